//! The distributed store: Apache Cassandra through cdrs-tokio.
//!
//! Tables are shaped by the queries (`docs/decisions/0006-cassandra-schema.md`): messages partitioned by
//! conversation and clustered by seq, newest first; the dedupe index in the conversation's partition;
//! members by conversation; conversations by user (the inbox). Message rows are insert-only: they are
//! written with `IF NOT EXISTS` in one conditional batch per append, so two writers can never both own a
//! seq (Cassandra's last-write-wins would silently keep one of them). That batch is the seq fence.
//!
//! Every call is bounded by the configured timeout; a timeout or a driver error is
//! [`StoreError::Unavailable`], so nothing is acknowledged unless Cassandra confirmed it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cdrs_tokio::authenticators::NoneAuthenticatorProvider;
use cdrs_tokio::cluster::send_envelope::send_envelope;
use cdrs_tokio::cluster::session::{Session, SessionBuilder, TcpSessionBuilder};
use cdrs_tokio::cluster::{NodeTcpConfigBuilder, TcpConnectionManager};
use cdrs_tokio::consistency::Consistency;
use cdrs_tokio::frame::message_query::BodyReqQuery;
use cdrs_tokio::frame::{Envelope, Flags, Version};
use cdrs_tokio::load_balancing::{QueryPlan, RoundRobinLoadBalancingStrategy};
use cdrs_tokio::query::{BatchQueryBuilder, PreparedQuery, QueryParams, QueryValues};
use cdrs_tokio::query_values;
use cdrs_tokio::statement::StatementParamsBuilder;
use cdrs_tokio::transport::TransportTcp;
use cdrs_tokio::types::blob::Blob;
use cdrs_tokio::types::rows::Row;
use cdrs_tokio::types::IntoRustByName;
use futures_util::future::try_join_all;
use switchboard_actors::store::{
    dm_pair, plan_append, Appended, ConvId, ConversationInfo, ConversationKind, HistoryQuery,
    Membership, Message, MessageStore, NewMessage, Page, StoreError, UserId,
};
use tracing::{debug, info, warn};

type CurrentSession = Session<
    TransportTcp,
    TcpConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportTcp, TcpConnectionManager>,
>;

/// The schema version this binary writes and reads.
const SCHEMA_VERSION: i32 = 3;
/// Largest conditional batch, in bytes of message bodies (Cassandra refuses batches over
/// `batch_size_fail_threshold`, 50 KiB by default).
const MAX_BATCH_BYTES: usize = 32 * 1024;
/// Concurrent statements when writing a large group's member rows.
const WRITE_FANOUT: usize = 64;

/// Replication of the keyspace (used only when the keyspace is created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with a replication factor.
    Simple(u32),
    /// `NetworkTopologyStrategy` with one data centre and its replication factor.
    NetworkTopology {
        /// Data-centre name.
        dc: String,
        /// Replication factor in it.
        rf: u32,
    },
}

/// Where and how to reach Cassandra: `cassandra://host:port[,host:port]/keyspace[?options]`.
///
/// Options: `rf` (replication factor, default 1), `dc` (switches to NetworkTopologyStrategy in that data
/// centre), `consistency` (`one`, `quorum`, `local_quorum`, `all`; default `local_quorum`),
/// `timeout_ms` (per request, default 5000).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CassandraConfig {
    /// Contact points.
    pub contact_points: Vec<String>,
    /// Keyspace.
    pub keyspace: String,
    /// Replication for `CREATE KEYSPACE IF NOT EXISTS`.
    pub replication: Replication,
    /// Consistency of reads and writes.
    pub consistency: Consistency,
    /// Bound on every request.
    pub timeout: Duration,
}

