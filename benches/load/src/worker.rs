//! A worker process (`switchboard-load worker`): holds a share of the clients on one single-threaded
//! runtime, reads its [`WorkerSpec`] and [`Command`]s from stdin and writes [`Event`]s to stdout.
//!
//! Each client is one task owning one WebSocket. It connects (bounded concurrency), syncs its conversation,
//! optionally sends history, then waits for the phase to change: during `Run` the worker's pacer hands it
//! sends, on `Drop` it drops its socket without a close frame and reconnects and resyncs at once (the storm),
//! on `Stop` it closes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::frame::{self, Op};
use crate::net::{connect_error_label, connect_ws, retry_hint, TryLater, Ws};
use crate::spec::{ClientSpec, Command, Counters, Event, WorkerResult, WorkerSpec};
use crate::stats::{self, latency_histogram};
use crate::Error;

/// One connection attempt may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per client during setup.
const SETUP_ATTEMPTS: u32 = 4;
/// A sync or a prefill must finish within this.
const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Application-level ping interval (the server closes a socket silent for 90 s).
const PING_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Run,
    Drop,
    Stop,
}

#[derive(Default)]
struct AtomicCounters {
    open: AtomicU64,
    upgrades: AtomicU64,
    connect_failures: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    replayed: AtomicU64,
    synced: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    signals: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        Counters {
            open: self.open.load(Relaxed),
            upgrades: self.upgrades.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            synced: self.synced.load(Relaxed),
            errors: self.errors.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            signals: self.signals.load(Relaxed),
        }
    }
}

impl Shared {
    /// The histogram for a send made at wall-clock µs `sent_us`: `measured`, or `warmup` before the
    /// measured part of the run.
    fn latencies<'a>(
        &self,
        sent_us: u64,
        measured: &'a Mutex<Histogram<u64>>,
        warmup: &'a Mutex<Histogram<u64>>,
    ) -> std::sync::MutexGuard<'a, Histogram<u64>> {
        let which = if sent_us < self.measured_from_us.load(Relaxed) {
            warmup
        } else {
            measured
        };
        which.lock().unwrap()
    }
}

struct Shared {
    spec: WorkerSpec,
    c: AtomicCounters,
    ack: Mutex<Histogram<u64>>,
    deliver: Mutex<Histogram<u64>>,
    warmup_ack: Mutex<Histogram<u64>>,
    warmup_deliver: Mutex<Histogram<u64>>,
    /// Wall-clock µs from which sends are measured (before it: the warm-up).
    measured_from_us: AtomicU64,
    connect: Mutex<Histogram<u64>>,
    resync: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<String, u64>>,
    first_send_us: AtomicU64,
    last_delivery_us: AtomicU64,
    unsent: AtomicU64,
    // Setup.
    ready: AtomicU64,
    failed: AtomicU64,
    last_upgrade_us: AtomicU64,
    last_ready_us: AtomicU64,
    setup_progress: Notify,
    // Storm.
    drop_at: Mutex<Option<(Instant, Duration)>>,
    storm_back: AtomicU64,
    storm_failed: AtomicU64,
    storm_synced: AtomicU64,
    last_back_us: AtomicU64,
    last_synced_us: AtomicU64,
    storm_progress: Notify,
}

impl Shared {
    fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock().unwrap().entry(key).or_default() += 1;
    }

    fn error(&self, key: String) {
        Self::count(&self.errors, key);
    }

    fn close(&self, key: String) {
        Self::count(&self.closes, key);
    }
}

fn emit(ev: &Event) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // The coordinator is gone if this fails; the stdin EOF stops the worker.
    let _ = serde_json::to_writer(&mut out, ev);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Entry point of `switchboard-load worker`.
