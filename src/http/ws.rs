//! `GET /v1/ws`: authenticate and upgrade on the actix worker that accepted the socket, then run the
//! connection on the actors' runtime, where its conversations and their write tasks run too.
//!
//! The upgrade is taken out of actix's HTTP/1 dispatcher (actix-http's upgrade service, see
//! [`upgrade_service`] and `docs/decisions/0008-own-websocket-loop.md`): once the `101` is written, the socket
//! is this module's, and the dispatcher with its two buffers is gone. What is left per connection is the
//! socket, one task, and buffers that exist only while bytes are in flight:
//!
//! - reading (`Reader`, its decoding in [`FrameDecoder`]): bytes are read when the socket is readable into
//!   a buffer that is released as soon as every complete frame in it is decoded; actix-http's frame parser
//!   checks masking, reserved bits, control-frame rules and the frame limit, and fragmented messages are
//!   reassembled up to the same limit;
//! - writing (`write_queue`): whatever the connection's outbound queue holds is framed (a 2–10 byte
//!   header in front of the shared JSON) into one buffer and written in one go, then the buffer is released.
//!
//! When both sides are done, the socket is shut down for writing and read until the client closes it too
//! (at most `LINGER`), so the client is never reset before it has read the close frame. A socket that
//! takes no byte for the heartbeat timeout while frames wait belongs to a client that stopped reading: it is
//! reset and dropped, since its close frame could never be written.

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_codec::{Framed, FramedParts};
use actix_http::body::BodySize;
use actix_http::ws::{CloseReason, OpCode, Parser, ProtocolError as WsError};
use actix_http::{h1, Request, Response};
use actix_service::{fn_service, ServiceFactory};
use actix_web::rt::net::TcpStream;
use actix_web::{web, HttpResponse, ResponseError};
use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, Stream};
use switchboard_actors::connection::Inbound;
use switchboard_actors::outbound::{OutFrame, OutboundQueue};
use switchboard_actors::protocol::{CloseCode, ErrorCode};
use switchboard_actors::sessions::Opened;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::admission::Admitted;
use super::error::ApiError;
use super::{token_of, AppState};
use crate::auth::Verified;

/// The path of the WebSocket endpoint.
pub const PATH: &str = "/v1/ws";

/// How long a closed connection waits for its client to close the TCP connection too.
const LINGER: Duration = Duration::from_secs(2);

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// The service actix-http hands every upgrade request to, with the socket (see the module doc).
pub fn upgrade_service(
    state: web::Data<AppState>,
) -> impl ServiceFactory<
    (Request, Framed<TcpStream, h1::Codec>),
    Config = (),
    Response = (),
    Error = Infallible,
    InitError = (),
> {
    fn_service(
        move |(req, framed): (Request, Framed<TcpStream, h1::Codec>)| {
            let state = state.clone();
            async move {
                upgrade(state, req, framed).await;
                Ok(())
            }
        },
    )
}

/// `GET /v1/ws` without an upgrade: the endpoint exists, but only for WebSocket clients.
pub async fn not_upgraded() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::InvalidField,
        "GET /v1/ws needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
    ))
}

