//! The connection registry: who is connected where, across the cluster.
//!
//! Each node runs one [`RedisRegistry`]: the session layer calls [`RedisRegistry::register`] and
//! [`RedisRegistry::unregister`] synchronously (while it holds its own lock), which only push onto an
//! unbounded queue; a single writer task, spawned by [`RedisRegistry::start`] on the node's Tokio runtime,
//! owns this node's in-memory set of `(user, conn)` and is the only writer of this node's entries.
//! [`RedisRegistry::close`] stops it during the node's graceful shutdown. A single node needs no registry
//! and runs none.
//!
//! Redis holds only what can be rebuilt and is never on a message's path: while Redis is down the node
//! keeps working, [`RedisRegistry::health`] reports why, and the writer rewrites everything it holds once
//! Redis answers again (also after Redis restarted empty).
//!
//! # Key layout
//! - `{prefix}:user:{user}`: a ZSET whose members are `{node}/{conn}`, each scored with its expiry in
//!   milliseconds since the Unix epoch on Redis's clock. Readers ignore members whose score is past;
//!   writers prune them. The key is `PEXPIRE`d to the TTL on every write.
//! - `{prefix}:node:{node}`: a SET of `{conn}/{user}` (connection first, so a user id containing `/`
//!   still parses), `PEXPIRE`d to the TTL, so that [`RedisRegistry::forget_node`] finds what to remove.
//!
//! # Liveness
//! Every `heartbeat` the writer asks Redis for its `TIME` (which also tells whether Redis is there) and
//! rewrites every entry this node holds with a fresh expiry, in pipelines of about a thousand connections.
//! A node that crashes stops doing so and is forgotten within the TTL, or at once when a survivor calls
//! [`RedisRegistry::forget_node`]. After a failed exchange the writer retries about once a second with a
//! full rewrite (remove this node's entries it no longer holds, write the current ones); the same rewrite
//! at start removes what an earlier process with the same node name left behind.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use switchboard_actors::session::ConnId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::NodeId;

/// Bound on one exchange with Redis (one command or one pipeline).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one TCP connection attempt; below [`EXCHANGE_TIMEOUT`] so that the attempt fails first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound the connection itself puts on one response.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1_500);
/// Delay between full rewrites while Redis is unreachable.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Bound on [`RedisRegistry::close`]'s removal of this node's entries.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections written per pipeline by a rewrite; also members popped per step of a forget.
const CHUNK: usize = 1_000;
/// Queued operations the writer takes at most in one batch.
const MAX_BATCH: usize = 4_096;

const WRITES_TOTAL: &str = "switchboard_registry_writes_total";
const ERRORS_TOTAL: &str = "switchboard_registry_errors_total";
const UP: &str = "switchboard_registry_up";

/// Settings of the [`RedisRegistry`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`. Never logged (it may hold a password).
    pub url: String,
    /// This node's name, as the rest of the cluster knows it.
    pub node: NodeId,
    /// How long an entry lives without a heartbeat: a crashed node is forgotten within it.
    /// Default 90 s; must be longer than `heartbeat`.
    pub ttl: Duration,
    /// How often this node rewrites its entries with fresh expiries. Default 15 s.
    pub heartbeat: Duration,
    /// Prefix of every key. Default `sb`.
    pub prefix: String,
}

impl RegistryConfig {
    /// Default TTL of an entry.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(90);
    /// Default heartbeat period.
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
    /// Default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "sb";

