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
        /// Register a behaviour that does nothing, to measure what the hooks cost (docs/benchmarks.md).
        #[arg(long, hide = true)]
        bench_noop_behaviour: bool,
    },
    /// Show the cluster as a node sees it: every node, its state, connections and conversations.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Drain a node: it stops taking connections, hands its conversations to the others, closes its
    /// clients with 1012 over its drain window and exits (what SIGTERM does).
    Drain {
        /// The node's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        node: String,
        /// The node's admin token, if it has one.
        #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
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

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print every node the asked node knows (`GET /v1/cluster`).
    Status {
        /// The node to ask, by its HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        node: String,
        /// Print the JSON as the node answered it.
        #[arg(long)]
        json: bool,
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
        Command::Cluster {
            command: ClusterCommand::Status { node, json },
        } => admin_runtime()?.block_on(cluster_status(&node, json)),
        Command::Drain { node, admin_token } => {
            admin_runtime()?.block_on(drain(&node, admin_token.as_deref()))
        }
        Command::Serve {
            config,
            settings,
            bench_noop_behaviour,
        } => {
            let config = load(config, settings)?;
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log)?)
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config, bench_noop_behaviour))
        }
    }
}

fn admin_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn cluster_status(node: &str, json: bool) -> anyhow::Result<()> {
    let url = format!("{}/v1/cluster", node.trim_end_matches('/'));
    let answer: serde_json::Value = reqwest::get(&url).await?.error_for_status()?.json().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:<22} {:<22} {:>11} {:>7} {:>13}",
        "NODE", "STATE", "HTTP", "CLUSTER", "CONNECTIONS", "USERS", "CONVERSATIONS"
    );
    for n in answer["nodes"].as_array().into_iter().flatten() {
        let text = |k: &str| n[k].as_str().unwrap_or("-").to_owned();
        let count = |k: &str| n[k].as_u64().map_or("-".into(), |v| v.to_string());
        println!(
            "{:<16} {:<9} {:<22} {:<22} {:>11} {:>7} {:>13}",
            text("name"),
            text("state"),
            text("http"),
            text("cluster"),
            count("connections"),
            count("online_users"),
            count("conversations")
        );
    }
    Ok(())
}

async fn drain(node: &str, admin_token: Option<&str>) -> anyhow::Result<()> {
    let url = format!("{}/v1/admin/drain", node.trim_end_matches('/'));
    let mut request = reqwest::Client::new().post(&url);
    if let Some(token) = admin_token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await?;
    let status = answer.status();
    let body = answer.text().await?;
    anyhow::ensure!(status.is_success(), "{url}: {status}: {body}");
    println!("{body}");
    Ok(())
}

async fn serve(config: Config, noop_behaviour: bool) -> anyhow::Result<()> {
    let listener = listen(config.listen)?;
    let mut builder = Server::builder().config(config.clone());
    if noop_behaviour {
        builder = builder.behaviour(switchboard::testing::Noop);
    }
    let server = builder.start(listener).await?;
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
