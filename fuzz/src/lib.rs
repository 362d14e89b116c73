//! What the fuzz targets share: a scratch directory for the store's log files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PREFIX: &str = "switchboard-fuzz-";

/// A directory of this process's own, in memory when `/dev/shm` exists (the log `fdatasync`s every record;
/// on tmpfs that costs nothing). Each input overwrites the files of the one before; the directories of
/// processes that are gone are removed when the next one starts (libFuzzer exits without running
/// destructors).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
            if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}
