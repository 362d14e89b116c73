//! The browser client in a real browser: `tests/browser/chat.mjs` drives Debian's Chromium through
//! Playwright (`playwright-core`) against the real binary, which this test starts, kills with `kill -9` and
//! restarts (same data directory, same port) when the script asks, over a line protocol on its stdin and
//! stdout (`@@ kill` → `killed`, `@@ start` → `started`).
//!
//! It needs Node.js, Chromium (`/usr/bin/chromium`, or `SWITCHBOARD_CHROMIUM`) and `npm ci` in
//! `tests/browser`; `scripts/test` installs all three. Without them the test fails: it never skips.
//! Screenshots go to `target/browser-artifacts/`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const ADMIN_TOKEN: &str = "browser-test-admin-token";
/// The whole browser run, restarts included; it takes about a minute.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The real binary on a fixed address and data directory, so a restart is the same node to the pages.
struct Node {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Node {
    async fn start(addr: SocketAddr, dir: &Path) -> Node {
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
            .arg(dir)
            .args(["--admin-token", ADMIN_TOKEN, "--node-name", "browser-n1"])
            // Offline shows 1 s after the last device goes, not 5: the test waits for it.
            .args(["--presence-grace-secs", "1"])
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start switchboard");
        let node = Node {
            child: Some(child),
            addr,
            dir: dir.to_owned(),
        };
        common::wait_ready(addr).await;
        node
    }

    /// `kill -9`, and wait until the process is gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().expect("kill -9");
        let status = child.wait().await.expect("wait");
        assert!(!status.success(), "killed, not exited: {status}");
    }

    async fn restart(&mut self) {
        let dir = self.dir.clone();
        *self = Node::start(self.addr, &dir).await;
    }
}

/// Panic (fail, not skip) with what to install when a tool the browser test needs is missing.
fn require(ok: bool, what: &str) {
    assert!(
        ok,
        "the browser test needs {what}; scripts/test installs it (see the README)"
    );
}

fn chromium() -> PathBuf {
    std::env::var_os("SWITCHBOARD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_real_browser_survives_kill_9() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require(node_ok, "Node.js (`node`; apt-get install nodejs npm)");
    require(
        chromium().exists(),
        "Chromium at /usr/bin/chromium or $SWITCHBOARD_CHROMIUM (apt-get install chromium)",
    );
    require(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core (`npm ci` in tests/browser)",
    );
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut node = Node::start(addr, dir.path()).await;

    let mut script = Command::new("node")
        .arg(browser_dir.join("chat.mjs"))
        .current_dir(&browser_dir)
        .env("SB_URL", format!("http://{addr}"))
        .env("SB_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SB_NODE_NAME", "browser-n1")
        .env("SB_ARTIFACTS", &artifacts)
        .env("SB_CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node tests/browser/chat.mjs");
    let mut to_script = script.stdin.take().unwrap();
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut output = Vec::new();
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the browser run took over {RUN_LIMIT:?}:\n{}",
                    output.join("\n")
                )
            })
            .expect("read the script's output");
        let Some(line) = line else { break };
        println!("{line}");
        match line.trim() {
            "@@ kill" => {
                node.kill().await;
                to_script.write_all(b"killed\n").await.unwrap();
            }
            "@@ start" => {
                node.restart().await;
                to_script.write_all(b"started\n").await.unwrap();
            }
            _ => output.push(line),
        }
    }
    let status = script.wait().await.unwrap();
    let output = output.join("\n");
    assert!(
        status.success(),
        "the browser run failed ({status}):\n{output}"
    );
    assert!(
        output.lines().any(|l| l.ends_with(" passed, 0 failed")),
        "the browser run did not report its steps:\n{output}"
    );
}
