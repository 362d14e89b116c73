//! A connection's outbound queue: the only way frames reach a client.
//!
//! Producers (the connection's loop, its syncs, every conversation the user is in) push shared,
//! already-serialised frames and never wait; the transport *pulls* them when its socket can take more, so a
//! delivery costs a push and, at most, one wake-up of the task that owns the socket — no writer task and no
//! second channel in between. Whatever piled up since the last pull goes out in one write.
//!
//! The queue is bounded in frames: a full queue means the client is not reading (a slow consumer) and the
//! pusher learns it at once. Closing is a flag, not a queued item, so a close is never refused for lack of
//! room: `close` sends the close frame after what is queued, `abort` drops the queue and sends it now.
//! An idle queue holds no buffer: a few dozen bytes behind one `Arc`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::CloseCode;

/// Most frames the transport takes from the shared queue under one lock.
pub const TAKE_AT_ONCE: usize = 256;

/// What the transport writes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A protocol frame (JSON text), shared by every recipient.
    Text(Bytes),
    /// The answer to a WebSocket ping, with its payload.
    Pong(Bytes),
    /// The last frame: close with this code. Nothing follows it.
    Close(CloseCode),
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the client is not reading.
    Full,
    /// The connection is closing or closed.
    Closed,
}

#[derive(Default)]
struct State {
    frames: VecDeque<OutFrame>,
    /// Close after the queued frames.
    close: Option<CloseCode>,
    /// Close now: the queue was dropped.
    abort: Option<CloseCode>,
    /// The transport took the close frame, or let go of the queue.
    finished: bool,
    waker: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    /// Notified when a close is asked for and when the queue finishes.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The pushing side of a connection's queue; cheap to clone.
#[derive(Clone)]
pub struct Outbound(Arc<Shared>);

/// The pulling side, owned by the transport. Dropping it marks the connection gone.
pub struct OutboundQueue {
    shared: Arc<Shared>,
    /// Frames taken from the shared queue in one go, not yet handed to the transport.
    taken: VecDeque<OutFrame>,
}

/// A queue of at most `capacity` frames.
pub fn outbound(capacity: usize) -> (Outbound, OutboundQueue) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        capacity: capacity.max(1),
        changed: Notify::new(),
    });
    (
        Outbound(shared.clone()),
        OutboundQueue {
            shared,
            taken: VecDeque::new(),
        },
    )
}

impl Outbound {
    /// Queue a protocol frame without waiting.
    pub fn push_frame(&self, frame: Bytes) -> Result<(), PushError> {
        self.push(OutFrame::Text(frame))
    }

    /// Queue the answer to a ping. Pongs count against the bound like any frame: a client that pings
    /// without reading is a slow consumer too.
    pub fn push_pong(&self, payload: Bytes) -> Result<(), PushError> {
        self.push(OutFrame::Pong(payload))
    }

