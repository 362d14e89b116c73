//! The store's background threads (the applier, fjall's flush and compaction workers) at idle priority.
//!
//! On Linux, a thread under `SCHED_IDLE` runs only on a core that no ordinary thread wants: a message's
//! path (connections, conversations, the store's writer) preempts it at once, and it still uses every idle
//! cycle. Lowering a thread's priority needs no privilege; raising it back would (`RLIMIT_NICE`), so these
//! threads stay idle for their whole life. See `docs/decisions/0012-background-store-work-at-idle-priority.md`.

/// Start a thread named `name` that runs `f` at idle priority ([`become_idle`]): every background thread
/// of the store starts here.
pub(super) fn spawn_idle<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let role = name.to_owned();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            become_idle(&role);
            f()
        })
}

/// Put the calling thread under `SCHED_IDLE`; the threads it starts from now on inherit it. Elsewhere than
/// Linux, or when the system refuses (a seccomp profile, say), it logs why and leaves the priority as it
/// is: the store works the same, only with a longer latency tail while it writes in the background.
fn become_idle(role: &str) {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 names the calling thread, and `param` is a valid `sched_param` for the call's length.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::warn!(
                thread = role,
                error = %std::io::Error::last_os_error(),
                "could not run the store's background work at idle priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!(
        thread = role,
        "idle priority is Linux-only: the store's background work runs at normal priority"
    );
}

#[cfg(all(test, target_os = "linux"))]
pub(super) mod tests {
    /// The scheduling policy (`/proc/<pid>/task/<tid>/stat`, field 41) of each of this process's threads
    /// named `name`.
    pub(crate) fn policies_of_threads_named(name: &str) -> Vec<u32> {
        let mut policies = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
                continue; // the thread ended meanwhile
            };
            let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
            if &stat[open + 1..close] != name {
                continue;
            }
            // After the name come fields 3, 4, …: the policy is field 41.
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            policies.push(fields[41 - 3].parse().unwrap());
        }
        policies
    }

    #[test]
    fn a_thread_becomes_idle_and_the_threads_it_starts_inherit_it() {
        let policies = std::thread::Builder::new()
            .name("sb-test-idle".into())
            .spawn(|| {
                super::become_idle("test");
                std::thread::Builder::new()
                    .name("sb-test-child".into())
                    .spawn(|| {
                        (
                            policies_of_threads_named("sb-test-idle"),
                            policies_of_threads_named("sb-test-child"),
                        )
                    })
                    .unwrap()
                    .join()
                    .unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        let idle = libc::SCHED_IDLE as u32;
        assert_eq!(policies, (vec![idle], vec![idle]));
    }
}
