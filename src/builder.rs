//! [`ServerBuilder`]: Switchboard as a library — a node with your [`Behaviour`]s, served on your listener
//! until your shutdown future resolves (`docs/extending.md`).

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use switchboard_actors::behaviour::Behaviour;

use crate::config::{Config, Settings};
use crate::server::Server;

/// Builds a [`Server`]: a configuration and behaviours, then [`run`](ServerBuilder::run) (or
/// [`start`](ServerBuilder::start) to hold the running server).
///
/// ```no_run
/// use switchboard::behaviour::{async_trait, Behaviour, Incoming, MessageVerdict};
/// use switchboard::{Config, Server};
///
/// /// Appends a signature to every message.
/// struct Signed;
///
/// #[async_trait]
/// impl Behaviour for Signed {
///     async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
///         MessageVerdict::Rewrite(format!("{} — sent with Switchboard", msg.body))
///     }
/// }
///
/// # async fn serve() -> anyhow::Result<()> {
/// let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
/// Server::builder()
///     .config(Config::for_data_dir("./data"))
///     .behaviour(Signed)
///     .run(listener, async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await
/// # }
/// ```
#[derive(Default)]
pub struct ServerBuilder {
    config: Option<Config>,
    behaviours: Vec<Arc<dyn Behaviour>>,
}

impl Server {
    /// A builder with the default configuration (every setting's default, data in `./data`) and no
    /// behaviour.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

impl ServerBuilder {
    /// Use `config` (see [`Config::for_data_dir`] and [`Settings::resolve`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Add a behaviour. Behaviours run in the order they are added; the HTTP hook, when `hook_url` is
    /// configured, runs after them.
    pub fn behaviour(self, behaviour: impl Behaviour) -> Self {
        self.shared_behaviour(Arc::new(behaviour))
    }

    /// Add a behaviour the caller keeps a handle on (to look at what it saw, say).
    pub fn shared_behaviour(mut self, behaviour: Arc<dyn Behaviour>) -> Self {
        self.behaviours.push(behaviour);
        self
    }

    /// The configuration so far: the one given, or the defaults.
    pub fn config_or_default(&mut self) -> &mut Config {
        self.config.get_or_insert_with(|| {
            Settings::default()
                .resolve(Settings::default())
                .expect("defaults are valid")
        })
    }

    /// Open the store, start the actors and serve on `listener`; the server runs until it is shut down
    /// ([`Server::shutdown`], [`Server::run_until`]). Must run inside a multi-threaded Tokio runtime.
    pub async fn start(mut self, listener: TcpListener) -> anyhow::Result<Server> {
        let config = self.config_or_default().clone();
        Server::launch(&config, listener, self.behaviours).await
    }

    /// [`start`](ServerBuilder::start), then serve until `shutdown` resolves (or an operator drains the node,
    /// or a supervisor escalates), then drain and stop.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.start(listener).await?.run_until(shutdown).await
    }
}
