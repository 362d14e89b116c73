//! The coordinator: prepares a run (tokens, conversations, clients, source addresses, and with `--servers`
//! the node each client connects to), spreads the clients over worker processes, steps them through the
//! scenario's phases while showing progress, reads the servers' RSS and CPU from `/proc` (and a cluster's
//! inter-node traffic from its nodes' `/metrics`), and builds the report.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cluster::{self, node_of, placement_name, Placement};
use crate::net::{self, check_source, parse_loopback_target, source_for};
use crate::report::{self, Report, Target as Goal};
use crate::setup::{mint, Api};
use crate::spec::{ClientSpec, Command, Counters, Event, Scenario, WorkerResult, WorkerSpec};
use crate::stats::{self, fmt_us, latency_histogram, rate_share, sig3, Summary};
use crate::Error;

/// No run opens more client connections than this.
pub(crate) const MAX_CLIENTS: usize = 100_000;
/// No run lasts longer than this (hold, send or storm phase).
pub(crate) const MAX_SECONDS: u64 = 600;
/// Setup (tokens, conversations, connecting) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Which server the run talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// Switchboard: tokens from dev login or `--jwt-secret`, conversations created over REST.
    Switchboard,
    /// `switchboard-load baseline`: no auth, made-up conversation ids.
    Baseline,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Switchboard => "switchboard",
            Self::Baseline => "baseline",
        }
    }
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// Server address, HOST:PORT in 127.0.0.0/8 (or localhost). Anything else is refused.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) server: String,
    /// A cluster's nodes instead of --server: HOST:PORT,HOST:PORT,… (each checked as --server). Setup goes
    /// to the first; clients are spread over all (see --placement for dm); each node's /metrics is read
    /// before and after the run for the inter-node traffic.
    #[arg(long, conflicts_with = "server")]
    pub(crate) servers: Option<String>,
    /// What kind of server is at --server.
    #[arg(long, value_enum, default_value_t = Target::Switchboard)]
    pub(crate) target: Target,
    /// The server's pid, or one per node (PID,PID,…), to read RSS and CPU time from /proc (summed).
    #[arg(long, value_delimiter = ',')]
    pub(crate) server_pid: Vec<u32>,
    /// Mint HS256 tokens with this secret instead of calling dev login.
    #[arg(long)]
    pub(crate) jwt_secret: Option<String>,
    /// Read the HS256 secret from a file (e.g. `<data-dir>/dev-jwt-secret`).
    #[arg(long, conflicts_with = "jwt_secret")]
    pub(crate) jwt_secret_file: Option<PathBuf>,
    /// `iss` claim for minted tokens.
    #[arg(long)]
    pub(crate) jwt_issuer: Option<String>,
    /// `aud` claim for minted tokens.
    #[arg(long)]
    pub(crate) jwt_audience: Option<String>,
    /// Worker processes (at least enough for --per-worker sockets each).
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Most sockets one worker holds (also capped by the open-files limit).
    #[arg(long, default_value_t = 18_000)]
    pub(crate) per_worker: usize,
    /// First source address; the next ones are used as each fills up.
    #[arg(long, default_value = "127.0.0.2")]
    pub(crate) source_from: Ipv4Addr,
    /// Ephemeral ports to use per source address (the machine has ~28,000).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) ports_per_source: usize,
    /// Connections each worker opens at once during setup.
    #[arg(long, default_value_t = 128)]
    pub(crate) connect_concurrency: usize,
    /// Message body size in bytes (at least 16: the send timestamp).
    #[arg(long, default_value_t = 32)]
    pub(crate) body_bytes: usize,
    /// After sending stops, wait at most this many seconds for the last acks and deliveries.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain: u64,
    /// Also start `switchboard-load baseline`, run the same scenario against it, and print the ratios.
    #[arg(long)]
    pub(crate) with_baseline: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    pub(crate) scenario: Scenario,
    pub(crate) clients: usize,
    pub(crate) rate: f64,
    pub(crate) duration_s: u64,
    /// Dm, group: seconds of sending before the measured `duration_s`, whose latencies are kept apart.
    pub(crate) warmup_s: u64,
    pub(crate) senders: usize,
    pub(crate) history: u32,
    pub(crate) storm_timeout_s: u64,
    /// Idle: give each pair of clients a DM to sync.
    pub(crate) conv: bool,
    /// Dm over several nodes: where each pair's two members connect.
    pub(crate) placement: Placement,
    /// Dm: typing before each send, a read for each message received.
    pub(crate) signals: bool,
    /// Group: members that stop reading when sending starts (the last ones).
    pub(crate) slow: usize,
}