async fn upgrade(
    state: web::Data<AppState>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) {
    // The client is already gone.
    let Ok(peer) = framed.io_ref().peer_addr() else {
        return;
    };
    let client = SocketAddr::new(
        state.admission.client_ip(peer.ip(), &req.head().headers),
        peer.port(),
    );
    let accepted = accept(&state, &req, client.ip());
    // The request's head goes back to actix's pool now, not when the connection ends.
    drop(req);
    let accepted = match accepted {
        Ok(accepted) => accepted,
        Err(Refusal::Http(refusal)) => return refuse(&mut framed, *refusal).await,
        Err(Refusal::TryLater(response, retry_after_ms)) => {
            return try_later(framed, response, retry_after_ms).await
        }
    };
    let (verified, response, admitted) = accepted;
    let lifetime = verified.lifetime();
    let user = verified.user;
    let peer = Some(client);
    let attachments = match super::admit::admit(&state, &user, peer).await {
        Ok(attachments) => attachments,
        Err(refusal) => return refuse(&mut framed, *refusal).await,
    };
    let mut opened = state.sessions.connect_with(user.clone(), peer, attachments);
    if let Some(at) = lifetime.and_then(|left| tokio::time::Instant::now().checked_add(left)) {
        opened.connection.expire_at(at);
    }
    if framed
        .send((response, BodySize::None).into())
        .await
        .is_err()
    {
        // The client is gone; dropping the queue ends the connection.
        return;
    }
    debug!(conn_id = opened.connection.id(), user_id = %user, "websocket upgraded");
    // The connection gets a task of its own, holding only the socket and what the client already sent; the
    // dispatcher's task — sized for any HTTP request, with its buffers and codec — ends here. The task runs
    // on the actors' runtime, not on this worker: a send then goes from the connection to its conversation,
    // its write task and the recipients' writers by waking tasks of one runtime, which its threads pick up
    // where they are, instead of crossing between a worker's thread and the runtime's at every step. The
    // socket is taken off this worker's reactor and registered with the runtime's from here, inside the
    // runtime's context, so that the task is `serve` itself: a wrapping future that registered it would keep
    // its own copy of everything it moves into `serve` for the connection's whole life.
    let FramedParts { io, read_buf, .. } = framed.into_parts();
    let io = {
        let _runtime = state.runtime.enter();
        io.into_std().and_then(TcpStream::from_std)
    };
    match io {
        Ok(io) => {
            state.runtime.spawn(serve(
                io,
                read_buf,
                opened,
                admitted,
                state.max_frame_bytes,
                state.heartbeat_timeout,
            ));
        }
        Err(e) => debug!(error = %e, "socket could not move to the actors' runtime"),
    }
}

/// Run an upgraded connection: its loop reading the socket, and its queue written to it. Its place under
/// the connection limits is given back when the socket is closed.
async fn serve(
    io: TcpStream,
    read_buf: BytesMut,
    opened: Opened,
    _admitted: Admitted,
    max_frame: usize,
    heartbeat: Duration,
) {
    let reader = Reader {
        io: &io,
        frames: FrameDecoder::new(read_buf, max_frame),
        done: false,
    };
    let ((), written) = futures_util::future::join(
        opened.connection.run(reader, heartbeat),
        write_queue(&io, opened.queue, heartbeat),
    )
    .await;
    match written {
        Written::Done => linger(io).await,
        Written::Stalled => reset(io),
    }
}

/// Why an upgrade is not admitted.
enum Refusal {
    /// A whole HTTP response (status, headers, JSON error).
    Http(Box<HttpResponse>),
    /// The node's handshake rate is full: the upgrade's response, to be followed at once by a close 1013
    /// with this retry hint (ms).
    TryLater(Response<()>, u64),
}

/// Check an upgrade request from `ip`: the path, the node's state, the address's handshake rate and the
/// origin, the handshake, the token, the node's handshake rate, then the open connections of the user and
/// of the address.
fn accept(
    state: &AppState,
    req: &Request,
    ip: IpAddr,
) -> Result<(Verified, Response<()>, Admitted), Refusal> {
    let refused = |e: ApiError| Refusal::Http(Box::new(e.error_response()));
    if req.path() != PATH {
        return Err(Refusal::Http(Box::new(HttpResponse::NotFound().finish())));
    }
    if state.is_draining() {
        return Err(refused(ApiError::new(
            ErrorCode::Unavailable,
            "the server is draining; connect to another node or retry",
        )));
    }
    // Before the token: a flood of handshakes costs no signature check.
    state
        .admission
        .before_token(ip, &req.head().headers)
        .map_err(|e| refused(e.into()))?;
    let response = actix_http::ws::handshake(req.head())
        .map_err(|e| refused(ApiError::new(ErrorCode::InvalidField, e.to_string())))?
        .finish()
        .drop_body();
    let verified = token_of(&req.head().headers, req.uri().query().unwrap_or(""))
        .and_then(|token| state.auth.verify_until(&token))
        .map_err(|e| refused(e.into()))?;
    // After the token: handshakes with bad tokens (refused at a signature check's cost) do not use up the
    // node's admissions; the address's own rate is what limits a flood of them.
    if let Err(retry_after_ms) = state.admission.node_handshake() {
        return Err(Refusal::TryLater(response, retry_after_ms));
    }
    let admitted = state
        .admission
        .admit(&verified.user, ip)
        .map_err(|e| refused(e.into()))?;
    Ok((verified, response, admitted))
}