    /// Queue several frames under one lock, with at most one wake-up; returns how many were queued. On
    /// `Full` the ones that fitted stay queued.
    pub fn push_frames<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a Bytes>,
    ) -> Result<usize, PushError> {
        let mut queued = 0;
        let (waker, result) = {
            let mut s = self.0.lock();
            if s.close.is_some() || s.abort.is_some() || s.finished {
                return Err(PushError::Closed);
            }
            let mut result = Ok(());
            for frame in frames {
                if s.frames.len() >= self.0.capacity {
                    result = Err(PushError::Full);
                    break;
                }
                s.frames.push_back(OutFrame::Text(frame.clone()));
                queued += 1;
            }
            (if queued > 0 { s.waker.take() } else { None }, result)
        };
        if let Some(w) = waker {
            w.wake();
        }
        result.map(|()| queued)
    }

    /// Queue a best-effort signal (typing, a receipt) if the queue is at most half full; `false` if it was
    /// dropped. Signals are the first thing dropped under load: they never take the room messages and
    /// answers need, and never make a connection a slow consumer.
    pub fn push_signal(&self, frame: &Bytes) -> bool {
        let waker = {
            let mut s = self.0.lock();
            if s.close.is_some()
                || s.abort.is_some()
                || s.finished
                || s.frames.len() * 2 >= self.0.capacity
            {
                return false;
            }
            s.frames.push_back(OutFrame::Text(frame.clone()));
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    fn push(&self, frame: OutFrame) -> Result<(), PushError> {
        let waker = {
            let mut s = self.0.lock();
            if s.close.is_some() || s.abort.is_some() || s.finished {
                return Err(PushError::Closed);
            }
            if s.frames.len() >= self.0.capacity {
                return Err(PushError::Full);
            }
            s.frames.push_back(frame);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Close with `code` once the queued frames are out; later pushes are refused. The first close wins.
    pub fn close(&self, code: CloseCode) {
        self.set(|s| {
            if s.close.is_none() {
                s.close = Some(code);
            }
        });
    }

    /// Close with `code` now, dropping whatever is queued (a slow consumer would never read its way to a
    /// close frame behind a full queue). Overrides a pending `close`.
    pub fn abort(&self, code: CloseCode) {
        self.set(|s| {
            if s.abort.is_none() {
                s.abort = Some(code);
                s.frames = VecDeque::new();
            }
        });
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        let waker = {
            let mut s = self.0.lock();
            f(&mut s);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        self.0.changed.notify_waiters();
    }

    /// Whether a close was asked for (or the transport let go): nothing more will be queued.
    pub fn is_closing(&self) -> bool {
        let s = self.0.lock();
        s.close.is_some() || s.abort.is_some() || s.finished
    }

    /// Wait until a close is asked for or the transport lets go.
    pub async fn closing(&self) {
        self.wait_for(|s| s.close.is_some() || s.abort.is_some() || s.finished)
            .await
    }

    /// Wait until the transport has taken the close frame or let go of the queue.
    pub async fn finished(&self) {
        self.wait_for(|s| s.finished).await
    }

    async fn wait_for(&self, done: impl Fn(&State) -> bool) {
        loop {
            let notified = self.0.changed.notified();
            if done(&self.0.lock()) {
                return;
            }
            notified.await;
        }
    }
}

impl OutboundQueue {
    /// The next frame to write; `Pending` (and a wake-up later) when there is none. After
    /// [`OutFrame::Close`] it yields `None` for ever.
    ///
    /// Frames are taken from the shared queue all at once (at most [`TAKE_AT_ONCE`]), so a transport that
    /// writes a batch takes the lock once per batch.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutFrame>> {
        let mut s = self.shared.lock();
        if s.finished {
            return Poll::Ready(None);
        }
        if s.abort.is_some() {
            self.taken = VecDeque::new();
        } else if let Some(frame) = self.taken.pop_front() {
            return Poll::Ready(Some(frame));
        }
        let next = if let Some(code) = s.abort {
            OutFrame::Close(code)
        } else if !s.frames.is_empty() {
            if s.frames.len() <= TAKE_AT_ONCE {
                self.taken = std::mem::take(&mut s.frames);
            } else {
                self.taken.extend(s.frames.drain(..TAKE_AT_ONCE));
            }
            return Poll::Ready(self.taken.pop_front());
        } else if let Some(code) = s.close {
            OutFrame::Close(code)
        } else {
            match &s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => s.waker = Some(cx.waker().clone()),
            }
            // Idle: hold no buffer.
            self.taken = VecDeque::new();
            return Poll::Pending;
        };
        Self::finish(&mut s, &self.shared);
        Poll::Ready(Some(next))
    }

    fn finish(s: &mut State, shared: &Shared) {
        s.finished = true;
        s.frames = VecDeque::new();
        s.waker = None;
        shared.changed.notify_waiters();
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        if !s.finished {
            Self::finish(&mut s, &self.shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    fn text(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    async fn next(q: &mut OutboundQueue) -> Option<OutFrame> {
        poll_fn(|cx| q.poll_next(cx)).await
    }

    #[test]
    fn signals_stop_at_half_the_queue_and_leave_the_rest_to_messages() {
        let (out, _q) = outbound(8);
        for _ in 0..4 {
            assert!(out.push_signal(&text("typing")));
        }
        assert!(!out.push_signal(&text("typing")), "half full: dropped");
        assert!(!out.is_closing(), "a dropped signal closes nothing");
        for _ in 0..4 {
            out.push_frame(text("msg")).unwrap();
        }
        assert_eq!(out.push_frame(text("msg")), Err(PushError::Full));
        out.close(CloseCode::Normal);
        assert!(!out.push_signal(&text("typing")), "closed: dropped");
    }

    #[tokio::test]
    async fn frames_come_out_in_order_then_the_close() {
        let (out, mut q) = outbound(8);
        out.push_frame(text("a")).unwrap();
        out.push_pong(text("p")).unwrap();
        out.push_frame(text("b")).unwrap();
        out.close(CloseCode::ServiceRestart);
        assert_eq!(out.push_frame(text("late")), Err(PushError::Closed));
        assert_eq!(next(&mut q).await, Some(OutFrame::Text(text("a"))));
        assert_eq!(next(&mut q).await, Some(OutFrame::Pong(text("p"))));
        assert_eq!(next(&mut q).await, Some(OutFrame::Text(text("b"))));
        assert_eq!(
            next(&mut q).await,
            Some(OutFrame::Close(CloseCode::ServiceRestart))
        );
        assert_eq!(next(&mut q).await, None);
        tokio::time::timeout(Duration::from_secs(1), out.finished())
            .await
            .expect("finished after the close was taken");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_an_abort_jumps_it() {
        let (out, mut q) = outbound(2);
        out.push_frame(text("a")).unwrap();
        out.push_frame(text("b")).unwrap();
        assert_eq!(out.push_frame(text("c")), Err(PushError::Full));
        assert_eq!(out.push_pong(text("p")), Err(PushError::Full));
        out.close(CloseCode::Normal);
        out.abort(CloseCode::SlowConsumer);
        assert_eq!(
            next(&mut q).await,
            Some(OutFrame::Close(CloseCode::SlowConsumer))
        );
        assert_eq!(next(&mut q).await, None);
    }

    #[tokio::test]
    async fn a_push_wakes_the_waiting_transport() {
        let (out, mut q) = outbound(4);
        let reader = tokio::spawn(async move { next(&mut q).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        out.push_frame(text("x")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, Some(OutFrame::Text(text("x"))));
    }

    #[tokio::test]
    async fn a_dropped_transport_refuses_pushes_and_finishes() {
        let (out, q) = outbound(4);
        drop(q);
        assert_eq!(out.push_frame(text("x")), Err(PushError::Closed));
        tokio::time::timeout(Duration::from_secs(1), out.finished())
            .await
            .expect("finished when the transport let go");
    }
}