pub(crate) fn main() -> Result<(), Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Error> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let spec: WorkerSpec = match lines.next_line().await? {
        Some(l) => serde_json::from_str(&l)?,
        None => return Err("no worker spec on stdin".into()),
    };
    let lifetime = Duration::from_secs(spec.lifetime_s);
    let worker = spec.worker;
    tokio::spawn(async move {
        tokio::time::sleep(lifetime).await;
        eprintln!("worker {worker}: lifetime of {lifetime:?} reached, exiting");
        std::process::exit(3);
    });

    let sh = Arc::new(Shared {
        spec,
        c: AtomicCounters::default(),
        ack: Mutex::new(latency_histogram()),
        deliver: Mutex::new(latency_histogram()),
        warmup_ack: Mutex::new(latency_histogram()),
        warmup_deliver: Mutex::new(latency_histogram()),
        measured_from_us: AtomicU64::new(0),
        connect: Mutex::new(latency_histogram()),
        resync: Mutex::new(latency_histogram()),
        errors: Mutex::default(),
        closes: Mutex::default(),
        first_send_us: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
        unsent: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_upgrade_us: AtomicU64::new(0),
        last_ready_us: AtomicU64::new(0),
        setup_progress: Notify::new(),
        drop_at: Mutex::new(None),
        storm_back: AtomicU64::new(0),
        storm_failed: AtomicU64::new(0),
        storm_synced: AtomicU64::new(0),
        last_back_us: AtomicU64::new(0),
        last_synced_us: AtomicU64::new(0),
        storm_progress: Notify::new(),
    });

    let progress = {
        let sh = sh.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                emit(&Event::Progress {
                    counters: sh.c.snapshot(),
                });
            }
        })
    };

    let (phase_tx, _) = watch::channel(Phase::Setup);
    let mut clients = JoinSet::new();
    let mut senders: Vec<mpsc::UnboundedSender<()>> = Vec::new();
    loop {
        let cmd = match lines.next_line().await {
            Ok(Some(l)) => serde_json::from_str::<Command>(&l)?,
            // The coordinator went away: stop.
            Ok(None) | Err(_) => Command::Stop,
        };
        match cmd {
            Command::Connect => {
                let start = Instant::now();
                let sem = Arc::new(Semaphore::new(sh.spec.connect_concurrency.max(1)));
                for i in 0..sh.spec.clients.len() {
                    let rx = if sh.spec.clients[i].sender {
                        let (tx, rx) = mpsc::unbounded_channel();
                        senders.push(tx);
                        Some(rx)
                    } else {
                        None
                    };
                    clients.spawn(client(
                        sh.clone(),
                        i,
                        phase_tx.subscribe(),
                        rx,
                        sem.clone(),
                        start,
                    ));
                }
                let sh = sh.clone();
                tokio::spawn(async move {
                    let n = sh.spec.clients.len() as u64;
                    loop {
                        let notified = sh.setup_progress.notified();
                        let (ready, failed) = (sh.ready.load(Relaxed), sh.failed.load(Relaxed));
                        if ready + failed >= n {
                            emit(&Event::Ready {
                                ready,
                                failed,
                                upgrades_done_ms: sh.last_upgrade_us.load(Relaxed) as f64 / 1e3,
                                ready_ms: sh.last_ready_us.load(Relaxed) as f64 / 1e3,
                            });
                            return;
                        }
                        notified.await;
                    }
                });
            }
            Command::Run {
                duration_ms,
                warmup_ms,
            } => {
                sh.measured_from_us
                    .store(frame::now_us() + warmup_ms * 1000, Relaxed);
                let _ = phase_tx.send(Phase::Run);
                let senders = std::mem::take(&mut senders);
                tokio::spawn(pace(
                    sh.clone(),
                    senders,
                    Duration::from_millis(warmup_ms + duration_ms),
                ));
            }
            Command::Drop { timeout_ms } => {
                let participants = sh.c.open.load(Relaxed);
                *sh.drop_at.lock().unwrap() =
                    Some((Instant::now(), Duration::from_millis(timeout_ms)));
                let _ = phase_tx.send(Phase::Drop);
                let sh = sh.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now()
                        + Duration::from_millis(timeout_ms)
                        + Duration::from_secs(5);
                    loop {
                        let notified = sh.storm_progress.notified();
                        let (synced, failed) =
                            (sh.storm_synced.load(Relaxed), sh.storm_failed.load(Relaxed));
                        if synced + failed >= participants
                            || tokio::time::Instant::now() >= deadline
                        {
                            emit(&Event::StormDone {
                                back_ms: sh.last_back_us.load(Relaxed) as f64 / 1e3,
                                synced_ms: sh.last_synced_us.load(Relaxed) as f64 / 1e3,
                                back: sh.storm_back.load(Relaxed),
                                failed: participants.saturating_sub(synced),
                            });
                            return;
                        }
                        let _ = tokio::time::timeout_at(deadline, notified).await;
                    }
                });
            }
            Command::Stop => {
                let _ = phase_tx.send(Phase::Stop);
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while clients.join_next().await.is_some() {}
                })
                .await;
                clients.abort_all();
                progress.abort();
                emit(&Event::Progress {
                    counters: sh.c.snapshot(),
                });
                emit(&Event::Final(Box::new(result(&sh))));
                return Ok(());
            }
        }
    }
}

