//! The real binary as an operator runs it: `kill -9` loses no acknowledged message; SIGTERM drains.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Api, Client, Recv};
use futures_util::future::join_all;
use serde_json::Value;

struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    async fn start(dir: &Path) -> Node {
        Self::start_logging(dir, "warn", Stdio::null()).await
    }

    /// Start with the log filter `log`, the log (tracing writes to stdout) going to `out`.
    async fn start_logging(dir: &Path, log: &str, out: Stdio) -> Node {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--data-dir",
                dir.to_str().unwrap(),
            ])
            .env("SWITCHBOARD_LOG", log)
            .stdout(out)
            .spawn()
            .expect("start switchboard");
        let node = Node { child, addr };
        common::wait_ready(addr).await;
        node
    }

    /// Start without waiting for `/readyz` (a node whose store failed never becomes ready): wait until it
    /// answers `/healthz`.
    async fn start_unready(dir: &Path, out: Stdio) -> Node {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
            .arg(dir)
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(out)
            .spawn()
            .expect("start switchboard");
        let mut node = Node { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("http://{addr}/healthz")).await {
                if r.status() == 200 {
                    return node;
                }
            }
            if let Some(status) = node.child.try_wait().unwrap() {
                panic!("the node exited instead of starting: {status}");
            }
            assert!(Instant::now() < deadline, "the node did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/readyz`: (status, reason).
    async fn readiness(&self) -> (u16, String) {
        let r = reqwest::get(format!("http://{}/readyz", self.addr))
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        (status, v["reason"].as_str().unwrap_or_default().to_owned())
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send pipelined (up to 32 unacknowledged) until the connection dies or `stop` passes; return acks.
async fn pump(
    addr: SocketAddr,
    token: String,
    conv: String,
    tag: String,
    stop: Instant,
) -> HashMap<String, (u64, String)> {
    let mut c = Client::connect(addr, &token).await;
    let mut acks = HashMap::new();
    let (mut sent, mut inflight) = (0u64, 0u64);
    loop {
        while inflight < 32 && Instant::now() < stop {
            let msg_id = format!("{tag}-{sent}");
            if futures_util::SinkExt::send(
                &mut c.ws,
                tokio_tungstenite::tungstenite::Message::Text(
                    serde_json::json!({"op":"send","conv":conv,"msg_id":msg_id,"body":"kill me"})
                        .to_string()
                        .into(),
                ),
            )
            .await
            .is_err()
            {
                return acks;
            }
            sent += 1;
            inflight += 1;
        }
        match c.recv_within(Duration::from_secs(5)).await {
            Some(Recv::Frame(f)) if f["op"] == "ack" => {
                inflight -= 1;
                acks.insert(
                    f["msg_id"].as_str().unwrap().to_owned(),
                    (
                        f["seq"].as_u64().unwrap(),
                        f["id"].as_str().unwrap().to_owned(),
                    ),
                );
            }
            Some(Recv::Frame(_)) => {}
            Some(Recv::Closed(_)) | None => return acks,
        }
    }
}

fn check_history(acks: &HashMap<String, (u64, String)>, history: &[Value]) {
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "history has no gap"
    );
    let stored: HashMap<&str, (u64, &str)> = history
        .iter()
        .map(|m| {
            (
                m["msg_id"].as_str().unwrap(),
                (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap()),
            )
        })
        .collect();
    for (msg_id, (seq, id)) in acks {
        assert_eq!(
            stored.get(msg_id.as_str()),
            Some(&(*seq, id.as_str())),
            "acked {msg_id} lost or changed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path()).await;
    let api = Api::new(node.addr);
    let names = ["alice", "bob", "carol", "dave"];
    let tokens = join_all(names.iter().map(|n| api.token(n))).await;
    let others: Vec<String> = names[1..].iter().map(|s| s.to_string()).collect();
    let convs = [
        api.group(&tokens[0], &others).await,
        api.group(&tokens[0], &others).await,
    ];

    // Four writers on two conversations, killed mid-stream.
    let stop = Instant::now() + Duration::from_secs(30);
    let writers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(pump(
                node.addr,
                tokens[i].clone(),
                convs[i % 2].clone(),
                format!("w{i}"),
                stop,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.signal("-KILL");
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let acks: Vec<_> = join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let total: usize = acks.iter().map(HashMap::len).sum();
    assert!(
        total > 100,
        "the test must kill a busy server (only {total} acks)"
    );

    let node = Node::start(dir.path()).await;
    let api = Api::new(node.addr);
    let token = api.token("alice").await;
    for (c, conv) in convs.iter().enumerate() {
        let history = api.all_messages(&token, conv).await;
        let mut conv_acks = HashMap::new();
        for (i, a) in acks.iter().enumerate() {
            if i % 2 == c {
                conv_acks.extend(a.clone());
            }
        }
        check_history(&conv_acks, &history);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_answers_accepted_sends_and_closes_with_1012() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path()).await;
    let api = Api::new(node.addr);
    let t = join_all(["alice", "bob"].iter().map(|n| api.token(n))).await;
    let conv = api.dm(&t[0], "bob").await;
    let mut alice = Client::connect(node.addr, &t[0]).await;
    let mut bob = Client::connect(node.addr, &t[1]).await;
    for i in 0..300 {
        alice.send_msg(&conv, &format!("t{i}"), "drain me").await;
    }
    node.signal("-TERM");

    let mut acks = HashMap::new();
    let code = loop {
        match alice.recv().await {
            Recv::Frame(f) if f["op"] == "ack" => {
                acks.insert(
                    f["msg_id"].as_str().unwrap().to_owned(),
                    (
                        f["seq"].as_u64().unwrap(),
                        f["id"].as_str().unwrap().to_owned(),
                    ),
                );
            }
            Recv::Frame(f) => panic!("unexpected frame during drain: {f}"),
            Recv::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(1012), "drain closes with 1012 (service restart)");
    assert_eq!(bob.closed().await, Some(1012));
    // Not ready any more: 503 while draining, or already gone.
    if let Ok(r) = reqwest::get(format!("http://{}/readyz", node.addr)).await {
        assert_eq!(r.status(), 503);
    }
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "a drained server exits 0, got {status}");

    let node = Node::start(dir.path()).await;
    let api = Api::new(node.addr);
    let history = api.all_messages(&api.token("alice").await, &conv).await;
    check_history(&acks, &history);
    // Sends that were answered are exactly the stored ones: nothing accepted went unanswered.
    assert_eq!(
        history.len(),
        acks.len(),
        "every stored send was acknowledged before the close"
    );
}

/// Tokens and message bodies never reach the log, even at the most verbose level: a real node's captured
/// log, after upgrades by query string and by header, refused tokens (tampered, at the upgrade and on
/// REST), sends over the socket and REST, malformed frames carrying a body, and an offline notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_bodies_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut node = Node::start_logging(&dir.path().join("data"), "trace", log.into()).await;
    let api = Api::new(node.addr);
    let t = join_all(["alice", "bob"].iter().map(|n| api.token(n))).await;
    let (alice_t, bob_t) = (&t[0], &t[1]);
    let conv = api.dm(alice_t, "bob").await;
    let group = api
        .group(alice_t, &["bob".to_owned(), "carol".to_owned()])
        .await;
    let secrets: Vec<String> = (0..6).map(|i| format!("BODY-SECRET-{i}-x7q")).collect();

    let mut alice = Client::connect(node.addr, alice_t).await;
    let mut bob = Client::connect_with_header(node.addr, bob_t).await;
    alice.send_msg(&conv, "m1", &secrets[0]).await;
    alice.expect_op("ack").await;
    assert_eq!(bob.expect_op("msg").await["body"], secrets[0].as_str());
    // Carol is offline: a notification is logged (debug) for her.
    alice.send_msg(&group, "m2", &secrets[1]).await;
    alice.expect_op("ack").await;
    alice
        .send_raw(&format!(r#"{{"op":"nope","body":"{}"}}"#, secrets[2]))
        .await;
    assert_eq!(alice.expect_op("error").await["code"], "unknown_op");
    alice
        .send_raw(&format!(r#"{{"op":"send","body":"{}""#, secrets[3]))
        .await;
    assert_eq!(alice.expect_op("error").await["code"], "invalid_json");
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conv}/messages"),
            bob_t,
            Some(serde_json::json!({"msg_id":"r1","body":secrets[4]})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conv}/messages"),
            bob_t,
            Some(serde_json::json!({"msg_id":"r2","body":secrets[5],"extra":[1,2]})),
        )
        .await;
    assert_eq!(status, 201);

    // Refused tokens: one signature character changed, and one claims part from another user.
    let mut tampered = alice_t.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let bob_parts: Vec<&str> = bob_t.split('.').collect();
    let alice_parts: Vec<&str> = alice_t.split('.').collect();
    let spliced = format!("{}.{}.{}", alice_parts[0], bob_parts[1], alice_parts[2]);
    for bad in [&tampered, &spliced] {
        assert!(Client::try_connect(node.addr, bad).await.is_err());
        let (status, _) = api
            .call(reqwest::Method::GET, "/v1/conversations", bad, None)
            .await;
        assert_eq!(status, 401);
    }
    alice.close().await;
    bob.close().await;
    node.signal("-TERM");
    assert!(node.wait_exit(Duration::from_secs(30)).success());

    let text = std::fs::read_to_string(&log_path).unwrap();
    // The capture works, at the level that says the most about these requests.
    for expected in [
        "websocket upgraded",
        "request refused",
        "offline notification",
    ] {
        assert!(text.contains(expected), "the log has {expected:?}");
    }
    let mut needles: Vec<(String, &str)> = Vec::new();
    for token in [alice_t, bob_t, &tampered, &spliced] {
        needles.push((token.clone(), "a token"));
        for part in token.split('.').skip(1) {
            needles.push((part.to_owned(), "part of a token"));
        }
    }
    for body in &secrets {
        needles.push((body.clone(), "a message body"));
    }
    for (needle, what) in &needles {
        if let Some(at) = text.find(needle.as_str()) {
            let line = text[..at].rsplit('\n').next().unwrap_or("");
            panic!("{what} in the log, in the line starting {line:?}");
        }
    }
}

/// A tmpfs of `size` mounted on a new directory (a disk that fills up), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the disk-full test mounts a tmpfs: it needs root (CAP_SYS_ADMIN), as CI has"
        );
        SmallDisk { dir }
    }

    fn grow(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount the tmpfs larger");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_says_why_and_loses_nothing_acknowledged() {
    let disk = SmallDisk::mount("100m");
    let data = disk.dir.path().join("data");
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut node = Node::start_logging(&data, "warn", log.into()).await;
    let api = Api::new(node.addr);
    let token = api.token("alice").await;
    let conv = api.group(&token, &[]).await;
    let mut alice = Client::connect(node.addr, &token).await;
    let body = "x".repeat(4000);
    // Fill the disk: ~10,000 messages of 4 KB go into the log and fjall before it is full.
    let mut acked = Vec::new();
    let refusal = loop {
        let n = acked.len();
        assert!(n < 40_000, "the disk never filled");
        alice.send_msg(&conv, &format!("m{n}"), &body).await;
        let f = alice.frame().await;
        match f["op"].as_str() {
            Some("ack") => acked.push(f["seq"].as_u64().unwrap()),
            _ => break f,
        }
    };
    assert_eq!(refusal["code"], "store_unavailable", "{refusal}");
    assert!(acked.len() > 1000, "{} acked", acked.len());
    // Every later send is refused the same way; the node stays up and says why.
    for i in 0..20 {
        alice.send_msg(&conv, &format!("after{i}"), "small").await;
        assert_eq!(alice.expect_op("error").await["code"], "store_unavailable");
    }
    let (status, reason) = node.readiness().await;
    assert_eq!(status, 503);
    assert!(
        reason.contains("No space left on device") && reason.contains("disk is full"),
        "{reason}"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(
        log.matches("stops taking writes").count(),
        1,
        "said once, not once per refused write:\n{log}"
    );

    // A restart on the still-full disk: the node comes up refusing, and says why, instead of exiting.
    node.signal("-KILL");
    node.wait_exit(Duration::from_secs(10));
    // Whether the replay still fits depends on where the disk filled (the log or fjall): either the node is
    // up and ready, or up, refusing, and saying why — never gone.
    let node = Node::start_unready(&data, Stdio::null()).await;
    let (status, reason) = node.readiness().await;
    if status == 200 {
        drop(node);
        disk.grow("400m");
        let node = Node::start(&data).await;
        let api = Api::new(node.addr);
        let seqs: Vec<u64> = api
            .all_messages(&token, &conv)
            .await
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs[..acked.len()],
            acked[..],
            "every acknowledged message, in order"
        );
        return;
    }
    assert_eq!(status, 503);
    assert!(
        reason.contains("could not open") && reason.contains("disk is full"),
        "{reason}"
    );
    let api = Api::new(node.addr);
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/conversations/{conv}/messages"),
            &token,
            Some(serde_json::json!({"msg_id":"rest-1","body":"hi"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    drop(node);

    // Space freed: the restart replays the log, and every acknowledged message is there once, in order.
    disk.grow("400m");
    let node = Node::start(&data).await;
    let api = Api::new(node.addr);
    let history = api.all_messages(&token, &conv).await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, acked, "exactly the acknowledged messages, in order");
    let mut alice = Client::connect(node.addr, &token).await;
    alice.send_msg(&conv, "after-restart", "hi").await;
    assert_eq!(alice.expect_op("ack").await["seq"], acked.len() as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_keeps_the_node_up_refusing_and_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data).await;
    let api = Api::new(node.addr);
    let token = api.token("alice").await;
    let conv = api.group(&token, &[]).await;
    let mut alice = Client::connect(node.addr, &token).await;
    for i in 0..50 {
        alice
            .send_msg(&conv, &format!("m{i}"), &format!("message {i}"))
            .await;
        alice.expect_op("ack").await;
    }
    node.signal("-KILL");
    node.wait_exit(Duration::from_secs(10));
    // fjall's files lost and a bit flipped in the middle of the newest log segment: the log must now
    // supply every message, and some of them are unreadable.
    std::fs::remove_dir_all(data.join("store")).unwrap();
    let segment = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("wal-0")
        })
        .max()
        .expect("a log segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let written = bytes.iter().rposition(|b| *b != 0).unwrap();
    bytes[written / 2] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();
    let node = Node::start_unready(&data, Stdio::null()).await;
    let (status, reason) = node.readiness().await;
    assert_eq!(status, 503);
    assert!(
        reason.contains("damaged")
            && reason.contains(segment.file_name().unwrap().to_str().unwrap()),
        "{reason}"
    );
    // Up, and refusing: every request gets store_unavailable, nothing is deleted.
    let api = Api::new(node.addr);
    let (status, v) = api.history(&token, &conv, "?after=0").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the damaged segment is left as it was"
    );
}