impl CassandraConfig {
    /// Parse a `cassandra://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("cassandra://")
            .ok_or("a Cassandra store URL starts with cassandra://")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = path.split_once('/').ok_or("missing /keyspace")?;
        let contact_points: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if contact_points.is_empty() {
            return Err("no contact point".into());
        }
        if keyspace.is_empty()
            || !keyspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || keyspace.len() > 48
        {
            return Err("the keyspace must be 1-48 of [A-Za-z0-9_]".into());
        }
        let mut rf = 1;
        let mut dc = None;
        let mut consistency = Consistency::LocalQuorum;
        let mut timeout = Duration::from_millis(5000);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("bad option {pair:?}"))?;
            match k {
                "rf" => rf = v.parse().map_err(|_| format!("rf {v:?} is not a number"))?,
                "dc" => dc = Some(v.to_owned()),
                "consistency" => {
                    consistency = match v {
                        "one" => Consistency::One,
                        "quorum" => Consistency::Quorum,
                        "local_quorum" => Consistency::LocalQuorum,
                        "all" => Consistency::All,
                        other => {
                            return Err(format!(
                                "consistency {other:?}: use one, quorum, local_quorum or all"
                            ))
                        }
                    }
                }
                "timeout_ms" => {
                    timeout = Duration::from_millis(
                        v.parse()
                            .map_err(|_| format!("timeout_ms {v:?} is not a number"))?,
                    )
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if rf == 0 {
            return Err("rf must be at least 1".into());
        }
        let replication = match dc {
            Some(dc) => Replication::NetworkTopology { dc, rf },
            None => Replication::Simple(rf),
        };
        Ok(Self {
            contact_points,
            keyspace: keyspace.to_owned(),
            replication,
            consistency,
            timeout,
        })
    }
}

struct Statements {
    insert_read: PreparedQuery,
    select_reads: PreparedQuery,
    insert_conversation: PreparedQuery,
    select_conversation: PreparedQuery,
    insert_member: PreparedQuery,
    delete_member: PreparedQuery,
    select_members: PreparedQuery,
    select_member: PreparedQuery,
    insert_owner: PreparedQuery,
    delete_owner: PreparedQuery,
    select_owners: PreparedQuery,
    select_owner: PreparedQuery,
    insert_user_conversation: PreparedQuery,
    delete_user_conversation: PreparedQuery,
    select_user_conversations: PreparedQuery,
    insert_dm_pair: PreparedQuery,
    select_dm_pair: PreparedQuery,
    insert_message: PreparedQuery,
    select_message: PreparedQuery,
    select_newest: PreparedQuery,
    select_forward: PreparedQuery,
    select_backward: PreparedQuery,
    insert_dedupe: PreparedQuery,
    select_dedupe: PreparedQuery,
}

/// A session and the statements prepared on it.
struct Conn {
    session: CurrentSession,
    st: Statements,
}

/// The Cassandra-backed store.
pub struct CassandraStore {
    conn: std::sync::RwLock<Arc<Conn>>,
    config: CassandraConfig,
    /// When the session was last rebuilt (at most once per [`RECONNECT_EVERY`]).
    last_reconnect: tokio::sync::Mutex<std::time::Instant>,
}

/// Least time between two session rebuilds.
const RECONNECT_EVERY: Duration = Duration::from_secs(5);

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

const MESSAGE_COLUMNS: &str = "conv, seq, id, msg_id, sender, body, ts";

