//! `GET /v1/ws`: authenticate, upgrade, and run the read loop that feeds the connection's actor.
//!
//! The read loop stays on the actix worker (actix-ws's stream is not `Send`); it forwards frames into the
//! `ConnectionActor`, answers WebSocket pings, enforces the heartbeat timeout and the frame limit. Writes go
//! through the actor's bounded queue into [`ActixSink`].

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseReason};
use async_trait::async_trait;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::SinkExt;
use switchboard_actors::connection::{ConnectionMsg, FrameSink, InboundWindow, SinkClosed};
use switchboard_actors::protocol::{CloseCode, ErrorCode};
use switchboard_actors::ractor::ActorRef;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::error::ApiError;
use super::{bearer_token, AppState};

/// Upgrade an authenticated request to a WebSocket.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if state.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the server is draining; connect to another node or retry",
        ));
    }
    let user = state.auth.verify(&bearer_token(&req)?)?;
    let (response, session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let stream = stream
        .max_frame_size(state.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.max_frame_bytes);
    let sink = Box::new(ActixSink {
        session: Some(session.clone()),
    });
    let hangup = CancellationToken::new();
    let (conn, conn_id) = state
        .sessions
        .connect(user.clone(), sink, hangup.clone())
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e))?;
    debug!(conn_id, user_id = %user, "websocket upgraded");
    actix_web::rt::spawn(read_loop(
        stream,
        session,
        conn,
        state.heartbeat_timeout,
        state.stop_reading.clone(),
        hangup,
    ));
    Ok(response)
}

async fn read_loop(
    mut stream: AggregatedMessageStream,
    mut session: actix_ws::Session,
    conn: ActorRef<ConnectionMsg>,
    heartbeat: Duration,
    stop_reading: CancellationToken,
    hangup: CancellationToken,
) {
    let window = InboundWindow::new();
    loop {
        let next = tokio::select! {
            // Draining: stop reading; the drain answers what was accepted and closes with 1012.
            _ = stop_reading.cancelled() => return,
            // The actor closed the connection (slow consumer, heartbeat, …): let go of the socket.
            _ = hangup.cancelled() => return,
            // Read only when the actor has room for one more frame (back-pressure on a flooding client).
            next = async {
                let permit = window.acquire().await;
                (tokio::time::timeout(heartbeat, stream.recv()).await, permit)
            } => next,
        };
        let (next, permit) = next;
        let forwarded = match next {
            Err(_silent) => {
                let _ = conn.send_message(ConnectionMsg::Close(CloseCode::IdleTimeout));
                return;
            }
            Ok(None) | Ok(Some(Ok(AggregatedMessage::Close(_)))) => {
                let _ = conn.send_message(ConnectionMsg::PeerGone);
                return;
            }
            Ok(Some(Err(e))) => {
                let code = match &e {
                    actix_ws::ProtocolError::Overflow => CloseCode::TooBig,
                    // actix-ws reports a fragmented message over the limit only as this I/O error.
                    actix_ws::ProtocolError::Io(io)
                        if io.to_string().contains("maximum continuation size") =>
                    {
                        CloseCode::TooBig
                    }
                    _ => CloseCode::ProtocolError,
                };
                debug!(error = %e, "websocket protocol error");
                let _ = conn.send_message(ConnectionMsg::Close(code));
                return;
            }
            Ok(Some(Ok(msg))) => match msg {
                AggregatedMessage::Text(text) => {
                    conn.send_message(ConnectionMsg::Inbound(text.to_string(), permit))
                }
                AggregatedMessage::Binary(_) => conn.send_message(ConnectionMsg::Binary(permit)),
                AggregatedMessage::Ping(payload) => {
                    let _ = session.pong(&payload).await;
                    Ok(())
                }
                AggregatedMessage::Pong(_) => Ok(()),
                AggregatedMessage::Close(_) => unreachable!("handled above"),
            },
        };
        if forwarded.is_err() {
            // The connection's actor is gone (it failed): close the socket as an internal error.
            let _ = session.close(Some(close_reason(CloseCode::Internal))).await;
            return;
        }
    }
}

fn close_reason(code: CloseCode) -> CloseReason {
    CloseReason {
        code: actix_ws::CloseCode::from(code.code()),
        description: Some(code.reason().to_owned()),
    }
}

/// The write half of an actix-ws socket.
pub struct ActixSink {
    session: Option<actix_ws::Session>,
}

#[async_trait]
impl FrameSink for ActixSink {
    async fn send(&mut self, frames: &[Bytes]) -> Result<(), SinkClosed> {
        let session = self.session.as_mut().ok_or(SinkClosed)?;
        for frame in frames {
            let text = ByteString::try_from(frame.clone()).map_err(|_| SinkClosed)?;
            session
                .feed(actix_ws::Message::Text(text))
                .await
                .map_err(|_| SinkClosed)?;
        }
        session.flush().await.map_err(|_| SinkClosed)
    }

    async fn close(&mut self, code: CloseCode) -> Result<(), SinkClosed> {
        let session = self.session.take().ok_or(SinkClosed)?;
        session
            .close(Some(close_reason(code)))
            .await
            .map_err(|_| SinkClosed)
    }
}
