//! [`Server`]: the whole node — store, actor tree and HTTP edge — started on a listener, stopped by a drain.
//!
//! `main` binds the listener and passes a shutdown future; tests start servers on port 0 the same way.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_http::HttpService;
use actix_service::{map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use switchboard_actors::cluster::SharedCluster;
use switchboard_actors::connection::ConnectionLimits;
use switchboard_actors::conversation::ConversationConfig;
use switchboard_actors::conversations::Conversations;
use switchboard_actors::presence::{Presence, PresenceConfig};
use switchboard_actors::supervisor::RestartIntensity;
use switchboard_actors::system::{ActorSystem, SystemConfig};
use switchboard_cluster::node::{ClusterConfig, ClusterNode};
use switchboard_cluster::registry::RegistryConfig;
use switchboard_cluster::tls::ClusterTls;
use switchboard_cluster::NodeId;
use tracing::{info, warn};

use crate::auth::Auth;
use crate::config::Config;
use crate::config::StoreKind;
use crate::hook::HttpHook;
use crate::http::{self, AppState};
use crate::push::Pusher;
use crate::store::cassandra::CassandraStore;
use crate::store::embedded::EmbeddedStore;
use switchboard_actors::behaviour::{Behaviour, Behaviours, Budgets};
use switchboard_actors::store::SharedStore;

use crate::store::failed::FailedStore;

/// A running node.
pub struct Server {
    addr: SocketAddr,
    state: web::Data<AppState>,
    system: ActorSystem,
    http: actix_server::ServerHandle,
    /// Tells idle keep-alive HTTP connections to close when the node stops.
    stopping: Arc<tokio::sync::Notify>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    store: SharedStore,
    drain_timeout: std::time::Duration,
}

/// The process-wide Prometheus recorder (installed once, shared by every server in the process).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

impl Server {
    /// Open the store, start the actor tree and serve HTTP on `listener`. Must run inside a multi-threaded
    /// Tokio runtime: the actors live on it, not on actix's per-thread workers.
    pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Server> {
        Self::launch(config, listener, Vec::new()).await
    }

    /// [`Server::start`] with `behaviours` (in order; the HTTP hook, when configured, after them).
    pub(crate) async fn launch(
        config: &Config,
        listener: TcpListener,
        mut behaviours: Vec<Arc<dyn Behaviour>>,
    ) -> anyhow::Result<Server> {
        let metrics = prometheus();
        let store: SharedStore = match &config.store {
            StoreKind::Embedded => match EmbeddedStore::open(&config.data_dir) {
                Ok(store) => Arc::new(store),
                // Up, refusing writes and saying why (`/readyz`), rather than exiting to be restarted into
                // the same failure: a full disk or a damaged file needs the operator.
                Err(e) => {
                    let hint = crate::store::embedded::diagnosis(&e);
                    tracing::error!(error = %e, hint, data_dir = %config.data_dir.display(),
                        "the embedded store could not open: the node runs without it, refusing every \
                         request with store_unavailable, until it is fixed and restarted");
                    Arc::new(FailedStore::new(e, hint))
                }
            },
            StoreKind::Cassandra(c) => Arc::new(CassandraStore::open(c.clone()).await?),
        };
        let auth = Auth::from_config(config)?;
        if config.dev_login && !auth.can_mint() {
            anyhow::bail!(
                "dev login needs an HS256 secret to sign tokens; turn it off with RS256/EdDSA keys"
            );
        }
        let system_config = SystemConfig {
            conversation: ConversationConfig {
                idle_after: config.conversation_idle,
                ..ConversationConfig::default()
            },
            limits: ConnectionLimits {
                max_body: config.max_body_bytes,
                outbound_queue: config.outbound_queue,
                max_unacked: config.max_unacked,
                drain_window: config.drain_window,
                messages_per_user: config.messages_per_user,
                signals_per_user: config.signals_per_user,
                syncs_per_user: config.syncs_per_user,
            },
            intensity: RestartIntensity {
                max_restarts: config.max_restarts,
                window: config.restart_window,
            },
            notifier: Some(Pusher::start(config.push.clone())),
            presence: PresenceConfig {
                grace: config.presence_grace,
                intensity: RestartIntensity {
                    max_restarts: config.max_restarts,
                    window: config.restart_window,
                },
            },
            ..SystemConfig::default()
        };
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let node = NodeId(config.node_name.clone());
        if let Some(url) = &config.hooks.url {
            behaviours.push(Arc::new(HttpHook::new(
                url.clone(),
                config.node_name.clone(),
                config.hooks.timeout,
                config.hooks.fail_open,
            )));
        }
        let behaviours = Behaviours::new(
            behaviours,
            Budgets {
                message: config.hooks.message_budget,
                ..Budgets::default()
            },
        );
        let system_config = SystemConfig {
            behaviours: behaviours.clone(),
            ..system_config
        };
        let cluster = match &config.cluster {
            None => None,
            Some(c) => Some(ClusterNode::new(ClusterConfig {
                node: node.clone(),
                listen: c.listen,
                seeds: c.seeds.clone(),
                cookie: c.cookie.clone(),
                http: addr,
                registry: RegistryConfig {
                    url: c.redis.clone(),
                    node: node.clone(),
                    ttl: c.registry_ttl,
                    heartbeat: c.registry_heartbeat,
                    prefix: "sb".into(),
                },
                call_timeout: Duration::from_secs(5),
                tls: c.tls.as_ref().map(ClusterTls::load).transpose()?,
            })?),
        };
        let shared: Option<SharedCluster> = cluster.clone().map(|c| c as SharedCluster);
        let system = ActorSystem::start(system_config, store.clone(), shared).await?;
        if let Some(c) = &cluster {
            c.attach(
                system.conversations.clone(),
                system.sessions.directory().clone(),
                system.sessions.presence().clone(),
            )
            .await?;
        }
        let drain_requested = Arc::new(tokio::sync::Notify::new());
        let state = web::Data::new(AppState {
            node,
            store: store.clone(),
            conversations: system.conversations.clone(),
            sessions: system.sessions.clone(),
            auth,
            admission: http::admission::Admission::new(config.admission.clone()),
            max_body_bytes: config.max_body_bytes,
            max_frame_bytes: config.max_frame_bytes,
            heartbeat_timeout: config.heartbeat_timeout,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            metrics,
            runtime: tokio::runtime::Handle::current(),
            http_addr: addr,
            cluster,
            admin_token: config.admin_token.clone(),
            drain_requested,
            behaviours,
        });
        let app_state = state.clone();
        let dev_login = config.dev_login;
        // actix-web's `HttpServer` cannot take an upgrade service, so the HTTP service is assembled here as
        // it does: the app for requests, and `ws::upgrade_service` for the WebSocket upgrades (decision 0008).
        let graceful = Arc::new(tokio::sync::Notify::new());
        let stopping = graceful.clone();
        let server = actix_server::Server::build()
            .workers(config.http_workers)
            .disable_signals()
            .shutdown_timeout(5)
            .listen("switchboard-http", listener, move || {
                let app = App::new()
                    .app_data(app_state.clone())
                    .configure(|cfg| http::routes(cfg, dev_login))
                    .into_factory()
                    .map_err(|e: actix_web::Error| e.error_response());
                let graceful = graceful.clone();
                HttpService::build()
                    // Nagle plus delayed ACKs holds small frames for tens of milliseconds: send at once.
                    .tcp_nodelay(true)
                    .graceful_shutdown_signal(move || {
                        let graceful = graceful.clone();
                        async move { graceful.notified().await }
                    })
                    .upgrade(http::ws::upgrade_service(app_state.clone()))
                    .finish(map_config(app, |_| AppConfig::default()))
                    .tcp()
            })?
            .run();
        let http = server.handle();
        let http_task = tokio::spawn(server);
        state.ready.store(true, Ordering::Release);
        Ok(Server {
            addr,
            state,
            system,
            http,
            stopping,
            http_task,
            store,
            drain_timeout: config.drain_timeout,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's identity.
    pub fn node(&self) -> &NodeId {
        &self.state.node
    }

    /// The conversation family (fault injection and inspection in tests).
    pub fn conversations(&self) -> &Conversations {
        &self.system.conversations
    }

    /// Presence on this node (fault injection and inspection in tests).
    pub fn presence(&self) -> &Presence {
        self.system.sessions.presence()
    }

    /// Serve until `shutdown` resolves or an operator asks for a drain (`POST /v1/admin/drain`) — then drain —
    /// or a supervisor escalates or the cluster layer fails (then drain and fail).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let drain_requested = self.state.drain_requested.clone();
        let cluster = self.state.cluster.clone();
        let cluster_failed = async {
            match &cluster {
                Some(c) => c.failed().await,
                None => std::future::pending().await,
            }
        };
        let escalated = tokio::select! {
            () = shutdown => None,
            () = drain_requested.notified() => {
                info!("drain requested over HTTP");
                None
            }
            reason = self.system.escalated() => Some(reason),
            reason = cluster_failed => Some(reason),
        };
        self.shutdown().await;
        match escalated {
            Some(reason) => Err(anyhow::anyhow!("supervision escalated: {reason}")),
            None => Ok(()),
        }
    }

    /// Drain and stop: readiness goes false and new connections are refused; connections stop reading,
    /// get the answers to the sends they had made, and are closed with 1012; in-flight REST requests finish;
    /// the actors stop; the store flushes its last group commit.
    pub async fn shutdown(self) {
        let Server {
            state,
            system,
            http,
            stopping,
            http_task,
            store,
            drain_timeout,
            ..
        } = self;
        info!("draining");
        state.ready.store(false, Ordering::Release);
        state.draining.store(true, Ordering::Release);
        if let Some(cluster) = &state.cluster {
            // The other nodes take this node's conversations from now on; its connections' sends follow them.
            cluster.drain();
        }
        if tokio::time::timeout(drain_timeout, system.drain())
            .await
            .is_err()
        {
            warn!(timeout = ?drain_timeout, "drain timed out; closing what is left");
        }
        stopping.notify_waiters();
        http.stop(true).await;
        let _ = http_task.await;
        if let Some(cluster) = &state.cluster {
            cluster.leave().await;
        }
        system.stop().await;
        drop(system);
        store.close();
        // What else holds the store (actix workers tearing down their apps, the last tasks) lets go shortly;
        // wait for it, so the data directory is free when this returns (an in-process restart).
        drop(state);
        let released = async {
            while Arc::strong_count(&store) > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), released)
            .await
            .is_err()
        {
            warn!("the store is still held 5 s after stopping");
        }
        info!("stopped");
    }
}
