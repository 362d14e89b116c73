//! `switchboard-load`: the load generator for Switchboard, and the baseline server it is compared with.
//!
//! ```text
//! switchboard-load idle  --server 127.0.0.1:8080 --server-pid PID --clients 19000 --duration 30
//! switchboard-load dm    --server 127.0.0.1:8080 --pairs 1000 --rate 10000 --duration 20
//! switchboard-load group --server 127.0.0.1:8080 --members 5000 --rate 200 --duration 20
//! switchboard-load storm --server 127.0.0.1:8080 --clients 10000
//! switchboard-load dm    --servers 127.0.0.1:8080,127.0.0.2:8080 --placement cross --pairs 100
//! switchboard-load baseline --listen 127.0.0.1:9090
//! ```
//!
//! Every scenario runs its clients in worker processes (`switchboard-load worker`, started by the tool
//! itself) because a process may hold only 20,000 open files here, binds them to source addresses
//! 127.0.0.2, 127.0.0.3, … because one address has ~28,000 ports, refuses targets outside 127.0.0.0/8, and
//! is bounded in connections and seconds. `--with-baseline` runs the same scenario against a baseline
//! server it starts, and prints both with the ratio; `--json` prints the report for machines.
//! `--servers` spreads the clients over a cluster's nodes and reports its inter-node messages per message.

mod baseline;
mod cluster;
mod coordinator;
mod frame;
mod net;
mod report;
mod setup;
mod spec;
mod stats;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cluster::Placement;
use coordinator::{Common, RunSpec};
use spec::Scenario;

/// Errors end the run with a message.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "switchboard-load",
    about = "Load generator for Switchboard (loopback only), and a baseline server to compare with"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N authenticated connections, hold them, report server RSS per connection and accept rate.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Seconds to hold them open.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Do not give the clients DMs to sync: bare authenticated connections.
        #[arg(long)]
        no_conv: bool,
    },
    /// Pairs of clients exchanging DMs at a total rate: send→ack and send→deliver latency.
    Dm {
        #[command(flatten)]
        common: Common,
        /// DM pairs (two connections each).
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Total messages per second, over all senders.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of sending, measured.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds of sending at the same rate before the measured ones: their latencies are reported
        /// apart (the first messages start the conversations' actors, while the setup's last work ends).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// With --servers: `same` puts both members of pair i on node i mod n; `cross` puts the second
        /// on node (i + 1) mod n, so that every message crosses nodes.
        #[arg(long, value_enum, default_value_t = Placement::Same)]
        placement: Placement,
        /// Signals on: each sender sends `typing` before each message (the server passes on at most one
        /// a second), and each receiver sends `read` for each message it gets.
        #[arg(long)]
        signals: bool,
    },
    /// One group: M messages per second to G members; deliveries per second and delivery latency.
    Group {
        #[command(flatten)]
        common: Common,
        /// Members (connections), the creator included.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Messages per second, over all senders.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Members that send (round-robin).
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Seconds of sending, measured.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds of sending at the same rate before the measured ones, reported apart.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Members (the last ones, never senders) that stop reading their socket when sending starts, with
        /// a 4 KiB receive buffer: slow consumers. The report gives the others' delivery latency, the
        /// server's peak RSS and how each slow client was closed.
        #[arg(long, default_value_t = 0)]
        slow: usize,
    },
    /// N connected clients all drop and reconnect and sync at once: time until all are back and synced.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Clients (in DM pairs).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Messages each DM holds before the storm (replayed by each client's sync).
        #[arg(long, default_value_t = 20)]
        history: u32,
        /// Seconds a client keeps trying to get back.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Run the baseline server: tokio-tungstenite broadcast, no auth, no storage, no actors.
    Baseline {
        /// Address to listen on (loopback only; port 0 picks one). Prints `listening ADDR`.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
    },
    /// Print two `--json` reports side by side with the ratio of the first to the second.
    Compare {
        /// The first report (usually Switchboard's).
        a: PathBuf,
        /// The second report (usually the baseline's).
        b: PathBuf,
    },
    /// Internal: a worker process started by the tool itself.
    #[command(hide = true)]
    Worker,
}

