//! The REST API: conversations, members, history, sends for bots, health, readiness, metrics, dev tokens.
//! Every `/v1` route but dev login needs `Authorization: Bearer <jwt>`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::cluster::{MemberChange, Role};
use switchboard_actors::conversation::{now_ms, owners_of, store_error, SendRequest};
use switchboard_actors::history;
use switchboard_actors::protocol::{check_send, user_list, ErrorCode};
use switchboard_actors::store::{
    ConversationInfo, ConversationKind, HistoryQuery, Message, MAX_MEMBERS,
};

use super::error::ApiError;
use super::{AppState, AuthUser};
use crate::auth::{valid_user_id, DEV_TOKEN_TTL_SECS};

type State = web::Data<AppState>;

/// Register the REST routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/v1/cluster", web::get().to(cluster_status))
        .route("/v1/admin/drain", web::post().to(admin_drain))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/presence", web::get().to(presence))
        .route("/v1/conversations", web::post().to(create_conversation))
        .route("/v1/conversations", web::get().to(list_conversations))
        .route("/v1/conversations/{id}", web::get().to(get_conversation))
        .route(
            "/v1/conversations/{id}/messages",
            web::get().to(history_page),
        )
        .route(
            "/v1/conversations/{id}/messages",
            web::post().to(send_message),
        )
        .route("/v1/conversations/{id}/members", web::post().to(add_member))
        .route(
            "/v1/conversations/{id}/members/{user}",
            web::put().to(set_role),
        )
        .route(
            "/v1/conversations/{id}/members/{user}",
            web::delete().to(remove_member),
        );
}

/// `POST /v1/dev/token`, registered only when dev login is on.
pub fn dev_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/dev/token", web::post().to(dev_token));
}

async fn healthz(state: State) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status":"ok","node": state.node}))
}

/// How long `/readyz` waits for the store to answer its probe.
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn readyz(state: State) -> HttpResponse {
    let reason = if !state.ready.load(Ordering::Acquire) {
        Some("starting".to_owned())
    } else if state.is_draining() {
        Some("draining".to_owned())
    } else if let Some(why) = state.cluster.as_ref().and_then(|c| c.unready()) {
        Some(why)
    } else if let Some(why) = state.store.failure() {
        Some(format!("store: {why}"))
    } else {
        // A read of a conversation that does not exist: one cheap round trip to the store.
        let probe = state.store.conversation("_readyz");
        match tokio::time::timeout(STORE_PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("store: {e}")),
            Err(_) => Some("store: no answer within 2 s".to_owned()),
        }
    };
    match reason {
        None => HttpResponse::Ok().json(json!({"ready":true})),
        Some(reason) => {
            HttpResponse::ServiceUnavailable().json(json!({"ready":false,"reason":reason}))
        }
    }
}

/// `GET /v1/cluster`: every node this one knows, with its state, connections and conversations. One node
/// outside a cluster reports itself alone.
async fn cluster_status(state: State) -> HttpResponse {
    let nodes = match &state.cluster {
        Some(cluster) => cluster.cluster_status().await,
        None => vec![switchboard_cluster::wire::NodeStatus {
            name: state.node.0.clone(),
            state: if state.is_draining() {
                "draining"
            } else {
                "up"
            }
            .into(),
            http: state.http_addr.to_string(),
            cluster: String::new(),
            connections: state.sessions.directory().connection_count() as u64,
            online_users: state.sessions.directory().online_users() as u64,
            conversations: state.conversations.running() as u64,
        }],
    };
    HttpResponse::Ok().json(json!({"node": state.node, "nodes": nodes}))
}

