//! The behaviours' say on a WebSocket upgrade: `on_connect` runs at the edge of the node the client
//! connects to, after the token and the handshake are checked and before the `101`. A refusal is the
//! upgrade's HTTP answer (`403 rejected`, or the status of the code the behaviour chose; `500
//! behaviour_failed` when a hook failed), like every other refusal of an upgrade.

use std::net::SocketAddr;

use actix_web::{HttpResponse, ResponseError};
use switchboard_actors::behaviour::Attachments;

use super::error::ApiError;
use super::AppState;

/// Ask the node's behaviours whether `user` may connect: what they attach to the connection, or the HTTP
/// answer refusing it. Without behaviours, nothing to ask.
pub async fn admit(
    state: &AppState,
    user: &str,
    peer: Option<SocketAddr>,
) -> Result<Attachments, Box<HttpResponse>> {
    let Some(behaviours) = &state.behaviours else {
        return Ok(Attachments::default());
    };
    behaviours
        .connect(user, peer)
        .await
        .map_err(|e| Box::new(ApiError(e).error_response()))
}