fn scenario(common: Common, spec: RunSpec) -> Result<(), Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(coordinator::main(common, spec))
}

fn run(cli: Cli) -> Result<(), Error> {
    let base = |scenario, clients| RunSpec {
        scenario,
        clients,
        rate: 0.0,
        duration_s: 0,
        warmup_s: 0,
        senders: 0,
        history: 0,
        storm_timeout_s: 0,
        conv: false,
        placement: Placement::Same,
        signals: false,
        slow: 0,
    };
    match cli.command {
        Cmd::Idle {
            common,
            clients,
            duration,
            no_conv,
        } => scenario(
            common,
            RunSpec {
                duration_s: duration,
                conv: !no_conv,
                ..base(Scenario::Idle, clients)
            },
        ),
        Cmd::Dm {
            common,
            pairs,
            rate,
            duration,
            warmup,
            placement,
            signals,
        } => scenario(
            common,
            RunSpec {
                rate,
                duration_s: duration,
                warmup_s: warmup,
                placement,
                signals,
                ..base(Scenario::Dm, pairs.saturating_mul(2))
            },
        ),
        Cmd::Group {
            common,
            members,
            rate,
            senders,
            duration,
            warmup,
            slow,
        } => scenario(
            common,
            RunSpec {
                rate,
                duration_s: duration,
                warmup_s: warmup,
                senders,
                slow,
                ..base(Scenario::Group, members)
            },
        ),
        Cmd::Storm {
            common,
            clients,
            history,
            timeout,
        } => scenario(
            common,
            RunSpec {
                history,
                storm_timeout_s: timeout,
                ..base(Scenario::Storm, clients)
            },
        ),
        Cmd::Baseline { listen } => baseline::main(&listen),
        Cmd::Compare { a, b } => coordinator::compare(&a, &b),
        Cmd::Worker => worker::main(),
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("switchboard-load: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_scenario_line() {
        let cli = Cli::try_parse_from([
            "switchboard-load",
            "dm",
            "--server",
            "127.0.0.1:18080",
            "--pairs",
            "200",
            "--rate",
            "2000",
            "--with-baseline",
        ])
        .unwrap();
        let Cmd::Dm { common, pairs, .. } = cli.command else {
            panic!("not dm")
        };
        assert_eq!(pairs, 200);
        assert!(common.with_baseline);
        assert!(Cli::try_parse_from(["switchboard-load", "idle", "--bogus"]).is_err());
    }

    #[test]
    fn parses_a_cluster_line() {
        let cli = Cli::try_parse_from([
            "switchboard-load",
            "dm",
            "--servers",
            "127.0.0.1:8080,127.0.0.2:8080",
            "--server-pid",
            "10,11",
            "--placement",
            "cross",
        ])
        .unwrap();
        let Cmd::Dm {
            common, placement, ..
        } = cli.command
        else {
            panic!("not dm")
        };
        assert_eq!(placement, Placement::Cross);
        assert_eq!(common.server_pid, [10, 11]);
        assert_eq!(
            common.servers.as_deref(),
            Some("127.0.0.1:8080,127.0.0.2:8080")
        );
        // One pid as before; --server and --servers exclude each other; placement is dm's.
        let cli = Cli::try_parse_from(["switchboard-load", "idle", "--server-pid", "42"]).unwrap();
        let Cmd::Idle { common, .. } = cli.command else {
            panic!("not idle")
        };
        assert_eq!(common.server_pid, [42]);
        assert!(Cli::try_parse_from([
            "switchboard-load",
            "dm",
            "--server",
            "127.0.0.1:1",
            "--servers",
            "127.0.0.1:2"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["switchboard-load", "group", "--placement", "cross"]).is_err()
        );
    }
}
