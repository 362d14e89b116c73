//! What the coordinator and its worker processes say to each other: one JSON object per line, the
//! [`WorkerSpec`] then [`Command`]s on the worker's stdin, [`Event`]s on its stdout.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// The four scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Scenario {
    Idle,
    Dm,
    Group,
    Storm,
}

impl Scenario {
    /// The scenario's name on the command line and in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Dm => "dm",
            Self::Group => "group",
            Self::Storm => "storm",
        }
    }
}

/// Everything one worker process needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    pub(crate) worker: usize,
    pub(crate) scenario: Scenario,
    pub(crate) clients: Vec<ClientSpec>,
    /// Connections being opened at once by this worker (setup phase).
    pub(crate) connect_concurrency: usize,
    /// This worker's share of the send rate, messages per second.
    pub(crate) rate: f64,
    pub(crate) body_bytes: usize,
    /// Dm: each sender sends `typing` before each message, each receiver a `read` for each message.
    #[serde(default)]
    pub(crate) signals: bool,
    /// The worker exits by itself after this many seconds, whatever happens.
    pub(crate) lifetime_s: u64,
}

/// One simulated device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ClientSpec {
    pub(crate) user: String,
    pub(crate) token: String,
    /// The node it connects to (and reconnects to in a storm).
    pub(crate) server: SocketAddrV4,
    /// The conversation it syncs (and sends to, if a sender).
    pub(crate) conv: Option<String>,
    pub(crate) source: Ipv4Addr,
    pub(crate) sender: bool,
    /// Messages it sends (and waits to see acked) before reporting ready: history for a storm's sync.
    pub(crate) prefill: u32,
    /// Stops reading its socket when sending starts (a slow consumer), with a small receive buffer.
    #[serde(default)]
    pub(crate) slow: bool,
}

/// Coordinator → worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    /// Open every connection, sync, prefill; answer with [`Event::Ready`].
    Connect,
    /// Send at the worker's rate for `warmup_ms + duration_ms` (answer with nothing: the coordinator
    /// watches progress); the latencies of what is sent in the first `warmup_ms` are kept apart.
    Run { duration_ms: u64, warmup_ms: u64 },
    /// Drop every connection at once and reconnect and sync; answer with [`Event::StormDone`].
    Drop { timeout_ms: u64 },
    /// Close everything and answer with [`Event::Final`].
    Stop,
}

/// Counters every worker reports, summed by the coordinator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    /// Connections currently open.
    pub(crate) open: u64,
    /// Successful WebSocket upgrades (including reconnects).
    pub(crate) upgrades: u64,
    /// Failed connection attempts.
    pub(crate) connect_failures: u64,
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    /// Live `msg` frames received.
    pub(crate) delivered: u64,
    /// `msg` frames received as part of a sync replay.
    pub(crate) replayed: u64,
    /// `synced` frames that ended a client's sync.
    pub(crate) synced: u64,
    /// `error` frames.
    pub(crate) errors: u64,
    /// `typing`, `receipt` and `presence` frames received.
    #[serde(default)]
    pub(crate) signals: u64,
    /// Connections the server closed or lost unexpectedly.
    pub(crate) dropped: u64,
}

impl Counters {
    /// Field-wise sum.
    pub(crate) fn add(&mut self, o: &Counters) {
        self.open += o.open;
        self.upgrades += o.upgrades;
        self.connect_failures += o.connect_failures;
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.replayed += o.replayed;
        self.synced += o.synced;
        self.errors += o.errors;
        self.dropped += o.dropped;
        self.signals += o.signals;
    }
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub(crate) enum Event {
    Progress {
        counters: Counters,
    },
    /// Setup finished: `ready` clients connected and synced, `failed` gave up.
    Ready {
        ready: u64,
        failed: u64,
        /// From the Connect command to the last successful upgrade.
        upgrades_done_ms: f64,
        /// From the Connect command to the last client ready (synced, prefilled).
        ready_ms: f64,
    },
    /// After a Drop: every client is back (or gave up).
    StormDone {
        /// From the drop to the last successful reconnect.
        back_ms: f64,
        /// From the drop to the last `synced`.
        synced_ms: f64,
        back: u64,
        failed: u64,
    },
    Final(Box<WorkerResult>),
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    pub(crate) counters: Counters,
    /// send → ack, µs, as histogram `(value, count)` pairs.
    pub(crate) ack_us: Vec<(u64, u64)>,
    /// send → deliver, µs.
    pub(crate) deliver_us: Vec<(u64, u64)>,
    /// The same two, of what was sent during the warm-up.
    pub(crate) warmup_ack_us: Vec<(u64, u64)>,
    pub(crate) warmup_deliver_us: Vec<(u64, u64)>,
    /// TCP connect + upgrade, µs.
    pub(crate) connect_us: Vec<(u64, u64)>,
    /// Storm: drop → this client synced again, µs.
    pub(crate) resync_us: Vec<(u64, u64)>,
    /// `error` frames and failed connects by code.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Server-initiated closes by close code.
    pub(crate) closes: BTreeMap<String, u64>,
    /// Wall-clock µs of the first send and the last live delivery.
    pub(crate) first_send_us: u64,
    pub(crate) last_delivery_us: u64,
    /// Sends the pacer could not hand to a connection (it was gone).
    pub(crate) unsent: u64,
    pub(crate) cpu_s: f64,
    pub(crate) rss_kb: u64,
}
