//! The actix-web edge: the WebSocket endpoint ([`ws`], served from actix-http's upgrade service), the REST API
//! ([`rest`], [`admin`]), the embedded browser pages ([`pages`]) and their shared state.
//!
//! Handlers run on actix's per-thread workers and reach the actor system only through handles
//! (`Conversations`, `Sessions`), whose messages are thread-safe; long-lived actors are never spawned here.

pub mod admin;
pub mod admission;
pub mod admit;
pub mod error;
pub mod pages;
pub mod rest;
pub mod ws;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::{web, HttpRequest};
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_actors::conversations::Conversations;
use switchboard_actors::sessions::Sessions;
use switchboard_actors::store::SharedStore;

use crate::auth::{Auth, AuthError};

/// What every handler shares.
pub struct AppState {
    /// This node's identity.
    pub node: switchboard_cluster::NodeId,
    /// The store (reads and conversation creation).
    pub store: SharedStore,
    /// The conversation family.
    pub conversations: Conversations,
    /// The session family.
    pub sessions: Sessions,
    /// Token verification.
    pub auth: Auth,
    /// Who may open a WebSocket, how many and how fast (checked at the upgrade).
    pub admission: std::sync::Arc<admission::Admission>,
    /// Largest body.
    pub max_body_bytes: usize,
    /// Largest frame.
    pub max_frame_bytes: usize,
    /// Heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Ready to serve (false while starting or draining).
    pub ready: AtomicBool,
    /// Draining: refuse new connections.
    pub draining: AtomicBool,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// The actors' runtime, where upgraded connections run (see `ws::upgrade`).
    pub runtime: tokio::runtime::Handle,
    /// The address HTTP and WebSocket clients reach this node at.
    pub http_addr: std::net::SocketAddr,
    /// The cluster, when this node is in one.
    pub cluster: Option<std::sync::Arc<switchboard_cluster::node::ClusterNode>>,
    /// Bearer token for `POST /v1/admin/drain` (loopback callers only without it).
    pub admin_token: Option<String>,
    /// Notified by `POST /v1/admin/drain`: the server then drains and stops as on SIGTERM.
    pub drain_requested: std::sync::Arc<tokio::sync::Notify>,
    /// The node's behaviours (`on_connect` runs at the upgrade), if any.
    pub behaviours: Option<std::sync::Arc<switchboard_actors::behaviour::Behaviours>>,
}

impl AppState {
    /// Whether new work is refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// The token of a request: `Authorization: Bearer …` (scheme case-insensitive), else `?token=` (browsers
/// cannot set headers on a WebSocket).
pub fn bearer_token(req: &HttpRequest) -> Result<String, AuthError> {
    token_of(req.headers(), req.query_string())
}

/// [`bearer_token`] from a request's headers and query string.
pub fn token_of(headers: &HeaderMap, query: &str) -> Result<String, AuthError> {
    let header = headers
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    if let Some((scheme, token)) = header.and_then(|h| h.trim().split_once(' ')) {
        if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
            return Ok(token.trim().to_owned());
        }
    }
    web::Query::<std::collections::HashMap<String, String>>::from_query(query)
        .ok()
        .and_then(|q| q.get("token").cloned())
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
}

/// The authenticated user of a request. As the first argument of a handler it runs before the body is
/// parsed, so an unauthenticated request gets 401 whatever its body.
pub struct AuthUser(pub String);

impl actix_web::FromRequest for AuthUser {
    type Error = error::ApiError;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let user = req
            .app_data::<web::Data<AppState>>()
            .ok_or_else(|| {
                error::ApiError::new(
                    switchboard_actors::protocol::ErrorCode::Internal,
                    "no state",
                )
            })
            .and_then(|state| Ok(state.auth.verify(&bearer_token(req)?)?));
        std::future::ready(user.map(AuthUser))
    }
}

/// Register every route (`dev_login` adds `POST /v1/dev/token`).
pub fn routes(cfg: &mut web::ServiceConfig, dev_login: bool) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(2 * 1024 * 1024)
            .error_handler(error::json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(error::query_error))
    .route(ws::PATH, web::get().to(ws::not_upgraded))
    .configure(rest::routes)
    .configure(admin::routes)
    .configure(|cfg| pages::routes(cfg, dev_login));
    if dev_login {
        cfg.configure(rest::dev_routes);
    }
}
