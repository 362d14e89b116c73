//! `GET /v1/ws`: authenticate, upgrade, and run the connection on the actix worker that owns the socket.
//!
//! actix-ws does the handshake and decodes what the client sends (its stream is not `Send`, so the
//! connection's loop runs on this worker); the frame and fragment limits are enforced there.
//!
//! Writes do not go through actix-ws's `Session` (a channel and a task hop per frame, and one encoding per
//! recipient): the response body is [`SocketBody`], which actix's HTTP dispatcher polls whenever the socket
//! can take more. It pulls whatever the connection's outbound queue holds, frames it (a 2–10 byte header in
//! front of the shared JSON) into one buffer, and the dispatcher writes that in one go.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_http::ws::{CloseReason, OpCode, Parser};
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, ProtocolError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use switchboard_actors::connection::Inbound;
use switchboard_actors::outbound::{OutFrame, OutboundQueue};
use switchboard_actors::protocol::{CloseCode, ErrorCode};
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
    // actix-ws does the handshake and decodes what the client sends; its write side is not used.
    let (response, _session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let frames = stream
        .max_frame_size(state.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(state.max_frame_bytes)
        .map(inbound);
    let opened = state
        .sessions
        .connect(user.clone())
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e))?;
    debug!(conn_id = opened.connection.id(), user_id = %user, "websocket upgraded");
    actix_web::rt::spawn(opened.connection.run(frames, state.heartbeat_timeout));
    let (response, read_side) = response.into_parts();
    Ok(response.set_body(BoxBody::new(SocketBody {
        queue: opened.queue,
        _read_side: read_side,
        done: false,
    })))
}

/// What actix-ws decoded, as the connection sees it.
fn inbound(item: Result<AggregatedMessage, ProtocolError>) -> Inbound {
    match item {
        Ok(AggregatedMessage::Text(text)) => Inbound::Text(text.to_string()),
        Ok(AggregatedMessage::Binary(_)) => Inbound::Binary,
        Ok(AggregatedMessage::Ping(payload)) => Inbound::Ping(payload),
        Ok(AggregatedMessage::Pong(_)) => Inbound::Pong,
        Ok(AggregatedMessage::Close(_)) => Inbound::Closed,
        Err(e) => {
            debug!(error = %e, "websocket protocol error");
            Inbound::Refused(match &e {
                ProtocolError::Overflow => CloseCode::TooBig,
                // actix-ws reports a fragmented message over the limit only as this I/O error.
                ProtocolError::Io(io) if io.to_string().contains("maximum continuation size") => {
                    CloseCode::TooBig
                }
                _ => CloseCode::ProtocolError,
            })
        }
    }
}

fn close_reason(code: CloseCode) -> CloseReason {
    CloseReason {
        code: actix_http::ws::CloseCode::from(code.code()),
        description: Some(code.reason().to_owned()),
    }
}

/// Frames (or bytes) put in one buffer per poll; the dispatcher writes it and polls again for more.
const WRITE_BATCH_FRAMES: usize = 256;
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// The body of a WebSocket response: the connection's outbound queue, framed as the socket takes it.
struct SocketBody {
    queue: OutboundQueue,
    /// actix-ws's own response body, never polled: dropping it tells actix-ws's reader that the connection
    /// is gone, so it is kept exactly as long as this body.
    _read_side: BoxBody,
    done: bool,
}

impl MessageBody for SocketBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        this.done = frame_batch(&mut this.queue, cx, &mut buf);
        if !buf.is_empty() {
            Poll::Ready(Some(Ok(buf.freeze())))
        } else if this.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// Frame what `queue` holds into `buf` as WebSocket frames, up to one batch; returns whether the queue
/// is finished (its close frame is in `buf`, or the connection is gone). With nothing queued, `cx` is
/// woken when something is.
pub fn frame_batch(queue: &mut OutboundQueue, cx: &mut Context<'_>, buf: &mut BytesMut) -> bool {
    for _ in 0..WRITE_BATCH_FRAMES {
        match queue.poll_next(cx) {
            Poll::Ready(Some(OutFrame::Text(json))) => {
                Parser::write_message(buf, &json, OpCode::Text, true, false)
            }
            Poll::Ready(Some(OutFrame::Pong(payload))) => {
                Parser::write_message(buf, &payload, OpCode::Pong, true, false)
            }
            Poll::Ready(Some(OutFrame::Close(code))) => {
                Parser::write_close(buf, Some(close_reason(code)), false);
                return true;
            }
            Poll::Ready(None) => return true,
            Poll::Pending => return false,
        }
        if buf.len() >= WRITE_BATCH_BYTES {
            return false;
        }
    }
    false
}