impl RunSpec {
    fn params(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("clients".into(), self.clients.to_string());
        match self.scenario {
            Scenario::Idle => {
                p.insert("hold_s".into(), self.duration_s.to_string());
                p.insert("dm_per_pair".into(), self.conv.to_string());
            }
            Scenario::Dm | Scenario::Group => {
                p.insert("rate".into(), sig3(self.rate));
                p.insert("duration_s".into(), self.duration_s.to_string());
                p.insert("warmup_s".into(), self.warmup_s.to_string());
                if self.scenario == Scenario::Group {
                    p.insert("senders".into(), self.senders.to_string());
                    p.insert("slow".into(), self.slow.to_string());
                } else {
                    p.insert("signals".into(), self.signals.to_string());
                }
            }
            Scenario::Storm => {
                p.insert("history".into(), self.history.to_string());
                p.insert("timeout_s".into(), self.storm_timeout_s.to_string());
            }
        }
        p
    }
}

/// The nodes a run targets: `--servers` (with `true`: the run reports nodes, placement and inter-node
/// traffic), else `--server`.
fn targets(common: &Common) -> Result<(Vec<SocketAddrV4>, bool), Error> {
    let Some(list) = &common.servers else {
        return Ok((vec![parse_loopback_target(&common.server)?], false));
    };
    let mut nodes = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr = parse_loopback_target(s)?;
        if nodes.contains(&addr) {
            return Err(format!("--servers lists {addr} twice").into());
        }
        nodes.push(addr);
    }
    if nodes.is_empty() {
        return Err("--servers needs at least one HOST:PORT".into());
    }
    if nodes.len() > 1 && common.target == Target::Baseline {
        return Err(
            "several --servers need --target switchboard (baseline servers are not a cluster)"
                .into(),
        );
    }
    Ok((nodes, true))
}

fn check_bounds(run: &RunSpec, common: &Common) -> Result<(), Error> {
    if run.clients == 0 || run.clients > MAX_CLIENTS {
        return Err(format!("clients must be 1..={MAX_CLIENTS} (got {})", run.clients).into());
    }
    if run.duration_s + run.warmup_s > MAX_SECONDS || run.storm_timeout_s > MAX_SECONDS {
        return Err(format!("runs are bounded to {MAX_SECONDS} s").into());
    }
    if matches!(run.scenario, Scenario::Dm | Scenario::Group)
        && (run.rate.is_nan() || run.rate <= 0.0 || run.rate > 10_000_000.0)
    {
        return Err("rate must be in (0, 10,000,000] messages per second".into());
    }
    if run.scenario == Scenario::Group && run.clients < 2 {
        return Err("a group needs at least 2 members".into());
    }
    if run.slow > 0
        && (run.scenario != Scenario::Group || run.slow + run.senders.max(1) >= run.clients)
    {
        return Err(
            "--slow is for a group, and leaves senders and at least one other reader".into(),
        );
    }
    if common.body_bytes > 4096 {
        return Err("--body-bytes is at most 4,096 (the server's limit)".into());
    }
    check_source(common.source_from)?;
    if common.with_baseline && common.target == Target::Baseline {
        return Err(
            "--with-baseline compares Switchboard with the baseline: use --target switchboard"
                .into(),
        );
    }
    Ok(())
}

/// Entry point of the scenario subcommands.
pub(crate) async fn main(common: Common, run: RunSpec) -> Result<(), Error> {
    check_bounds(&run, &common)?;
    let (servers, cluster) = targets(&common)?;
    let primary = Nodes {
        addrs: servers,
        pids: common.server_pid.clone(),
        cluster,
    };
    let mut reports = vec![run_once(&common, &run, common.target, &primary).await?];
    if common.with_baseline {
        let (mut child, addr) = spawn_baseline().await?;
        let baseline = Nodes {
            addrs: vec![addr],
            pids: child.id().into_iter().collect(),
            cluster: false,
        };
        let r = run_once(&common, &run, Target::Baseline, &baseline).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        reports.push(r?);
    }
    print_reports(&reports, common.json)
}

