//! One typed configuration, layered: command-line flag > `SWITCHBOARD_*` environment > TOML file > default.
//!
//! [`Settings`] is both the clap argument group and the TOML file's shape, so a setting has one name
//! everywhere (`--max-body-bytes`, `SWITCHBOARD_MAX_BODY_BYTES`, `max_body_bytes = …`). `switchboard.example.toml`
//! lists every setting with its default; a test keeps it complete.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use switchboard_cluster::tls::TlsFiles;
use switchboard_cluster::NodeId;

use crate::hook::HookConfig;
use crate::push::PushConfig;
use crate::store::cassandra::CassandraConfig;

/// Every setting, all optional so that the layers can be merged.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded store and the dev token secret [default: ./data].
    #[arg(long, env = "SWITCHBOARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Message store: `embedded` (a write-ahead log and fjall in the data directory) or
    /// `cassandra://host:port[,host:port]/keyspace[?rf=N&dc=NAME&consistency=local_quorum&timeout_ms=5000]`
    /// [default: embedded].
    #[arg(long, env = "SWITCHBOARD_STORE")]
    pub store: Option<String>,
    /// HS256 secret for JWTs. Without it (and without a public key) a secret kept in the data directory is used.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256 or EdDSA JWTs (with --jwt-algorithm).
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// JWT algorithm: HS256, RS256 or EdDSA [default: HS256].
    #[arg(long, env = "SWITCHBOARD_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on a JWT's `exp` and `nbf`, in seconds; a WebSocket is closed with 1008 this long
    /// after its token's `exp` [default: 30].
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY_SECS")]
    pub jwt_leeway_secs: Option<u64>,
    /// Enable `POST /v1/dev/token` [default: on only when listening on a loopback address].
    #[arg(long, env = "SWITCHBOARD_DEV_LOGIN")]
    pub dev_login: Option<bool>,
    /// Largest message body in UTF-8 bytes [default: 4096].
    #[arg(long, env = "SWITCHBOARD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest WebSocket frame in bytes; a bigger one closes the socket with 1009 [default: 65536].
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Frames queued per connection before it is closed as a slow consumer [default: 1024].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    /// Sends per connection awaiting their ack; past that a send gets `rate_limited` [default: 1024].
    #[arg(long, env = "SWITCHBOARD_MAX_UNACKED")]
    pub max_unacked: Option<usize>,
    /// Open WebSockets per user on this node; more are refused with 429 `too_many_connections`, 0 for no
    /// limit [default: 10].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Open WebSockets per client IP address on this node; more are refused with 429
    /// `too_many_connections`, 0 for no limit [default: 0].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// WebSocket handshakes per client IP address per second (a token bucket holding as many); more are
    /// refused with 429 `rate_limited` and a retry hint, 0 for no limit [default: 0].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKES_PER_IP_PER_SEC")]
    pub handshakes_per_ip_per_sec: Option<u32>,
    /// WebSocket handshakes this node admits per second, from all addresses together (a token bucket
    /// holding as many): past it a handshake is answered with the upgrade and at once a close 1013 whose
    /// reason carries `retry_after_ms` (a reconnect storm is admitted at this pace instead of starving the
    /// connections already open), 0 for no limit [default: 2000].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKES_PER_SEC")]
    pub handshakes_per_sec: Option<u32>,
    /// Sends per user per second over WebSockets, all of the user's connections together (a token bucket);
    /// more get `rate_limited` with `retry_after_ms`, 0 for no limit [default: 0].
    #[arg(long, env = "SWITCHBOARD_MESSAGES_PER_USER_PER_SEC")]
    pub messages_per_user_per_sec: Option<u32>,
    /// How many sends a user may make at once before `messages_per_user_per_sec` paces them
    /// [default: 10 times the rate].
    #[arg(long, env = "SWITCHBOARD_MESSAGES_BURST")]
    pub messages_burst: Option<u32>,
    /// `typing`, `delivered` and `read` frames per user per second, all of the user's connections together
    /// (a token bucket holding twice as many); more are dropped, 0 for no limit [default: 30].
    #[arg(long, env = "SWITCHBOARD_SIGNALS_PER_USER_PER_SEC")]
    pub signals_per_user_per_sec: Option<u32>,
    /// `sync` frames per user per second, all of the user's connections together (a token bucket holding
    /// five times as many, for a reconnect that syncs many conversations); more get `rate_limited` with
    /// `retry_after_ms`, 0 for no limit [default: 20].
    #[arg(long, env = "SWITCHBOARD_SYNCS_PER_USER_PER_SEC")]
    pub syncs_per_user_per_sec: Option<u32>,
    /// Origins allowed to open a WebSocket, comma-separated, matched exactly against the `Origin` header
    /// (`https://chat.example.com`); a browser page from another origin gets 403 `forbidden_origin`. A
    /// request without `Origin` (not a browser) is not checked [default: none: every origin].
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Addresses of the reverse proxies in front of the node, comma-separated. When a WebSocket upgrade
    /// comes from one of them, the client's address (for the per-address limits) is read from
    /// `X-Forwarded-For`: the rightmost address that is not a trusted proxy. Unset: the TCP peer's address,
    /// and `X-Forwarded-For` is ignored [default: none].
    #[arg(long, env = "SWITCHBOARD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<std::net::IpAddr>>,
    /// Close a connection silent for this many seconds [default: 90].
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_TIMEOUT_SECS")]
    pub heartbeat_timeout_secs: Option<f64>,
    /// Stop a conversation actor idle for this many seconds [default: 300].
    #[arg(long, env = "SWITCHBOARD_CONVERSATION_IDLE_SECS")]
    pub conversation_idle_secs: Option<f64>,
    /// Restarts a family supervisor allows within the window before escalating [default: 20].
    #[arg(long, env = "SWITCHBOARD_MAX_RESTARTS")]
    pub max_restarts: Option<u32>,
    /// The restart intensity window in seconds [default: 10].
    #[arg(long, env = "SWITCHBOARD_RESTART_WINDOW_SECS")]
    pub restart_window_secs: Option<f64>,
    /// Longest wait for a drain on SIGTERM, in seconds [default: 30].
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<f64>,
    /// HTTP worker threads [default: the number of cores].
    #[arg(long, env = "SWITCHBOARD_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Log filter, tracing's EnvFilter syntax [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG")]
    pub log: Option<String>,
    /// Close connections over this many seconds when the node drains, so that their clients do not all
    /// reconnect at once [default: 5].
    #[arg(long, env = "SWITCHBOARD_DRAIN_WINDOW_SECS")]
    pub drain_window_secs: Option<f64>,
    /// A user whose last device went shows offline after this many seconds, so a reconnect within them
    /// shows nothing; 0 shows offline at once [default: 5].
    #[arg(long, env = "SWITCHBOARD_PRESENCE_GRACE_SECS")]
    pub presence_grace_secs: Option<f64>,
    /// Bearer token for `POST /v1/admin/drain`; without it only loopback callers may drain the node.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// This node's name in the cluster [default: a random `n_…`].
    #[arg(long, env = "SWITCHBOARD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where to listen for other nodes; setting it makes the node a cluster member (needs `store` =
    /// cassandra and `redis`).
    #[arg(long, env = "SWITCHBOARD_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Cluster listeners of nodes to join, comma-separated `host:port`.
    #[arg(long, env = "SWITCHBOARD_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// The secret every node of the cluster shares (required with `cluster_listen`).
    #[arg(long, env = "SWITCHBOARD_COOKIE", hide_env_values = true)]
    pub cookie: Option<String>,
    /// Redis for the connection registry, `redis://host:port[/db]` (required with `cluster_listen`).
    #[arg(long, env = "SWITCHBOARD_REDIS")]
    pub redis: Option<String>,
    /// Registry entries of a node that stops refreshing them expire after this many seconds [default: 90].
    #[arg(long, env = "SWITCHBOARD_REGISTRY_TTL_SECS")]
    pub registry_ttl_secs: Option<f64>,
    /// How often a node refreshes (and after a Redis outage, rewrites) its registry entries [default: 15].
    #[arg(long, env = "SWITCHBOARD_REGISTRY_HEARTBEAT_SECS")]
    pub registry_heartbeat_secs: Option<f64>,
    /// `POST` offline members' notifications to this URL as JSON [default: none: they are logged].
    #[arg(long, env = "SWITCHBOARD_PUSH_WEBHOOK")]
    pub push_webhook: Option<String>,
    /// Include the message body in push notifications [default: false].
    #[arg(long, env = "SWITCHBOARD_PUSH_PREVIEW")]
    pub push_preview: Option<bool>,
    /// Push notifications per user per minute; more are dropped [default: 6].
    #[arg(long, env = "SWITCHBOARD_PUSH_PER_USER_PER_MINUTE")]
    pub push_per_user_per_minute: Option<u32>,
    /// Mutual TLS between nodes: this node's certificate chain (PEM; with `cluster_tls_key` and
    /// `cluster_tls_ca`). Its names must include the host its peers dial.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// Time budget of each behaviour's `on_message`, in milliseconds: a hook that takes longer fails the
    /// send with `behaviour_failed` [default: 50].
    #[arg(long, env = "SWITCHBOARD_MESSAGE_HOOK_BUDGET_MS")]
    pub message_hook_budget_ms: Option<u64>,
    /// `POST` connect and message decisions to this URL as JSON (the HTTP hook, `docs/extending.md`)
    /// [default: none].
    #[arg(long, env = "SWITCHBOARD_HOOK_URL")]
    pub hook_url: Option<String>,
    /// How long the HTTP hook waits for an answer, in milliseconds [default: 1000].
    #[arg(long, env = "SWITCHBOARD_HOOK_TIMEOUT_MS")]
    pub hook_timeout_ms: Option<u64>,
    /// When the HTTP hook fails or does not answer in time: accept (`true`) or refuse with
    /// `behaviour_failed` (`false`) [default: false].
    #[arg(long, env = "SWITCHBOARD_HOOK_FAIL_OPEN")]
    pub hook_fail_open: Option<bool>,
    /// This node's private key (PEM).
    #[arg(long, env = "SWITCHBOARD_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// The CA that signs every node's certificate (PEM).
    #[arg(long, env = "SWITCHBOARD_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
}