/// Complete the upgrade and close at once with 1013 (try again later) and `{"retry_after_ms":N}` as the
/// reason: what a browser's WebSocket can see, where an HTTP status before the upgrade shows only as a
/// failed connection.
async fn try_later(
    mut framed: Framed<TcpStream, h1::Codec>,
    response: Response<()>,
    retry_after_ms: u64,
) {
    debug!(
        retry_after_ms,
        "websocket upgraded and closed with 1013: the node's handshake rate is full"
    );
    if framed
        .send((response, BodySize::None).into())
        .await
        .is_err()
    {
        return;
    }
    let mut close = BytesMut::new();
    Parser::write_close(
        &mut close,
        Some(CloseReason {
            code: actix_http::ws::CloseCode::from(CloseCode::TryAgainLater.code()),
            description: Some(format!("{{\"retry_after_ms\":{retry_after_ms}}}")),
        }),
        false,
    );
    let FramedParts { mut io, .. } = framed.into_parts();
    if io.write_all(&close).await.is_ok() {
        linger(io).await;
    }
}

/// Write a refusal (status, headers, JSON body) and let the connection go.
async fn refuse(framed: &mut Framed<TcpStream, h1::Codec>, refusal: HttpResponse) {
    let response: Response<_> = refusal.into();
    let (head, body) = response.into_parts();
    let body = actix_web::body::to_bytes(body).await.unwrap_or_default();
    let sent = async {
        framed
            .feed((head, BodySize::Sized(body.len() as u64)).into())
            .await?;
        framed.feed(h1::Message::Chunk(Some(body))).await?;
        framed.send(h1::Message::Chunk(None)).await
    };
    if let Err(e) = sent.await {
        debug!(error = %e, "upgrade refusal not delivered");
    }
}

/// What the client sends, decoded frame by frame as the socket has it.
struct Reader<'a> {
    io: &'a TcpStream,
    /// What was read and not yet decoded, and the message being reassembled.
    frames: FrameDecoder,
    /// The client closed, or broke the protocol: nothing more is read.
    done: bool,
}

/// The reader's bytes-to-messages half, with no socket: RFC 6455 frames in, [`Inbound`] items out. The
/// server's reader feeds it what the socket gives; the `ws_reader` fuzz target (`fuzz/`) feeds it arbitrary
/// bytes.
pub struct FrameDecoder {
    /// Bytes read and not yet decoded; no allocation while nothing is in flight.
    buf: BytesMut,
    max_frame: usize,
    /// A fragmented message being reassembled.
    fragments: Option<Fragments>,
}

/// A fragmented message so far.
struct Fragments {
    text: bool,
    data: BytesMut,
    /// How much of a text message's `data` is known to be whole, valid UTF-8: text is checked as its
    /// fragments arrive, so an invalid one is refused at once, not after the rest of the message.
    checked: usize,
}

impl Fragments {
    /// Whether the text so far can still become valid UTF-8 (it may end inside a character, unless
    /// `last`).
    fn utf8_so_far(&mut self, last: bool) -> bool {
        if !self.text {
            return true;
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => {
                self.checked = self.data.len();
                true
            }
            // Cut inside a character: the next fragment may complete it.
            Err(e) if e.error_len().is_none() && !last => {
                self.checked += e.valid_up_to();
                true
            }
            Err(_) => false,
        }
    }
}

impl Stream for Reader<'_> {
    type Item = Inbound;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(item) = this.frames.decode() {
                this.done = matches!(item, Inbound::Closed | Inbound::Refused(_));
                return Poll::Ready(Some(item));
            }
            let buf = this.frames.buffer();
            if buf.is_empty() {
                // Idle: hold no buffer.
                *buf = BytesMut::new();
            }
            if let Err(e) = ready!(this.io.poll_read_ready(cx)) {
                return this.ended(&e);
            }
            let buf = this.frames.buffer();
            buf.reserve(READ_CHUNK);
            match this.io.try_read_buf(buf) {
                Ok(0) => {
                    this.done = true;
                    return Poll::Ready(Some(Inbound::Closed));
                }
                Ok(_) => {}
                // Readiness was stale; poll_read_ready waits for the next.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return this.ended(&e),
            }
        }
    }
}

impl Reader<'_> {
    fn ended(&mut self, e: &std::io::Error) -> Poll<Option<Inbound>> {
        debug!(error = %e, "websocket read failed");
        self.done = true;
        Poll::Ready(Some(Inbound::Closed))
    }
}

