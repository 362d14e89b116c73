//! The actix-web edge: the WebSocket endpoint ([`ws`]), the REST API ([`rest`]) and their shared state.
//!
//! Handlers run on actix's per-thread workers and reach the actor system only through handles
//! (`Conversations`, `Sessions`), whose messages are thread-safe; long-lived actors are never spawned here.

pub mod error;
pub mod rest;
pub mod ws;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{web, HttpRequest};
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_actors::conversations::Conversations;
use switchboard_actors::sessions::Sessions;
use switchboard_actors::store::SharedStore;
use tokio_util::sync::CancellationToken;

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
    /// `POST /v1/dev/token` enabled.
    pub dev_login: bool,
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
    /// Cancelled when connections must stop reading (drain).
    pub stop_reading: CancellationToken,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// Whether new work is refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// The token of a request: `Authorization: Bearer …`, or `?token=` (browsers cannot set headers on a socket).
pub fn bearer_token(req: &HttpRequest) -> Result<String, AuthError> {
    if let Some(h) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        let h = h.to_str().map_err(|_| AuthError::Missing)?;
        return h
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing);
    }
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
}

/// Register every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(2 * 1024 * 1024)
            .error_handler(error::json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(error::query_error))
    .route("/v1/ws", web::get().to(ws::upgrade))
    .configure(rest::routes);
}