fn result(sh: &Shared) -> WorkerResult {
    let me = std::process::id();
    WorkerResult {
        counters: sh.c.snapshot(),
        ack_us: stats::to_pairs(&sh.ack.lock().unwrap()),
        deliver_us: stats::to_pairs(&sh.deliver.lock().unwrap()),
        warmup_ack_us: stats::to_pairs(&sh.warmup_ack.lock().unwrap()),
        warmup_deliver_us: stats::to_pairs(&sh.warmup_deliver.lock().unwrap()),
        connect_us: stats::to_pairs(&sh.connect.lock().unwrap()),
        resync_us: stats::to_pairs(&sh.resync.lock().unwrap()),
        errors: sh.errors.lock().unwrap().clone(),
        closes: sh.closes.lock().unwrap().clone(),
        first_send_us: sh.first_send_us.load(Relaxed),
        last_delivery_us: sh.last_delivery_us.load(Relaxed),
        unsent: sh.unsent.load(Relaxed),
        cpu_s: stats::cpu_s(me).unwrap_or(0.0),
        rss_kb: stats::rss_kb(me).unwrap_or(0),
    }
}

/// Hand out this worker's share of the sends, round-robin over its sender connections.
async fn pace(sh: Arc<Shared>, senders: Vec<mpsc::UnboundedSender<()>>, duration: Duration) {
    let rate = sh.spec.rate;
    if senders.is_empty() || rate <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut scheduled = 0u64;
    let mut rr = 0usize;
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        let n = stats::due(rate, elapsed.min(duration), scheduled);
        for _ in 0..n {
            let mut handed = false;
            for _ in 0..senders.len() {
                let tx = &senders[rr % senders.len()];
                rr = rr.wrapping_add(1);
                if tx.send(()).is_ok() {
                    handed = true;
                    break;
                }
            }
            if !handed {
                sh.unsent.fetch_add(1, Relaxed);
            }
        }
        scheduled += n;
        if elapsed >= duration {
            return;
        }
    }
}

/// What a client is doing with incoming `msg` frames.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Live,
    Replay,
}

struct Conn {
    /// Unanswered sends: msg id → when it was written (and its wall-clock µs).
    pending: HashMap<u64, (Instant, u64)>,
    next_id: u64,
    /// With signals on: the seq of the last live `msg`, to send a `read` for.
    read_due: Option<u64>,
}

/// The end of a sync replay, from a `synced` frame.
struct Synced {
    last_seq: u64,
    has_more: bool,
}

impl Conn {
    fn on_text(&mut self, text: &str, sh: &Shared, mode: Mode) -> Option<Synced> {
        match frame::op(text) {
            Op::Msg => {
                if mode == Mode::Replay {
                    sh.c.replayed.fetch_add(1, Relaxed);
                } else {
                    sh.c.delivered.fetch_add(1, Relaxed);
                    let now = frame::now_us();
                    if let Some(stamp) = frame::body_stamp(text) {
                        sh.latencies(stamp, &sh.deliver, &sh.warmup_deliver)
                            .saturating_record(now.saturating_sub(stamp).max(1));
                    }
                    sh.last_delivery_us.fetch_max(now, Relaxed);
                    if sh.spec.signals {
                        self.read_due = frame::u64_field(text, "seq");
                    }
                }
            }
            Op::Ack => {
                sh.c.acked.fetch_add(1, Relaxed);
                let id = frame::str_field(text, "msg_id").and_then(|s| s.parse::<u64>().ok());
                if let Some((at, stamp)) = id.and_then(|id| self.pending.remove(&id)) {
                    sh.latencies(stamp, &sh.ack, &sh.warmup_ack)
                        .saturating_record((at.elapsed().as_micros() as u64).max(1));
                }
            }
            Op::Synced => {
                return Some(Synced {
                    last_seq: frame::u64_field(text, "last_seq").unwrap_or(0),
                    has_more: frame::bool_field(text, "has_more").unwrap_or(false),
                });
            }
            Op::Error => {
                sh.c.errors.fetch_add(1, Relaxed);
                let code = frame::str_field(text, "code").unwrap_or("?");
                sh.error(format!("error frame: {code}"));
                let id = frame::str_field(text, "msg_id").and_then(|s| s.parse::<u64>().ok());
                if let Some(id) = id {
                    self.pending.remove(&id);
                }
            }
            Op::Pong => {}
            Op::Signal => {
                sh.c.signals.fetch_add(1, Relaxed);
            }
            Op::Other => sh.error("unexpected frame".into()),
        }
        None
    }