/// A node's cluster settings (present when `cluster_listen` is set).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Cluster listen address.
    pub listen: SocketAddr,
    /// Seeds.
    pub seeds: Vec<String>,
    /// Shared secret.
    pub cookie: String,
    /// Redis URL.
    pub redis: String,
    /// Registry TTL.
    pub registry_ttl: Duration,
    /// Registry heartbeat.
    pub registry_heartbeat: Duration,
    /// Mutual TLS between nodes, if configured.
    pub tls: Option<TlsFiles>,
}

/// Which message store a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// A write-ahead log and fjall in the data directory.
    Embedded,
    /// Apache Cassandra.
    Cassandra(CassandraConfig),
}

/// Which JWT algorithm is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA with a public key.
    Rs256,
    /// Ed25519 with a public key.
    EdDsa,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Message store.
    pub store: StoreKind,
    /// HS256 secret, if configured.
    pub jwt_secret: Option<String>,
    /// Public key file, if configured.
    pub jwt_public_key: Option<PathBuf>,
    /// Pinned algorithm.
    pub jwt_algorithm: JwtAlgorithm,
    /// Required issuer.
    pub jwt_issuer: Option<String>,
    /// Required audience.
    pub jwt_audience: Option<String>,
    /// JWT leeway on `exp` and `nbf`, in seconds.
    pub jwt_leeway_secs: u64,
    /// Dev login on.
    pub dev_login: bool,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Frame limit.
    pub max_frame_bytes: usize,
    /// Outbound queue per connection.
    pub outbound_queue: usize,
    /// Unacknowledged sends per connection.
    pub max_unacked: usize,
    /// Who may open a WebSocket, how many and how fast.
    pub admission: Admission,
    /// Sends per user per second (all connections together) and their burst; `None`: no limit.
    pub messages_per_user: Option<(NonZeroU32, NonZeroU32)>,
    /// Signals per user per second and their burst; `None`: no limit.
    pub signals_per_user: Option<(NonZeroU32, NonZeroU32)>,
    /// Syncs per user per second and their burst; `None`: no limit.
    pub syncs_per_user: Option<(NonZeroU32, NonZeroU32)>,
    /// Heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Conversation idle time.
    pub conversation_idle: Duration,
    /// Restart intensity: count.
    pub max_restarts: u32,
    /// Restart intensity: window.
    pub restart_window: Duration,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// HTTP workers.
    pub http_workers: usize,
    /// Log filter.
    pub log: String,
    /// Drain window.
    pub drain_window: Duration,
    /// Presence grace period.
    pub presence_grace: Duration,
    /// Admin token.
    pub admin_token: Option<String>,
    /// Node name.
    pub node_name: String,
    /// Cluster membership, if any.
    pub cluster: Option<ClusterSettings>,
    /// Offline push.
    pub push: PushConfig,
    /// Behaviour budgets and the HTTP hook.
    pub hooks: HookConfig,
}

