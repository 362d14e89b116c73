//! `SessionSupervisor` and [`Sessions`], the edge's handle for opening connections.
//!
//! Every new connection goes through the supervisor, which finds or starts the user's session, attaches the
//! connection to it and hands the edge a [`Connection`] to run. Because attaching and stopping an empty
//! session are both decided here, in one mailbox, a session never stops under a connection that is being
//! attached to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How long a drain waits for one connection to answer its sends and take its close frame.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

use crate::connection::{Connection, ConnectionContext};
use crate::outbound::{outbound, OutboundQueue};
use crate::session::{ConnHandle, SessionActor, SessionArgs, SessionDirectory, SessionMsg};
use crate::store::UserId;
use crate::supervisor::{Decision, Escalation, RestartBudget, RestartIntensity};

/// Messages of the session supervisor.
pub enum SessionsMsg {
    /// Open a connection for `user`.
    Connect {
        /// The authenticated user.
        user: UserId,
        /// The new connection.
        reply: RpcReplyPort<Result<Opened, String>>,
    },
    /// A session has no connection left.
    Empty {
        /// Its user.
        user: UserId,
        /// The session that reported (it may have been replaced).
        session: ActorId,
    },
}

/// A connection just opened, attached to its session: the transport runs it and drains its queue.
pub struct Opened {
    /// The connection, to run with what the transport reads.
    pub connection: Connection,
    /// The queue the transport drains into the socket.
    pub queue: OutboundQueue,
}

/// Supervises the sessions of this node.
pub struct SessionSupervisor;

/// Arguments of the session supervisor.
pub struct SessionSupervisorArgs {
    directory: SessionDirectory,
    ctx: Arc<ConnectionContext>,
    intensity: RestartIntensity,
    next_conn: Arc<AtomicU64>,
    drain: CancellationToken,
}

/// The supervisor's state.
pub struct SessionSupervisorState {
    directory: SessionDirectory,
    ctx: Arc<ConnectionContext>,
    sessions: HashMap<ActorId, UserId>,
    budget: RestartBudget,
    intensity: RestartIntensity,
    next_conn: Arc<AtomicU64>,
    /// Cancelled when the node drains: every connection then answers its sends and closes with 1012.
    drain: CancellationToken,
}

impl SessionSupervisorState {
    async fn session(
        &mut self,
        myself: &ActorRef<SessionsMsg>,
        user: &str,
    ) -> Result<ActorRef<SessionMsg>, SpawnErr> {
        if let Some(s) = self.directory.get(user) {
            return Ok(s);
        }
        let args = SessionArgs {
            user: user.to_owned(),
            directory: self.directory.clone(),
        };
        let (session, _) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await?;
        self.sessions.insert(session.get_id(), user.to_owned());
        self.directory.insert(user.to_owned(), session.clone());
        Ok(session)
    }

    async fn connect(
        &mut self,
        myself: &ActorRef<SessionsMsg>,
        user: UserId,
    ) -> Result<Opened, SpawnErr> {
        let session = self.session(myself, &user).await?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (outbound, queue) = outbound(self.ctx.limits.outbound_queue);
        let handle = ConnHandle {
            id,
            outbound: outbound.clone(),
        };
        // Listed for delivery now, before the edge reads anything from the client.
        self.directory
            .attach(&user, session.get_id(), handle.clone());
        let _ = session.send_message(SessionMsg::Attach(handle));
        let connection = Connection::new(
            user,
            id,
            self.ctx.clone(),
            outbound,
            session,
            self.drain.clone(),
        );
        Ok(Opened { connection, queue })
    }
}

impl Actor for SessionSupervisor {
    type Msg = SessionsMsg;
    type State = SessionSupervisorState;
    type Arguments = SessionSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionsMsg>,
        args: SessionSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SessionSupervisorState {
            directory: args.directory,
            ctx: args.ctx,
            sessions: HashMap::new(),
            budget: RestartBudget::new(args.intensity),
            intensity: args.intensity,
            next_conn: args.next_conn,
            drain: args.drain,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionsMsg>,
        message: SessionsMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionsMsg::Connect { user, reply } => {
                let result = state.connect(&myself, user).await.map_err(|e| {
                    warn!(error = %e, "connection could not start");
                    e.to_string()
                });
                let _ = reply.send(result);
            }
            SessionsMsg::Empty { user, session } => {
                let Some(current) = state.directory.get(&user).filter(|s| s.get_id() == session)
                else {
                    return Ok(());
                };
                // Asked here, after every Attach this supervisor already sent: the answer is final.
                let stops = matches!(
                    current
                        .call(SessionMsg::StopIfEmpty, Some(Duration::from_secs(5)))
                        .await,
                    Ok(CallResult::Success(true))
                );
                if stops {
                    state.directory.remove_if(&user, session);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SessionsMsg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, ..) => {
                if let Some(user) = state.sessions.remove(&cell.get_id()) {
                    state.directory.remove_if(&user, cell.get_id());
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(user) = state.sessions.remove(&cell.get_id()) else {
                    return Ok(());
                };
                // The failed session's state, dropped, closed the user's connections with 1011; their
                // devices reconnect (and resync) into a fresh session on demand.
                error!(user_id = %user, error = %err, "session failed; its connections were closed");
                metrics::counter!("switchboard_actor_restarts_total", "family" => "session")
                    .increment(1);
                state.directory.remove_if(&user, cell.get_id());
                if state.budget.on_failure(Instant::now()) == Decision::Escalate {
                    return Err(Escalation::new("session", state.intensity).into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The edge's handle on sessions: cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    directory: SessionDirectory,
    supervisor: ActorRef<SessionsMsg>,
    drain: CancellationToken,
}

impl Sessions {
    /// Spawn the session supervisor linked to `parent`.
    pub async fn start(
        directory: SessionDirectory,
        ctx: Arc<ConnectionContext>,
        intensity: RestartIntensity,
        parent: ActorCell,
    ) -> Result<Self, SpawnErr> {
        let drain = CancellationToken::new();
        let args = SessionSupervisorArgs {
            directory: directory.clone(),
            ctx,
            intensity,
            next_conn: Arc::new(AtomicU64::new(1)),
            drain: drain.clone(),
        };
        let (supervisor, _) = Actor::spawn_linked(None, SessionSupervisor, args, parent).await?;
        Ok(Self {
            directory,
            supervisor,
            drain,
        })
    }

    /// Open a connection for `user`, attached to the user's session (started if need be).
    pub async fn connect(&self, user: UserId) -> Result<Opened, String> {
        match self
            .supervisor
            .call(
                |reply| SessionsMsg::Connect { user, reply },
                Some(Duration::from_secs(10)),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err("session supervisor unavailable".into()),
        }
    }

    /// The directory of online users and their connections (what conversations deliver through).
    pub fn directory(&self) -> &SessionDirectory {
        &self.directory
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