    async fn send(&mut self, ws: &mut Ws, sh: &Shared, conv: &str) -> Result<(), Error> {
        self.next_id += 1;
        let now = frame::now_us();
        if sh.spec.signals {
            ws.send(Message::Text(frame::typing_frame(conv).into()))
                .await?;
        }
        let text = frame::send_frame(conv, self.next_id, &frame::body(now, sh.spec.body_bytes));
        self.pending.insert(self.next_id, (Instant::now(), now));
        ws.send(Message::Text(text.into())).await?;
        sh.c.sent.fetch_add(1, Relaxed);
        let _ = sh.first_send_us.compare_exchange(0, now, Relaxed, Relaxed);
        Ok(())
    }
}

/// Why a client's socket ended.
fn ended(sh: &Shared, frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) {
    let key = match frame {
        Some(Ok(Message::Close(Some(cf)))) => format!("{} {}", u16::from(cf.code), cf.reason),
        Some(Ok(Message::Close(None))) => "close without code".into(),
        Some(Err(e)) => format!(
            "socket error: {}",
            e.to_string().chars().take(50).collect::<String>()
        ),
        _ => "connection lost (no close frame)".into(),
    };
    sh.close(key);
    sh.c.dropped.fetch_add(1, Relaxed);
    sh.c.open.fetch_sub(1, Relaxed);
}

/// Read frames until one ends a sync (with `has_more: false`), re-syncing from `last_seq` while it has more.
async fn sync_fully(ws: &mut Ws, conn: &mut Conn, sh: &Shared, conv: &str) -> Result<(), Error> {
    ws.send(Message::Text(frame::sync_frame(conv, 0).into()))
        .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if let Some(s) = conn.on_text(&t, sh, Mode::Replay) {
                    if s.has_more {
                        ws.send(Message::Text(frame::sync_frame(conv, s.last_seq).into()))
                            .await?;
                    } else {
                        sh.c.synced.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                }
            }
            // Admitted late: the node's 1013 came after the connect's short look for it.
            Some(Ok(Message::Close(Some(cf)))) if u16::from(cf.code) == 1013 => {
                return Err(Box::new(TryLater(retry_hint(&cf.reason))))
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                return Err("socket closed during sync".into())
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Send `n` messages and wait for all of them to be answered.
async fn prefill(
    ws: &mut Ws,
    conn: &mut Conn,
    sh: &Shared,
    conv: &str,
    n: u32,
) -> Result<(), Error> {
    for _ in 0..n {
        conn.send(ws, sh, conv).await?;
    }
    while !conn.pending.is_empty() {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                conn.on_text(&t, sh, Mode::Live);
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                return Err("socket closed during prefill".into())
            }
            Some(Ok(_)) => {}
        }
    }
    Ok(())
}

/// A small pseudo-random jitter in `0..max_ms`, different per client and attempt.
fn jitter(seed: u64, max_ms: u64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    Duration::from_millis(h.finish() % max_ms.max(1))
}

/// The node closed a connection with 1013 after the connect's look for it: count it as a refused attempt,
/// and wait for the node's hint before trying again.
async fn admitted_late(sh: &Shared, e: Error) {
    sh.c.connect_failures.fetch_add(1, Relaxed);
    sh.error(connect_error_label(&e));
    sh.c.open.fetch_sub(1, Relaxed);
    if let Ok(later) = e.downcast::<TryLater>() {
        tokio::time::sleep(Duration::from_millis(later.0)).await;
    }
}

/// A slow consumer's kernel receive buffer: small, so that what it does not read backs up into the
/// server's queue for it within seconds rather than minutes.
const SLOW_RECV_BUFFER: u32 = 4096;

