//! The Redis connection registry against a real `redis-server` (Debian's, 7.0): each test starts its own
//! server on a free loopback port and kills it when it ends. Short TTLs and heartbeats keep them quick.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard_cluster::registry::{RedisRegistry, RegistryConfig, RegistryError};
use switchboard_cluster::NodeId;

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const TTL: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(300);
/// A TTL long enough that nothing expires during a test: what disappears was removed.
const LONG_TTL: Duration = Duration::from_secs(60);

/// A `redis-server` child process, killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self { port, child: None };
        server.restart();
        server
    }

    /// Start (again) on the same port, empty.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.answers_ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freeze (`STOP`) or thaw (`CONT`) the server: connections stay open, nothing answers.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain connection, to look at the keys directly.
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn node(name: &str) -> NodeId {
    NodeId(name.to_owned())
}

fn config(server: &RedisServer, name: &str, ttl: Duration) -> RegistryConfig {
    RegistryConfig {
        url: server.url(),
        node: node(name),
        ttl,
        heartbeat: HEARTBEAT,
        prefix: "sbtest".to_owned(),
    }
}

fn start(server: &RedisServer, name: &str, ttl: Duration) -> RedisRegistry {
    RedisRegistry::start(config(server, name, ttl)).expect("start registry")
}

fn entries(list: &[(&str, u64)]) -> Vec<(NodeId, u64)> {
    let mut v: Vec<_> = list.iter().map(|&(n, c)| (node(n), c)).collect();
    v.sort();
    v
}

