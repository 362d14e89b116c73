//! `GET /v1/admin/status`: what the operator's page (`/admin`, [`super::pages`]) shows of this node beyond
//! `/metrics` and `/v1/cluster` — its state, its connections and online users, the conversations whose
//! actors it hosts. Needs the configured admin token as a bearer token: unlike a drain, it is never open to
//! loopback callers without one, since the page runs in a browser that any local site could drive.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use switchboard_actors::protocol::ErrorCode;

use super::error::ApiError;
use super::AppState;

/// At most this many conversation ids and user ids in one answer (the counts are always whole).
const LIST_LIMIT: usize = 500;

/// Register `GET /v1/admin/status`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/status", web::get().to(status));
}

async fn status(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this node has no admin token; set admin_token to use the admin page",
        ));
    };
    let given = super::bearer_token(&req).unwrap_or_default();
    if !super::rest::same_secret(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::new(ErrorCode::Unauthorized, "wrong admin token"));
    }
    let node_state = if state.is_draining() {
        "draining"
    } else if state.ready.load(Ordering::Acquire) {
        "up"
    } else {
        "starting"
    };
    let directory = state.sessions.directory();
    let mut users: Vec<String> =
        directory.with_online_users(|users| users.take(LIST_LIMIT).cloned().collect());
    users.sort();
    let mut conversations = state.conversations.hosted();
    let hosted = conversations.len();
    conversations.sort();
    conversations.truncate(LIST_LIMIT);
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "node": state.node,
            "version": env!("CARGO_PKG_VERSION"),
            "state": node_state,
            "http": state.http_addr.to_string(),
            "clustered": state.cluster.is_some(),
            "connections": directory.connection_count(),
            "online_users": directory.online_users(),
            "users": users,
            "hosted_conversations": hosted,
            "conversations": conversations,
        })))
}