impl FrameDecoder {
    /// A decoder of frames up to `max_frame` bytes (a fragmented message counts whole), starting with the
    /// bytes in `buf` (what the client sent with its upgrade request).
    pub fn new(buf: BytesMut, max_frame: usize) -> Self {
        Self {
            buf,
            max_frame,
            fragments: None,
        }
    }

    /// The undecoded bytes: read more into it, then [`decode`](Self::decode). It holds at most one frame
    /// header and `max_frame` payload bytes once `decode` returned `None`.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The bytes of the fragmented message being reassembled (0 when none is).
    pub fn fragmented_bytes(&self) -> usize {
        self.fragments.as_ref().map_or(0, |f| f.data.len())
    }

    /// The next whole message or control frame in the buffer, if there is one. After a `Closed` or a
    /// `Refused` the connection ends: what follows is not to be decoded.
    pub fn decode(&mut self) -> Option<Inbound> {
        loop {
            // Everything a frame's header can break is refused as soon as the header is in, before its
            // payload is waited for or buffered (actix's parser would read a whole frame first).
            if let Some(code) = header(&self.buf).and_then(|h| self.refuse(h)) {
                return Some(Inbound::Refused(code));
            }
            let (fin, opcode, payload) = match Parser::parse(&mut self.buf, true, self.max_frame) {
                Ok(None) => return None,
                Ok(Some(frame)) => frame,
                Err(WsError::Overflow) => return Some(Inbound::Refused(CloseCode::TooBig)),
                Err(e) => {
                    debug!(error = %e, "websocket protocol error");
                    return Some(Inbound::Refused(CloseCode::ProtocolError));
                }
            };
            let payload = payload.unwrap_or_default();
            match opcode {
                OpCode::Text | OpCode::Binary if fin => {
                    return Some(message(opcode == OpCode::Text, payload))
                }
                OpCode::Text | OpCode::Binary => {
                    let mut started = Fragments {
                        text: opcode == OpCode::Text,
                        data: payload,
                        checked: 0,
                    };
                    if !started.utf8_so_far(false) {
                        return Some(Inbound::Refused(CloseCode::InvalidPayload));
                    }
                    self.fragments = Some(started);
                }
                OpCode::Continue => {
                    // `refuse` made sure a message is open and that this fragment fits.
                    let Some(fragments) = self.fragments.as_mut() else {
                        return Some(Inbound::Refused(CloseCode::ProtocolError));
                    };
                    fragments.data.extend_from_slice(&payload);
                    if !fragments.utf8_so_far(fin) {
                        return Some(Inbound::Refused(CloseCode::InvalidPayload));
                    }
                    if fin {
                        let text = fragments.text;
                        let data = std::mem::take(&mut fragments.data);
                        self.fragments = None;
                        return Some(message(text, data));
                    }
                }
                OpCode::Ping => return Some(Inbound::Ping(payload.freeze())),
                OpCode::Pong => return Some(Inbound::Pong),
                OpCode::Close => return Some(closing(&payload)),
                OpCode::Bad => return Some(Inbound::Refused(CloseCode::ProtocolError)),
            }
        }
    }

    /// Why a frame with this header must be refused, if it must (RFC 6455 §5.2, §5.4, §5.5).
    fn refuse(&self, h: Header) -> Option<CloseCode> {
        let control = h.opcode >= 0x8;
        let broken = h.rsv != 0
            || !h.masked
            || !matches!(h.opcode, 0x0..=0x2 | 0x8..=0xA)
            || (control && (!h.fin || h.len > MAX_CONTROL_PAYLOAD))
            || (h.opcode == 0x0 && self.fragments.is_none())
            || (matches!(h.opcode, 0x1 | 0x2) && self.fragments.is_some());
        if broken {
            return Some(CloseCode::ProtocolError);
        }
        // A fragment counts with the message it continues. A length with its top bit set (RFC 6455 says it
        // must be clear) is over any limit, and refused like one.
        let so_far = match (&self.fragments, h.opcode) {
            (Some(f), 0x0) => f.data.len() as u64,
            _ => 0,
        };
        (so_far.saturating_add(h.len) > self.max_frame as u64).then_some(CloseCode::TooBig)
    }
}

/// Control frames carry at most this many payload bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// What a frame's header says, once the header's length bytes are in.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    len: u64,
}

