//! The root of the supervision tree and the handle the edge holds.
//!
//! ```text
//! RootSupervisor
//! ├── ConversationSupervisor ── ConversationActor (one per active conversation)
//! └── PresenceSupervisor ────── PresenceShard × 16 (each online user's presence, by a hash of its id)
//! ```
//!
//! Each online user is an entry in the [`SessionDirectory`] listing the user's connections, and each
//! connection is a loop in its socket's task (decisions 0007 and 0009); what a user's session does beyond
//! listing devices — aggregating them across nodes, debouncing flaps, last seen — is its presence shard's
//! work (decision 0019).
//!
//! A family supervisor that exceeds its restart intensity fails; the root then stops and reports the
//! escalation, and the server exits so that the operating system's supervisor restarts it.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::watch;
use tracing::error;

use crate::cluster::SharedCluster;
use crate::connection::{ConnectionContext, ConnectionLimits, UserLimiter};
use crate::conversation::{ConversationConfig, ConversationContext};
use crate::conversations::Conversations;
use crate::presence::{Presence, PresenceConfig};
use crate::session::SessionDirectory;
use crate::sessions::Sessions;
use crate::store::SharedStore;
use crate::supervisor::RestartIntensity;

/// Everything the actor tree is configured with.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Conversation tunables.
    pub conversation: ConversationConfig,
    /// Connection limits.
    pub limits: ConnectionLimits,
    /// Restart intensity of each family supervisor.
    pub intensity: RestartIntensity,
    /// How long the edge waits for a conversation's answer.
    pub reply_timeout: Duration,
    /// Where offline members' notifications go, if anywhere.
    pub notifier: Option<crate::notify::SharedNotifier>,
    /// Presence settings.
    pub presence: PresenceConfig,
    /// The node's behaviours (`None`: no hooks).
    pub behaviours: Option<Arc<crate::behaviour::Behaviours>>,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            conversation: ConversationConfig::default(),
            limits: ConnectionLimits::default(),
            intensity: RestartIntensity::default(),
            reply_timeout: Duration::from_secs(10),
            notifier: None,
            presence: PresenceConfig::default(),
            behaviours: None,
        }
    }
}

/// The running actor tree.
pub struct ActorSystem {
    /// The conversation family.
    pub conversations: Conversations,
    /// The session family.
    pub sessions: Sessions,
    root: ActorRef<()>,
    escalation: watch::Receiver<Option<String>>,
}

struct RootSupervisor;

impl Actor for RootSupervisor {
    type Msg = ();
    type State = watch::Sender<Option<String>>;
    type Arguments = watch::Sender<Option<String>>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        report: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(report)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        report: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = event {
            let reason = err.to_string();
            error!(reason, "a family supervisor escalated; stopping the node");
            let _ = report.send(Some(reason));
            myself.stop(Some("escalation".into()));
        }
        Ok(())
    }
}

impl ActorSystem {
    /// Start the tree on the current Tokio runtime; `cluster` when this node is in one.
    pub async fn start(
        config: SystemConfig,
        store: SharedStore,
        cluster: Option<SharedCluster>,
    ) -> Result<Self, SpawnErr> {
        let (report, escalation) = watch::channel(None);
        let (root, _) = Actor::spawn(None, RootSupervisor, report).await?;
        let directory = SessionDirectory::with_cluster(cluster.clone());
        let presence = Presence::start(
            config.presence,
            directory.clone(),
            cluster.clone(),
            store.clone(),
            config.behaviours.clone(),
            root.get_cell(),
        )
        .await?;
        let conv_ctx = Arc::new(ConversationContext {
            store: store.clone(),
            sessions: directory.clone(),
            config: config.conversation.clone(),
            cluster,
            notifier: config.notifier.clone(),
            behaviours: config.behaviours.clone(),
        });
        let conversations = Conversations::start(
            conv_ctx,
            config.intensity,
            config.reply_timeout,
            root.get_cell(),
        )
        .await?;
        let conn_ctx = Arc::new(ConnectionContext {
            conversations: conversations.clone(),
            store,
            send_limiter: UserLimiter::new(config.limits.messages_per_user),
            signal_limiter: UserLimiter::new(config.limits.signals_per_user),
            sync_limiter: UserLimiter::new(config.limits.syncs_per_user),
            limits: config.limits,
            runtime: tokio::runtime::Handle::current(),
            directory,
            presence,
            behaviours: config.behaviours.clone(),
        });
        let sessions = Sessions::new(conn_ctx);
        if let Some(behaviours) = &config.behaviours {
            behaviours.start(crate::behaviour::Api::new(conversations.clone()));
        }
        Ok(Self {
            conversations,
            sessions,
            root,
            escalation,
        })
    }

    /// Close every connection gracefully (answers first, then 1012) and flush every conversation.
    pub async fn drain(&self) {
        self.sessions.drain_all().await;
        self.conversations.flush_all().await;
    }

    /// Stop the whole tree.
    pub async fn stop(&self) {
        let _ = self
            .root
            .stop_children_and_wait(None, Some(Duration::from_secs(10)))
            .await;
        let _ = self
            .root
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
    }

    /// Resolves with the reason when a family supervisor escalated and the tree stopped.
    pub async fn escalated(&self) -> String {
        let mut rx = self.escalation.clone();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "root supervisor gone".into();
            }
        }
    }
}