impl CassandraStore {
    /// Connect, create the keyspace and tables if missing, check the schema version, prepare statements.
    pub async fn open(config: CassandraConfig) -> Result<Self, StoreError> {
        let timeout = config.timeout.max(Duration::from_secs(30));
        let session = connect(&config, timeout).await?;
        let ks = &config.keyspace;
        let replication = match &config.replication {
            Replication::Simple(rf) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}")
            }
            Replication::NetworkTopology { dc, rf } => {
                format!("{{'class': 'NetworkTopologyStrategy', '{dc}': {rf}}}")
            }
        };
        let ddl = [
            format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"),
            format!("CREATE TABLE IF NOT EXISTS {ks}.schema_version (component text PRIMARY KEY, version int)"),
            format!("CREATE TABLE IF NOT EXISTS {ks}.conversations (id text PRIMARY KEY, info blob)"),
            format!("CREATE TABLE IF NOT EXISTS {ks}.members (conv text, member text, joined_at bigint, PRIMARY KEY ((conv), member))"),
            format!("CREATE TABLE IF NOT EXISTS {ks}.conversations_by_user (member text, conv text, PRIMARY KEY ((member), conv))"),
            format!("CREATE TABLE IF NOT EXISTS {ks}.dm_pairs (a text, b text, conv text, PRIMARY KEY ((a, b)))"),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.messages (conv text, seq bigint, id text, msg_id text, sender text, \
                 body text, ts bigint, PRIMARY KEY ((conv), seq)) WITH CLUSTERING ORDER BY (seq DESC)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.dedupe (conv text, sender text, msg_id text, seq bigint, \
                 PRIMARY KEY ((conv), sender, msg_id))"
            ),
            // Version 2: read positions, written `USING TIMESTAMP seq` so that the highest seq wins.
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.read_positions (member text, conv text, seq bigint, \
                 PRIMARY KEY ((member), conv))"
            ),
            // Version 3: a group's owners.
            format!("CREATE TABLE IF NOT EXISTS {ks}.owners (conv text, owner text, PRIMARY KEY ((conv), owner))"),
        ];
        for statement in &ddl {
            // cdrs does not wait for schema agreement: a node may not know the keyspace or table created
            // a moment ago through another coordinator. Every statement is idempotent; retry briefly.
            until_schema_agrees(|| async {
                tokio::time::timeout(timeout, session.query(statement.as_str()))
                    .await
                    .map_err(|_| "schema change timed out".to_owned())?
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| unavailable(format!("{statement}: {e}")))?;
        }
        await_schema_agreement(&session, timeout).await;
        let st = prepare_all(&session, ks, timeout).await?;
        let store = Self {
            conn: std::sync::RwLock::new(Arc::new(Conn { session, st })),
            config,
            last_reconnect: tokio::sync::Mutex::new(std::time::Instant::now()),
        };
        store.check_schema_version().await?;
        info!(keyspace = %store.config.keyspace, "cassandra store ready");
        Ok(store)
    }

    /// Statement parameters at the configured consistency (and its serial level for conditional writes).
    fn params(&self, values: QueryValues) -> cdrs_tokio::statement::StatementParams {
        StatementParamsBuilder::new()
            .with_values(values)
            .with_consistency(self.config.consistency)
            .with_serial_consistency(serial(self.config.consistency))
            .build()
    }

    fn conn(&self) -> Arc<Conn> {
        self.conn.read().expect("conn lock").clone()
    }

    /// The driver gave up on every node (all were down at once): rebuild the session from the contact
    /// points, at most once per [`RECONNECT_EVERY`]. The failed request still fails; the next ones use
    /// the new session.
    async fn reconnect(&self) {
        let Ok(mut last) = self.last_reconnect.try_lock() else {
            return;
        };
        if last.elapsed() < RECONNECT_EVERY {
            return;
        }
        *last = std::time::Instant::now();
        let fresh = async {
            let session = connect(&self.config, self.config.timeout).await?;
            let st = prepare_all(&session, &self.config.keyspace, self.config.timeout).await?;
            Ok::<_, StoreError>(Conn { session, st })
        };
        match fresh.await {
            Ok(conn) => {
                *self.conn.write().expect("conn lock") = Arc::new(conn);
                info!("cassandra session rebuilt");
            }
            Err(e) => warn!(error = %e, "cassandra still unreachable"),
        }
    }

    async fn check_schema_version(&self) -> Result<(), StoreError> {
        let c = self.conn();
        let ks = &self.config.keyspace;
        let insert = format!("INSERT INTO {ks}.schema_version (component, version) VALUES ('messages', ?) IF NOT EXISTS");
        // cdrs's plain `query` reads at ONE: with RF > 1 that may miss the row just written.
        self.bounded(
            c.session
                .query_with_params(insert, self.params(query_values!(SCHEMA_VERSION))),
        )
        .await?;
        let select =
            format!("SELECT version FROM {ks}.schema_version WHERE component = 'messages'");
        let rows = rows(
            self.bounded(
                c.session
                    .query_with_params(select, self.params(QueryValues::SimpleValues(vec![]))),
            )
            .await?,
        )?;
        let version: i32 = rows
            .first()
            .ok_or_else(|| corrupt("no schema version"))?
            .get_r_by_name("version")
            .map_err(corrupt)?;
        if version > SCHEMA_VERSION {
            return Err(corrupt(format!(
                "keyspace schema version {version} is newer than this binary ({SCHEMA_VERSION})"
            )));
        }
        if version < SCHEMA_VERSION {
            // Every step so far only adds tables, which the DDL above has created: record the new version.
            let update =
                format!("UPDATE {ks}.schema_version SET version = ? WHERE component = 'messages'");
            self.bounded(
                c.session
                    .query_with_params(update, self.params(query_values!(SCHEMA_VERSION))),
            )
            .await?;
            info!(
                from = version,
                to = SCHEMA_VERSION,
                "keyspace schema upgraded"
            );
        }
        Ok(())
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = cdrs_tokio::error::Result<T>>,
    ) -> Result<T, StoreError> {
        let result = tokio::time::timeout(self.config.timeout, fut)
            .await
            .map_err(|_| unavailable("cassandra timed out"))?
            .map_err(unavailable);
        if let Err(StoreError::Unavailable(e)) = &result {
            if e.contains("No nodes available") {
                self.reconnect().await;
            }
        }
        result
    }

    /// Run a prepared statement at the configured consistency, within the timeout.
    async fn send(
        &self,
        statement: fn(&Statements) -> &PreparedQuery,
        values: QueryValues,
    ) -> Result<Envelope, StoreError> {
        let c = self.conn();
        let params = self.params(values);
        self.bounded(c.session.exec_with_params(statement(&c.st), &params))
            .await
    }

    /// Run a write; its answer carries nothing.
    async fn exec(
        &self,
        statement: fn(&Statements) -> &PreparedQuery,
        values: QueryValues,
    ) -> Result<(), StoreError> {
        self.send(statement, values).await.map(drop)
    }

    /// Run a read or a conditional write: its answer must be rows (an empty result is an answer; anything
    /// else is an error, never "no such row").
    async fn fetch(
        &self,
        statement: fn(&Statements) -> &PreparedQuery,
        values: QueryValues,
    ) -> Result<Vec<Row>, StoreError> {
        rows(self.send(statement, values).await?)
    }

    async fn message_at(&self, conv: &str, seq: u64) -> Result<Option<Message>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_message, query_values!(conv, seq as i64))
            .await?;
        rows.first().map(message_from_row).transpose()
    }

    /// The stored original of `(conv, from, msg_id)`, if any. A dedupe entry is written before its message
    /// and is only believed when the message at its seq is really that message.
    async fn original(&self, conv: &str, m: &NewMessage) -> Result<Option<Message>, StoreError> {
        let rows = self
            .fetch(
                |s| &s.select_dedupe,
                query_values!(conv, m.from.as_str(), m.msg_id.as_str()),
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let seq: i64 = row.get_r_by_name("seq").map_err(corrupt)?;
        Ok(self
            .message_at(conv, seq as u64)
            .await?
            .filter(|o| o.from == m.from && o.msg_id == m.msg_id))
    }

    /// Write `messages` (consecutive seqs) with one conditional batch: all or none.
    async fn insert_messages(&self, conv: &str, messages: &[&Message]) -> Result<bool, StoreError> {
        let c = self.conn();
        let mut dedupe = BatchQueryBuilder::new()
            .with_batch_type(cdrs_tokio::frame::message_batch::BatchType::Unlogged);
        let mut insert = BatchQueryBuilder::new()
            .with_consistency(self.config.consistency)
            .with_serial_consistency(serial(self.config.consistency));
        for m in messages {
            dedupe = dedupe.add_query_prepared(
                &c.st.insert_dedupe,
                query_values!(conv, m.from.as_str(), m.msg_id.as_str(), m.seq as i64),
            );
            insert = insert.add_query_prepared(
                &c.st.insert_message,
                query_values!(
                    conv,
                    m.seq as i64,
                    m.id.as_str(),
                    m.msg_id.as_str(),
                    m.from.as_str(),
                    m.body.as_str(),
                    m.ts as i64
                ),
            );
        }
        let dedupe = dedupe
            .with_consistency(self.config.consistency)
            .build()
            .map_err(unavailable)?;
        self.bounded(c.session.batch(dedupe)).await?;
        let insert = insert.build().map_err(unavailable)?;
        let rows = rows(self.bounded(c.session.batch(insert)).await?)?;
        applied(&rows)
    }
}

