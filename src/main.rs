//! The `switchboard` command: `serve` runs a node, `token` mints a dev JWT. The only place that reads flags
//! and the environment.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchboard::auth::Auth;
use switchboard::config::{Config, Settings};
use switchboard::server::Server;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A real-time chat server built the Erlang way"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// TOML configuration file (see switchboard.example.toml).
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print a JWT for USER signed with the configured HS256 secret (or the data directory's dev secret).
    Token {
        /// The user id (the token's `sub`).
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = switchboard::auth::DEV_TOKEN_TTL_SECS)]
        ttl_secs: u64,
        /// TOML configuration file.
        #[arg(long, env = "SWITCHBOARD_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
}

fn load(config: Option<PathBuf>, settings: Settings) -> anyhow::Result<Config> {
    let file = match config {
        Some(path) => Settings::from_file(&path)?,
        None => Settings::default(),
    };
    Ok(settings.resolve(file)?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Token {
            user,
            ttl_secs,
            config,
            settings,
        } => {
            let config = load(config, settings)?;
            println!("{}", Auth::from_config(&config)?.mint(&user, ttl_secs)?);
            Ok(())
        }
        Command::Serve { config, settings } => {
            let config = load(config, settings)?;
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log)?)
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = listen(config.listen)?;
    let server = Server::start(&config, listener).await?;
    info!(node = %server.node(), listen = %server.local_addr(), data_dir = %config.data_dir.display(), "switchboard ready");
    if config.dev_login {
        warn!("dev login is ON: anyone who can reach this address can get a token (POST /v1/dev/token)");
    } else {
        info!("dev login is off");
    }
    server.run_until(shutdown_signal()).await
}

/// Pending connections the kernel may queue before `accept` (capped by `net.core.somaxconn`). The standard
/// library asks for 128, which a reconnect storm overflows: the kernel then drops connection attempts and
/// clients wait a second to retry.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