/// Poll `probe` until it returns `Some`, or panic with `what` after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Wait until `connections_of(user)` is exactly `expected`.
async fn until_connections(
    registry: &RedisRegistry,
    user: &str,
    expected: &[(&str, u64)],
    within: Duration,
) {
    let expected = entries(expected);
    let mut last = None;
    let found = tokio::time::timeout(within, async {
        loop {
            match registry.connections_of(user).await {
                Ok(found) if found == expected => return,
                other => last = Some(other),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "connections_of({user:?}) never became {expected:?}; last: {last:?}"
    );
}

async fn until_healthy(registry: &RedisRegistry, within: Duration) {
    eventually(within, "registry healthy", || async {
        registry.health().ok()
    })
    .await;
}

#[tokio::test]
async fn connections_on_two_nodes_are_listed_and_unregister_removes_one() {
    let server = RedisServer::start();
    let n1 = start(&server, "n1", LONG_TTL);
    let n2 = start(&server, "n2", LONG_TTL);
    n1.register("alice", 1);
    n1.register("alice", 2);
    n2.register("alice", 1);
    n2.register("bob", 9);

    let all = [("n1", 1), ("n1", 2), ("n2", 1)];
    until_connections(&n1, "alice", &all, Duration::from_secs(3)).await;
    until_connections(&n2, "alice", &all, Duration::from_secs(1)).await;
    until_connections(&n1, "bob", &[("n2", 9)], Duration::from_secs(1)).await;
    assert_eq!(n1.local_connections(), 2);
    assert_eq!(n2.local_connections(), 2);
    until_healthy(&n1, Duration::from_secs(1)).await;

    n1.unregister("alice", 2);
    until_connections(
        &n2,
        "alice",
        &[("n1", 1), ("n2", 1)],
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(n1.local_connections(), 1);

    // Unregistering what is not registered changes nothing.
    n1.unregister("alice", 77);
    n1.unregister("carol", 1);
    tokio::time::sleep(HEARTBEAT * 2).await;
    until_connections(
        &n2,
        "alice",
        &[("n1", 1), ("n2", 1)],
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(n1.local_connections(), 1);

    n1.close().await;
    n2.close().await;
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_expires_within_the_ttl() {
    let server = RedisServer::start();
    let n1 = start(&server, "n1", TTL);
    let n2 = start(&server, "n2", TTL);
    n1.register("alice", 1);
    n2.register("alice", 2);
    until_connections(
        &n1,
        "alice",
        &[("n1", 1), ("n2", 2)],
        Duration::from_secs(2),
    )
    .await;

    // Dropped without `close`: nothing removes its entries, as after a crash.
    drop(n2);
    let crashed = Instant::now();
    until_connections(&n1, "alice", &[("n1", 1)], TTL + Duration::from_secs(1)).await;
    assert!(
        crashed.elapsed() > TTL / 2,
        "entries vanished before they could have expired: {:?}",
        crashed.elapsed()
    );

    // The heartbeat keeps n1's entry alive well past the TTL.
    tokio::time::sleep(TTL + HEARTBEAT).await;
    assert_eq!(
        n1.connections_of("alice").await.expect("read"),
        entries(&[("n1", 1)])
    );
    // The crashed node's set expired as a whole too.
    let mut raw = server.raw().await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("sbtest:node:n2")
        .query_async(&mut raw)
        .await
        .expect("exists");
    assert!(!exists, "the crashed node's set outlived its ttl");
    n1.close().await;
}

/// Registries n1 and n2 (long TTL) with alice on both and bob on n2, once n1 reads them all back.
async fn alice_on_two_nodes_and_bob_on_n2(server: &RedisServer) -> (RedisRegistry, RedisRegistry) {
    let n1 = start(server, "n1", LONG_TTL);
    let n2 = start(server, "n2", LONG_TTL);
    n1.register("alice", 1);
    n2.register("alice", 2);
    n2.register("bob", 3);
    until_connections(
        &n1,
        "alice",
        &[("n1", 1), ("n2", 2)],
        Duration::from_secs(2),
    )
    .await;
    until_connections(&n1, "bob", &[("n2", 3)], Duration::from_secs(1)).await;
    (n1, n2)
}

#[tokio::test]
async fn forget_node_removes_another_nodes_entries_at_once() {
    let server = RedisServer::start();
    let (n1, n2) = alice_on_two_nodes_and_bob_on_n2(&server).await;
    drop(n2);

    n1.forget_node(&node("n2"));
    until_connections(&n1, "alice", &[("n1", 1)], Duration::from_secs(1)).await;
    until_connections(&n1, "bob", &[], Duration::from_secs(1)).await;
    // Idempotent, and forgetting itself leaves this node's entries alone.
    n1.forget_node(&node("n2"));
    n1.forget_node(&node("n1"));
    tokio::time::sleep(HEARTBEAT).await;
    until_connections(&n1, "alice", &[("n1", 1)], Duration::from_secs(1)).await;
    assert!(n1.health().is_ok(), "{:?}", n1.health());
    n1.close().await;
}

#[tokio::test]
async fn the_registry_is_rewritten_after_redis_restarts_empty() {
    let mut server = RedisServer::start();
    let n1 = start(&server, "n1", TTL);
    n1.register("alice", 1);
    n1.register("alice", 2);
    until_connections(
        &n1,
        "alice",
        &[("n1", 1), ("n1", 2)],
        Duration::from_secs(2),
    )
    .await;
    until_healthy(&n1, Duration::from_secs(1)).await;

    server.kill();
    let reason = eventually(Duration::from_secs(3), "registry unhealthy", || async {
        n1.health().err()
    })
    .await;
    assert!(reason.starts_with("redis unreachable"), "{reason}");
    assert!(n1.connections_of("alice").await.is_err());
    // Changes while Redis is away are kept in memory.
    n1.register("bob", 3);
    n1.unregister("alice", 2);
    eventually(Duration::from_secs(1), "ops applied in memory", || async {
        (n1.local_connections() == 2).then_some(())
    })
    .await;
    // Still unhealthy after a few retries, without the writer giving up.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(n1.health().is_err());

    server.restart();
    until_healthy(&n1, Duration::from_secs(4)).await;
    until_connections(&n1, "alice", &[("n1", 1)], Duration::from_secs(2)).await;
    until_connections(&n1, "bob", &[("n1", 3)], Duration::from_secs(1)).await;
    n1.close().await;
}

#[tokio::test]
async fn close_removes_the_nodes_entries() {
    let server = RedisServer::start();
    let (n1, n2) = alice_on_two_nodes_and_bob_on_n2(&server).await;

    let closing = Instant::now();
    n2.close().await;
    assert!(closing.elapsed() < Duration::from_secs(3));
    // No polling: the entries are gone when `close` returns.
    assert_eq!(
        n1.connections_of("alice").await.expect("read"),
        entries(&[("n1", 1)])
    );
    assert_eq!(n1.connections_of("bob").await.expect("read"), vec![]);
    assert!(n2.health().is_err());
    // Operations after close are dropped, and a second close does nothing.
    n2.register("carol", 4);
    n2.close().await;
    tokio::time::sleep(HEARTBEAT).await;
    assert_eq!(n1.connections_of("carol").await.expect("read"), vec![]);
    n1.close().await;
}

#[tokio::test]
async fn user_ids_with_slashes_and_colons_round_trip() {
    let server = RedisServer::start();
    let n1 = start(&server, "n1", LONG_TTL);
    let user = "org:acme/team/alice:1";
    n1.register(user, 5);
    n1.register("org:acme", 6);
    until_connections(&n1, user, &[("n1", 5)], Duration::from_secs(2)).await;
    until_connections(&n1, "org:acme", &[("n1", 6)], Duration::from_secs(1)).await;
    n1.unregister(user, 5);
    until_connections(&n1, user, &[], Duration::from_secs(1)).await;
    until_connections(&n1, "org:acme", &[("n1", 6)], Duration::from_secs(1)).await;
    n1.close().await;
}

#[tokio::test]
async fn a_restart_under_the_same_node_name_removes_the_earlier_processs_entries() {
    let server = RedisServer::start();
    let before = start(&server, "n1", LONG_TTL);
    before.register("alice", 1);
    before.register("bob", 2);
    until_connections(&before, "alice", &[("n1", 1)], Duration::from_secs(2)).await;
    until_connections(&before, "bob", &[("n1", 2)], Duration::from_secs(1)).await;
    drop(before);

    let after = start(&server, "n1", LONG_TTL);
    after.register("alice", 7);
    until_connections(&after, "alice", &[("n1", 7)], Duration::from_secs(2)).await;
    until_connections(&after, "bob", &[], Duration::from_secs(1)).await;
    after.close().await;
}

#[tokio::test]
async fn without_redis_the_registry_starts_reports_why_and_closes_promptly() {
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let registry = RedisRegistry::start(RegistryConfig {
        url: format!("redis://127.0.0.1:{port}/"),
        node: node("n1"),
        ttl: TTL,
        heartbeat: HEARTBEAT,
        prefix: "sbtest".to_owned(),
    })
    .expect("start without redis");
    registry.register("alice", 1);
    // First "not reached yet", then the reason of the first failed exchange.
    assert!(registry.health().is_err());
    eventually(Duration::from_secs(3), "registry unreachable", || async {
        registry
            .health()
            .err()
            .filter(|reason| reason.starts_with("redis unreachable"))
    })
    .await;
    eventually(Duration::from_secs(1), "op applied in memory", || async {
        (registry.local_connections() == 1).then_some(())
    })
    .await;

    let closing = Instant::now();
    registry.close().await;
    assert!(
        closing.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        closing.elapsed()
    );
}

#[tokio::test]
async fn an_invalid_url_is_an_error() {
    let mut config = RegistryConfig::new("not a url", node("n1"));
    config.heartbeat = HEARTBEAT;
    assert!(matches!(
        RedisRegistry::start(config),
        Err(RegistryError::InvalidUrl(_))
    ));
}

#[tokio::test]
async fn readers_ignore_members_whose_expiry_is_past() {
    let server = RedisServer::start();
    let n1 = start(&server, "n1", LONG_TTL);
    n1.register("alice", 1);
    until_connections(&n1, "alice", &[("n1", 1)], Duration::from_secs(2)).await;

    // A member left by a node that died between two prunes: its score (expiry) is in the past.
    let mut raw = server.raw().await;
    let () = redis::cmd("ZADD")
        .arg("sbtest:user:alice")
        .arg(1_000)
        .arg("n9/4")
        .query_async(&mut raw)
        .await
        .expect("zadd");
    let listed = n1.connections_of("alice").await.expect("read");
    assert_eq!(listed, entries(&[("n1", 1)]));
    n1.close().await;
}

#[tokio::test]
async fn a_stalled_redis_does_not_stall_the_writer_or_close() {
    let server = RedisServer::start();
    let n1 = start(&server, "n1", TTL);
    n1.register("alice", 1);
    until_connections(&n1, "alice", &[("n1", 1)], Duration::from_secs(2)).await;
    until_healthy(&n1, Duration::from_secs(1)).await;

    server.signal("STOP");
    let reason = eventually(Duration::from_secs(4), "registry unhealthy", || async {
        n1.health().err()
    })
    .await;
    assert!(reason.starts_with("redis unreachable"), "{reason}");
    n1.register("bob", 2);

    server.signal("CONT");
    until_healthy(&n1, Duration::from_secs(5)).await;
    until_connections(&n1, "bob", &[("n1", 2)], Duration::from_secs(2)).await;

    server.signal("STOP");
    let closing = Instant::now();
    n1.close().await;
    assert!(
        closing.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        closing.elapsed()
    );
}