/// A session on the contact points, within `timeout`.
async fn connect(
    config: &CassandraConfig,
    timeout: Duration,
) -> Result<CurrentSession, StoreError> {
    let connect = async {
        let nodes = NodeTcpConfigBuilder::new()
            .with_contact_points(
                config
                    .contact_points
                    .iter()
                    .map(|c| c.as_str().into())
                    .collect(),
            )
            .with_authenticator_provider(Arc::new(NoneAuthenticatorProvider))
            .build()
            .await
            .map_err(unavailable)?;
        TcpSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), nodes)
            .build()
            .await
            .map_err(unavailable)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| unavailable("connect timed out"))?
}

/// Prepare every statement. Each is prepared through the load balancer (which must succeed), then on every
/// other node the driver knows (best effort), as the Java driver does: Cassandra keeps prepared statements
/// per node, and cdrs-tokio only re-prepares on the node that answers "unprepared" — which fails if that
/// node restarted and has not caught up yet.
async fn prepare_all(
    session: &CurrentSession,
    ks: &str,
    timeout: Duration,
) -> Result<Statements, StoreError> {
    let nodes = session.cluster_metadata().unignored_nodes();
    let prepare = |cql: String| {
        let nodes = nodes.clone();
        async move {
            let prepared = until_schema_agrees(|| async {
                tokio::time::timeout(timeout, session.prepare(cql.as_str()))
                    .await
                    .map_err(|_| "prepare timed out".to_owned())?
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| unavailable(format!("prepare {cql}: {e}")))?;
            for node in nodes {
                let addr = node.broadcast_rpc_address();
                let on_node = session.prepare_raw_tw_with_query_plan(
                    cql.as_str(),
                    None,
                    false,
                    false,
                    false,
                    Some(QueryPlan::new(vec![node])),
                );
                match tokio::time::timeout(PER_NODE_TIMEOUT, on_node).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => debug!(%addr, error = %e, "statement not prepared on this node"),
                    Err(_) => debug!(%addr, "preparing on this node timed out"),
                }
            }
            Ok::<_, StoreError>(prepared)
        }
    };
    let m = MESSAGE_COLUMNS;
    Ok(Statements {
        insert_conversation: prepare(format!("INSERT INTO {ks}.conversations (id, info) VALUES (?, ?)")).await?,
        select_conversation: prepare(format!("SELECT info FROM {ks}.conversations WHERE id = ?")).await?,
        insert_member: prepare(format!("INSERT INTO {ks}.members (conv, member, joined_at) VALUES (?, ?, ?)")).await?,
        delete_member: prepare(format!("DELETE FROM {ks}.members WHERE conv = ? AND member = ?")).await?,
        select_members: prepare(format!("SELECT member FROM {ks}.members WHERE conv = ?")).await?,
        select_member: prepare(format!("SELECT member FROM {ks}.members WHERE conv = ? AND member = ?")).await?,
        insert_owner: prepare(format!("INSERT INTO {ks}.owners (conv, owner) VALUES (?, ?)")).await?,
        delete_owner: prepare(format!("DELETE FROM {ks}.owners WHERE conv = ? AND owner = ?")).await?,
        select_owners: prepare(format!("SELECT owner FROM {ks}.owners WHERE conv = ?")).await?,
        select_owner: prepare(format!("SELECT owner FROM {ks}.owners WHERE conv = ? AND owner = ?")).await?,
        insert_user_conversation: prepare(format!("INSERT INTO {ks}.conversations_by_user (member, conv) VALUES (?, ?)")).await?,
        delete_user_conversation: prepare(format!("DELETE FROM {ks}.conversations_by_user WHERE member = ? AND conv = ?")).await?,
        select_user_conversations: prepare(format!("SELECT conv FROM {ks}.conversations_by_user WHERE member = ?")).await?,
        insert_dm_pair: prepare(format!("INSERT INTO {ks}.dm_pairs (a, b, conv) VALUES (?, ?, ?) IF NOT EXISTS")).await?,
        select_dm_pair: prepare(format!("SELECT conv FROM {ks}.dm_pairs WHERE a = ? AND b = ?")).await?,
        insert_message: prepare(format!("INSERT INTO {ks}.messages ({m}) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS")).await?,
        select_message: prepare(format!("SELECT {m} FROM {ks}.messages WHERE conv = ? AND seq = ?")).await?,
        select_newest: prepare(format!("SELECT {m} FROM {ks}.messages WHERE conv = ? LIMIT 1")).await?,
        select_forward: prepare(format!(
            "SELECT {m} FROM {ks}.messages WHERE conv = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
        ))
        .await?,
        select_backward: prepare(format!("SELECT {m} FROM {ks}.messages WHERE conv = ? AND seq > ? AND seq < ? LIMIT ?")).await?,
        insert_dedupe: prepare(format!("INSERT INTO {ks}.dedupe (conv, sender, msg_id, seq) VALUES (?, ?, ?, ?)")).await?,
        select_dedupe: prepare(format!("SELECT seq FROM {ks}.dedupe WHERE conv = ? AND sender = ? AND msg_id = ?")).await?,
        insert_read: prepare(format!("INSERT INTO {ks}.read_positions (member, conv, seq) VALUES (?, ?, ?) USING TIMESTAMP ?")).await?,
        select_reads: prepare(format!("SELECT conv, seq FROM {ks}.read_positions WHERE member = ?")).await?,
    })
}

