//! Three real nodes on 127.0.0.1–3 sharing one Cassandra keyspace and one Redis, as an operator runs them:
//! the cluster forms and reports itself, delivery crosses nodes, `kill -9` and drains under load lose and
//! duplicate nothing, a rolling restart loses nothing, a Redis outage keeps delivery going, a dead node is
//! forgotten in Redis.
//!
//! Each test starts its own `redis-server` and three `switchboard serve` processes. The tests of this file
//! take turns ([`SERIAL`]): three nodes under load plus Cassandra already fill two cores, and the timings
//! asserted here (re-homing, drain) mean nothing on a machine running two clusters at once.
//!
//! Node logs go to files: `SWITCHBOARD_TEST_NODE_LOG` sets their level (default `warn`), and
//! `SWITCHBOARD_TEST_LOG_DIR` keeps them (else they live in a temporary directory). A failing test prints
//! the end of every node's log.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::receiver::{Receiver, Reply};
use common::{cassandra_url, Api, Client};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard_cluster::placement;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// One test of this file at a time (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COOKIE: &str = "cluster-test-cookie";
const JWT_SECRET: &str = "cluster-test-jwt-secret";
/// Test certificates for mutual TLS between nodes (see its README).
const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cluster-tls");
/// How long a cluster may take to see all its nodes up.
const FORM_WITHIN: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` free ports on `ip`, bound together so that they differ.
fn free_addrs(ip: &str, n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Poll `probe` until it gives `Ok`, or fail after `within` with its last `Err`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` of this test on a free port, killed on drop.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    async fn start(dir: &Path) -> Redis {
        let port = free_addrs("127.0.0.1", 1)[0].port();
        let mut redis = Redis {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    /// Start (again) on the same port, empty.
    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test installs it)");
        self.child = Some(child);
        eventually("redis answers PING", Duration::from_secs(10), || async {
            match self.cmd(&["PING"]).await {
                Some(lines) if lines == ["PONG"] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command through `redis-cli`; its reply lines, or `None` when Redis cannot be reached.
    async fn cmd(&self, args: &[&str]) -> Option<Vec<String>> {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .await
            .expect("run redis-cli");
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.starts_with("Could not connect") {
            return None;
        }
        Some(
            text.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// The members of `sb:user:{user}` (`{node}/{conn}`).
    async fn user_entries(&self, user: &str) -> Vec<String> {
        self.cmd(&["ZRANGE", &format!("sb:user:{user}"), "0", "-1"])
            .await
            .unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Nodes and the cluster

/// One `switchboard serve` process: its name, addresses and data directory stay across restarts.
struct Node {
    name: String,
    http: SocketAddr,
    cluster: SocketAddr,
    dir: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
    /// Mutual TLS between nodes: the base name of this node's certificate and key in `TLS_DIR`.
    tls: Option<&'static str>,
}

impl Node {
    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Redis and three nodes n1, n2, n3 on 127.0.0.1, .2 and .3, one fresh Cassandra keyspace.
struct Cluster {
    redis: Redis,
    nodes: Vec<Node>,
    store: String,
    http: reqwest::Client,
    logs: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// Environment every node is started with, beyond the harness's own settings.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Start redis and n1 (which creates the keyspace), then n2 and n3; wait until every node sees all three up.
    async fn start(label: &str) -> Cluster {
        Self::start_with(label, None, Vec::new()).await
    }

    /// [`Self::start`], with every node on mutual TLS with certificate `tls` (of `TLS_DIR`) if given.
    /// … and with `env` in every node's environment.
    async fn start_with(
        label: &str,
        tls: Option<&'static str>,
        env: Vec<(String, String)>,
    ) -> Cluster {
        let (logs, tmp) = match std::env::var_os("SWITCHBOARD_TEST_LOG_DIR") {
            Some(base) => {
                let dir = PathBuf::from(base).join(format!(
                    "{label}-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ));
                std::fs::create_dir_all(&dir).unwrap();
                (dir, None)
            }
            None => {
                let tmp = tempfile::tempdir().unwrap();
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let redis = Redis::start(&logs).await;
        let nodes = (1..=3)
            .map(|k| {
                let addrs = free_addrs(&format!("127.0.0.{k}"), 2);
                Node {
                    name: format!("n{k}"),
                    http: addrs[0],
                    cluster: addrs[1],
                    dir: tempfile::tempdir().unwrap(),
                    log: logs.join(format!("n{k}.log")),
                    child: None,
                    tls,
                }
            })
            .collect();
        let mut cluster = Cluster {
            redis,
            nodes,
            store: cassandra_url(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            logs,
            _tmp: tmp,
            env,
        };
        // One node creates the keyspace and tables before the others open them.
        cluster.spawn(0);
        cluster.wait_healthy(0, Duration::from_secs(60)).await;
        cluster.spawn(1);
        cluster.spawn(2);
        cluster.wait_healthy(1, Duration::from_secs(30)).await;
        cluster.wait_healthy(2, Duration::from_secs(30)).await;
        cluster.wait_formed(&[0, 1, 2]).await;
        cluster
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.http).collect()
    }

    fn api(&self, i: usize) -> Api {
        Api::new(self.nodes[i].http)
    }

    fn spawn(&mut self, i: usize) {
        let seeds = self
            .nodes
            .iter()
            .map(|n| n.cluster.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let level = std::env::var("SWITCHBOARD_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into());
        let redis = self.redis.url();
        let env = self.env.clone();
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let tls: Vec<String> = node.tls.map_or_else(Vec::new, |cert| {
            vec![
                "--cluster-tls-cert".into(),
                format!("{TLS_DIR}/{cert}.pem"),
                "--cluster-tls-key".into(),
                format!("{TLS_DIR}/{cert}.key"),
                "--cluster-tls-ca".into(),
                format!("{TLS_DIR}/ca.pem"),
            ]
        });
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .args(&tls)
            .args(["--listen", &node.http.to_string()])
            .args(["--data-dir", node.dir.path().to_str().unwrap()])
            .args(["--node-name", &node.name])
            .args(["--cluster-listen", &node.cluster.to_string()])
            .args(["--seeds", &seeds, "--cookie", COOKIE, "--redis", &redis])
            .args(["--store", &self.store, "--jwt-secret", JWT_SECRET])
            .args(["--dev-login", "true", "--drain-window-secs", "1"])
            .args(["--presence-grace-secs", "1"])
            .args(["--registry-heartbeat-secs", "1", "--registry-ttl-secs", "5"])
            .env("SWITCHBOARD_LOG", level)
            .envs(env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start switchboard");
        node.child = Some(child);
    }

    /// `GET` a JSON route of node `i`: status and body, `None` when the node does not answer.
    async fn get(&self, i: usize, path: &str) -> Option<(u16, Value)> {
        let r = self
            .http
            .get(format!("http://{}{path}", self.nodes[i].http))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let text = r.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Wait for node `i` to answer `/healthz`; fail at once if it exits (its log says why).
    async fn wait_healthy(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some((200, _)) = self.get(i, "/healthz").await {
                return;
            }
            let node = &mut self.nodes[i];
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                node.child = None;
                panic!("{} exited while starting: {status}", node.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer /healthz within {within:?}",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/v1/cluster` of node `i`: node name → state.
    async fn states(&self, i: usize) -> Option<BTreeMap<String, String>> {
        let (status, v) = self.get(i, "/v1/cluster").await?;
        if status != 200 {
            return None;
        }
        Some(
            v["nodes"]
                .as_array()?
                .iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("?").to_owned(),
                        n["state"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect(),
        )
    }

    /// Every node of `live` lists exactly the nodes of `live` as `up`.
    async fn wait_formed(&self, live: &[usize]) {
        let want: BTreeSet<String> = live.iter().map(|&i| self.nodes[i].name.clone()).collect();
        eventually("every node sees the cluster up", FORM_WITHIN, || async {
            let mut seen = Vec::new();
            for &i in live {
                let states = self.states(i).await;
                let up: BTreeSet<String> = states
                    .iter()
                    .flatten()
                    .filter(|(_, s)| *s == "up")
                    .map(|(n, _)| n.clone())
                    .collect();
                if up != want {
                    seen.push(format!("{}: {states:?}", self.nodes[i].name));
                }
            }
            if seen.is_empty() {
                Ok(())
            } else {
                Err(seen.join("; "))
            }
        })
        .await;
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i].child.as_ref().expect("node running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.nodes[i].name);
    }

    async fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.nodes[i].child.as_mut().expect("node running");
            if let Some(status) = child.try_wait().unwrap() {
                self.nodes[i].child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` node `i`; returns when it was killed.
    async fn kill9(&mut self, i: usize) -> Instant {
        let at = Instant::now();
        self.signal(i, "-KILL");
        let status = self.wait_exit(i, Duration::from_secs(5)).await;
        assert!(!status.success());
        at
    }

    /// Start node `i` again with its name, ports and data directory.
    async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i, Duration::from_secs(30)).await;
    }

    /// Sum of a Prometheus metric's samples on node `i` whose line contains `filter`.
    async fn metric(&self, i: usize, name: &str, filter: &str) -> f64 {
        let Some((200, Value::String(text))) = self.get(i, "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
                    && l.contains(filter)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Start a device for each user of `setup`, user `j` on node `j % 3`, and wait until all are connected.
    async fn devices(&self, setup: &Setup) -> Vec<Device> {
        let devices: Vec<Device> = setup
            .users
            .iter()
            .enumerate()
            .map(|(j, user)| {
                let convs: Vec<String> = setup
                    .convs
                    .iter()
                    .filter(|c| c.members.contains(user))
                    .map(|c| c.id.clone())
                    .collect();
                Device::start(user, &setup.tokens[user], self.addrs(), j % 3, &convs)
            })
            .collect();
        for (j, d) in devices.iter().enumerate() {
            let node = d.wait_connected().await;
            assert_eq!(node, j % 3, "{} connected to its home node", d.user);
        }
        devices
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_now();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                println!("---- last lines of {} ({})", n.name, n.log.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    println!("{l}");
                }
            }
            println!("node logs: {}", self.logs.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A device that follows the cluster

/// What a [`Device`]'s task is asked to do.
enum Cmd {
    /// Send this pending message (unless the current connection already has).
    Send(String),
    /// Close the connection and stop.
    Close,
}

/// A send not acked yet.
struct Pending {
    order: u64,
    conv: String,
    body: String,
    first_sent: Instant,
    sent_at: Instant,
    /// The connection (generation) it was last sent on; 0: never sent.
    generation: u64,
    /// Resend at this time (after a retryable error).
    retry_at: Option<Instant>,
}

struct Acked {
    conv: String,
    seq: u64,
    id: String,
    at: Instant,
    first_sent: Instant,
}

/// A message as the device knows it.
struct Seen {
    id: String,
    msg_id: String,
    from: String,
}

/// One conversation as the device sees it.
#[derive(Default)]
struct ConvView {
    seen: BTreeMap<u64, Seen>,
    /// `msg` frames received per seq (live or replayed).
    frames: BTreeMap<u64, usize>,
    /// Seqs of `msg` frames in arrival order.
    order: Vec<u64>,
    /// Every seq up to this one is known.
    contiguous: u64,
    syncing: Option<Instant>,
    needs_sync: bool,
    gap_since: Option<Instant>,
    /// `msg` frames for a seq already known.
    duplicates: usize,
    /// Messages first learned while a sync was outstanding.
    learned_in_sync: usize,
}

/// A close the device saw.
struct Closed {
    node: usize,
    code: Option<u16>,
    at: Instant,
}

/// Everything a device knows; the test reads it, the device's task writes it.
#[derive(Default)]
struct DeviceState {
    user: String,
    node: Option<usize>,
    generation: u64,
    next: u64,
    convs: BTreeMap<String, ConvView>,
    pending: HashMap<String, Pending>,
    /// Every msg_id sent, with its conversation.
    sent: HashMap<String, String>,
    acks: HashMap<String, Acked>,
    connects: Vec<(usize, Instant)>,
    closes: Vec<Closed>,
    syncs_sent: usize,
    resends: usize,
    errors: BTreeMap<String, usize>,
    /// Protocol violations seen (the test asserts there are none).
    problems: Vec<String>,
}

/// Resend a send with no answer after this long (the server waits 10 s per attempt).
const RESEND_AFTER: Duration = Duration::from_secs(10);
/// A gap in seqs that lasts this long is filled with a sync (an `ack` can overtake a `msg`).
const GAP_PATIENCE: Duration = Duration::from_millis(300);
/// Re-issue a sync with no `synced` after this long.
const SYNC_PATIENCE: Duration = Duration::from_secs(10);

fn send_frame(msg_id: &str, p: &Pending) -> Value {
    json!({"op":"send","conv":p.conv,"msg_id":msg_id,"body":p.body})
}

impl DeviceState {
    fn sync(&mut self, conv: &str, after: u64, now: Instant) -> Value {
        let view = self.convs.get_mut(conv).expect("tracked conversation");
        view.syncing = Some(now);
        view.needs_sync = false;
        self.syncs_sent += 1;
        json!({"op":"sync","conv":conv,"after_seq":after})
    }

    /// A new connection: sync every conversation (but on the first one) and resend every pending send.
    fn on_open(&mut self, node: usize, now: Instant) -> Vec<Value> {
        let first = self.connects.is_empty();
        self.node = Some(node);
        self.connects.push((node, now));
        self.generation += 1;
        let mut out = Vec::new();
        if !first {
            let convs: Vec<(String, u64)> = self
                .convs
                .iter()
                .map(|(c, v)| (c.clone(), v.contiguous))
                .collect();
            for (conv, after) in convs {
                out.push(self.sync(&conv, after, now));
            }
        }
        let mut pending: Vec<(&String, &mut Pending)> = self.pending.iter_mut().collect();
        pending.sort_by_key(|(_, p)| p.order);
        for (msg_id, p) in pending {
            p.generation = self.generation;
            p.sent_at = now;
            p.retry_at = None;
            out.push(send_frame(msg_id, p));
            self.resends += 1;
        }
        out
    }

    fn on_close(&mut self, node: usize, code: Option<u16>, at: Instant) {
        self.node = None;
        self.closes.push(Closed { node, code, at });
        for view in self.convs.values_mut() {
            view.syncing = None;
        }
    }

    /// The frame for a new send, unless this connection already sent it (on open) or it was acked.
    fn send_now(&mut self, msg_id: &str, now: Instant) -> Option<Value> {
        let generation = self.generation;
        let p = self.pending.get_mut(msg_id)?;
        if p.generation == generation {
            return None;
        }
        p.generation = generation;
        p.sent_at = now;
        Some(send_frame(msg_id, p))
    }

    /// Apply one server frame; returns the frames to send in answer.
    fn handle(&mut self, f: Value, now: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        match f["op"].as_str() {
            Some("ack") => self.on_ack(&f, now),
            Some("msg") => self.on_msg(&f, now),
            Some("synced") => {
                let conv = f["conv"].as_str().unwrap_or_default().to_owned();
                match self.convs.get_mut(&conv) {
                    Some(view) => {
                        view.syncing = None;
                        if f["has_more"] == true {
                            let after = f["last_seq"].as_u64().unwrap_or(view.contiguous);
                            out.push(self.sync(&conv, after, now));
                        }
                    }
                    None => self.problems.push(format!("synced for unknown conv: {f}")),
                }
            }
            Some("error") => self.on_error(&f, now),
            // Contacts come and go as devices reconnect across nodes.
            Some("pong" | "presence") => {}
            _ => self.problems.push(format!("unexpected frame: {f}")),
        }
        out
    }

    /// Record message `seq` of `conv`; whether it was new.
    fn learn(&mut self, conv: &str, seq: u64, seen: Seen, now: Instant) -> bool {
        let Some(view) = self.convs.get_mut(conv) else {
            self.problems
                .push(format!("message for a conversation not tracked: {conv}"));
            return false;
        };
        if let Some(known) = view.seen.get(&seq) {
            if known.id != seen.id {
                self.problems.push(format!(
                    "{conv} seq {seq} is both {} ({}) and {} ({})",
                    known.id, known.msg_id, seen.id, seen.msg_id
                ));
            }
            return false;
        }
        view.seen.insert(seq, seen);
        while view.seen.contains_key(&(view.contiguous + 1)) {
            view.contiguous += 1;
        }
        let last = view.seen.keys().next_back().copied().unwrap_or(0);
        if last > view.contiguous {
            view.gap_since.get_or_insert(now);
        } else {
            view.gap_since = None;
        }
        true
    }

    fn on_ack(&mut self, f: &Value, now: Instant) {
        let (Some(msg_id), Some(conv), Some(seq), Some(id)) = (
            f["msg_id"].as_str(),
            f["conv"].as_str(),
            f["seq"].as_u64(),
            f["id"].as_str(),
        ) else {
            self.problems.push(format!("malformed ack: {f}"));
            return;
        };
        let earlier = self.acks.get(msg_id).map(|a| (a.seq, a.id.clone()));
        match (self.pending.remove(msg_id), earlier) {
            (_, Some((earlier_seq, earlier_id))) => {
                // A resend answered after the original: dedupe must give the original seq and id.
                if (earlier_seq, earlier_id.as_str()) != (seq, id) {
                    self.problems.push(format!(
                        "{msg_id} acked as seq {earlier_seq} and as seq {seq}"
                    ));
                }
            }
            (Some(p), None) => {
                if p.conv != conv {
                    self.problems
                        .push(format!("{msg_id} sent to {} acked for {conv}", p.conv));
                }
                self.acks.insert(
                    msg_id.to_owned(),
                    Acked {
                        conv: conv.to_owned(),
                        seq,
                        id: id.to_owned(),
                        at: now,
                        first_sent: p.first_sent,
                    },
                );
            }
            (None, None) => self
                .problems
                .push(format!("ack of a message never sent: {f}")),
        }
        let seen = Seen {
            id: id.to_owned(),
            msg_id: msg_id.to_owned(),
            from: self.user.clone(),
        };
        self.learn(conv, seq, seen, now);
    }

    fn on_msg(&mut self, f: &Value, now: Instant) {
        let (Some(conv), Some(seq), Some(id), Some(msg_id), Some(from)) = (
            f["conv"].as_str(),
            f["seq"].as_u64(),
            f["id"].as_str(),
            f["msg_id"].as_str(),
            f["from"].as_str(),
        ) else {
            self.problems.push(format!("malformed msg: {f}"));
            return;
        };
        let seen = Seen {
            id: id.to_owned(),
            msg_id: msg_id.to_owned(),
            from: from.to_owned(),
        };
        let new = self.learn(conv, seq, seen, now);
        if let Some(view) = self.convs.get_mut(conv) {
            *view.frames.entry(seq).or_default() += 1;
            view.order.push(seq);
            if !new {
                view.duplicates += 1;
            } else if view.syncing.is_some() {
                view.learned_in_sync += 1;
            }
        }
    }

    fn on_error(&mut self, f: &Value, now: Instant) {
        let code = f["code"].as_str().unwrap_or("?").to_owned();
        *self.errors.entry(code.clone()).or_default() += 1;
        let retryable = matches!(
            code.as_str(),
            "rate_limited" | "store_unavailable" | "internal" | "unavailable"
        );
        match f["msg_id"].as_str() {
            // An error for a send answered meanwhile (a resend raced its original): nothing to do.
            Some(msg_id) if !self.pending.contains_key(msg_id) => {}
            Some(msg_id) if retryable => {
                let wait = f["retry_after_ms"].as_u64().unwrap_or(200);
                let p = self.pending.get_mut(msg_id).expect("pending");
                p.retry_at = Some(now + Duration::from_millis(wait));
            }
            Some(msg_id) => {
                self.pending.remove(msg_id);
                self.problems.push(format!("send refused for good: {f}"));
            }
            // A sync's error names no conversation: retry every outstanding sync.
            None if retryable => {
                for view in self.convs.values_mut() {
                    if view.syncing.take().is_some() {
                        view.needs_sync = true;
                    }
                }
            }
            None => self.problems.push(format!("sync refused: {f}")),
        }
    }

    /// Retries that are due: sends after an error or a silence, syncs for gaps and lost syncs.
    fn due(&mut self, now: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        let generation = self.generation;
        let mut pending: Vec<(&String, &mut Pending)> = self.pending.iter_mut().collect();
        pending.sort_by_key(|(_, p)| p.order);
        for (msg_id, p) in pending {
            let due = match p.retry_at {
                Some(at) => at <= now,
                None => p.generation != 0 && now.duration_since(p.sent_at) > RESEND_AFTER,
            };
            if due {
                p.retry_at = None;
                p.sent_at = now;
                p.generation = generation;
                out.push(send_frame(msg_id, p));
                self.resends += 1;
            }
        }
        let wanted: Vec<(String, u64)> = self
            .convs
            .iter()
            .filter(|(_, v)| match v.syncing {
                Some(at) => now.duration_since(at) > SYNC_PATIENCE,
                None => {
                    v.needs_sync
                        || v.gap_since
                            .is_some_and(|at| now.duration_since(at) > GAP_PATIENCE)
                }
            })
            .map(|(c, v)| (c.clone(), v.contiguous))
            .collect();
        for (conv, after) in wanted {
            out.push(self.sync(&conv, after, now));
        }
        out
    }
}

/// A user's device: one WebSocket to some node of the cluster, reconnecting to another node when its
/// connection closes (1012, reset, …), then syncing its conversations from the last seq it holds and
/// resending its unacked sends with the same msg_id (the client algorithm of docs/protocol.md §10).
#[derive(Clone)]
struct Device {
    user: String,
    state: Arc<Mutex<DeviceState>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Device {
    /// Connect to `addrs[home]` first; track `convs`.
    fn start(
        user: &str,
        token: &str,
        addrs: Vec<SocketAddr>,
        home: usize,
        convs: &[String],
    ) -> Device {
        let mut state = DeviceState {
            user: user.to_owned(),
            ..DeviceState::default()
        };
        for c in convs {
            state.convs.insert(c.clone(), ConvView::default());
        }
        let state = Arc::new(Mutex::new(state));
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_device(token.to_owned(), addrs, home, state.clone(), rx));
        Device {
            user: user.to_owned(),
            state,
            cmds,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut DeviceState) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// Queue a new message to `conv`; returns its msg_id.
    fn send(&self, conv: &str) -> String {
        let now = Instant::now();
        let msg_id = self.with(|s| {
            s.next += 1;
            let msg_id = format!("{}-{}", s.user, s.next);
            s.pending.insert(
                msg_id.clone(),
                Pending {
                    order: s.next,
                    conv: conv.to_owned(),
                    body: format!("{} says {}", s.user, s.next),
                    first_sent: now,
                    sent_at: now,
                    generation: 0,
                    retry_at: None,
                },
            );
            s.sent.insert(msg_id.clone(), conv.to_owned());
            msg_id
        });
        let _ = self.cmds.send(Cmd::Send(msg_id.clone()));
        msg_id
    }

    fn node(&self) -> Option<usize> {
        self.with(|s| s.node)
    }

    fn unacked(&self) -> usize {
        self.with(|s| s.pending.len())
    }

    async fn wait_connected(&self) -> usize {
        let what = format!("{} connects", self.user);
        eventually(&what, Duration::from_secs(10), || async {
            self.node().ok_or_else(|| "not connected".to_owned())
        })
        .await
    }

    async fn close(&self) {
        let _ = self.cmds.send(Cmd::Close);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

async fn send_all(ws: &mut Ws, frames: Vec<Value>) -> bool {
    for f in frames {
        if ws
            .feed(WsMessage::Text(f.to_string().into()))
            .await
            .is_err()
        {
            return false;
        }
    }
    ws.flush().await.is_ok()
}

/// Connect to the first node that takes the connection, trying `start` first, then the next ones;
/// `None` when asked to close meanwhile or when no node took it within 30 s.
async fn connect_any(
    addrs: &[SocketAddr],
    start: usize,
    token: &str,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    state: &Mutex<DeviceState>,
) -> Option<(usize, Ws)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Duration::from_millis(50);
    loop {
        for k in 0..addrs.len() {
            let node = (start + k) % addrs.len();
            let attempt = Client::try_connect(addrs[node], token);
            if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
                return Some((node, client.ws));
            }
            // Sends wait in `pending` for the next connection; a close ends the device.
            loop {
                match cmds.try_recv() {
                    Ok(Cmd::Send(_)) => continue,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Ok(Cmd::Close) | Err(mpsc::error::TryRecvError::Disconnected) => return None,
                }
            }
        }
        if Instant::now() > deadline {
            lock(state)
                .problems
                .push("no node took a connection for 30 s".into());
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

async fn run_device(
    token: String,
    addrs: Vec<SocketAddr>,
    home: usize,
    state: Arc<Mutex<DeviceState>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut target = home;
    loop {
        let Some((node, mut ws)) = connect_any(&addrs, target, &token, &mut cmds, &state).await
        else {
            return;
        };
        let opening = lock(&state).on_open(node, Instant::now());
        let mut alive = send_all(&mut ws, opening).await;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let code = loop {
            if !alive {
                break None;
            }
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Send(msg_id)) => {
                        let frame = lock(&state).send_now(&msg_id, Instant::now());
                        alive = send_all(&mut ws, frame.into_iter().collect()).await;
                    }
                    Some(Cmd::Close) | None => {
                        let _ = ws.close(None).await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        lock(&state).node = None;
                        return;
                    }
                },
                next = ws.next() => match next {
                    Some(Ok(WsMessage::Text(text))) => {
                        let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        let out = lock(&state).handle(frame, Instant::now());
                        alive = send_all(&mut ws, out).await;
                    }
                    Some(Ok(WsMessage::Close(close))) => break close.map(|c| u16::from(c.code)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                },
                _ = tick.tick() => {
                    let out = lock(&state).due(Instant::now());
                    alive = send_all(&mut ws, out).await;
                }
            }
        };
        lock(&state).on_close(node, code, Instant::now());
        target = (node + 1) % addrs.len();
    }
}

async fn close_all(devices: &[Device]) {
    for d in devices {
        d.close().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Conversations, load and the no-loss check

struct Conv {
    id: String,
    members: Vec<String>,
}

/// Users, their tokens and their conversations.
struct Setup {
    users: Vec<String>,
    tokens: HashMap<String, String>,
    convs: Vec<Conv>,
}

impl Setup {
    /// Create `groups` and `dms` (indexes into `users`); with `balance`, add groups until every node owns at
    /// least two conversations.
    async fn build(
        api: &Api,
        users: &[&str],
        groups: &[&[usize]],
        dms: &[(usize, usize)],
        balance: bool,
    ) -> Setup {
        let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        let mut tokens = HashMap::new();
        for u in &users {
            tokens.insert(u.clone(), api.token(u).await);
        }
        let mut setup = Setup {
            users,
            tokens,
            convs: Vec::new(),
        };
        for g in groups {
            setup.group(api, g).await;
        }
        for &(a, b) in dms {
            let id = api
                .dm(&setup.tokens[&setup.users[a]], &setup.users[b])
                .await;
            let members = vec![setup.users[a].clone(), setup.users[b].clone()];
            setup.convs.push(Conv { id, members });
        }
        let mut extra = 0;
        while balance && setup.owned().values().any(|c| c.len() < 2) {
            assert!(
                extra < 30,
                "placement never gave every node two conversations"
            );
            let n = setup.users.len();
            setup
                .group(api, &[extra % n, (extra + 1) % n, (extra + 3) % n])
                .await;
            extra += 1;
        }
        setup
    }

    async fn group(&mut self, api: &Api, members: &[usize]) {
        let creator = &self.users[members[0]];
        let others: Vec<String> = members[1..]
            .iter()
            .map(|&m| self.users[m].clone())
            .collect();
        let id = api.group(&self.tokens[creator], &others).await;
        let members = members.iter().map(|&m| self.users[m].clone()).collect();
        self.convs.push(Conv { id, members });
    }

    /// Six users u0..u5 (two per node), five groups and six DMs, balanced over the nodes.
    async fn six_users(api: &Api) -> Setup {
        let groups: [&[usize]; 5] = [
            &[0, 1, 2, 3, 4, 5],
            &[0, 1, 2],
            &[3, 4, 5],
            &[0, 2, 4],
            &[1, 3, 5],
        ];
        let dms = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0)];
        let users = ["u0", "u1", "u2", "u3", "u4", "u5"];
        Setup::build(api, &users, &groups, &dms, true).await
    }

    /// Node name → the conversations it owns while all three nodes are up.
    fn owned(&self) -> BTreeMap<String, Vec<String>> {
        let nodes = ["n1", "n2", "n3"];
        let mut owned: BTreeMap<String, Vec<String>> =
            nodes.iter().map(|n| (n.to_string(), Vec::new())).collect();
        for c in &self.convs {
            let owner = placement::owner(&c.id, &nodes).expect("nodes");
            owned.get_mut(*owner).unwrap().push(c.id.clone());
        }
        owned
    }

    fn convs_of(&self, user: &str) -> Vec<String> {
        self.convs
            .iter()
            .filter(|c| c.members.iter().any(|m| m == user))
            .map(|c| c.id.clone())
            .collect()
    }
}

/// Every device sends to its conversations in turn, one message per `every`, at most `window` unacked.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(devices: &[Device], setup: &Setup, every: Duration, window: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = devices
            .iter()
            .map(|d| {
                let (d, stop) = (d.clone(), stop.clone());
                let convs = setup.convs_of(&d.user);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        if d.unacked() < window {
                            d.send(&convs[i % convs.len()]);
                            i += 1;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// What [`check_no_loss`] counted.
#[derive(Debug, Default)]
struct Report {
    messages: usize,
    acked: usize,
    duplicates: usize,
    learned_in_sync: usize,
    syncs: usize,
    resends: usize,
    errors: BTreeMap<String, usize>,
}

/// Wait until every send is acked, then, per conversation: the history (REST, node `api`) has seqs 1..N
/// with no gap; it holds exactly the messages sent, each once; every ack names the stored seq and id; and
/// every member's device has seen exactly the history (by seq, after dedupe).
async fn check_no_loss(api: &Api, setup: &Setup, devices: &[Device]) -> Report {
    eventually("every send is acked", Duration::from_secs(30), || async {
        let left: Vec<(String, usize)> = devices
            .iter()
            .map(|d| (d.user.clone(), d.unacked()))
            .filter(|(_, n)| *n > 0)
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("unacked: {left:?}"))
        }
    })
    .await;
    let mut report = Report::default();
    for conv in &setup.convs {
        let history = api
            .all_messages(&setup.tokens[&conv.members[0]], &conv.id)
            .await;
        let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=history.len() as u64).collect::<Vec<_>>(),
            "{}: history has seqs 1..N with no gap",
            conv.id
        );
        let mut stored: HashMap<String, (u64, String)> = HashMap::new();
        for m in &history {
            let msg_id = m["msg_id"].as_str().unwrap().to_owned();
            let entry = (
                m["seq"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_owned(),
            );
            if let Some(earlier) = stored.insert(msg_id.clone(), entry) {
                panic!("{}: {msg_id} stored twice (seq {})", conv.id, earlier.0);
            }
        }
        let mut sent: BTreeSet<String> = BTreeSet::new();
        for d in devices {
            d.with(|s| {
                for (msg_id, c) in &s.sent {
                    if *c == conv.id {
                        sent.insert(msg_id.clone());
                    }
                }
                for (msg_id, a) in s.acks.iter().filter(|(_, a)| a.conv == conv.id) {
                    assert_eq!(
                        stored.get(msg_id),
                        Some(&(a.seq, a.id.clone())),
                        "{}: acked {msg_id} is stored with its acked seq and id",
                        conv.id
                    );
                    report.acked += 1;
                }
            });
        }
        let stored_ids: BTreeSet<String> = stored.keys().cloned().collect();
        assert_eq!(
            stored_ids, sent,
            "{}: the history holds exactly the messages sent",
            conv.id
        );
        report.messages += history.len();
        let want: Vec<(u64, String)> = history
            .iter()
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap(),
                    m["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for d in devices.iter().filter(|d| conv.members.contains(&d.user)) {
            let what = format!("{} has seen all of {}", d.user, conv.id);
            eventually(&what, Duration::from_secs(10), || async {
                d.with(|s| {
                    let view = &s.convs[&conv.id];
                    let have: Vec<(u64, String)> =
                        view.seen.iter().map(|(q, m)| (*q, m.id.clone())).collect();
                    if have == want {
                        Ok(())
                    } else {
                        let missing: Vec<u64> = want
                            .iter()
                            .filter(|(q, _)| !view.seen.contains_key(q))
                            .map(|(q, _)| *q)
                            .collect();
                        Err(format!(
                            "{} of {} seen, missing seqs {missing:?}, contiguous {}",
                            have.len(),
                            want.len(),
                            view.contiguous
                        ))
                    }
                })
            })
            .await;
        }
    }
    for d in devices {
        d.with(|s| {
            assert!(s.problems.is_empty(), "{}: {:#?}", s.user, s.problems);
            for v in s.convs.values() {
                report.duplicates += v.duplicates;
                report.learned_in_sync += v.learned_in_sync;
            }
            report.syncs += s.syncs_sent;
            report.resends += s.resends;
            for (code, n) in &s.errors {
                *report.errors.entry(code.clone()).or_default() += n;
            }
        });
    }
    report
}

// ---------------------------------------------------------------------------------------------------------
// Tests

/// Wait until each of `devices` is connected to a node other than `gone`.
async fn reconnected_elsewhere(devices: &[&Device], gone: usize, what: &str) {
    for d in devices {
        eventually(what, Duration::from_secs(10), || async {
            match d.node() {
                Some(n) if n != gone => Ok(()),
                other => Err(format!("{}: {other:?}", d.user)),
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_forms_and_reports_itself() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("forms").await;
    for i in 0..3 {
        let (status, v) = cluster.get(i, "/v1/cluster").await.expect("answers");
        assert_eq!(status, 200);
        assert_eq!(v["node"], cluster.nodes[i].name.as_str(), "{v}");
        for n in &cluster.nodes {
            let entry = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == n.name.as_str())
                .unwrap_or_else(|| panic!("{} missing from {v}", n.name));
            assert_eq!(entry["state"], "up", "{v}");
            assert_eq!(entry["http"], n.http.to_string(), "{v}");
            assert_eq!(entry["cluster"], n.cluster.to_string(), "{v}");
        }
        let (status, ready) = cluster.get(i, "/readyz").await.expect("answers");
        assert_eq!((status, &ready), (200, &json!({"ready": true})));
    }

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["cluster", "status", "--node"])
        .arg(format!("http://{}", cluster.nodes[0].http))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for n in &cluster.nodes {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n.name.as_str()))
            .unwrap_or_else(|| panic!("cluster status lists {}:\n{text}", n.name));
        assert!(line.contains(" up "), "{line}");
    }

    // Two connections on n1, one on n2, three on n3: every node reports them.
    let api = cluster.api(0);
    let per_node = [2u64, 1, 3];
    let mut clients = Vec::new();
    for (i, count) in per_node.iter().enumerate() {
        for c in 0..*count {
            let token = api.token(&format!("user{i}{c}")).await;
            clients.push(Client::connect(cluster.nodes[i].http, &token).await);
        }
    }
    for i in 0..3 {
        eventually(
            "/v1/cluster counts the connections",
            Duration::from_secs(5),
            || async {
                let (_, v) = cluster.get(i, "/v1/cluster").await.ok_or("no answer")?;
                let counts: Vec<(u64, u64)> = cluster
                    .nodes
                    .iter()
                    .map(|n| {
                        let e = v["nodes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|e| e["name"] == n.name.as_str());
                        e.map_or((u64::MAX, u64::MAX), |e| {
                            (
                                e["connections"].as_u64().unwrap_or(u64::MAX),
                                e["online_users"].as_u64().unwrap_or(u64::MAX),
                            )
                        })
                    })
                    .collect();
                if counts.iter().map(|c| c.0).eq(per_node)
                    && counts.iter().map(|c| c.1).eq(per_node)
                {
                    Ok(())
                } else {
                    Err(format!("{} reports {counts:?}", cluster.nodes[i].name))
                }
            },
        )
        .await;
    }
    for c in clients {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_node_dm_and_group() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("cross").await;
    let users = ["alice", "bob", "carol"];
    let setup = Setup::build(&cluster.api(0), &users, &[&[0, 1, 2]], &[(0, 1)], false).await;
    let devices = cluster.devices(&setup).await;
    for round in 0..5 {
        for d in &devices {
            for conv in setup.convs_of(&d.user) {
                d.send(&conv);
            }
        }
        if round == 0 {
            // Let the first round settle: every path is exercised cold once.
            eventually("first round acked", Duration::from_secs(10), || async {
                match devices.iter().map(Device::unacked).sum::<usize>() {
                    0 => Ok(()),
                    n => Err(format!("{n} unacked")),
                }
            })
            .await;
        }
    }
    let report = check_no_loss(&cluster.api(1), &setup, &devices).await;
    assert_eq!(report.messages, 5 * (2 + 2 + 1));

    for conv in &setup.convs {
        let token = &setup.tokens[&conv.members[0]];
        let on_n1 = cluster.api(0).all_messages(token, &conv.id).await;
        for i in 1..3 {
            let there = cluster.api(i).all_messages(token, &conv.id).await;
            assert_eq!(on_n1, there, "history of {} on n1 and n{}", conv.id, i + 1);
        }
        for d in devices.iter().filter(|d| conv.members.contains(&d.user)) {
            d.with(|s| {
                let view = &s.convs[&conv.id];
                for (seq, m) in &view.seen {
                    let frames = view.frames.get(seq).copied().unwrap_or(0);
                    let want = usize::from(m.from != s.user);
                    assert_eq!(
                        frames, want,
                        "{}: seq {seq} of {} (from {}) delivered {frames} times",
                        s.user, conv.id, m.from
                    );
                }
                assert!(
                    view.order.windows(2).all(|w| w[0] < w[1]),
                    "{}: {} delivered out of order: {:?}",
                    s.user,
                    conv.id,
                    view.order
                );
                assert_eq!(s.syncs_sent, 0, "{}: no sync was needed", s.user);
                assert!(s.errors.is_empty(), "{}: {:?}", s.user, s.errors);
                assert_eq!(s.connects.len(), 1, "{} stayed connected", s.user);
            });
        }
    }
    let mut forwarded = 0.0;
    let mut delivered = 0.0;
    for i in 0..3 {
        let name = "switchboard_cluster_messages_sent_total";
        forwarded += cluster.metric(i, name, "kind=\"send\"").await;
        delivered += cluster.metric(i, name, "kind=\"deliver\"").await;
    }
    assert!(
        forwarded > 0.0 && delivered > 0.0,
        "sends were forwarded ({forwarded}) and deliveries crossed nodes ({delivered})"
    );
    println!("cross_node_dm_and_group: {report:?}");

    // Roles are checked by the group's actor, on its owner node, whichever node takes the request: the
    // asking user travels with the forwarded change.
    let group = &setup.convs[0].id;
    let (alice, bob) = (&setup.tokens["alice"], &setup.tokens["bob"]);
    let members = |i: usize, token: &str, user: &str, body: Option<Value>, method| {
        let api = cluster.api(i);
        let (token, user, body) = (token.to_owned(), user.to_owned(), body);
        async move {
            let path = match method {
                reqwest::Method::POST => format!("/v1/conversations/{group}/members"),
                _ => format!("/v1/conversations/{group}/members/{user}"),
            };
            api.call(method, &path, &token, body).await
        }
    };
    for i in 0..3 {
        let (status, v) = members(
            i,
            bob,
            "",
            Some(json!({"user":"dave"})),
            reqwest::Method::POST,
        )
        .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "n{}: {v}",
            i + 1
        );
    }
    let (status, v) = members(
        1,
        alice,
        "bob",
        Some(json!({"role":"owner"})),
        reqwest::Method::PUT,
    )
    .await;
    assert_eq!((status, v), (200, json!({"changed": true})));
    let (status, v) = members(
        2,
        bob,
        "",
        Some(json!({"user":"dave"})),
        reqwest::Method::POST,
    )
    .await;
    assert_eq!((status, v), (200, json!({"added": true})));
    for i in 0..3 {
        let (_, v) = cluster
            .api(i)
            .call(
                reqwest::Method::GET,
                &format!("/v1/conversations/{group}"),
                alice,
                None,
            )
            .await;
        assert_eq!(v["owners"], json!(["alice", "bob"]), "n{}", i + 1);
        assert_eq!(
            v["members"],
            json!(["alice", "bob", "carol", "dave"]),
            "n{}",
            i + 1
        );
    }
    close_all(&devices).await;
}

/// One message per device every 50 ms, at most 8 unacked per device (a few hundred messages over 5 s).
const LOAD_EVERY: Duration = Duration::from_millis(50);
const LOAD_WINDOW: usize = 8;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("kill9").await;
    let setup = Setup::six_users(&cluster.api(0)).await;
    let devices = cluster.devices(&setup).await;
    let victim = 1;
    let owned = setup.owned();
    let victim_convs = owned[&cluster.nodes[victim].name].clone();

    let load = Load::start(&devices, &setup, LOAD_EVERY, LOAD_WINDOW);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_victim: Vec<&Device> = devices
        .iter()
        .filter(|d| d.node() == Some(victim))
        .collect();
    assert!(!on_victim.is_empty());
    let killed_at = cluster.kill9(victim).await;

    // Its clients reconnect to the others.
    reconnected_elsewhere(&on_victim, victim, "a client of the dead node reconnects").await;
    let reconnected = on_victim
        .iter()
        .filter_map(|d| {
            d.with(|s| {
                s.connects
                    .iter()
                    .find(|(_, at)| *at > killed_at)
                    .map(|(_, at)| at.duration_since(killed_at))
            })
        })
        .max()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop().await;
    let report = check_no_loss(&cluster.api(0), &setup, &devices).await;
    assert!(
        report.acked > 100,
        "the test must kill a busy cluster (only {} acks)",
        report.acked
    );

    // Re-homing: per conversation, the first ack of a send made after the kill. The other conversations
    // give the baseline (write latency under this load).
    let first_ack_after_kill = |conv: &str| {
        devices
            .iter()
            .filter_map(|d| {
                d.with(|s| {
                    s.acks
                        .values()
                        .filter(|a| a.conv == conv && a.first_sent > killed_at)
                        .map(|a| a.at.duration_since(killed_at))
                        .min()
                })
            })
            .min()
            .unwrap_or_else(|| panic!("no send to {conv} was acked after the kill"))
    };
    let rehome: Vec<Duration> = victim_convs
        .iter()
        .map(|c| first_ack_after_kill(c))
        .collect();
    let baseline: Vec<Duration> = setup
        .convs
        .iter()
        .filter(|c| !victim_convs.contains(&c.id))
        .map(|c| first_ack_after_kill(&c.id))
        .collect();
    let worst = *rehome.iter().max().unwrap();
    println!(
        "kill_9_under_load_loses_nothing: {} conversations, {} on n{}: first ack of a send made after \
         the kill {rehome:?} (worst {worst:?}; other conversations: {baseline:?}); its clients \
         reconnected within {reconnected:?}; {report:?}",
        setup.convs.len(),
        victim_convs.len(),
        victim + 1
    );
    assert!(
        worst < Duration::from_secs(5),
        "conversations of the killed node took {worst:?} to accept sends again"
    );
    close_all(&devices).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_hands_over_and_closes_with_1012() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("drain").await;
    let setup = Setup::six_users(&cluster.api(0)).await;
    let devices = cluster.devices(&setup).await;
    let victim = 2;
    let victim_name = cluster.nodes[victim].name.clone();
    let load = Load::start(&devices, &setup, LOAD_EVERY, LOAD_WINDOW);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let on_victim: Vec<&Device> = devices
        .iter()
        .filter(|d| d.node() == Some(victim))
        .collect();
    assert!(!on_victim.is_empty());
    // Watch how the others see the draining node (they report `left` only if they saw it draining).
    let watching = Arc::new(AtomicBool::new(true));
    let watchers: Vec<JoinHandle<Vec<String>>> = [0, 1]
        .into_iter()
        .map(|i| {
            let (http, name, watching) =
                (cluster.nodes[i].http, victim_name.clone(), watching.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut states: Vec<String> = Vec::new();
                while watching.load(Ordering::Relaxed) {
                    let url = format!("http://{http}/v1/cluster");
                    if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(2), async {
                        client.get(&url).send().await?.json::<Value>().await
                    })
                    .await
                    {
                        let state = v["nodes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|n| n["name"] == name.as_str())
                            .map_or("absent".to_owned(), |n| {
                                n["state"].as_str().unwrap_or("?").to_owned()
                            });
                        if states.last() != Some(&state) {
                            states.push(state);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                states
            })
        })
        .collect();

    let drain_at = Instant::now();
    let r = cluster
        .http
        .post(format!(
            "http://{}/v1/admin/drain",
            cluster.nodes[victim].http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = cluster.wait_exit(victim, Duration::from_secs(15)).await;
    let drained = drain_at.elapsed();
    assert!(status.success(), "a drained node exits 0, got {status}");

    let mut closes = Vec::new();
    for d in &on_victim {
        d.with(|s| {
            let close = s
                .closes
                .iter()
                .find(|c| c.node == victim && c.at > drain_at)
                .unwrap_or_else(|| panic!("{} was not closed by the drain", s.user));
            assert_eq!(close.code, Some(1012), "{} closed with 1012", s.user);
            closes.push(close.at.duration_since(drain_at));
        });
    }
    closes.sort();
    reconnected_elsewhere(
        &on_victim,
        victim,
        "a client of the drained node reconnects",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    watching.store(false, Ordering::Relaxed);
    let mut seen_states = Vec::new();
    for w in watchers {
        seen_states.push(w.await.unwrap());
    }
    for (i, states) in seen_states.iter().enumerate() {
        let last = states.last().map(String::as_str);
        if states.iter().any(|s| s == "draining") {
            assert_eq!(
                last,
                Some("left"),
                "n{} saw {victim_name}: {states:?}",
                i + 1
            );
        } else {
            assert!(
                matches!(last, Some("left" | "down" | "absent")),
                "n{} saw {victim_name}: {states:?}",
                i + 1
            );
        }
    }
    load.stop().await;
    let report = check_no_loss(&cluster.api(0), &setup, &devices).await;
    assert!(
        report.acked > 100,
        "the test must drain a busy node (only {} acks)",
        report.acked
    );
    println!(
        "drain_hands_over_and_closes_with_1012: drain took {drained:?}; {} clients closed with 1012 \
         from {:?} to {:?} after the request; the others saw {victim_name} as {seen_states:?}; {report:?}",
        closes.len(),
        closes.first().unwrap(),
        closes.last().unwrap()
    );
    close_all(&devices).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_restart_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("rolling").await;
    let setup = Setup::six_users(&cluster.api(0)).await;
    let devices = cluster.devices(&setup).await;
    let load = Load::start(&devices, &setup, Duration::from_millis(150), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut timings = Vec::new();
    for i in 0..3 {
        let t0 = Instant::now();
        cluster.signal(i, "-TERM");
        let status = cluster.wait_exit(i, Duration::from_secs(15)).await;
        assert!(
            status.success(),
            "n{} exits 0 after SIGTERM, got {status}",
            i + 1
        );
        let drained = t0.elapsed();
        cluster.restart(i).await;
        cluster.wait_formed(&[0, 1, 2]).await;
        timings.push((drained, t0.elapsed()));
        if i == 0 {
            // The others held n1's conversations while it was away and hand them back.
            eventually(
                "n1's conversations are re-homed to it",
                Duration::from_secs(5),
                || async {
                    let mut rehomed = 0.0;
                    for j in 1..3 {
                        rehomed += cluster
                            .metric(j, "switchboard_cluster_rehomed_total", "")
                            .await;
                    }
                    if rehomed > 0.0 {
                        Ok(())
                    } else {
                        Err("switchboard_cluster_rehomed_total is 0 on n2 and n3".to_owned())
                    }
                },
            )
            .await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop().await;
    let report = check_no_loss(&cluster.api(0), &setup, &devices).await;
    let closes: usize = devices
        .iter()
        .map(|d| d.with(|s| s.closes.iter().filter(|c| c.code == Some(1012)).count()))
        .sum();
    assert!(
        closes >= setup.users.len(),
        "every node's clients were closed with 1012"
    );
    println!(
        "rolling_restart_loses_nothing: per node (drained, back up in the cluster): {timings:?}; \
         {closes} closes with 1012; {report:?}"
    );
    close_all(&devices).await;
}

/// Every `(user, node)` has an entry `{node}/…` in `sb:user:{user}`.
async fn registered(redis: &Redis, homes: &[(&str, &str)]) -> Result<(), String> {
    for (user, node) in homes {
        let entries = redis.user_entries(user).await;
        if !entries.iter().any(|e| e.starts_with(&format!("{node}/"))) {
            return Err(format!("sb:user:{user} = {entries:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_keeps_delivery_and_registry_rebuilds() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("redis").await;
    let users = ["alice", "bob", "carol"];
    let setup = Setup::build(&cluster.api(0), &users, &[&[0, 1, 2]], &[], false).await;
    let devices = cluster.devices(&setup).await;
    let homes = [("alice", "n1"), ("bob", "n2"), ("carol", "n3")];
    eventually(
        "the registry holds every client",
        Duration::from_secs(5),
        || registered(&cluster.redis, &homes),
    )
    .await;

    cluster.redis.kill();
    let down_at = Instant::now();
    for i in 0..3 {
        eventually(
            "/readyz says the registry is down",
            Duration::from_secs(10),
            || async {
                match cluster.get(i, "/readyz").await {
                    Some((503, v))
                        if v["reason"].as_str().is_some_and(|r| r.contains("registry")) =>
                    {
                        Ok(())
                    }
                    other => Err(format!("n{}: {other:?}", i + 1)),
                }
            },
        )
        .await;
    }
    let unready = down_at.elapsed();

    // Delivery does not go through Redis.
    let conv = setup.convs[0].id.clone();
    for (d, n) in devices.iter().zip([3, 2, 1]) {
        for _ in 0..n {
            d.send(&conv);
        }
    }
    let report = check_no_loss(&cluster.api(0), &setup, &devices).await;
    assert_eq!(report.messages, 6);

    cluster.redis.spawn().await;
    let up_at = Instant::now();
    eventually("the registry is rewritten", Duration::from_secs(10), || {
        registered(&cluster.redis, &homes)
    })
    .await;
    let rebuilt = up_at.elapsed();
    for i in 0..3 {
        eventually("/readyz is 200 again", Duration::from_secs(10), || async {
            match cluster.get(i, "/readyz").await {
                Some((200, _)) => Ok(()),
                other => Err(format!("n{}: {other:?}", i + 1)),
            }
        })
        .await;
    }
    println!(
        "redis_outage_keeps_delivery_and_registry_rebuilds: unready after {unready:?}, registry \
         rebuilt {rebuilt:?} after Redis came back, ready after {:?}",
        up_at.elapsed()
    );
    close_all(&devices).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_node_is_forgotten_in_redis() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("forget").await;
    let api = cluster.api(0);
    let mut clients = Vec::new();
    for (user, node) in [("dave", 1), ("erin", 1), ("frank", 0)] {
        let token = api.token(user).await;
        clients.push(Client::connect(cluster.nodes[node].http, &token).await);
    }
    eventually(
        "n2's clients are in the registry",
        Duration::from_secs(5),
        || async {
            let members = cluster
                .redis
                .cmd(&["SMEMBERS", "sb:node:n2"])
                .await
                .unwrap_or_default();
            let dave = cluster.redis.user_entries("dave").await;
            let frank = cluster.redis.user_entries("frank").await;
            let ok = members.len() == 2
                && members.iter().any(|m| m.ends_with("/dave"))
                && members.iter().any(|m| m.ends_with("/erin"))
                && dave.iter().any(|e| e.starts_with("n2/"))
                && frank.iter().any(|e| e.starts_with("n1/"));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "sb:node:n2 {members:?}, dave {dave:?}, frank {frank:?}"
                ))
            }
        },
    )
    .await;

    let killed_at = cluster.kill9(1).await;
    // The TTL is 5 s; within 3 s only a survivor's forget_node removes the entries.
    let left = (killed_at + Duration::from_secs(3)).saturating_duration_since(Instant::now());
    eventually("the dead node's entries are removed", left, || async {
        let exists = cluster.redis.cmd(&["EXISTS", "sb:node:n2"]).await;
        let mut on_n2 = Vec::new();
        for user in ["dave", "erin"] {
            on_n2.extend(
                cluster
                    .redis
                    .user_entries(user)
                    .await
                    .into_iter()
                    .filter(|e| e.starts_with("n2/")),
            );
        }
        if exists.as_deref() == Some(&["0".to_owned()][..]) && on_n2.is_empty() {
            Ok(())
        } else {
            Err(format!("EXISTS sb:node:n2 {exists:?}, entries {on_n2:?}"))
        }
    })
    .await;
    let forgotten = killed_at.elapsed();
    let frank = cluster.redis.user_entries("frank").await;
    assert!(
        frank.iter().any(|e| e.starts_with("n1/")),
        "a survivor's entries stay: {frank:?}"
    );
    println!("dead_node_is_forgotten_in_redis: forgotten {forgotten:?} after kill -9");
    drop(clients);
}

/// One message to a 5,000-member group spread over the three nodes, sent on a node that does not own the
/// conversation, costs three inter-node messages — its forward, and one delivery to each other node (the
/// one to the sender's node carries the ack) — and reaches every other member exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_big_group_message_crosses_to_each_node_once() {
    const MEMBERS: usize = 5_000;
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("big-group").await;
    let auth = {
        let mut config = switchboard::config::Config::for_data_dir(cluster.logs.join("auth"));
        config.jwt_secret = Some(JWT_SECRET.into());
        switchboard::auth::Auth::from_config(&config).unwrap()
    };
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("big{i:04}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| auth.mint(u, 3600).unwrap()).collect();
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let group = cluster.api(0).group(&tokens[0], &users[1..]).await;
    let owner = names
        .iter()
        .position(|n| n == placement::owner(&group, &names).unwrap())
        .unwrap();
    // The sender is on a node that does not own the group; member j is on node j % 3.
    let sender = (0..MEMBERS).find(|j| j % 3 != owner).unwrap();

    let mut clients = Vec::with_capacity(MEMBERS);
    for chunk in (0..MEMBERS).collect::<Vec<_>>().chunks(250) {
        let connecting = chunk
            .iter()
            .map(|&j| Client::connect_small_buffer(cluster.nodes[j % 3].http, &tokens[j]));
        clients.extend(futures_util::future::join_all(connecting).await);
    }
    // A sync from each node waits for the owner to have seen that node's sessions (the sync barrier).
    // (Members 0, 1 and 2 are on nodes 0, 1 and 2.)
    for c in clients.iter_mut().take(3) {
        c.send(json!({"op":"sync","conv":group,"after_seq":0}))
            .await;
        assert_eq!(c.expect_op("synced").await["last_seq"], 0);
    }

    let sent_by = |kind: &'static str| {
        let cluster = &cluster;
        async move {
            let mut total = 0.0;
            for i in 0..3 {
                let filter = if kind.is_empty() {
                    String::new()
                } else {
                    format!("kind=\"{kind}\"")
                };
                total += cluster
                    .metric(i, "switchboard_cluster_messages_sent_total", &filter)
                    .await;
            }
            total
        }
    };
    let before = (
        sent_by("").await,
        sent_by("send").await,
        sent_by("deliver").await,
    );
    clients[sender]
        .send_msg(&group, "big-1", "to everyone")
        .await;
    let ack = clients[sender].expect_op("ack").await;
    assert_eq!(ack["seq"], 1, "{ack}");
    let deliveries = clients
        .iter_mut()
        .enumerate()
        .filter(|(j, _)| *j != sender)
        .map(|(j, c)| async move {
            let m = c.expect_op("msg").await;
            assert_eq!(
                (m["seq"].as_u64(), m["msg_id"].as_str()),
                (Some(1), Some("big-1")),
                "member {j}"
            );
        });
    futures_util::future::join_all(deliveries).await;
    let after = (
        sent_by("").await,
        sent_by("send").await,
        sent_by("deliver").await,
    );
    let (total, sends, delivers) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    println!("one group message: {total} inter-node messages ({sends} send, {delivers} deliver)");
    assert_eq!(
        (sends, delivers),
        (1.0, 2.0),
        "one forward, one delivery per other node"
    );
    assert!(
        total <= 3.0,
        "{total} inter-node messages for one group message"
    );
    // Nobody got it twice.
    for c in clients.iter_mut().step_by(97) {
        assert!(
            c.silent_for(Duration::from_millis(20)).await,
            "a second frame"
        );
    }
}

/// With mutual TLS between nodes the cluster forms and carries messages across nodes; a node whose
/// certificate another CA signed is refused and never joins.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_on_mutual_tls_form_a_cluster_and_refuse_another_ca() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with("tls", Some("node"), Vec::new()).await;
    let api = cluster.api(0);
    let (ta, tb) = (api.token("alice").await, api.token("bob").await);
    let dm = api.dm(&ta, "bob").await;
    let mut alice = Client::connect(cluster.nodes[0].http, &ta).await;
    let mut bob = Client::connect(cluster.nodes[1].http, &tb).await;
    // Bob's node must know him before the message is committed: his sync waits for the owner (barrier).
    bob.send(json!({"op":"sync","conv":dm,"after_seq":0})).await;
    bob.expect_op("synced").await;
    alice.send_msg(&dm, "tls-1", "over TLS").await;
    assert_eq!(alice.expect_op("ack").await["seq"], 1);
    assert_eq!(bob.expect_op("msg").await["body"], "over TLS");

    cluster.kill9(2).await;
    cluster.nodes[2].tls = Some("rogue");
    cluster.restart(2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, v) = cluster.get(0, "/v1/cluster").await.expect("answers");
    let n3 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "n3")
        .expect("n3 was seen before");
    assert_eq!(n3["state"], "down", "a node from another CA joined: {v}");
    let (_, v) = cluster
        .get(2, "/v1/cluster")
        .await
        .expect("the rogue answers");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["nodes"][0]["state"], "joining", "{v}");
}

/// Typing and receipts reach the members on every node, whichever node owns the conversation.
#[tokio::test(flavor = "multi_thread")]
async fn typing_and_receipts_cross_nodes() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("signals").await;
    let api = cluster.api(0);
    let names = ["alice", "bob", "carol"];
    let mut tokens = Vec::new();
    for n in names {
        tokens.push(api.token(n).await);
    }
    let group = api.group(&tokens[0], &["bob".into(), "carol".into()]).await;
    let mut clients = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let mut c = Client::connect(cluster.nodes[i].http, t).await;
        // The sync's barrier: the owner knows this connection before anything is sent.
        c.send(json!({"op":"sync","conv":group,"after_seq":0}))
            .await;
        c.expect_op("synced").await;
        clients.push(c);
    }
    clients[0].send(json!({"op":"typing","conv":group})).await;
    for c in &mut clients[1..] {
        assert_eq!(
            c.frame().await,
            json!({"op":"typing","conv":group,"user":"alice"})
        );
    }
    clients[1]
        .send(json!({"op":"read","conv":group,"seq":0}))
        .await;
    for i in [0, 2] {
        assert_eq!(
            clients[i].frame().await,
            json!({"op":"receipt","conv":group,"user":"bob","kind":"read","seq":0})
        );
    }
    assert!(
        clients[1].silent_for(Duration::from_millis(300)).await,
        "the reading device gets its own receipt back"
    );
}

/// The next `presence` frame: its user and state.
async fn presence_of(c: &mut Client) -> (String, String) {
    let f = c.expect_op("presence").await;
    (
        f["user"].as_str().unwrap().to_owned(),
        f["state"].as_str().unwrap().to_owned(),
    )
}

/// Presence is computed on every node from the cluster's view: a contact on one node and a watcher on
/// another hear a user on a third come online, see no change while a second device comes and goes
/// elsewhere, and hear it go offline when its node is killed.
#[tokio::test(flavor = "multi_thread")]
async fn presence_crosses_nodes_and_a_dead_node_takes_its_users_offline() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start("presence").await;
    let api = cluster.api(0);
    let mut tokens = Vec::new();
    for n in ["alice", "bob", "carol"] {
        tokens.push(api.token(n).await);
    }
    api.dm(&tokens[0], "bob").await;
    let mut bob = Client::connect(cluster.nodes[0].http, &tokens[1])
        .await
        .hear_presence();
    let mut carol = Client::connect(cluster.nodes[2].http, &tokens[2])
        .await
        .hear_presence();
    carol
        .send(json!({"op":"presence_subscribe","users":["alice"]}))
        .await;
    assert_eq!(
        presence_of(&mut carol).await,
        ("alice".into(), "offline".into())
    );

    let alice = Client::connect(cluster.nodes[1].http, &tokens[0]).await;
    for c in [&mut bob, &mut carol] {
        assert_eq!(presence_of(c).await, ("alice".into(), "online".into()));
    }
    let other = Client::connect(cluster.nodes[2].http, &tokens[0]).await;
    other.close().await;
    assert!(
        bob.silent_for(Duration::from_secs(2)).await,
        "a second device on another node changed alice's presence"
    );
    let (status, v) = api
        .call(
            reqwest::Method::GET,
            "/v1/presence?users=alice",
            &tokens[1],
            None,
        )
        .await;
    assert_eq!(
        (status, v["users"][0]["state"].clone()),
        (200, json!("online")),
        "{v}"
    );

    let killed = cluster.kill9(1).await;
    for c in [&mut bob, &mut carol] {
        assert_eq!(presence_of(c).await, ("alice".into(), "offline".into()));
    }
    println!(
        "presence_crosses_nodes: offline {:?} after kill -9 (grace 1 s)",
        killed.elapsed()
    );
    drop(alice);
}

/// A message hook runs in the conversation's actor, on its owner: a send made on another node is screened
/// there once (here by the HTTP hook, which rewrites it), and every member on every node gets the rewrite.
#[tokio::test(flavor = "multi_thread")]
async fn message_hooks_run_on_the_owner_for_sends_from_any_node() {
    let _serial = SERIAL.lock().await;
    let service = Receiver::start(|_, req| {
        let body = req["body"].as_str().unwrap_or_default();
        if req["hook"] == "message" && body.starts_with("shout") {
            Reply::json(json!({"result": "rewrite", "body": body.to_uppercase()}))
        } else {
            Reply::json(json!({"result": "accept"}))
        }
    })
    .await;
    let env = vec![("SWITCHBOARD_HOOK_URL".to_owned(), service.url())];
    let cluster = Cluster::start_with("hooks", None, env).await;
    let api = cluster.api(0);
    let mut tokens = Vec::new();
    for n in ["alice", "bob", "carol"] {
        tokens.push(api.token(n).await);
    }
    let group = api.group(&tokens[0], &["bob".into(), "carol".into()]).await;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let owner = names
        .iter()
        .position(|n| n == placement::owner(&group, &names).unwrap())
        .unwrap();
    // Alice on a node that does not own the group, Bob on the third, Carol on the owner.
    let (a, b) = ((owner + 1) % 3, (owner + 2) % 3);
    let mut clients = Vec::new();
    for (token, node) in tokens.iter().zip([a, b, owner]) {
        let mut c = Client::connect(cluster.nodes[node].http, token).await;
        c.send(json!({"op":"sync","conv":group,"after_seq":0}))
            .await;
        c.expect_op("synced").await;
        clients.push(c);
    }
    clients[0].send_msg(&group, "h1", "shout across").await;
    let ack = clients[0].expect_op("ack").await;
    assert_eq!(ack["seq"], 1, "{ack}");
    for c in &mut clients[1..] {
        let m = c.expect_op("msg").await;
        assert_eq!(
            (m["seq"].clone(), m["body"].clone()),
            (json!(1), json!("SHOUT ACROSS")),
            "{m}"
        );
    }
    let asked: Vec<Value> = service
        .bodies()
        .into_iter()
        .filter(|r| r["hook"] == "message")
        .collect();
    assert_eq!(asked.len(), 1, "screened once, by the owner: {asked:?}");
    assert_eq!(asked[0]["from"], "alice");
}
