//! The conversation actor's side of the behaviours: sends screened by `on_message` in arrival order before
//! they are queued for the store, and stored batches fed to `on_stored` in seq order.
//!
//! Screening never blocks the actor. A verdict that is ready when first asked (a behaviour that decides
//! from memory) is taken at once, in the handler; from the first send whose hooks must wait, the sends
//! waiting go to one task, which runs their hooks concurrently and hands the verdicts back in arrival
//! order (`ConversationMsg::Screened`). Sends arriving meanwhile wait behind that task, so one sender's
//! messages keep their order, and the store assigns seqs only to what was accepted.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tracing::warn;

use super::{Behaviours, Incoming};
use crate::conversation::PendingSend;
use crate::protocol::ProtocolError;
use crate::store::{Appended, ConvId, Message};

/// Stored batches waiting for `on_stored`, per conversation; past this the batch is not fed to the hooks
/// (counted as an `overflow` failure of `on_stored`).
pub(crate) const STORED_QUEUE: usize = 1024;

/// One send's screening: the send back, with its body rewritten or the refusal for its sender.
pub(crate) type Screening =
    Pin<Box<dyn Future<Output = (PendingSend, Result<(), ProtocolError>)> + Send>>;

fn screening(behaviours: Arc<Behaviours>, conv: ConvId, mut pending: PendingSend) -> Screening {
    Box::pin(async move {
        let m = &pending.message;
        let incoming = Incoming {
            conv: &conv,
            from: &m.from,
            msg_id: &m.msg_id,
            body: &m.body,
        };
        let verdict = match behaviours.message(&incoming).await {
            Ok(Some(body)) => {
                pending.message.body = body;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        (pending, verdict)
    })
}

/// Screen `queue` front to back while verdicts are ready at once, handing each to `done`; from the first
/// that must wait, return the screenings of everything left (in order) for a task to finish.
pub(crate) fn inline(
    behaviours: &Arc<Behaviours>,
    conv: &ConvId,
    queue: &mut VecDeque<PendingSend>,
    mut done: impl FnMut(PendingSend, Result<(), ProtocolError>),
) -> Option<Vec<Screening>> {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    while let Some(pending) = queue.pop_front() {
        let mut first = screening(behaviours.clone(), conv.clone(), pending);
        // Polled here with a waker that does nothing: a future that is not ready is polled again, with the
        // task's waker, by the task it moves to.
        match first.as_mut().poll(&mut cx) {
            Poll::Ready((p, verdict)) => done(p, verdict),
            Poll::Pending => {
                let mut rest = Vec::with_capacity(queue.len() + 1);
                rest.push(first);
                rest.extend(
                    queue
                        .drain(..)
                        .map(|p| screening(behaviours.clone(), conv.clone(), p)),
                );
                return Some(rest);
            }
        }
    }
    None
}

/// A conversation's feed to `on_stored`: one task per conversation actor runs the hooks for each stored
/// message in seq order, off the write path; it ends when the actor and its write jobs are gone.
#[derive(Clone)]
pub(crate) struct StoredFeed(mpsc::Sender<Vec<Message>>);

impl StoredFeed {
    pub(crate) fn start(behaviours: Arc<Behaviours>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<Message>>(STORED_QUEUE);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                for m in &batch {
                    behaviours.stored(m).await;
                }
            }
        });
        Self(tx)
    }

    /// Feed a batch's new messages (not the duplicates) to the hooks; never waits.
    pub(crate) fn push(&self, results: &[Appended]) {
        let new: Vec<Message> = results
            .iter()
            .filter_map(|r| match r {
                Appended::New(m) => Some(m.clone()),
                Appended::Duplicate(_) => None,
            })
            .collect();
        if new.is_empty() {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(batch)) = self.0.try_send(new) {
            metrics::counter!(
                "switchboard_behaviour_failures_total",
                "hook" => "on_stored",
                "kind" => "overflow"
            )
            .increment(1);
            warn!(
                conv_id = %batch[0].conv,
                messages = batch.len(),
                "on_stored is behind; batch not fed to the behaviours"
            );
        }
    }
}