/// How long one node may take to answer a per-node request (schema version, prepare).
const PER_NODE_TIMEOUT: Duration = Duration::from_secs(2);

/// Wait, for up to `timeout`, until every node that answers reports the same schema version (what drivers
/// call schema agreement). cdrs-tokio does not wait after a schema change, and a node that has not applied
/// it yet cannot prepare statements on the new tables. A node that does not answer is down: it loads the
/// schema when it comes back. Without agreement in time, go on: [`until_schema_agrees`] and the driver's
/// re-prepare still cover a late node, and the wait is logged.
async fn await_schema_agreement(session: &CurrentSession, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let query = Envelope::new_query(
        BodyReqQuery {
            query: "SELECT schema_version FROM system.local".into(),
            query_params: QueryParams {
                consistency: Consistency::One,
                ..QueryParams::default()
            },
        },
        Flags::empty(),
        Version::V4,
    );
    loop {
        let mut versions = Vec::new();
        for node in session.cluster_metadata().unignored_nodes() {
            let answer = tokio::time::timeout(
                PER_NODE_TIMEOUT,
                send_envelope(
                    std::iter::once(node),
                    &query,
                    true,
                    session.retry_policy().new_session(),
                ),
            )
            .await;
            let Ok(Some(Ok(envelope))) = answer else {
                continue;
            };
            let version: Option<uuid::Uuid> = rows(envelope).ok().and_then(|rows| {
                rows.first()
                    .and_then(|r| r.get_r_by_name("schema_version").ok())
            });
            versions.extend(version);
        }
        versions.dedup();
        if versions.len() == 1 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(?versions, "no schema agreement among the nodes; going on");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run a schema step until it succeeds, for up to ~15 s: right after a schema change, the node that
/// coordinates the next request may not have received it yet.
async fn until_schema_agrees<T, F, Fut>(mut step: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for _ in 0..60 {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

/// The serial consistency that goes with a consistency level.
fn serial(c: Consistency) -> Consistency {
    match c {
        Consistency::LocalQuorum | Consistency::One | Consistency::LocalOne => {
            Consistency::LocalSerial
        }
        _ => Consistency::Serial,
    }
}

/// The rows of an answer that must carry rows. Anything else (seen right after a whole cluster restarted)
/// is an error: read as "no rows", it told a member they were not one.
fn rows(envelope: Envelope) -> Result<Vec<Row>, StoreError> {
    envelope
        .response_body()
        .map_err(corrupt)?
        .into_rows()
        .ok_or_else(|| StoreError::Unavailable("Cassandra answered a read without rows".into()))
}

/// The `[applied]` column of a conditional statement's answer.
fn applied(rows: &[Row]) -> Result<bool, StoreError> {
    let row = rows
        .first()
        .ok_or_else(|| corrupt("conditional write without [applied]"))?;
    row.get_r_by_name("[applied]").map_err(corrupt)
}

fn message_from_row(row: &Row) -> Result<Message, StoreError> {
    let text =
        |name: &str| -> Result<String, StoreError> { row.get_r_by_name(name).map_err(corrupt) };
    let num = |name: &str| -> Result<u64, StoreError> {
        IntoRustByName::<i64>::get_r_by_name(row, name)
            .map(|v| v as u64)
            .map_err(corrupt)
    };
    Ok(Message {
        conv: text("conv")?,
        seq: num("seq")?,
        id: text("id")?,
        msg_id: text("msg_id")?,
        from: text("sender")?,
        body: text("body")?,
        ts: num("ts")?,
    })
}

/// Bind a u64 cursor as a bigint, clamped to the column's range.
fn seq_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl MessageStore for CassandraStore {
    async fn create_conversation(
        &self,
        info: ConversationInfo,
        members: Vec<UserId>,
    ) -> Result<(ConversationInfo, bool), StoreError> {
        let mut info = info;
        let mut created = true;
        if info.kind == ConversationKind::Dm {
            let (a, b) = dm_pair(&members);
            let rows = self
                .fetch(|s| &s.insert_dm_pair, query_values!(a, b, info.id.as_str()))
                .await?;
            if !applied(&rows)? {
                let rows = self
                    .fetch(|s| &s.select_dm_pair, query_values!(a, b))
                    .await?;
                let id: String = rows
                    .first()
                    .ok_or_else(|| corrupt("dm pair vanished"))?
                    .get_r_by_name("conv")
                    .map_err(corrupt)?;
                if let Some(existing) = self.conversation(&id).await? {
                    return Ok((existing, false));
                }
                // The pair was claimed but the conversation never finished: finish it under the claimed id.
                info.id = id;
                created = false;
            }
        }
        // Members first, the conversation row last: a conversation is visible only once it is complete.
        let conv = info.id.as_str();
        for chunk in members.chunks(WRITE_FANOUT) {
            try_join_all(chunk.iter().map(|user| async move {
                self.exec(
                    |s| &s.insert_member,
                    query_values!(conv, user.as_str(), info.created_at as i64),
                )
                .await?;
                self.exec(
                    |s| &s.insert_user_conversation,
                    query_values!(user.as_str(), conv),
                )
                .await
            }))
            .await?;
        }
        let raw = postcard::to_stdvec(&info).map_err(corrupt)?;
        self.exec(
            |s| &s.insert_conversation,
            query_values!(conv, Blob::from(raw)),
        )
        .await?;
        Ok((info, created))
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConversationInfo>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_conversation, query_values!(conv))
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let blob: Blob = row.get_r_by_name("info").map_err(corrupt)?;
        postcard::from_bytes(&blob.into_vec())
            .map(Some)
            .map_err(corrupt)
    }

    async fn members(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_members, query_values!(conv))
            .await?;
        rows.iter()
            .map(|r| IntoRustByName::<String>::get_r_by_name(r, "member").map_err(corrupt))
            .collect()
    }

    async fn membership(&self, conv: &str, user: &str) -> Result<Membership, StoreError> {
        if !self
            .fetch(|s| &s.select_member, query_values!(conv, user))
            .await?
            .is_empty()
        {
            return Ok(Membership::Member);
        }
        Ok(if self.conversation(conv).await?.is_some() {
            Membership::NotMember
        } else {
            Membership::Unknown
        })
    }

    async fn add_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        let existed = !self
            .fetch(|s| &s.select_member, query_values!(conv, user))
            .await?
            .is_empty();
        let now = switchboard_actors::conversation::now_ms() as i64;
        self.exec(|s| &s.insert_member, query_values!(conv, user, now))
            .await?;
        self.exec(|s| &s.insert_user_conversation, query_values!(user, conv))
            .await?;
        Ok(!existed)
    }

    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<(), StoreError> {
        // Last write wins by timestamp: with the seq as the timestamp the highest position wins, whatever
        // order the writes arrive in, with no read and no Paxos round. Rows are never deleted (a tombstone
        // with a wall-clock timestamp would shadow every later position).
        let seq = i64::try_from(seq).map_err(|_| corrupt("seq out of range"))?;
        self.exec(|s| &s.insert_read, query_values!(user, conv, seq, seq))
            .await
    }

    async fn read_positions(
        &self,
        user: &str,
    ) -> Result<std::collections::HashMap<ConvId, u64>, StoreError> {
        let rows = self.fetch(|s| &s.select_reads, query_values!(user)).await?;
        rows.iter()
            .map(|r| {
                let conv: String = IntoRustByName::get_r_by_name(r, "conv").map_err(corrupt)?;
                let seq: i64 = IntoRustByName::get_r_by_name(r, "seq").map_err(corrupt)?;
                Ok((conv, seq.max(0) as u64))
            })
            .collect()
    }

    async fn remove_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        let existed = !self
            .fetch(|s| &s.select_member, query_values!(conv, user))
            .await?
            .is_empty();
        self.exec(|s| &s.delete_owner, query_values!(conv, user))
            .await?;
        self.exec(|s| &s.delete_member, query_values!(conv, user))
            .await?;
        self.exec(|s| &s.delete_user_conversation, query_values!(user, conv))
            .await?;
        Ok(existed)
    }

    async fn owners(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_owners, query_values!(conv))
            .await?;
        rows.iter()
            .map(|r| IntoRustByName::<String>::get_r_by_name(r, "owner").map_err(corrupt))
            .collect()
    }

    async fn set_owner(&self, conv: &str, user: &str, owner: bool) -> Result<bool, StoreError> {
        let was = !self
            .fetch(|s| &s.select_owner, query_values!(conv, user))
            .await?
            .is_empty();
        if owner {
            self.exec(|s| &s.insert_owner, query_values!(conv, user))
                .await?;
        } else {
            self.exec(|s| &s.delete_owner, query_values!(conv, user))
                .await?;
        }
        Ok(was != owner)
    }

    async fn user_conversations(&self, user: &str) -> Result<Vec<ConvId>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_user_conversations, query_values!(user))
            .await?;
        rows.iter()
            .map(|r| IntoRustByName::<String>::get_r_by_name(r, "conv").map_err(corrupt))
            .collect()
    }

    async fn last_message(&self, conv: &str) -> Result<Option<Message>, StoreError> {
        let rows = self
            .fetch(|s| &s.select_newest, query_values!(conv))
            .await?;
        rows.first().map(message_from_row).transpose()
    }

    async fn append(
        &self,
        conv: &str,
        first_seq: u64,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StoreError> {
        let found = self.last_seq(conv).await?;
        if found + 1 != first_seq {
            return Err(StoreError::SeqConflict {
                expected: first_seq,
                found,
            });
        }
        // Read phase: which messages are resends (of earlier writes, or of each other in this batch).
        let originals = try_join_all(batch.iter().map(|m| self.original(conv, m))).await?;
        let results = plan_append(conv, first_seq, batch, originals);
        // Write phase: conditional batches of bounded size, in seq order. Each is all-or-nothing; if one is
        // refused, what earlier ones wrote is a gap-free prefix that resends will find through dedupe.
        let new: Vec<&Message> = results
            .iter()
            .filter_map(|r| {
                if let Appended::New(m) = r {
                    Some(m)
                } else {
                    None
                }
            })
            .collect();
        let mut start = 0;
        while start < new.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < new.len()
                && (end == start || bytes + new[end].body.len() <= MAX_BATCH_BYTES)
            {
                bytes += new[end].body.len() + 128;
                end += 1;
            }
            if !self.insert_messages(conv, &new[start..end]).await? {
                let found = self.last_seq(conv).await?;
                return Err(StoreError::SeqConflict {
                    expected: new[start].seq,
                    found,
                });
            }
            start = end;
        }
        Ok(results)
    }

    async fn messages(&self, conv: &str, query: HistoryQuery) -> Result<Page, StoreError> {
        let low = seq_value(query.after.unwrap_or(0));
        let high = seq_value(query.before.unwrap_or(u64::MAX));
        let limit = i32::try_from(query.limit + 1).unwrap_or(i32::MAX);
        let statement: fn(&Statements) -> &PreparedQuery = if query.after.is_some() {
            |s| &s.select_forward
        } else {
            |s| &s.select_backward
        };
        let rows = self
            .fetch(statement, query_values!(conv, low, high, limit))
            .await?;
        let mut messages: Vec<Message> = rows
            .iter()
            .map(message_from_row)
            .collect::<Result<_, _>>()?;
        let has_more = messages.len() > query.limit;
        messages.truncate(query.limit);
        if query.after.is_none() {
            messages.reverse();
        }
        Ok(Page { messages, has_more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let c = CassandraConfig::parse(
            "cassandra://127.0.0.1:9042,127.0.0.2:9042/chat?rf=3&consistency=quorum&timeout_ms=800",
        )
        .unwrap();
        assert_eq!(c.contact_points, vec!["127.0.0.1:9042", "127.0.0.2:9042"]);
        assert_eq!(c.keyspace, "chat");
        assert_eq!(c.replication, Replication::Simple(3));
        assert_eq!(c.consistency, Consistency::Quorum);
        assert_eq!(c.timeout, Duration::from_millis(800));
        let c = CassandraConfig::parse("cassandra://db:9042/chat?dc=eu1&rf=2").unwrap();
        assert_eq!(
            c.replication,
            Replication::NetworkTopology {
                dc: "eu1".into(),
                rf: 2
            }
        );
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        for bad in [
            "http://x/ks",
            "cassandra://x",
            "cassandra:///ks",
            "cassandra://x/k-s",
            "cassandra://x/ks?rf=0",
            "cassandra://x/ks?foo=1",
        ] {
            assert!(CassandraConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