/// The limits on opening WebSockets, checked at the upgrade (`None`: no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Open WebSockets per user on this node.
    pub per_user: Option<NonZeroUsize>,
    /// Open WebSockets per client IP address on this node.
    pub per_ip: Option<NonZeroUsize>,
    /// Handshakes per client IP address per second.
    pub handshakes_per_ip: Option<NonZeroU32>,
    /// Handshakes per second on this node, all addresses together.
    pub handshakes_per_node: Option<NonZeroU32>,
    /// `Origin` values allowed, when a browser sends one.
    pub origins: Option<Vec<String>>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid TOML for [`Settings`].
    #[error("invalid config file {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    /// A value is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Settings {
    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Self::from_toml(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))
    }

    /// Parse a TOML file's text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Resolve `self` (flags and environment) over `file`, then defaults.
    pub fn resolve(self, file: Settings) -> Result<Config, ConfigError> {
        macro_rules! pick {
            ($f:ident) => {
                self.$f.or(file.$f)
            };
        }
        let secs = |v: Option<f64>, default: f64, name: &str| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero() && d.as_secs_f64() <= MAX_SECS)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{name} must be a positive number of seconds, at most {MAX_SECS:e}"
                    ))
                })
        };
        let listen =
            pick!(listen).unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid default"));
        let jwt_algorithm = match pick!(jwt_algorithm).as_deref().unwrap_or("HS256") {
            "HS256" => JwtAlgorithm::Hs256,
            "RS256" => JwtAlgorithm::Rs256,
            "EdDSA" => JwtAlgorithm::EdDsa,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "jwt_algorithm {other:?}: use HS256, RS256 or EdDSA"
                )))
            }
        };
        let config = Config {
            listen,
            data_dir: pick!(data_dir).unwrap_or_else(|| PathBuf::from("./data")),
            store: match pick!(store).as_deref().unwrap_or("embedded") {
                "embedded" => StoreKind::Embedded,
                url => StoreKind::Cassandra(
                    CassandraConfig::parse(url)
                        .map_err(|e| ConfigError::Invalid(format!("store: {e}")))?,
                ),
            },
            jwt_secret: pick!(jwt_secret),
            jwt_public_key: pick!(jwt_public_key),
            jwt_algorithm,
            jwt_issuer: pick!(jwt_issuer),
            jwt_audience: pick!(jwt_audience),
            // Dev tokens are signed with the HS256 secret, so the default is off with public-key verification.
            dev_login: pick!(dev_login).unwrap_or_else(|| {
                listen.ip().is_loopback() && jwt_algorithm == JwtAlgorithm::Hs256
            }),
            jwt_leeway_secs: pick!(jwt_leeway_secs).unwrap_or(30),
            admission: Admission {
                per_user: NonZeroUsize::new(pick!(max_connections_per_user).unwrap_or(10)),
                per_ip: NonZeroUsize::new(pick!(max_connections_per_ip).unwrap_or(0)),
                handshakes_per_ip: NonZeroU32::new(pick!(handshakes_per_ip_per_sec).unwrap_or(0)),
                handshakes_per_node: NonZeroU32::new(pick!(handshakes_per_sec).unwrap_or(2000)),
                origins: pick!(allowed_origins).filter(|o| !o.is_empty()),
                trusted_proxies: pick!(trusted_proxies).unwrap_or_default(),
            },
            signals_per_user: rate_with_burst(pick!(signals_per_user_per_sec).unwrap_or(30), 2),
            syncs_per_user: rate_with_burst(pick!(syncs_per_user_per_sec).unwrap_or(20), 5),
            messages_per_user: match NonZeroU32::new(pick!(messages_per_user_per_sec).unwrap_or(0))
            {
                None => None,
                Some(rate) => {
                    let burst = pick!(messages_burst).unwrap_or(rate.get().saturating_mul(10));
                    Some((
                        rate,
                        NonZeroU32::new(burst).ok_or_else(|| {
                            ConfigError::Invalid("messages_burst must be positive".into())
                        })?,
                    ))
                }
            },
            max_body_bytes: pick!(max_body_bytes).unwrap_or(4096),
            max_frame_bytes: pick!(max_frame_bytes).unwrap_or(64 * 1024),
            outbound_queue: pick!(outbound_queue).unwrap_or(1024),
            max_unacked: pick!(max_unacked).unwrap_or(1024),
            heartbeat_timeout: secs(
                pick!(heartbeat_timeout_secs),
                90.0,
                "heartbeat_timeout_secs",
            )?,
            conversation_idle: secs(
                pick!(conversation_idle_secs),
                300.0,
                "conversation_idle_secs",
            )?,
            max_restarts: pick!(max_restarts).unwrap_or(20),
            restart_window: secs(pick!(restart_window_secs), 10.0, "restart_window_secs")?,
            drain_timeout: secs(pick!(drain_timeout_secs), 30.0, "drain_timeout_secs")?,
            http_workers: pick!(http_workers).unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .min(MAX_HTTP_WORKERS)
            }),
            log: pick!(log).unwrap_or_else(|| "info".into()),
            drain_window: match pick!(drain_window_secs) {
                Some(0.0) => Duration::ZERO,
                v => secs(v, 5.0, "drain_window_secs")?,
            },
            presence_grace: match pick!(presence_grace_secs) {
                Some(0.0) => Duration::ZERO,
                v => secs(v, 5.0, "presence_grace_secs")?,
            },
            admin_token: pick!(admin_token),
            node_name: pick!(node_name).unwrap_or_else(|| NodeId::random().0),
            cluster: None,
            push: PushConfig {
                webhook: pick!(push_webhook),
                preview: pick!(push_preview).unwrap_or(false),
                queue: 1024,
                per_user_per_minute: std::num::NonZeroU32::new(
                    pick!(push_per_user_per_minute).unwrap_or(6),
                )
                .ok_or_else(|| {
                    ConfigError::Invalid("push_per_user_per_minute must be positive".into())
                })?,
            },
            hooks: HookConfig {
                message_budget: Duration::from_millis(pick!(message_hook_budget_ms).unwrap_or(50)),
                url: pick!(hook_url),
                timeout: Duration::from_millis(pick!(hook_timeout_ms).unwrap_or(1000)),
                fail_open: pick!(hook_fail_open).unwrap_or(false),
            },
        };
        if config.hooks.message_budget.is_zero() || config.hooks.timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "message_hook_budget_ms and hook_timeout_ms must be positive".into(),
            ));
        }
        if let Some(url) = &config.hooks.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "hook_url {url:?}: an http:// or https:// URL"
                )));
            }
        }
        if let Some(url) = &config.push.webhook {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "push_webhook {url:?}: an http:// or https:// URL"
                )));
            }
        }
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !valid_name(&config.node_name) {
            return Err(ConfigError::Invalid(
                "node_name: 1 to 64 of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        let seeds = pick!(seeds).unwrap_or_default();
        let (cookie, redis) = (pick!(cookie), pick!(redis));
        let tls = match (
            pick!(cluster_tls_cert),
            pick!(cluster_tls_key),
            pick!(cluster_tls_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
            _ => return Err(ConfigError::Invalid(
                "cluster TLS needs cluster_tls_cert, cluster_tls_key and cluster_tls_ca together"
                    .into(),
            )),
        };
        let config = match pick!(cluster_listen) {
            None if !seeds.is_empty() || redis.is_some() || tls.is_some() => {
                return Err(ConfigError::Invalid(
                    "seeds, redis and cluster TLS need cluster_listen".into(),
                ))
            }
            None => config,
            Some(listen) => {
                let (Some(cookie), Some(redis)) = (cookie, redis) else {
                    return Err(ConfigError::Invalid(
                        "a cluster node (cluster_listen) needs cookie and redis".into(),
                    ));
                };
                if config.store == StoreKind::Embedded {
                    return Err(ConfigError::Invalid(
                        "a cluster node needs a shared store: store = cassandra://…".into(),
                    ));
                }
                Config {
                    cluster: Some(ClusterSettings {
                        listen,
                        seeds,
                        cookie,
                        redis,
                        registry_ttl: secs(pick!(registry_ttl_secs), 90.0, "registry_ttl_secs")?,
                        registry_heartbeat: secs(
                            pick!(registry_heartbeat_secs),
                            15.0,
                            "registry_heartbeat_secs",
                        )?,
                        tls,
                    }),
                    ..config
                }
            }
        };
        if config.max_body_bytes == 0 || config.max_body_bytes >= config.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be positive and below max_frame_bytes".into(),
            ));
        }
        if !(1..=MAX_HTTP_WORKERS).contains(&config.http_workers) {
            return Err(ConfigError::Invalid(format!(
                "http_workers must be 1 to {MAX_HTTP_WORKERS}"
            )));
        }
        if config.jwt_leeway_secs > MAX_JWT_LEEWAY_SECS {
            return Err(ConfigError::Invalid(format!(
                "jwt_leeway_secs must be at most {MAX_JWT_LEEWAY_SECS} (a day)"
            )));
        }
        if config.outbound_queue == 0 || config.max_unacked == 0 {
            return Err(ConfigError::Invalid(
                "outbound_queue and max_unacked must be positive".into(),
            ));
        }
        if let Some(origin) = config
            .admission
            .origins
            .iter()
            .flatten()
            .find(|o| !exact_origin(o))
        {
            return Err(ConfigError::Invalid(format!(
                "allowed_origins {origin:?}: scheme://host[:port], as browsers send it (no path, no trailing slash)"
            )));
        }
        if config.jwt_algorithm != JwtAlgorithm::Hs256 && config.jwt_public_key.is_none() {
            return Err(ConfigError::Invalid(
                "RS256 and EdDSA need jwt_public_key".into(),
            ));
        }
        Ok(config)
    }
}