fn print_reports(reports: &[Report], json: bool) -> Result<(), Error> {
    if json {
        let mut out = serde_json::json!({ "runs": reports });
        if let [a, b] = reports {
            out["ratios"] = serde_json::to_value(report::ratios(a, b))?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if let [a, b] = reports {
        print!("{}", report::comparison(a, b));
    } else {
        for r in reports {
            print!("{}", report::summary(r));
        }
    }
    Ok(())
}

/// `switchboard-load compare A.json B.json`: the first run of each file side by side.
pub(crate) fn compare(a: &PathBuf, b: &PathBuf) -> Result<(), Error> {
    let load = |p: &PathBuf| -> Result<Report, Error> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
        let run = v
            .get("runs")
            .and_then(|r| r.get(0))
            .ok_or_else(|| format!("{}: no runs", p.display()))?;
        Ok(serde_json::from_value(run.clone())?)
    };
    print!("{}", report::comparison(&load(a)?, &load(b)?));
    Ok(())
}

async fn spawn_baseline() -> Result<(Child, SocketAddrV4), Error> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["baseline", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| "the baseline server did not start")??
        .ok_or("the baseline server exited")?;
    let addr = line
        .strip_prefix("listening ")
        .ok_or_else(|| format!("unexpected baseline output {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

/// A per-run prefix for user ids, so that runs never share users or DMs.
fn run_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("lt{:08x}", h.finish() as u32)
}

fn secret(common: &Common) -> Result<Option<Vec<u8>>, Error> {
    if let Some(s) = &common.jwt_secret {
        return Ok(Some(s.as_bytes().to_vec()));
    }
    if let Some(p) = &common.jwt_secret_file {
        let s = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        return Ok(Some(s.trim().as_bytes().to_vec()));
    }
    Ok(None)
}

/// The worker processes of one run.
struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::UnboundedReceiver<(usize, Option<Event>)>,
    counters: Vec<Counters>,
    inbox: Vec<VecDeque<Event>>,
    alive: Vec<bool>,
    bar: ProgressBar,
    label: String,
    phase: &'static str,
}

impl Fleet {
    async fn spawn(specs: Vec<WorkerSpec>, bar: ProgressBar, label: String) -> Result<Self, Error> {
        let exe = std::env::current_exe()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let n = specs.len();
        let mut children = Vec::with_capacity(n);
        let mut stdins = Vec::with_capacity(n);
        for spec in specs {
            let w = spec.worker;
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            let _ = tx.send((w, Some(ev)));
                        }
                        Err(e) => eprintln!("worker {w}: bad event {e}: {line:.80}"),
                    }
                }
                let _ = tx.send((w, None));
            });
            let mut line = serde_json::to_string(&spec)?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Self {
            children,
            stdins,
            rx,
            counters: vec![Counters::default(); n],
            inbox: vec![VecDeque::new(); n],
            alive: vec![true; n],
            bar,
            label,
            phase: "start",
        })
    }

    async fn send_all(&mut self, cmd: Command) -> Result<(), Error> {
        let mut line = serde_json::to_string(&cmd)?;
        line.push('\n');
        for s in &mut self.stdins {
            s.write_all(line.as_bytes()).await?;
            s.flush().await?;
        }
        Ok(())
    }

    fn total(&self) -> Counters {
        let mut t = Counters::default();
        for c in &self.counters {
            t.add(c);
        }
        t
    }

    fn redraw(&self) {
        let t = self.total();
        self.bar.set_message(format!(
            "{} {} | open {} | upgrades {} (failed {}) | sent {} acked {} | delivered {} | replayed {} | errors {} | lost {}",
            self.label,
            self.phase,
            t.open,
            t.upgrades,
            t.connect_failures,
            t.sent,
            t.acked,
            t.delivered,
            t.replayed,
            t.errors,
            t.dropped
        ));
    }

    fn set_phase(&mut self, phase: &'static str) {
        self.phase = phase;
        self.redraw();
    }

    fn on_event(&mut self, w: usize, ev: Option<Event>) {
        match ev {
            Some(Event::Progress { counters }) => {
                self.counters[w] = counters;
                self.redraw();
            }
            Some(ev) => self.inbox[w].push_back(ev),
            None => self.alive[w] = false,
        }
    }

    /// Handle events until `deadline`.
    async fn pump_until(&mut self, deadline: tokio::time::Instant) {
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((w, ev))) => self.on_event(w, ev),
                Ok(None) => {
                    tokio::time::sleep_until(deadline).await;
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Wait for one event accepted by `want` from every worker.
    async fn wait_all(
        &mut self,
        want: fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Event>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let n = self.children.len();
        let mut got: Vec<Option<Event>> = vec![None; n];
        loop {
            for (w, slot) in got.iter_mut().enumerate() {
                if slot.is_none() {
                    if let Some(pos) = self.inbox[w].iter().position(want) {
                        *slot = self.inbox[w].remove(pos);
                    }
                }
            }
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            if let Some(w) = (0..n).find(|&w| got[w].is_none() && !self.alive[w]) {
                return Err(format!("worker {w} exited during {}", self.phase).into());
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((w, ev))) => self.on_event(w, ev),
                Ok(None) => return Err("every worker is gone".into()),
                Err(_) => {
                    return Err(
                        format!("workers did not finish {} in {timeout:?}", self.phase).into(),
                    )
                }
            }
        }
    }

    async fn finish(mut self) -> Result<Vec<WorkerResult>, Error> {
        self.set_phase("stop");
        self.send_all(Command::Stop).await?;
        let finals = self
            .wait_all(|e| matches!(e, Event::Final(_)), Duration::from_secs(30))
            .await?;
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
            }
        }
        Ok(finals
            .into_iter()
            .filter_map(|e| match e {
                Event::Final(r) => Some(*r),
                _ => None,
            })
            .collect())
    }
}

/// The servers one run talks to.
struct Nodes {
    /// Their addresses; setup goes to the first.
    addrs: Vec<SocketAddrV4>,
    /// Their pids (any number, summed), for RSS and CPU.
    pids: Vec<u32>,
    /// Given with `--servers`: report nodes, placement and inter-node traffic.
    cluster: bool,
}