/// The header at the start of `buf` (RFC 6455 §5.2), or `None` until its length bytes are in.
fn header(buf: &[u8]) -> Option<Header> {
    let (first, second) = (*buf.first()?, *buf.get(1)?);
    let len = match second & 0x7f {
        126 => u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        127 => u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?),
        n => u64::from(n),
    };
    Some(Header {
        fin: first & 0x80 != 0,
        rsv: first & 0x70,
        opcode: first & 0x0f,
        masked: second & 0x80 != 0,
        len,
    })
}

/// A whole data message. Text must be UTF-8 (RFC 6455 §8.1): 1007 otherwise.
fn message(text: bool, data: BytesMut) -> Inbound {
    if !text {
        return Inbound::Binary;
    }
    match String::from_utf8(data.to_vec()) {
        Ok(text) => Inbound::Text(text),
        Err(_) => Inbound::Refused(CloseCode::InvalidPayload),
    }
}

/// The client's close frame: a clean close, or a refusal of a payload RFC 6455 does not allow — one byte
/// (§5.5.1), a code no endpoint may send (§7.4), or a reason that is not UTF-8 (§8.1).
fn closing(payload: &[u8]) -> Inbound {
    match payload {
        [] => Inbound::Closed,
        [_] => Inbound::Refused(CloseCode::ProtocolError),
        [hi, lo, reason @ ..] => {
            // 1000-1003 and 1007-1011 (RFC 6455 §7.4.1), 1012-1014 (registered with IANA since),
            // 3000-3999 (registered) and 4000-4999 (private use). 1004-1006 and 1015 are never sent.
            if !matches!(u16::from_be_bytes([*hi, *lo]), 1000..=1003 | 1007..=1014 | 3000..=4999) {
                Inbound::Refused(CloseCode::ProtocolError)
            } else if std::str::from_utf8(reason).is_err() {
                Inbound::Refused(CloseCode::InvalidPayload)
            } else {
                Inbound::Closed
            }
        }
    }
}

/// How writing the queue ended.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// The close frame is out, or the socket failed.
    Done,
    /// The socket took nothing for the stall bound: the client stopped reading.
    Stalled,
}

/// Write what the queue holds, in batches, until its close frame is out, the socket fails, or the socket
/// takes nothing for `stall` (a client that stopped reading: its close frame could never be written).
/// Dropping the queue at the end tells the connection its transport is gone.
async fn write_queue(io: &TcpStream, mut queue: OutboundQueue, stall: Duration) -> Written {
    loop {
        let mut buf = BytesMut::new();
        let done = poll_fn(|cx| {
            let done = frame_batch(&mut queue, cx, &mut buf);
            if buf.is_empty() && !done {
                Poll::Pending
            } else {
                Poll::Ready(done)
            }
        })
        .await;
        while buf.has_remaining() {
            match tokio::time::timeout(stall, io.writable()).await {
                Err(_) => {
                    info!(stall = ?stall, "the socket took nothing: client not reading, connection dropped");
                    metrics::counter!("switchboard_write_stalls_total").increment(1);
                    return Written::Stalled;
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "websocket write failed");
                    return Written::Done;
                }
                Ok(Ok(())) => {}
            }
            match io.try_write(&buf) {
                Ok(n) => buf.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "websocket write failed");
                    return Written::Done;
                }
            }
        }
        if done {
            return Written::Done;
        }
    }
}

/// Drop a stalled socket with a reset: its unsent bytes are discarded at once, not retried by the kernel.
fn reset(io: TcpStream) {
    // A zero linger makes close() send RST without blocking (tokio deprecates SO_LINGER because a non-zero
    // one blocks the thread on drop).
    #[allow(deprecated)]
    let _ = io.set_linger(Some(Duration::ZERO));
}

/// Shut down the write side and read until the client closes (at most [`LINGER`]), so that closing does
/// not reset a client that has not read the close frame yet.
async fn linger(mut io: TcpStream) {
    let _ = io.shutdown().await;
    let drained = async {
        let mut scratch = [0u8; 512];
        loop {
            if io.readable().await.is_err() {
                return;
            }
            match io.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

fn close_reason(code: CloseCode) -> CloseReason {
    CloseReason {
        code: actix_http::ws::CloseCode::from(code.code()),
        description: Some(code.reason().to_owned()),
    }
}

/// Frames (or bytes) put in one buffer per batch; the socket takes it in one write.
const WRITE_BATCH_FRAMES: usize = 256;
const WRITE_BATCH_BYTES: usize = 64 * 1024;

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