/// Longest duration setting, in seconds (about 31 years): the server adds durations to the clock, and
/// one near `u64::MAX` seconds overflows it (`heartbeat_timeout_secs = 1e19` panicked on every connection;
/// the `config` fuzz target checks it).
const MAX_SECS: f64 = 1e9;

/// Most HTTP workers: actix-server's own limit, which it asserts (`http_workers = 0` or `513` panicked at
/// start; the `config` fuzz target checks it).
const MAX_HTTP_WORKERS: usize = 512;

/// Most clock skew allowed on a JWT: jsonwebtoken computes `now - leeway` in `u64`, which wraps (or panics)
/// once the leeway passes the Unix time; a day is already far more skew than any clock has.
const MAX_JWT_LEEWAY_SECS: u64 = 86_400;

/// Whether `origin` is written as a browser sends it in `Origin` (RFC 6454 §6.1): a scheme, `://`, a host
/// and maybe a port — nothing that could never match exactly.
fn exact_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, host)| {
        !scheme.is_empty()
            && !host.is_empty()
            && scheme.bytes().all(|b| b.is_ascii_lowercase())
            && !host.contains(['/', '?', '#', ' '])
    })
}

impl Config {
    /// Defaults with a data directory: what tests and embedders start from.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let settings = Settings {
            data_dir: Some(data_dir.into()),
            ..Settings::default()
        };
        settings
            .resolve(Settings::default())
            .expect("defaults are valid")
    }
}