/// Server-side readings at one instant, summed over the pids (`None` when any cannot be read).
#[derive(Clone, Copy)]
struct ServerSample {
    rss_kb: Option<u64>,
    cpu_s: Option<f64>,
}

fn sample(pids: &[u32]) -> ServerSample {
    if pids.is_empty() {
        return ServerSample {
            rss_kb: None,
            cpu_s: None,
        };
    }
    ServerSample {
        rss_kb: pids.iter().map(|&p| stats::rss_kb(p)).sum(),
        cpu_s: pids.iter().map(|&p| stats::cpu_s(p)).sum(),
    }
}

fn cpu_between(a: ServerSample, b: ServerSample) -> Option<f64> {
    Some(b.cpu_s? - a.cpu_s?)
}

/// Merged worker results.
struct Merged {
    counters: Counters,
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    warmup_ack: Histogram<u64>,
    warmup_deliver: Histogram<u64>,
    connect: Histogram<u64>,
    resync: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    first_send_us: u64,
    last_delivery_us: u64,
    unsent: u64,
    cpu_s: f64,
    rss_kb: u64,
}

fn merge(results: &[WorkerResult]) -> Merged {
    let mut m = Merged {
        counters: Counters::default(),
        ack: latency_histogram(),
        deliver: latency_histogram(),
        warmup_ack: latency_histogram(),
        warmup_deliver: latency_histogram(),
        connect: latency_histogram(),
        resync: latency_histogram(),
        errors: BTreeMap::new(),
        closes: BTreeMap::new(),
        first_send_us: u64::MAX,
        last_delivery_us: 0,
        unsent: 0,
        cpu_s: 0.0,
        rss_kb: 0,
    };
    for r in results {
        m.counters.add(&r.counters);
        stats::add_pairs(&mut m.ack, &r.ack_us);
        stats::add_pairs(&mut m.deliver, &r.deliver_us);
        stats::add_pairs(&mut m.warmup_ack, &r.warmup_ack_us);
        stats::add_pairs(&mut m.warmup_deliver, &r.warmup_deliver_us);
        stats::add_pairs(&mut m.connect, &r.connect_us);
        stats::add_pairs(&mut m.resync, &r.resync_us);
        for (k, v) in &r.errors {
            *m.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.closes {
            *m.closes.entry(k.clone()).or_default() += v;
        }
        if r.first_send_us != 0 {
            m.first_send_us = m.first_send_us.min(r.first_send_us);
        }
        m.last_delivery_us = m.last_delivery_us.max(r.last_delivery_us);
        m.unsent += r.unsent;
        m.cpu_s += r.cpu_s;
        m.rss_kb += r.rss_kb;
    }
    m
}

fn push_latency(r: &mut Report, key: &str, label: &str, h: &Histogram<u64>) {
    let s = Summary::of(h);
    r.latencies.insert(label.to_string(), s.line());
    r.push(
        &format!("{key}_p50_us"),
        &format!("{label} p50"),
        s.p50 as f64,
        "us",
    );
    r.push(
        &format!("{key}_p99_us"),
        &format!("{label} p99"),
        s.p99 as f64,
        "us",
    );
    r.push(
        &format!("{key}_p999_us"),
        &format!("{label} p99.9"),
        s.p999 as f64,
        "us",
    );
    r.push(
        &format!("{key}_max_us"),
        &format!("{label} max"),
        s.max as f64,
        "us",
    );
}

/// The clients of a run: users, tokens, conversations, roles, source addresses, nodes.
async fn plan(
    common: &Common,
    run: &RunSpec,
    target: Target,
    servers: &[SocketAddrV4],
) -> Result<Vec<ClientSpec>, Error> {
    let n = run.clients;
    let prefix = run_prefix();
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let ports_per_client = if run.scenario == Scenario::Storm {
        2
    } else {
        1
    };
    let sources = (0..n)
        .map(|i| {
            source_for(
                i,
                ports_per_client,
                common.ports_per_source,
                common.source_from,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Every node shares the store: setup talks to the first.
    let api = Api::new(servers[0])?;
    let tokens: Vec<String> = match target {
        Target::Baseline => vec!["baseline".into(); n],
        Target::Switchboard => match secret(common)? {
            Some(key) => users
                .iter()
                .map(|u| {
                    mint(
                        &key,
                        u,
                        common.jwt_issuer.as_deref(),
                        common.jwt_audience.as_deref(),
                    )
                })
                .collect::<Result<_, _>>()?,
            None => api.dev_tokens(&users).await?,
        },
    };
    let pairs = matches!(run.scenario, Scenario::Dm | Scenario::Storm)
        || (run.scenario == Scenario::Idle && run.conv);
    let convs: Vec<Option<String>> = if pairs {
        let npairs = n.div_ceil(2);
        let ids: Vec<String> = match target {
            Target::Baseline => (0..npairs).map(|k| format!("c_{prefix}_{k}")).collect(),
            Target::Switchboard => {
                let reqs: Vec<(String, String)> = (0..npairs)
                    .map(|k| {
                        let other = users
                            .get(2 * k + 1)
                            .cloned()
                            .unwrap_or_else(|| format!("{prefix}-absent"));
                        (tokens[2 * k].clone(), other)
                    })
                    .collect();
                api.create_dms(&reqs).await?
            }
        };
        (0..n).map(|i| Some(ids[i / 2].clone())).collect()
    } else if run.scenario == Scenario::Group {
        let id = match target {
            Target::Baseline => format!("c_{prefix}_group"),
            Target::Switchboard => {
                api.create_group(&tokens[0], &format!("load {prefix}"), &users[1..])
                    .await?
            }
        };
        vec![Some(id); n]
    } else {
        vec![None; n]
    };
    Ok((0..n)
        .map(|i| ClientSpec {
            user: users[i].clone(),
            token: tokens[i].clone(),
            server: servers[node_of(run.scenario, run.placement, i, run.senders, servers.len())],
            conv: convs[i].clone(),
            source: sources[i],
            sender: match run.scenario {
                Scenario::Dm => true,
                Scenario::Group => i < run.senders.max(1),
                Scenario::Idle | Scenario::Storm => false,
            },
            slow: run.scenario == Scenario::Group && i >= n - run.slow,
            prefill: if run.scenario == Scenario::Storm && i % 2 == 0 {
                run.history
            } else {
                0
            },
        })
        .collect())
}

async fn run_once(
    common: &Common,
    run: &RunSpec,
    target: Target,
    nodes: &Nodes,
) -> Result<Report, Error> {
    let pid = nodes.pids.as_slice();
    let label = format!("{} {}", target.name(), run.scenario.name());
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!("{label} setup: tokens and conversations"));

    let t_setup = Instant::now();
    let clients = tokio::time::timeout(SETUP_TIMEOUT, plan(common, run, target, &nodes.addrs))
        .await
        .map_err(|_| "setup (tokens, conversations) timed out")??;
    let rest_setup_s = t_setup.elapsed().as_secs_f64();
    let n = clients.len();
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| net::parse_nofile_limit(&s))
        .unwrap_or(20_000);
    let per_worker = common.per_worker.min(nofile.saturating_sub(256)).max(1);
    let workers = net::workers_needed(n, per_worker, common.workers);
    let ranges = net::split_even(n, workers);
    let total_senders = clients.iter().filter(|c| c.sender).count();
    let lifetime_s =
        run.duration_s + run.warmup_s + run.storm_timeout_s + SETUP_TIMEOUT.as_secs() + 120;
    let specs: Vec<WorkerSpec> = ranges
        .iter()
        .enumerate()
        .map(|(w, r)| {
            let mine = &clients[r.clone()];
            WorkerSpec {
                worker: w,
                scenario: run.scenario,
                clients: mine.to_vec(),
                connect_concurrency: common.connect_concurrency,
                rate: rate_share(
                    run.rate,
                    mine.iter().filter(|c| c.sender).count(),
                    total_senders,
                ),
                body_bytes: common.body_bytes.max(frame_min()),
                signals: run.signals,
                lifetime_s,
            }
        })
        .collect();
    let mut fleet = Fleet::spawn(specs, bar.clone(), label).await?;

    let s0 = sample(pid);
    let t_connect = Instant::now();
    fleet.set_phase("connect");
    fleet.send_all(Command::Connect).await?;
    let ready_events = fleet
        .wait_all(|e| matches!(e, Event::Ready { .. }), SETUP_TIMEOUT)
        .await?;
    let connect_wall_s = t_connect.elapsed().as_secs_f64();
    let (mut ready, mut failed, mut upgrades_ms, mut ready_ms) = (0u64, 0u64, 0f64, 0f64);
    for e in &ready_events {
        if let Event::Ready {
            ready: r,
            failed: f,
            upgrades_done_ms,
            ready_ms: rm,
        } = e
        {
            ready += r;
            failed += f;
            upgrades_ms = upgrades_ms.max(*upgrades_done_ms);
            ready_ms = ready_ms.max(*rm);
        }
    }
    let s1 = sample(pid);
    let at_ready = fleet.total();

    let mut report = Report {
        scenario: run.scenario.name().into(),
        target: target.name().into(),
        server: nodes
            .addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        params: run.params(),
        ..Report::default()
    };
    report.params.insert("workers".into(), workers.to_string());
    if nodes.cluster {
        let mut per_node = vec![0usize; nodes.addrs.len()];
        for c in &clients {
            if let Some(k) = nodes.addrs.iter().position(|a| *a == c.server) {
                per_node[k] += 1;
            }
        }
        report
            .params
            .insert("nodes".into(), nodes.addrs.len().to_string());
        report.params.insert(
            "placement".into(),
            placement_name(run.scenario, run.placement).into(),
        );
        report.params.insert(
            "clients_per_node".into(),
            per_node
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/"),
        );
    }
    if pid.len() > 1 {
        report
            .params
            .insert("server_pids".into(), pid.len().to_string());
    }
    // A cluster's inter-node traffic over the run's main phase (hold, send + drain, storm).
    let scrape = nodes.cluster && target == Target::Switchboard;
    let metrics_before = if scrape {
        Some(cluster::scrape(&nodes.addrs).await)
    } else {
        None
    };
    let ports_per_client = if run.scenario == Scenario::Storm {
        2
    } else {
        1
    };
    report.params.insert(
        "source_addrs".into(),
        net::sources_needed(n, ports_per_client, common.ports_per_source).to_string(),
    );
    report.push("clients", "clients", n as f64, "");
    report.push("ready", "connected and synced", ready as f64, "");
    report.push("setup_failed", "failed to connect/sync", failed as f64, "");
    if target == Target::Switchboard {
        report.push(
            "rest_setup_s",
            "REST setup (tokens, conversations)",
            rest_setup_s,
            "s",
        );
    }
    report.push(
        "accept_rate",
        "accept rate (upgrades during setup)",
        ready as f64 / (upgrades_ms / 1e3).max(1e-6),
        "conn/s",
    );
    report.push("setup_s", "setup until all synced", ready_ms / 1e3, "s");
    let mut storm_s2 = None;
    let mut peak_rss_kb: Option<u64> = None;

    let s2 = match run.scenario {
        Scenario::Idle => {
            fleet.set_phase("hold");
            fleet
                .pump_until(tokio::time::Instant::now() + Duration::from_secs(run.duration_s))
                .await;
            sample(pid)
        }
        Scenario::Dm | Scenario::Group => {
            fleet.set_phase("send");
            fleet
                .send_all(Command::Run {
                    duration_ms: run.duration_s * 1000,
                    warmup_ms: run.warmup_s * 1000,
                })
                .await?;
            // The server's RSS is sampled every 250 ms while sending: its peak shows what queues for
            // slow consumers cost (bounded by their outbound queues, then closed).
            let send_end =
                tokio::time::Instant::now() + Duration::from_secs(run.warmup_s + run.duration_s);
            while tokio::time::Instant::now() < send_end {
                let step = tokio::time::Instant::now() + Duration::from_millis(250);
                fleet.pump_until(step.min(send_end)).await;
                if let Some(kb) = sample(pid).rss_kb {
                    peak_rss_kb = Some(peak_rss_kb.map_or(kb, |p: u64| p.max(kb)));
                }
            }
            fleet.set_phase("drain");
            let drain_end = tokio::time::Instant::now() + Duration::from_secs(common.drain);
            let mut last = fleet.total();
            let mut still = 0;
            while tokio::time::Instant::now() < drain_end {
                fleet
                    .pump_until(tokio::time::Instant::now() + Duration::from_millis(250))
                    .await;
                let t = fleet.total();
                if t == last && t.acked + t.errors >= t.sent {
                    still += 1;
                    if still >= 4 {
                        break;
                    }
                } else {
                    still = 0;
                    last = t;
                }
            }
            sample(pid)
        }
        Scenario::Storm => {
            fleet.set_phase("storm");
            let t_drop = Instant::now();
            fleet
                .send_all(Command::Drop {
                    timeout_ms: run.storm_timeout_s * 1000,
                })
                .await?;
            let done = fleet
                .wait_all(
                    |e| matches!(e, Event::StormDone { .. }),
                    Duration::from_secs(run.storm_timeout_s + 30),
                )
                .await?;
            let wall = t_drop.elapsed().as_secs_f64();
            let s = sample(pid);
            let (mut back, mut sfailed, mut back_ms, mut synced_ms) = (0u64, 0u64, 0f64, 0f64);
            for e in &done {
                if let Event::StormDone {
                    back: b,
                    failed: f,
                    back_ms: bm,
                    synced_ms: sm,
                } = e
                {
                    back += b;
                    sfailed += f;
                    back_ms = back_ms.max(*bm);
                    synced_ms = synced_ms.max(*sm);
                }
            }
            storm_s2 = Some((back, sfailed, back_ms, synced_ms, wall));
            s
        }
    };
    let metrics_after = if scrape {
        Some(cluster::scrape(&nodes.addrs).await)
    } else {
        None
    };
    let results = fleet.finish().await?;
    bar.finish_and_clear();
    let m = merge(&results);
    let c = m.counters;

    let connect = Summary::of(&m.connect);
    report
        .latencies
        .insert("connect+upgrade (all attempts)".into(), connect.line());
    report.push(
        "connect_p50_us",
        "connect+upgrade p50",
        connect.p50 as f64,
        "us",
    );
    report.push(
        "connect_p99_us",
        "connect+upgrade p99",
        connect.p99 as f64,
        "us",
    );
    let conns = ready.max(1) as f64;
    if let (Some(a), Some(b)) = (s0.rss_kb, s1.rss_kb) {
        report.push(
            "server_rss_before_mib",
            "server RSS before connecting",
            a as f64 / 1024.0,
            "MiB",
        );
        report.push(
            "server_rss_ready_mib",
            "server RSS when all ready",
            b as f64 / 1024.0,
            "MiB",
        );
        if let Some(peak) = peak_rss_kb {
            report.push(
                "server_rss_peak_mib",
                "server RSS, peak while sending",
                peak as f64 / 1024.0,
                "MiB",
            );
        }
        if let Some(c2) = s2.rss_kb {
            report.push(
                "server_rss_end_mib",
                "server RSS at the end",
                c2 as f64 / 1024.0,
                "MiB",
            );
        }
        if run.scenario == Scenario::Idle {
            let end = s2.rss_kb.unwrap_or(b);
            let per = (end as f64 - a as f64) * 1024.0 / conns;
            report.push(
                "server_rss_per_conn_b",
                "server RSS per connection",
                per,
                "B",
            );
            if target == Target::Switchboard {
                report.targets.push(Goal {
                    what: format!("idle server RSS per connection ({ready} connections)"),
                    goal: "≤ 4 KB (at ~19,000 connections)".into(),
                    measured: format!("{} B", sig3(per)),
                    met: per <= 4096.0,
                });
            }
        }
    }
    if let Some(cpu) = cpu_between(s0, s1) {
        report.push(
            "server_cpu_setup_s",
            "server CPU during connect+sync",
            cpu,
            "s",
        );
        report.push(
            "server_cpu_per_conn_us",
            "server CPU per connection setup",
            cpu * 1e6 / conns,
            "us",
        );
    }

    match run.scenario {
        Scenario::Idle => {}
        Scenario::Dm | Scenario::Group => {
            // Slow clients read nothing once sending starts: they are not recipients here.
            let fanout = if run.scenario == Scenario::Dm {
                1
            } else {
                (n - 1 - run.slow) as u64
            };
            let sent = c.sent - at_ready.sent;
            let acked = c.acked - at_ready.acked;
            let delivered = c.delivered - at_ready.delivered;
            report.push("target_rate", "target send rate", run.rate, "msg/s");
            report.push("sent", "sent", sent as f64, "");
            report.push(
                "send_rate",
                "achieved send rate",
                sent as f64 / (run.warmup_s + run.duration_s).max(1) as f64,
                "msg/s",
            );
            report.push("acked", "acked", acked as f64, "");
            report.push("errors", "error frames", c.errors as f64, "");
            report.push(
                "unsent",
                "sends with no live connection",
                m.unsent as f64,
                "",
            );
            push_latency(&mut report, "ack", "send→ack", &m.ack);
            let expected = acked * fanout;
            report.push("delivered", "deliveries", delivered as f64, "");
            report.push(
                "signals",
                "typing, receipt and presence frames received",
                (c.signals - at_ready.signals) as f64,
                "",
            );
            report.push(
                "missing",
                "deliveries missing (acked × recipients − delivered)",
                expected as f64 - delivered as f64,
                "",
            );
            let span_s = if m.last_delivery_us > m.first_send_us {
                (m.last_delivery_us - m.first_send_us) as f64 / 1e6
            } else {
                f64::NAN
            };
            report.push(
                "deliveries_per_s",
                "deliveries per second",
                delivered as f64 / span_s,
                "/s",
            );
            push_latency(&mut report, "deliver", "send→deliver", &m.deliver);
            if run.warmup_s > 0 {
                push_latency(
                    &mut report,
                    "warmup_ack",
                    &format!("warm-up ({} s) send→ack", run.warmup_s),
                    &m.warmup_ack,
                );
                push_latency(
                    &mut report,
                    "warmup_deliver",
                    &format!("warm-up ({} s) send→deliver", run.warmup_s),
                    &m.warmup_deliver,
                );
            }
            report.push(
                "lost_conns",
                "connections lost during the run",
                c.dropped as f64,
                "",
            );
            if let Some(cpu) = cpu_between(s1, s2) {
                report.push("server_cpu_run_s", "server CPU during send+drain", cpu, "s");
                report.push(
                    "server_cpu_per_msg_us",
                    "server CPU per message",
                    cpu * 1e6 / acked.max(1) as f64,
                    "us",
                );
                report.push(
                    "server_cpu_per_delivery_us",
                    "server CPU per delivery",
                    cpu * 1e6 / delivered.max(1) as f64,
                    "us",
                );
            }
            if target == Target::Switchboard {
                let d = Summary::of(&m.deliver);
                if run.scenario == Scenario::Dm {
                    report.targets.push(Goal {
                        what: format!(
                            "DM send→deliver p99 at {} msg/s",
                            sig3(sent as f64 / (run.warmup_s + run.duration_s).max(1) as f64)
                        ),
                        goal: "≤ 5 ms at 10,000 msg/s (aim 2 ms)".into(),
                        measured: fmt_us(d.p99),
                        met: d.count > 0 && d.p99 <= 5_000,
                    });
                } else {
                    let rate = delivered as f64 / span_s;
                    report.targets.push(Goal {
                        what: format!("group deliveries per second ({n} members)"),
                        goal: "≥ 1,000,000 (5,000 members)".into(),
                        measured: sig3(rate),
                        met: rate >= 1_000_000.0,
                    });
                }
            }
        }
        Scenario::Storm => {
            let (back, sfailed, back_ms, synced_ms, wall) =
                storm_s2.expect("storm figures are set in the storm phase");
            report.push("storm_back", "clients back", back as f64, "");
            report.push(
                "storm_failed",
                "clients not back+synced",
                sfailed as f64,
                "",
            );
            report.push("storm_back_s", "drop → all reconnected", back_ms / 1e3, "s");
            report.push("storm_synced_s", "drop → all synced", synced_ms / 1e3, "s");
            report.push("storm_wall_s", "drop → all workers report", wall, "s");
            push_latency(&mut report, "resync", "drop → client synced", &m.resync);
            report.push(
                "storm_connect_failures",
                "failed connect attempts in the storm",
                (c.connect_failures - at_ready.connect_failures) as f64,
                "",
            );
            report.push(
                "storm_replayed",
                "messages replayed by the syncs",
                (c.replayed - at_ready.replayed) as f64,
                "",
            );
            if let Some(cpu) = cpu_between(s1, s2) {
                report.push(
                    "server_cpu_storm_s",
                    "server CPU during the storm",
                    cpu,
                    "s",
                );
            }
            if target == Target::Switchboard {
                report.targets.push(Goal {
                    what: format!("storm: {ready} clients back and synced"),
                    goal: "≤ 10 s (10,000 clients)".into(),
                    measured: format!("{} s", sig3(synced_ms / 1e3)),
                    met: sfailed == 0 && synced_ms <= 10_000.0,
                });
            }
        }
    }
    if let (Some(before), Some(after)) = (&metrics_before, &metrics_after) {
        let sends = matches!(run.scenario, Scenario::Dm | Scenario::Group);
        let span_s = if m.last_delivery_us > m.first_send_us {
            (m.last_delivery_us - m.first_send_us) as f64 / 1e6
        } else {
            f64::NAN
        };
        cluster::report_traffic(
            &mut report,
            &nodes.addrs,
            before,
            after,
            sends.then(|| c.sent - at_ready.sent),
            span_s,
        );
    }
    report.push(
        "client_cpu_s",
        "load generator CPU (all workers)",
        m.cpu_s,
        "s",
    );
    report.push(
        "client_rss_mib",
        "load generator RSS (all workers)",
        m.rss_kb as f64 / 1024.0,
        "MiB",
    );
    report.push(
        "connect_wall_s",
        "coordinator: connect phase wall time",
        connect_wall_s,
        "s",
    );
    report.errors = m.errors;
    report.closes = m.closes;
    Ok(report)
}

fn frame_min() -> usize {
    crate::frame::STAMP_DIGITS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: Common,
    }

    fn targets_of(args: &[&str]) -> Result<(Vec<SocketAddrV4>, bool), Error> {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        targets(&Cli::try_parse_from(argv).unwrap().common)
    }

    #[test]
    fn servers_are_loopback_distinct_and_switchboard() {
        let (one, cluster) = targets_of(&[]).unwrap();
        assert_eq!(one, ["127.0.0.1:8080".parse::<SocketAddrV4>().unwrap()]);
        assert!(!cluster);
        let (three, cluster) =
            targets_of(&["--servers", "127.0.0.1:8080, 127.0.0.2:8080,localhost:9"]).unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(three[2], "127.0.0.1:9".parse::<SocketAddrV4>().unwrap());
        assert!(cluster);
        assert!(targets_of(&["--servers", "127.0.0.1:8080,10.0.0.1:8080"]).is_err());
        assert!(targets_of(&["--servers", "127.0.0.1:8080,localhost:8080"]).is_err());
        assert!(targets_of(&["--servers", ","]).is_err());
        assert!(targets_of(&[
            "--servers",
            "127.0.0.1:1,127.0.0.2:1",
            "--target",
            "baseline"
        ])
        .is_err());
    }

    #[test]
    fn server_samples_sum_over_pids() {
        let me = std::process::id();
        assert!(sample(&[]).rss_kb.is_none());
        let one = sample(&[me]).rss_kb.unwrap();
        let two = sample(&[me, me]).rss_kb.unwrap();
        assert!(two >= one * 2 - one / 2, "{one} {two}");
        // A pid that cannot be read makes the sum unknown rather than short.
        assert!(sample(&[me, u32::MAX]).rss_kb.is_none());
    }
}