    /// Settings for `node` on the Redis at `url`, with the default TTL, heartbeat and prefix.
    pub fn new(url: impl Into<String>, node: NodeId) -> Self {
        Self {
            url: url.into(),
            node,
            ttl: Self::DEFAULT_TTL,
            heartbeat: Self::DEFAULT_HEARTBEAT,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The Redis URL does not parse.
    #[error("invalid redis url: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// The settings contradict each other.
    #[error("invalid registry settings: {0}")]
    InvalidConfig(&'static str),
    /// [`RedisRegistry::start`] was called outside a Tokio runtime.
    #[error("no tokio runtime to run the registry writer on")]
    NoRuntime,
    /// Redis answered with an error, or could not be reached.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl RegistryError {
    /// Whether the connection should be replaced: a timed-out connection is not replaced by the
    /// connection manager itself, and may be stuck on a peer that vanished without a reset.
    fn is_timeout(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// The Redis connection registry of one node. Cheap to clone; see the module documentation.
#[derive(Clone)]
pub struct RedisRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("node", &self.inner.keys.node)
            .field("local_connections", &self.local_connections())
            .field("health", &self.health())
            .finish()
    }
}

/// What the handles share. Dropping the last handle drops `ops`, which ends the writer.
struct Inner {
    ops: mpsc::UnboundedSender<Op>,
    shared: Arc<Shared>,
    keys: Keys,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What the handles and the writer share.
struct Shared {
    /// Result of the writer's last exchange with Redis.
    health: Mutex<Result<(), String>>,
    /// Number of connections in the writer's in-memory set.
    local: AtomicUsize,
    /// Redis's clock minus ours, in milliseconds, as of the last `TIME`.
    clock_offset_ms: AtomicI64,
    /// The current connection; the writer replaces it after a timeout.
    conn: Mutex<ConnectionManager>,
    client: redis::Client,
}

impl Shared {
    fn conn(&self) -> ConnectionManager {
        lock(&self.conn).clone()
    }

    /// Now on Redis's clock, in milliseconds since the Unix epoch (as of the last offset measured).
    fn redis_now_ms(&self) -> i64 {
        local_now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }
}

/// One operation queued for the writer.
#[derive(Debug)]
enum Op {
    Register { user: String, conn: ConnId },
    Unregister { user: String, conn: ConnId },
    ForgetNode { node: NodeId },
}

impl RedisRegistry {
    /// Start the writer task on the current Tokio runtime.
    ///
    /// Never fails because Redis is down: the registry then reports unhealthy and catches up when Redis
    /// answers. Fails on an invalid URL, on a TTL not longer than the heartbeat, and outside a runtime.
    pub fn start(config: RegistryConfig) -> Result<Self, RegistryError> {
        if config.heartbeat.is_zero() {
            return Err(RegistryError::InvalidConfig("heartbeat must be positive"));
        }
        if config.ttl <= config.heartbeat {
            return Err(RegistryError::InvalidConfig(
                "ttl must be longer than the heartbeat",
            ));
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RegistryError::NoRuntime)?;
        let client = redis::Client::open(config.url.as_str()).map_err(RegistryError::InvalidUrl)?;
        let conn = connection_manager(&client).map_err(RegistryError::InvalidUrl)?;
        describe_metrics();
        metrics::gauge!(UP).set(0.0);

        let keys = Keys {
            prefix: config.prefix,
            node: config.node,
        };
        let shared = Arc::new(Shared {
            health: Mutex::new(Err("redis not reached yet".to_owned())),
            local: AtomicUsize::new(0),
            clock_offset_ms: AtomicI64::new(0),
            conn: Mutex::new(conn),
            client,
        });
        let (ops, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            keys: keys.clone(),
            shared: shared.clone(),
            ttl: config.ttl,
            heartbeat: config.heartbeat,
            local: HashMap::new(),
            count: 0,
            pending_forgets: Vec::new(),
            up: None,
            needs_rewrite: true,
            retry_at: Instant::now(),
            heartbeat_at: Instant::now() + config.heartbeat,
        };
        let span = tracing::info_span!("registry", node = %keys.node);
        let handle = runtime.spawn(writer.run(rx).instrument(span));
        Ok(Self {
            inner: Arc::new(Inner {
                ops,
                shared,
                keys,
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// Record one connection of `user` on this node. Never blocks: the writer applies it.
    pub fn register(&self, user: &str, conn: ConnId) {
        self.push(Op::Register {
            user: user.to_owned(),
            conn,
        });
    }

    /// Forget one connection of `user` on this node. Never blocks: the writer applies it.
    pub fn unregister(&self, user: &str, conn: ConnId) {
        self.push(Op::Unregister {
            user: user.to_owned(),
            conn,
        });
    }

    /// Another node went down: remove its entries now. Idempotent; every survivor may call it.
    /// Calling it with this node's own name does nothing (this node rewrites its entries anyway).
    pub fn forget_node(&self, node: &NodeId) {
        self.push(Op::ForgetNode { node: node.clone() });
    }

    /// The live (unexpired) connections of `user`, on every node, sorted.
    pub async fn connections_of(&self, user: &str) -> Result<Vec<(NodeId, ConnId)>, RegistryError> {
        let mut conn = self.inner.shared.conn();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("ZRANGE")
            .arg(self.inner.keys.user(user))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let ((secs, micros), members): ((i64, i64), Vec<(String, f64)>) =
            bounded(pipe.query_async(&mut conn)).await?;
        // Scores are whole milliseconds, well within f64's exact integers.
        let now_ms = (secs * 1_000 + micros / 1_000) as f64;
        let mut live: Vec<(NodeId, ConnId)> = members
            .into_iter()
            .filter(|(_, expiry)| *expiry > now_ms)
            .filter_map(|(member, _)| {
                let parsed = parse_user_member(&member);
                if parsed.is_none() {
                    debug!(key = %self.inner.keys.user(user), "malformed registry member ignored");
                }
                parsed
            })
            .collect();
        live.sort();
        Ok(live)
    }

    /// `Ok(())` while the writer's last exchange with Redis succeeded, else why not
    /// (e.g. `redis unreachable: …`), for `/readyz`. Reads by [`Self::connections_of`] do not count.
    pub fn health(&self) -> Result<(), String> {
        lock(&self.inner.shared.health).clone()
    }

    /// Number of this node's connections the registry holds (what it would rewrite), as of the
    /// operations the writer has applied so far.
    pub fn local_connections(&self) -> usize {
        self.inner.shared.local.load(Ordering::Relaxed)
    }

    /// This node's name.
    pub fn node(&self) -> &NodeId {
        &self.inner.keys.node
    }

    /// Graceful stop: stop the writer, then remove this node's entries from Redis (at most ~2 s).
    /// Later calls, and operations after it, do nothing.
    pub async fn close(&self) {
        let Some(writer) = lock(&self.inner.writer).take() else {
            return;
        };
        writer.abort();
        // Only a panic of the writer shows here; it was already reported by the runtime.
        let _ = writer.await;
        let shared = &self.inner.shared;
        let mut conn = shared.conn();
        let node = &self.inner.keys.node;
        match tokio::time::timeout(
            CLOSE_TIMEOUT,
            forget(&mut conn, &self.inner.keys, node, |_| true),
        )
        .await
        {
            Ok(Ok(removed)) => info!(node = %node, removed, "registry closed"),
            Ok(Err(e)) => {
                warn!(node = %node, error = %e, "registry closed, entries left to expire")
            }
            Err(_) => {
                warn!(node = %node, "registry closed, entries left to expire (redis too slow)")
            }
        }
        *lock(&shared.health) = Err("registry closed".to_owned());
        metrics::gauge!(UP).set(0.0);
    }

    fn push(&self, op: Op) {
        // A closed registry drops the operation: after `close` nothing is recorded any more.
        let _ = self.inner.ops.send(op);
    }
}

/// Key and member names.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    node: NodeId,
}

impl Keys {
    fn user(&self, user: &str) -> String {
        format!("{}:user:{user}", self.prefix)
    }

    fn node_set(&self, node: &NodeId) -> String {
        format!("{}:node:{node}", self.prefix)
    }
}

fn user_member(node: &NodeId, conn: ConnId) -> String {
    format!("{node}/{conn}")
}

fn node_member(conn: ConnId, user: &str) -> String {
    format!("{conn}/{user}")
}

/// `{node}/{conn}`: the connection id is digits, so the last `/` separates (a node name may hold `/`).
fn parse_user_member(member: &str) -> Option<(NodeId, ConnId)> {
    let (node, conn) = member.rsplit_once('/')?;
    Some((NodeId(node.to_owned()), conn.parse().ok()?))
}

/// `{conn}/{user}`: the first `/` separates (a user id may hold `/`).
fn parse_node_member(member: &str) -> Option<(ConnId, &str)> {
    let (conn, user) = member.split_once('/')?;
    Some((conn.parse().ok()?, user))
}

/// The writer task's state: this node's connections, and whether Redis holds them.
struct Writer {
    keys: Keys,
    shared: Arc<Shared>,
    ttl: Duration,
    heartbeat: Duration,
    /// This node's connections: the truth that Redis mirrors.
    local: HashMap<String, HashSet<ConnId>>,
    count: usize,
    /// Forgets that failed, with when they were asked; redone with the next rewrite, until the TTL
    /// would have removed the entries anyway.
    pending_forgets: Vec<(NodeId, Instant)>,
    /// Whether Redis answered the last exchange; `None` before the first.
    up: Option<bool>,
    /// Redis may miss operations: write nothing incrementally, rewrite everything at `retry_at`.
    needs_rewrite: bool,
    retry_at: Instant,
    heartbeat_at: Instant,
}

impl Writer {
    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        debug!("registry writer started");
        loop {
            // Timers first: a steady stream of operations must not starve the heartbeat.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(self.retry_at), if self.needs_rewrite => {
                    self.rewrite().await;
                }
                () = tokio::time::sleep_until(self.heartbeat_at), if !self.needs_rewrite => {
                    self.heartbeat_at = Instant::now() + self.heartbeat;
                    if let Err(e) = self.refresh().await {
                        self.failed(&e);
                    }
                }
                op = ops.recv() => {
                    let Some(op) = op else { break };
                    let mut batch = vec![op];
                    while batch.len() < MAX_BATCH {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    self.apply(batch).await;
                }
            }
        }
        debug!("registry writer stopped: every handle dropped");
    }

    /// Apply queued operations to memory and, unless a rewrite is due anyway, to Redis in one pipeline
    /// (split around forgets, which need their own exchanges).
    async fn apply(&mut self, batch: Vec<Op>) {
        let mut pipe = redis::pipe();
        let mut touched_node_set = false;
        let expiry = self.shared.redis_now_ms() + self.ttl_ms();
        for op in batch {
            match op {
                Op::Register { user, conn } => {
                    if self.local.entry(user.clone()).or_default().insert(conn) {
                        self.count += 1;
                    }
                    self.write_user(&mut pipe, &user, &[conn], expiry);
                    touched_node_set = true;
                }
                Op::Unregister { user, conn } => {
                    let Some(conns) = self.local.get_mut(&user) else {
                        continue;
                    };
                    if !conns.remove(&conn) {
                        continue;
                    }
                    if conns.is_empty() {
                        self.local.remove(&user);
                    }
                    self.count -= 1;
                    pipe.cmd("ZREM")
                        .arg(self.keys.user(&user))
                        .arg(user_member(&self.keys.node, conn))
                        .ignore()
                        .cmd("SREM")
                        .arg(self.keys.node_set(&self.keys.node))
                        .arg(node_member(conn, &user))
                        .ignore();
                }
                Op::ForgetNode { node } => {
                    if node == self.keys.node {
                        debug!("forget of this node ignored");
                        continue;
                    }
                    self.flush(&mut pipe, &mut touched_node_set).await;
                    if self.needs_rewrite {
                        self.pending_forgets.push((node, Instant::now()));
                        continue;
                    }
                    let mut conn = self.shared.conn();
                    match forget(&mut conn, &self.keys, &node, |_| true).await {
                        Ok(removed) => {
                            metrics::counter!(WRITES_TOTAL).increment(1);
                            info!(forgotten = %node, removed, "node forgotten");
                        }
                        Err(e) => {
                            self.pending_forgets.push((node, Instant::now()));
                            self.failed(&e);
                        }
                    }
                }
            }
            if pipe.len() >= CHUNK {
                self.flush(&mut pipe, &mut touched_node_set).await;
            }
        }
        self.flush(&mut pipe, &mut touched_node_set).await;
        self.shared.local.store(self.count, Ordering::Relaxed);
    }

    /// Send what `pipe` holds, unless Redis is known to be missing operations (the rewrite covers them).
    async fn flush(&mut self, pipe: &mut redis::Pipeline, touched_node_set: &mut bool) {
        if *touched_node_set {
            self.expire_node_set(pipe);
            *touched_node_set = false;
        }
        let full = std::mem::take(pipe);
        if full.is_empty() || self.needs_rewrite {
            return;
        }
        let mut conn = self.shared.conn();
        match bounded(full.exec_async(&mut conn)).await {
            Ok(()) => metrics::counter!(WRITES_TOTAL).increment(1),
            Err(e) => self.failed(&e),
        }
    }

    /// Rewrite every entry this node holds with a fresh expiry. Also the heartbeat's liveness check.
    async fn refresh(&mut self) -> Result<(), RegistryError> {
        let mut conn = self.shared.conn();
        self.sync_clock(&mut conn).await?;
        let expiry = self.shared.redis_now_ms() + self.ttl_ms();
        let mut pipe = redis::pipe();
        let mut in_chunk = 0;
        for (user, conns) in &self.local {
            let conns: Vec<ConnId> = conns.iter().copied().collect();
            for part in conns.chunks(CHUNK) {
                self.write_user(&mut pipe, user, part, expiry);
                in_chunk += part.len();
                if in_chunk >= CHUNK {
                    self.expire_node_set(&mut pipe);
                    bounded(pipe.exec_async(&mut conn)).await?;
                    metrics::counter!(WRITES_TOTAL).increment(1);
                    pipe = redis::pipe();
                    in_chunk = 0;
                }
            }
        }
        if in_chunk > 0 {
            self.expire_node_set(&mut pipe);
            bounded(pipe.exec_async(&mut conn)).await?;
            metrics::counter!(WRITES_TOTAL).increment(1);
        }
        self.succeeded();
        Ok(())
    }

    /// After a failure, and at start: redo pending forgets, remove this node's entries it no longer
    /// holds, write the current ones. Schedules the next try on failure.
    async fn rewrite(&mut self) {
        match self.try_rewrite().await {
            Ok(()) => {
                self.needs_rewrite = false;
                self.heartbeat_at = Instant::now() + self.heartbeat;
            }
            Err(e) => self.failed(&e),
        }
    }

    async fn try_rewrite(&mut self) -> Result<(), RegistryError> {
        let mut conn = self.shared.conn();
        let ttl = self.ttl;
        self.pending_forgets
            .retain(|(_, asked)| asked.elapsed() < ttl);
        while let Some((node, _)) = self.pending_forgets.last() {
            let removed = forget(&mut conn, &self.keys, node, |_| true).await?;
            info!(forgotten = %node, removed, "node forgotten");
            self.pending_forgets.pop();
        }
        let local = &self.local;
        let stale = forget(&mut conn, &self.keys, &self.keys.node, |(conn, user)| {
            !local.get(user).is_some_and(|conns| conns.contains(&conn))
        })
        .await?;
        if stale > 0 {
            info!(removed = stale, "stale entries of this node removed");
        }
        self.refresh().await
    }

    /// Ask Redis for its clock: scores are expiries on Redis's clock, whatever this host's says.
    async fn sync_clock(&self, conn: &mut ConnectionManager) -> Result<(), RegistryError> {
        let (secs, micros): (i64, i64) = bounded(redis::cmd("TIME").query_async(conn)).await?;
        let offset = secs * 1_000 + micros / 1_000 - local_now_ms();
        self.shared.clock_offset_ms.store(offset, Ordering::Relaxed);
        Ok(())
    }

    /// Queue the writes of `conns` of `user` on this node, expiring at `expiry`.
    fn write_user(&self, pipe: &mut redis::Pipeline, user: &str, conns: &[ConnId], expiry: i64) {
        let key = self.keys.user(user);
        let zadd = pipe.cmd("ZADD").arg(&key);
        for &conn in conns {
            zadd.arg(expiry).arg(user_member(&self.keys.node, conn));
        }
        zadd.ignore();
        let now = self.shared.redis_now_ms();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.ttl_ms())
            .ignore();
        let sadd = pipe.cmd("SADD").arg(self.keys.node_set(&self.keys.node));
        for &conn in conns {
            sadd.arg(node_member(conn, user));
        }
        sadd.ignore();
    }

    fn expire_node_set(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("PEXPIRE")
            .arg(self.keys.node_set(&self.keys.node))
            .arg(self.ttl_ms())
            .ignore();
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2)
    }

    fn succeeded(&mut self) {
        if self.up != Some(true) {
            if self.up.is_some() {
                info!("redis reachable again, registry rewritten");
            } else {
                info!("redis reachable, registry written");
            }
            self.up = Some(true);
            metrics::gauge!(UP).set(1.0);
        }
        *lock(&self.shared.health) = Ok(());
    }

    fn failed(&mut self, error: &RegistryError) {
        metrics::counter!(ERRORS_TOTAL).increment(1);
        if self.up != Some(false) {
            warn!(%error, "redis unreachable, connections kept in memory until it returns");
            self.up = Some(false);
            metrics::gauge!(UP).set(0.0);
        } else {
            debug!(%error, "redis still unreachable");
        }
        *lock(&self.shared.health) = Err(format!("redis unreachable: {error}"));
        self.needs_rewrite = true;
        self.retry_at = Instant::now() + RETRY_EVERY;
        if error.is_timeout() {
            self.replace_connection();
        }
    }

    /// A timed-out connection may hang on a peer that vanished without a reset: start afresh.
    fn replace_connection(&self) {
        match connection_manager(&self.shared.client) {
            Ok(conn) => *lock(&self.shared.conn) = conn,
            Err(error) => debug!(%error, "redis connection not replaced"),
        }
    }
}

/// Remove from Redis the entries of `node` whose `(conn, user)` passes `remove`; returns how many.
///
/// Walks the node's set with `SSCAN` (which tolerates removals during the walk) and removes each passing
/// member from it and from its user's set. Idempotent: survivors forgetting the same node at once only
/// repeat each other's removals.
async fn forget(
    conn: &mut ConnectionManager,
    keys: &Keys,
    node: &NodeId,
    remove: impl Fn((ConnId, &str)) -> bool,
) -> Result<usize, RegistryError> {
    let node_set = keys.node_set(node);
    let mut removed = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, members): (u64, Vec<String>) = bounded(
            redis::cmd("SSCAN")
                .arg(&node_set)
                .arg(cursor)
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(conn),
        )
        .await?;
        let mut pipe = redis::pipe();
        for member in &members {
            let keep = parse_node_member(member).is_some_and(|parsed| !remove(parsed));
            if keep {
                continue;
            }
            pipe.cmd("SREM").arg(&node_set).arg(member).ignore();
            if let Some((c, user)) = parse_node_member(member) {
                pipe.cmd("ZREM")
                    .arg(keys.user(user))
                    .arg(user_member(node, c))
                    .ignore();
                removed += 1;
            }
        }
        if !pipe.is_empty() {
            bounded(pipe.exec_async(conn)).await?;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// One exchange with Redis, bounded by [`EXCHANGE_TIMEOUT`].
async fn bounded<T>(
    exchange: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RegistryError::Timeout(EXCHANGE_TIMEOUT)),
    }
}

/// A lazy connection: made on first use, remade by the manager after the connection drops.
fn connection_manager(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        // The writer retries on its own schedule; the manager should fail fast rather than queue.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

fn describe_metrics() {
    metrics::describe_counter!(
        WRITES_TOTAL,
        "Successful write exchanges (pipelines) with the Redis connection registry."
    );
    metrics::describe_counter!(
        ERRORS_TOTAL,
        "Failed exchanges of the registry writer with Redis."
    );
    metrics::describe_gauge!(
        UP,
        "1 while the registry writer's last exchange with Redis succeeded, else 0."
    );
}

fn local_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
}

/// Locks never held across an await or a panic point, so poisoning cannot hide a broken invariant.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_member_round_trips_a_node_name_with_slashes() {
        let node = NodeId("eu/west/n1".to_owned());
        let member = user_member(&node, 42);
        assert_eq!(parse_user_member(&member), Some((node, 42)));
    }

    #[test]
    fn node_member_round_trips_a_user_id_with_slashes_and_colons() {
        let member = node_member(7, "org:acme/team/bob");
        assert_eq!(parse_node_member(&member), Some((7, "org:acme/team/bob")));
    }

    #[test]
    fn malformed_members_are_rejected() {
        assert_eq!(parse_user_member("no-slash"), None);
        assert_eq!(parse_user_member("n1/not-a-number"), None);
        assert_eq!(parse_node_member("x/alice"), None);
        assert_eq!(parse_node_member("12"), None);
    }

    #[test]
    fn keys_carry_the_prefix() {
        let keys = Keys {
            prefix: "sb".to_owned(),
            node: NodeId("n1".to_owned()),
        };
        assert_eq!(keys.user("a:b/c"), "sb:user:a:b/c");
        assert_eq!(keys.node_set(&NodeId("n2".to_owned())), "sb:node:n2");
    }

    #[test]
    fn start_rejects_a_ttl_not_longer_than_the_heartbeat() {
        let mut config = RegistryConfig::new("redis://127.0.0.1:1", NodeId("n1".to_owned()));
        config.ttl = config.heartbeat;
        assert!(matches!(
            RedisRegistry::start(config),
            Err(RegistryError::InvalidConfig(_))
        ));
    }
}