/// A rate of `per_second` (0: no limit) with a burst of `burst_times` as many.
fn rate_with_burst(per_second: u32, burst_times: u32) -> Option<(NonZeroU32, NonZeroU32)> {
    let rate = NonZeroU32::new(per_second)?;
    Some((rate, rate.saturating_mul(NonZeroU32::new(burst_times)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let file = Settings {
            max_body_bytes: Some(100),
            outbound_queue: Some(7),
            ..Default::default()
        };
        let flags = Settings {
            max_body_bytes: Some(200),
            ..Default::default()
        };
        let c = flags.resolve(file).unwrap();
        assert_eq!(c.max_body_bytes, 200);
        assert_eq!(c.outbound_queue, 7);
        assert_eq!(c.max_frame_bytes, 65536);
    }

    #[test]
    fn dev_login_defaults_to_loopback_only() {
        let loopback = Settings::default().resolve(Settings::default()).unwrap();
        assert!(loopback.dev_login);
        let public = Settings {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Default::default()
        };
        assert!(!public.resolve(Settings::default()).unwrap().dev_login);
    }

    #[test]
    fn rejects_bad_values() {
        let bad = Settings {
            jwt_algorithm: Some("none".into()),
            ..Default::default()
        };
        assert!(bad.resolve(Settings::default()).is_err());
        let bad = Settings {
            max_body_bytes: Some(70_000),
            ..Default::default()
        };
        assert!(bad.resolve(Settings::default()).is_err());
    }

    #[test]
    fn signal_and_sync_rates_default_on_with_their_bursts_and_turn_off_with_zero() {
        let c = Settings::default().resolve(Settings::default()).unwrap();
        let pair = |a, b| Some((NonZeroU32::new(a).unwrap(), NonZeroU32::new(b).unwrap()));
        assert_eq!(c.signals_per_user, pair(30, 60));
        assert_eq!(c.syncs_per_user, pair(20, 100));
        let c = Settings {
            signals_per_user_per_sec: Some(0),
            syncs_per_user_per_sec: Some(3),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap();
        assert_eq!((c.signals_per_user, c.syncs_per_user), (None, pair(3, 15)));
    }

    #[test]
    fn limits_default_to_ten_connections_per_user_and_no_address_or_send_limits() {
        let c = Settings::default().resolve(Settings::default()).unwrap();
        assert_eq!(c.admission.per_user, NonZeroUsize::new(10));
        assert_eq!(c.admission.per_ip, None);
        assert_eq!(c.admission.handshakes_per_ip, None);
        assert_eq!(c.admission.handshakes_per_node, NonZeroU32::new(2000));
        assert_eq!(c.admission.origins, None);
        assert_eq!(c.messages_per_user, None);
        assert_eq!(c.jwt_leeway_secs, 30);
        let c = Settings {
            max_connections_per_user: Some(0),
            messages_per_user_per_sec: Some(5),
            allowed_origins: Some(vec!["https://chat.example.com".into()]),
            ..Default::default()
        }
        .resolve(Settings::default())
        .unwrap();
        assert_eq!(c.admission.per_user, None, "0 turns the limit off");
        assert_eq!(
            c.messages_per_user,
            Some((NonZeroU32::new(5).unwrap(), NonZeroU32::new(50).unwrap()))
        );
        for bad in [
            "https://chat.example.com/",
            "chat.example.com",
            "HTTPS://x",
            "*",
        ] {
            let s = Settings {
                allowed_origins: Some(vec![bad.into()]),
                ..Default::default()
            };
            assert!(s.resolve(Settings::default()).is_err(), "{bad}");
        }
    }

    /// Checked by the `config` fuzz target: these resolved, then panicked when the server started or took a
    /// connection (or, for the leeway, made jsonwebtoken's `now - leeway` wrap).
    #[test]
    fn refuses_values_the_server_cannot_run_with() {
        for text in [
            "http_workers = 0",
            "http_workers = 513",
            "heartbeat_timeout_secs = 1e19",
            "conversation_idle_secs = 1.8e19",
            "drain_window_secs = 1e10",
            "jwt_leeway_secs = 18446744073709551615",
        ] {
            let file = Settings::from_toml(text).unwrap();
            assert!(
                matches!(
                    Settings::default().resolve(file),
                    Err(ConfigError::Invalid(_))
                ),
                "{text}"
            );
        }
        for text in [
            "http_workers = 512",
            "heartbeat_timeout_secs = 1e9",
            "jwt_leeway_secs = 86400",
        ] {
            let file = Settings::from_toml(text).unwrap();
            Settings::default().resolve(file).expect(text);
        }
    }

    /// The example file names every setting (optional ones commented out) and parses as it stands.
    #[test]
    fn example_config_is_complete_and_valid() {
        use clap::Args;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("switchboard.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let settings: Settings = toml::from_str(&text).unwrap();
        settings.resolve(Settings::default()).unwrap();
        let named: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| {
                l.trim_start_matches('#')
                    .trim()
                    .split_once(" = ")
                    .map(|(k, _)| k.to_owned())
            })
            .collect();
        let fields: std::collections::BTreeSet<String> =
            Settings::augment_args(clap::Command::new("t"))
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .collect();
        assert_eq!(
            named, fields,
            "switchboard.example.toml must name every setting"
        );
    }
}