/// A slow consumer at the end of the run: read what the server sent until its close (or the connection's
/// end), and file how it ended. Not a dropped connection: it was meant to be cut off.
async fn slow_end(sh: &Shared, ws: &mut Ws) {
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(cf)))) => {
                    return format!("slow client: closed {} {}", u16::from(cf.code), cf.reason)
                }
                Some(Ok(Message::Close(None))) => {
                    return "slow client: closed without a code".into()
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return format!(
                        "slow client: {}",
                        e.to_string().chars().take(40).collect::<String>()
                    )
                }
                None => return "slow client: connection ended, no close frame".into(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "slow client: still open at the end".into());
    sh.close(ended);
}

/// Connect, retrying with exponential backoff until `attempts` or `deadline`.
async fn connect_retrying(
    sh: &Shared,
    spec: &ClientSpec,
    index: usize,
    attempts: u32,
    deadline: Instant,
) -> Option<Ws> {
    let mut attempt = 0;
    loop {
        let t = Instant::now();
        let recv_buffer = spec.slow.then_some(SLOW_RECV_BUFFER);
        match connect_ws(
            spec.server,
            spec.source,
            &spec.token,
            CONNECT_TIMEOUT,
            recv_buffer,
        )
        .await
        {
            Ok(ws) => {
                sh.connect
                    .lock()
                    .unwrap()
                    .saturating_record((t.elapsed().as_micros() as u64).max(1));
                sh.c.upgrades.fetch_add(1, Relaxed);
                sh.c.open.fetch_add(1, Relaxed);
                return Some(ws);
            }
            Err(e) => {
                sh.c.connect_failures.fetch_add(1, Relaxed);
                sh.error(connect_error_label(&e));
                // The node's hint (it carries its own jitter; being asked to wait is not a failed
                // attempt), or exponential backoff with jitter.
                let backoff = match e.downcast_ref::<TryLater>() {
                    Some(TryLater(ms)) => Duration::from_millis(*ms),
                    None => {
                        attempt += 1;
                        Duration::from_millis(100 << attempt.min(4))
                            + jitter(index as u64 * 31 + u64::from(attempt), 100)
                    }
                };
                if attempt >= attempts || Instant::now() + backoff >= deadline {
                    return None;
                }
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

async fn client(
    sh: Arc<Shared>,
    index: usize,
    mut phase: watch::Receiver<Phase>,
    mut sends: Option<mpsc::UnboundedReceiver<()>>,
    sem: Arc<Semaphore>,
    start: Instant,
) {
    let spec = &sh.spec.clients[index];
    let setup_failed = |sh: &Shared| {
        sh.failed.fetch_add(1, Relaxed);
        sh.setup_progress.notify_one();
    };
    let permit = sem.acquire().await;
    let far = Instant::now() + Duration::from_secs(120);
    let mut conn = Conn {
        pending: HashMap::new(),
        next_id: 0,
        read_due: None,
    };
    // Connect and sync; a node that closes with 1013 after the connect's look for it is tried again later.
    let (mut ws, synced) = loop {
        let Some(mut ws) = connect_retrying(&sh, spec, index, SETUP_ATTEMPTS, far).await else {
            setup_failed(&sh);
            return;
        };
        let Some(conv) = &spec.conv else {
            break (ws, Ok(Ok(())));
        };
        let synced = tokio::time::timeout(
            SETUP_STEP_TIMEOUT,
            sync_fully(&mut ws, &mut conn, &sh, conv),
        )
        .await;
        match synced {
            Ok(Err(e)) if e.downcast_ref::<TryLater>().is_some() => admitted_late(&sh, e).await,
            other => break (ws, other),
        }
    };
    drop(permit);
    sh.last_upgrade_us
        .fetch_max(start.elapsed().as_micros() as u64, Relaxed);
    if let Some(conv) = &spec.conv {
        let setup = async {
            synced.map_err(|_| -> Error { "sync timed out".into() })??;
            prefill(&mut ws, &mut conn, &sh, conv, spec.prefill).await
        };
        match tokio::time::timeout(SETUP_STEP_TIMEOUT, setup).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                sh.error(format!("setup: {e}"));
                sh.c.open.fetch_sub(1, Relaxed);
                setup_failed(&sh);
                return;
            }
            Err(_) => {
                sh.error("setup: sync/prefill timed out".into());
                sh.c.open.fetch_sub(1, Relaxed);
                setup_failed(&sh);
                return;
            }
        }
    }
    sh.last_ready_us
        .fetch_max(start.elapsed().as_micros() as u64, Relaxed);
    sh.ready.fetch_add(1, Relaxed);
    sh.setup_progress.notify_one();

    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    // A slow consumer stops reading when sending starts.
    let mut reading = true;
    loop {
        tokio::select! {
            changed = phase.changed() => {
                let now = if changed.is_err() { Phase::Stop } else { *phase.borrow_and_update() };
                match now {
                    Phase::Stop if !reading => {
                        slow_end(&sh, &mut ws).await;
                        sh.c.open.fetch_sub(1, Relaxed);
                        return;
                    }
                    Phase::Stop => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                        sh.c.open.fetch_sub(1, Relaxed);
                        return;
                    }
                    Phase::Run if spec.slow => reading = false,
                    Phase::Drop => match storm(&sh, spec, index, ws, &mut conn).await {
                        Some(new) => ws = new,
                        None => return,
                    },
                    Phase::Setup | Phase::Run => {}
                }
            }
            frame = ws.next(), if reading => match frame {
                Some(Ok(Message::Text(t))) => {
                    conn.on_text(&t, &sh, Mode::Live);
                    if let Some(seq) = conn.read_due.take() {
                        let conv = spec.conv.as_deref().unwrap_or("none");
                        if ws.send(Message::Text(frame::read_frame(conv, seq).into())).await.is_err() {
                            sh.c.dropped.fetch_add(1, Relaxed);
                            sh.c.open.fetch_sub(1, Relaxed);
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    ended(&sh, frame);
                    return;
                }
                Some(Ok(_)) => {}
            },
            Some(()) = async {
                match sends.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let conv = spec.conv.as_deref().unwrap_or("none");
                if let Err(e) = conn.send(&mut ws, &sh, conv).await {
                    sh.error(format!("send failed: {}", e.to_string().chars().take(40).collect::<String>()));
                    sh.c.dropped.fetch_add(1, Relaxed);
                    sh.c.open.fetch_sub(1, Relaxed);
                    return;
                }
            }
            _ = ping.tick() => {
                if ws.send(Message::Text(frame::PING.into())).await.is_err() {
                    if reading {
                        sh.c.dropped.fetch_add(1, Relaxed);
                    } else {
                        // The server has cut the slow consumer off: read how.
                        slow_end(&sh, &mut ws).await;
                    }
                    sh.c.open.fetch_sub(1, Relaxed);
                    return;
                }
            }
        }
    }
}

/// The storm: drop the socket without a close frame, reconnect at once, resync.
async fn storm(
    sh: &Shared,
    spec: &ClientSpec,
    index: usize,
    ws: Ws,
    conn: &mut Conn,
) -> Option<Ws> {
    let (t0, timeout) = sh
        .drop_at
        .lock()
        .unwrap()
        .expect("drop time set before the phase");
    drop(ws);
    sh.c.open.fetch_sub(1, Relaxed);
    conn.pending.clear();
    let mut synced = None;
    let fail = || {
        sh.storm_failed.fetch_add(1, Relaxed);
        sh.storm_progress.notify_one();
    };
    let ws = loop {
        let Some(mut ws) = connect_retrying(sh, spec, index, u32::MAX, t0 + timeout).await else {
            fail();
            return None;
        };
        let Some(conv) = &spec.conv else { break ws };
        let left = (t0 + timeout).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sync_fully(&mut ws, conn, sh, conv)).await {
            Ok(Err(e)) if e.downcast_ref::<TryLater>().is_some() => admitted_late(sh, e).await,
            other => {
                synced = Some(other);
                break ws;
            }
        }
    };
    sh.storm_back.fetch_add(1, Relaxed);
    sh.last_back_us
        .fetch_max(t0.elapsed().as_micros() as u64, Relaxed);
    if let Some(outcome) = synced {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                sh.error(format!("storm: {e}"));
                sh.c.open.fetch_sub(1, Relaxed);
                fail();
                return None;
            }
            Err(_) => {
                sh.error("storm: sync timed out".into());
                fail();
                return Some(ws);
            }
        }
    }
    let us = t0.elapsed().as_micros() as u64;
    sh.resync.lock().unwrap().saturating_record(us.max(1));
    sh.last_synced_us.fetch_max(us, Relaxed);
    sh.storm_synced.fetch_add(1, Relaxed);
    sh.storm_progress.notify_one();
    Some(ws)
}