/// Compare secrets in time that depends on their length only.
pub(super) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /v1/admin/drain`: drain this node and stop it, as SIGTERM does. Needs the admin token when one is
/// configured, else a loopback caller.
async fn admin_drain(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let allowed = match &state.admin_token {
        Some(expected) => crate::http::bearer_token(&req)
            .is_ok_and(|t| same_secret(t.as_bytes(), expected.as_bytes())),
        None => req.peer_addr().is_some_and(|a| a.ip().is_loopback()),
    };
    if !allowed {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "draining needs the admin token (or, without one, a loopback caller)",
        ));
    }
    state.drain_requested.notify_one();
    Ok(HttpResponse::Accepted().json(json!({"draining": true, "node": state.node})))
}

async fn metrics(state: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// The body of `POST /v1/dev/token`.
#[derive(Deserialize)]
pub struct DevTokenBody {
    user: String,
}

impl DevTokenBody {
    /// Refuse a user id that is not one.
    pub fn check(&self) -> Result<(), ApiError> {
        check_user(&self.user, "user must be 1-64 of A-Z a-z 0-9 _ . @ -")
    }
}

/// `Ok` for a valid user id, else `invalid_field` saying `why`.
fn check_user(user: &str, why: &'static str) -> Result<(), ApiError> {
    if valid_user_id(user) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::InvalidField, why))
    }
}

async fn dev_token(state: State, body: web::Json<DevTokenBody>) -> Result<HttpResponse, ApiError> {
    body.check()?;
    let token = state
        .auth
        .mint(&body.user, DEV_TOKEN_TTL_SECS)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    Ok(HttpResponse::Ok()
        .json(json!({"token": token, "user": body.user, "expires_in": DEV_TOKEN_TTL_SECS})))
}

/// The body of `POST /v1/conversations`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    kind: ConversationKind,
    #[serde(default)]
    name: Option<String>,
    members: Vec<String>,
}

/// A conversation to create, as a valid [`CreateBody`] asks for it.
#[derive(Debug)]
pub struct NewConversation {
    /// DM or group.
    pub kind: ConversationKind,
    /// A group's name (1 to 200 bytes, not blank); `None` for a DM.
    pub name: Option<String>,
    /// Every member, the creator included, sorted, without repeats: two for a DM, at most [`MAX_MEMBERS`].
    pub members: Vec<String>,
}

impl CreateBody {
    /// What `me` asks to create, or why it may not be: member ids must be valid, a DM has exactly one
    /// other member, a group needs a name, and the creator always belongs.
    pub fn check(self, me: &str) -> Result<NewConversation, ApiError> {
        if let Some(bad) = self.members.iter().find(|m| !valid_user_id(m)) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("{bad:?} is not a valid user id"),
            ));
        }
        let mut members: BTreeSet<String> = self.members.into_iter().collect();
        let name = match self.kind {
            ConversationKind::Dm => {
                members.remove(me);
                if members.len() != 1 {
                    return Err(ApiError::new(
                        ErrorCode::InvalidField,
                        "a DM has exactly one other member",
                    ));
                }
                None
            }
            ConversationKind::Group => {
                let name = self.name.unwrap_or_default();
                if name.trim().is_empty() || name.len() > 200 {
                    return Err(ApiError::new(
                        ErrorCode::InvalidField,
                        "a group needs a name of 1 to 200 bytes",
                    ));
                }
                Some(name)
            }
        };
        members.insert(me.to_owned());
        if members.len() > MAX_MEMBERS {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("a conversation has at most {MAX_MEMBERS} members, the creator included"),
            ));
        }
        Ok(NewConversation {
            kind: self.kind,
            name,
            members: members.into_iter().collect(),
        })
    }
}

fn conversation_json(
    info: &ConversationInfo,
    members: Option<&[String]>,
    last: Option<&Message>,
) -> serde_json::Value {
    let mut v = json!({
        "id": info.id,
        "kind": info.kind,
        "name": info.name,
        "created_at": info.created_at,
        "created_by": info.created_by,
        "last_seq": last.map_or(0, |m| m.seq),
        "last_message": last,
    });
    if let Some(members) = members {
        v["members"] = json!(members);
    }
    v
}

/// The conversation object with its members and newest message (create and get answer with it).
async fn full_view(
    state: &AppState,
    info: &ConversationInfo,
) -> Result<serde_json::Value, ApiError> {
    let members = state.store.members(&info.id).await.map_err(store_error)?;
    let stored = state.store.owners(&info.id).await.map_err(store_error)?;
    let owners = owners_of(info, &members, stored);
    let last = state
        .store
        .last_message(&info.id)
        .await
        .map_err(store_error)?;
    let mut view = conversation_json(info, Some(&members), last.as_ref());
    view["owners"] = json!(owners);
    Ok(view)
}

async fn create_conversation(
    AuthUser(me): AuthUser,
    state: State,
    body: web::Json<CreateBody>,
) -> Result<HttpResponse, ApiError> {
    let NewConversation {
        kind,
        name,
        members,
    } = body.into_inner().check(&me)?;
    let info = ConversationInfo {
        id: format!("c_{}", uuid::Uuid::now_v7().simple()),
        kind,
        name,
        created_by: me,
        created_at: now_ms(),
    };
    if let Some(behaviours) = &state.behaviours {
        behaviours.creating(&info.id, &members).await?;
    }
    let (info, created) = state
        .store
        .create_conversation(info, members)
        .await
        .map_err(store_error)?;
    let body = full_view(&state, &info).await?;
    Ok(if created {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

async fn list_conversations(
    AuthUser(me): AuthUser,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let entries = history::inbox(&*state.store, &me).await?;
    // One read for all of the user's read positions, not one per conversation.
    let read = state.store.read_positions(&me).await.map_err(store_error)?;
    let list: Vec<_> = entries
        .iter()
        .map(|(info, last)| {
            let mut v = conversation_json(info, None, last.as_ref());
            let last_seq = last.as_ref().map_or(0, |m| m.seq);
            let read_seq = read.get(&info.id).copied().unwrap_or(0).min(last_seq);
            v["read_seq"] = json!(read_seq);
            v["unread"] = json!(last_seq - read_seq);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "conversations": list })))
}

async fn get_conversation(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let conv = path.into_inner();
    history::authorize(&*state.store, &conv, &me).await?;
    let info = state
        .store
        .conversation(&conv)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownConversation, "no such conversation"))?;
    Ok(HttpResponse::Ok().json(full_view(&state, &info).await?))
}

#[derive(Deserialize)]
struct HistoryParams {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<usize>,
}

async fn history_page(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<String>,
    q: web::Query<HistoryParams>,
) -> Result<HttpResponse, ApiError> {
    let query = HistoryQuery {
        before: q.before,
        after: q.after,
        limit: q.limit.unwrap_or(50),
    };
    let mut page = history::page(&*state.store, &me, &path.into_inner(), query).await?;
    if let Some(b) = &state.behaviours {
        page.messages = b.replay(page.messages, &me);
    }
    Ok(HttpResponse::Ok().json(page))
}

/// The query of `GET /v1/presence`.
#[derive(Deserialize)]
pub struct PresenceParams {
    users: Option<String>,
}

impl PresenceParams {
    /// The users asked about: `users` is a comma-separated list (empty items skipped), checked as
    /// `presence_subscribe`'s list is.
    pub fn users(&self) -> Result<Vec<String>, ApiError> {
        let users = self.users.as_deref().map(|list| {
            Value::Array(
                list.split(',')
                    .filter(|u| !u.is_empty())
                    .map(|u| Value::String(u.to_owned()))
                    .collect(),
            )
        });
        Ok(user_list(users.as_ref(), "users")?)
    }
}

/// `GET /v1/presence?users=a,b`: each user's presence as this node's events say it.
async fn presence(
    AuthUser(_): AuthUser,
    state: State,
    q: web::Query<PresenceParams>,
) -> Result<HttpResponse, ApiError> {
    let users = q.users()?;
    let users = state.sessions.presence().lookup(&users);
    Ok(HttpResponse::Ok().json(json!({ "users": users })))
}

/// The body of `POST /v1/conversations/{id}/messages`.
#[derive(Deserialize)]
pub struct SendBody {
    msg_id: String,
    body: String,
}

impl SendBody {
    /// The checks a send over the socket passes too: a valid `msg_id`, a body of at most `max_body` bytes.
    pub fn check(&self, max_body: usize) -> Result<(), ApiError> {
        Ok(check_send(&self.msg_id, &self.body, max_body)?)
    }
}

async fn send_message(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<String>,
    body: web::Json<SendBody>,
) -> Result<HttpResponse, ApiError> {
    body.check(state.max_body_bytes)?;
    let SendBody { msg_id, body } = body.into_inner();
    let request = SendRequest {
        from: me,
        msg_id,
        body,
        origin: None,
    };
    let message = state
        .conversations
        .send(&path.into_inner(), request)
        .await?;
    Ok(HttpResponse::Created().json(message))
}

/// The body of `POST /v1/conversations/{id}/members`.
#[derive(Deserialize)]
pub struct MemberBody {
    user: String,
}

impl MemberBody {
    /// Refuse a user id that is not one.
    pub fn check(&self) -> Result<(), ApiError> {
        check_user(&self.user, "user is not a valid user id")
    }
}

async fn add_member(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<String>,
    body: web::Json<MemberBody>,
) -> Result<HttpResponse, ApiError> {
    let conv = path.into_inner();
    body.check()?;
    history::authorize(&*state.store, &conv, &me).await?;
    let added = state
        .conversations
        .change_member(&conv, body.into_inner().user, MemberChange::Add, Some(&me))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "added": added })))
}

async fn remove_member(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (conv, member) = path.into_inner();
    history::authorize(&*state.store, &conv, &me).await?;
    let removed = state
        .conversations
        .change_member(&conv, member, MemberChange::Remove, Some(&me))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "removed": removed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: Role,
}

async fn set_role(
    AuthUser(me): AuthUser,
    state: State,
    path: web::Path<(String, String)>,
    body: web::Json<RoleBody>,
) -> Result<HttpResponse, ApiError> {
    let (conv, member) = path.into_inner();
    history::authorize(&*state.store, &conv, &me).await?;
    let changed = state
        .conversations
        .change_member(&conv, member, MemberChange::SetRole(body.role), Some(&me))
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "changed": changed })))
}
