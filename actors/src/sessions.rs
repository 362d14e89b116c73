//! [`Sessions`], the edge's handle for opening connections, and the node's drain of them.
//!
//! Opening a connection lists it in the user's entry of the [`SessionDirectory`] (opening the entry if it is
//! the user's first) and hands the edge a [`Connection`] to run; the connection unlists itself when it ends.
//! Both are changes under the directory's lock, so an entry never goes away under a connection being added
//! to it. Sessions are rows of that table, not actors (decision 0009): an idle user costs its entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::behaviour::{Attachments, Disconnected, Farewell};
use crate::connection::{Connection, ConnectionContext};
use crate::outbound::{outbound, OutboundQueue};
use crate::presence::Presence;
use crate::session::{ConnHandle, SessionDirectory};
use crate::store::UserId;

/// How long a drain waits for one connection to answer its sends and take its close frame.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection just opened and listed for delivery: the transport runs it and drains its queue.
pub struct Opened {
    /// The connection, to run with what the transport reads.
    pub connection: Connection,
    /// The queue the transport drains into the socket.
    pub queue: OutboundQueue,
}

/// The edge's handle on sessions: cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    directory: SessionDirectory,
    ctx: Arc<ConnectionContext>,
    next_conn: Arc<AtomicU64>,
    /// Cancelled when the node drains: every connection then answers its sends and closes with 1012.
    drain: CancellationToken,
}

impl Sessions {
    /// Sessions whose connections share `ctx` (and are listed in its directory).
    pub fn new(ctx: Arc<ConnectionContext>) -> Self {
        Self {
            directory: ctx.directory.clone(),
            ctx,
            next_conn: Arc::new(AtomicU64::new(1)),
            drain: CancellationToken::new(),
        }
    }

    /// Open a connection for `user`, listed for delivery before the edge reads anything from the client.
    pub fn connect(&self, user: UserId) -> Opened {
        self.connect_with(user, None, Attachments::default())
    }

    /// [`Sessions::connect`] for a client the behaviours admitted (`Behaviours::connect`), with its address
    /// and what they attached; the behaviours' `on_disconnect` gets both when the connection ends.
    pub fn connect_with(
        &self,
        user: UserId,
        peer: Option<std::net::SocketAddr>,
        attachments: Attachments,
    ) -> Opened {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (outbound, queue) = outbound(self.ctx.limits.outbound_queue);
        let first = self.directory.attach(
            &user,
            ConnHandle {
                id,
                outbound: outbound.clone(),
            },
        );
        if first {
            self.ctx.presence.changed(&user);
        }
        let farewell = self.ctx.behaviours.clone().map(|behaviours| {
            Farewell::new(
                behaviours,
                Disconnected {
                    user: user.clone(),
                    conn: id,
                    peer,
                    attachments,
                },
            )
        });
        let connection = Connection::new(
            user,
            id,
            self.ctx.clone(),
            outbound,
            self.drain.clone(),
            farewell,
        );
        Opened { connection, queue }
    }

    /// The directory of online users and their connections (what conversations deliver through).
    pub fn directory(&self) -> &SessionDirectory {
        &self.directory
    }

    /// Presence on this node.
    pub fn presence(&self) -> &Presence {
        &self.ctx.presence
    }

    /// Drain every connection on this node: each stops reading, gets the answers to the sends it accepted,
    /// and is closed with 1012.
    pub async fn drain_all(&self) {
        self.drain.cancel();
        let drains = self
            .directory
            .connections()
            .into_iter()
            .map(|c| async move {
                tokio::time::timeout(DRAIN_TIMEOUT, c.outbound.finished())
                    .await
                    .is_err()
            });
        let stuck = futures_util::future::join_all(drains)
            .await
            .into_iter()
            .filter(|&stuck| stuck)
            .count();
        if stuck > 0 {
            warn!(stuck, "connections did not drain in time");
        }
    }
}
