//! The embedded store: fjall (an LSM tree) in `<data-dir>/store`, made durable through a write-ahead log
//! (`<data-dir>/wal-<lsn>.log`), so that acknowledging a message never waits on fjall.
//!
//! Two threads:
//!
//! - **`store-writer`** (on every message's path) takes all the appends waiting (when it is busy, also those
//!   arriving within 100 µs of the first), plans them — the seq fence, the dedupe, the new seqs — appends
//!   the new messages to the log as one record and `fdatasync`s it, and only then answers them. A new
//!   message is then kept in memory (the overlay) until fjall has it, so every read sees it from the moment
//!   it is answered. This thread only reads fjall, through snapshots.
//! - **`store-applier`** writes the log's records to fjall in the background, in transactions committed
//!   without an fsync (the log is what makes them durable), and about once a second makes fjall itself
//!   durable (a checkpoint: its journal `fdatasync`ed, with the last lsn it covers) and deletes the log
//!   segments it covers. fjall's commits wait, now and then, on its memtable rotations and flushes (locks
//!   held across file writes); here that stalls only this thread, never an acknowledgement. Conversation
//!   and membership changes are rare and are applied here too, each durably, before they are answered.
//!   It publishes the last lsn it wrote, and the writer then drops those messages from the overlay; when
//!   more than `MAX_UNAPPLIED_BYTES` wait for it, the writer waits too.
//!
//! The applier and fjall's own flush and compaction workers run at idle priority (`priority`): they use the
//! cores only when a message's path does not. So do the writer's two helpers: `store-spares` prepares the
//! next log segment (`wal::Spares`: preallocated, so an `fdatasync` writes no file-system metadata), and
//! `store-dedupe` reads the stored dedupe keys once after the start, for the writer's `DedupeFilter` (which
//! spares a new message's dedupe check a fjall lookup).
//!
//! After a crash, opening the store replays the log records after fjall's last checkpoint into fjall.
//! See `docs/decisions/0010-write-ahead-log-and-fjall.md` for why, and what was measured.

mod dedupe;
mod priority;
pub(crate) mod wal;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx as WriteTransaction, Snapshot,
};
use serde::{Deserialize, Serialize};
use switchboard_actors::store::{
    dm_pair, plan_append, Appended, ConvId, ConversationInfo, ConversationKind, HistoryQuery,
    Membership, Message, MessageStore, NewMessage, Page, StoreError, UserId,
};
use tokio::sync::oneshot;

use dedupe::DedupeFilter;
use wal::{Spares, Wal};

/// fjall's directory inside the data directory.
const STORE_DIR: &str = "store";

/// The file of the redb store of earlier versions; a data directory holding it is refused, not ignored.
const OLD_REDB_FILE: &str = "switchboard.redb";

const APPLIED_LSN: &str = "applied_lsn";

/// When the writer is busy, how long it gathers appends after the first before logging them together.
/// A log append costs a `write` and an `fdatasync` whatever its size (docs/benchmarks.md).
const GROUP_WINDOW: Duration = Duration::from_micros(100);

/// Most jobs the writer takes at once.
const MAX_GROUP: usize = 1024;

/// How often the applier makes fjall durable (a checkpoint) and deletes the log it covers.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How long the applier lets log records gather before writing them to fjall: one transaction (and one
/// journal write) per 50 ms instead of one per record, with the overlay holding that much meanwhile.
const APPLY_EVERY: Duration = Duration::from_millis(50);

/// Most messages the applier writes to fjall in one transaction: a short transaction holds fjall's locks,
/// which the writer's reads also take, for a short time.
const APPLY_CHUNK: usize = 128;

/// Most bytes of acknowledged messages not yet in fjall (the overlay, by [`footprint`]) before the writer
/// waits for the applier: about 25 s of 10,000 msg/s. The applier runs at idle priority, so a box saturated
/// for that long, or a stalled disk, slows the writes down instead of growing the memory without bound.
const MAX_UNAPPLIED_BYTES: usize = 64 * 1024 * 1024;

/// A log segment is closed, and a new one started, past this size; segments are preallocated to it.
const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Most conversations whose last seq the writer remembers; past it, it forgets them all and reads again.
const MAX_CACHED_SEQS: usize = 100_000;

mod key {
    use super::StoreError;

    /// The prefix of every key whose leading fields are `fields`.
    pub(super) fn prefix(fields: &[&str]) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 2).sum::<usize>() + 8);
        for f in fields {
            let len = u16::try_from(f.len())
                .map_err(|_| StoreError::Corrupt(format!("key field of {} bytes", f.len())))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        Ok(out)
    }

    /// `fields` then a last string field.
    pub(super) fn with_str(fields: &[&str], last: &str) -> Result<Vec<u8>, StoreError> {
        let mut out = prefix(fields)?;
        out.extend_from_slice(last.as_bytes());
        Ok(out)
    }

    /// `fields` then a seq.
    pub(super) fn with_seq(fields: &[&str], seq: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = prefix(fields)?;
        out.extend_from_slice(&seq.to_be_bytes());
        Ok(out)
    }

    /// The last field of a key that starts with `prefix`, as a string.
    pub(super) fn last_str(key: &[u8], prefix: &[u8]) -> Result<String, StoreError> {
        let rest = key
            .get(prefix.len()..)
            .ok_or_else(|| StoreError::Corrupt("short key".into()))?;
        String::from_utf8(rest.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The seq a key ends with.
    pub(super) fn last_seq(key: &[u8]) -> Result<u64, StoreError> {
        let tail: [u8; 8] = key
            .len()
            .checked_sub(8)
            .and_then(|at| key.get(at..))
            .and_then(|t| t.try_into().ok())
            .ok_or_else(|| StoreError::Corrupt("short key".into()))?;
        Ok(u64::from_be_bytes(tail))
    }
}

/// A u64 value.
fn decode_u64(raw: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| corrupt("u64 value"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A message as stored (its conversation and seq are the key).
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    msg_id: String,
    from: UserId,
    body: String,
    ts: u64,
}

impl Record {
    fn of(m: &Message) -> Self {
        Self {
            id: m.id.clone(),
            msg_id: m.msg_id.clone(),
            from: m.from.clone(),
            body: m.body.clone(),
            ts: m.ts,
        }
    }

    fn into_message(self, conv: &str, seq: u64) -> Message {
        Message {
            conv: conv.to_owned(),
            seq,
            id: self.id,
            msg_id: self.msg_id,
            from: self.from,
            body: self.body,
            ts: self.ts,
        }
    }
}

/// One log record: the new messages of one writer group, in the order they took their seqs.
#[derive(Serialize, Deserialize)]
pub(crate) struct LogRecord {
    pub(crate) lsn: u64,
    pub(crate) messages: Vec<Message>,
}

impl LogRecord {
    /// The record's bytes in the log (postcard).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(self).map_err(corrupt)
    }

    /// A record read back from the log; bytes that are not one are a corrupt store.
    pub(crate) fn decode(raw: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(raw).map_err(corrupt)
    }
}

enum WriteOp {
    Create {
        info: ConversationInfo,
        members: Vec<UserId>,
    },
    AddMember {
        conv: ConvId,
        user: UserId,
    },
    RemoveMember {
        conv: ConvId,
        user: UserId,
    },
    SetRead {
        conv: ConvId,
        user: UserId,
        seq: u64,
    },
    SetOwner {
        conv: ConvId,
        user: UserId,
        owner: bool,
    },
    Append {
        conv: ConvId,
        first_seq: u64,
        batch: Vec<NewMessage>,
    },
}

enum WriteOutcome {
    Created(ConversationInfo, bool),
    Changed(bool),
    Appended(Vec<Appended>),
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

/// What the applier is sent, in the writer's order.
enum ToApplier {
    /// A logged record, to write to fjall.
    Logged(LogRecord),
    /// A conversation or membership change, to apply durably and answer.
    Change(Job),
}

/// The new messages answered but not yet in fjall, by conversation; read before fjall by every read. Only the
/// writer changes it: it adds each record it logs, and drops the records the applier has written to fjall
/// ([`Overlay::prune`]), so the applier, at idle priority, never holds this lock.
#[derive(Default)]
struct Overlay {
    convs: HashMap<ConvId, ConvOverlay>,
    /// The records held, oldest first: their lsn and the (conversation, seq) of their messages.
    records: VecDeque<(u64, Vec<(ConvId, u64)>)>,
    /// The [`footprint`] of the messages held.
    bytes: usize,
}

#[derive(Default)]
struct ConvOverlay {
    messages: BTreeMap<u64, Message>,
    /// (sender, msg_id) → seq
    dedupe: HashMap<(UserId, String), u64>,
}

/// About what a message takes in memory: its fields, and the text they point to.
fn footprint(m: &Message) -> usize {
    std::mem::size_of::<Message>()
        + m.conv.len()
        + m.id.len()
        + m.msg_id.len()
        + m.from.len()
        + m.body.len()
}

impl Overlay {
    fn add(&mut self, record: &LogRecord) {
        let mut keys = Vec::with_capacity(record.messages.len());
        for m in &record.messages {
            let conv = self.convs.entry(m.conv.clone()).or_default();
            conv.dedupe
                .insert((m.from.clone(), m.msg_id.clone()), m.seq);
            conv.messages.insert(m.seq, m.clone());
            keys.push((m.conv.clone(), m.seq));
            self.bytes += footprint(m);
        }
        self.records.push_back((record.lsn, keys));
    }

    /// Drop the messages of the records up to `applied`: fjall has them.
    fn prune(&mut self, applied: u64) {
        while self.records.front().is_some_and(|(lsn, _)| *lsn <= applied) {
            let (_, keys) = self.records.pop_front().expect("a front record");
            for (conv_id, seq) in keys {
                let Some(conv) = self.convs.get_mut(&conv_id) else {
                    continue;
                };
                if let Some(m) = conv.messages.remove(&seq) {
                    self.bytes -= footprint(&m);
                    conv.dedupe.remove(&(m.from, m.msg_id));
                }
                if conv.messages.is_empty() {
                    self.convs.remove(&conv_id);
                }
            }
        }
    }

    fn last(&self, conv: &str) -> Option<&Message> {
        self.convs
            .get(conv)
            .and_then(|c| c.messages.last_key_value())
            .map(|(_, m)| m)
    }

    fn original(&self, conv: &str, from: &str, msg_id: &str) -> Option<&Message> {
        let c = self.convs.get(conv)?;
        let seq = c.dedupe.get(&(from.to_owned(), msg_id.to_owned()))?;
        c.messages.get(seq)
    }

    fn range(&self, conv: &str, low: u64, high: u64) -> Vec<Message> {
        self.convs
            .get(conv)
            .map(|c| {
                c.messages
                    .range(low..=high)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Every keyspace (fjall's name for a table: an LSM tree of its own, sharing the one journal).
struct Keyspaces {
    /// conversation → postcard [`ConversationInfo`]
    conversations: SingleWriterTxKeyspace,
    /// (conversation, user) → joined at (ms)
    members: SingleWriterTxKeyspace,
    /// (user, conversation) → nothing: the inbox index
    user_conversations: SingleWriterTxKeyspace,
    /// (lesser user, greater user) → DM conversation id
    dm_pairs: SingleWriterTxKeyspace,
    /// (conversation, seq) → postcard [`Record`]
    messages: SingleWriterTxKeyspace,
    /// (conversation, sender, msg_id) → seq: the dedupe index
    dedupe: SingleWriterTxKeyspace,
    /// [`APPLIED_LSN`] → the lsn of the last log record applied (u64, big-endian)
    meta: SingleWriterTxKeyspace,
    /// (user, conversation) → the user's read position (u64, big-endian)
    read_positions: SingleWriterTxKeyspace,
    /// (conversation, user) → nothing: the group's owners
    owners: SingleWriterTxKeyspace,
}

impl Keyspaces {
    fn open(db: &SingleWriterTxDatabase) -> Result<Self, StoreError> {
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(unavailable)
        };
        Ok(Self {
            conversations: open("conversations")?,
            members: open("members")?,
            user_conversations: open("user_conversations")?,
            dm_pairs: open("dm_pairs")?,
            messages: open("messages")?,
            dedupe: open("dedupe")?,
            meta: open("meta")?,
            read_positions: open("read_positions")?,
            owners: open("owners")?,
        })
    }
}

/// What the store's threads and readers share.
struct Shared {
    db: SingleWriterTxDatabase,
    ks: Keyspaces,
    overlay: Mutex<Overlay>,
    /// The last lsn the applier wrote to fjall (only the applier sets it; held for an instant only), and
    /// its signal to a writer waiting for room in the overlay.
    applied: Mutex<u64>,
    applied_changed: Condvar,
    /// Set when the log or fjall failed: every later write is refused until a restart replays the log.
    failed: Mutex<Option<StoreError>>,
}

impl Shared {
    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, u64> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(&self) -> Option<StoreError> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn snapshot(&self) -> Snapshot {
        self.db.read_tx()
    }

    /// Stop taking writes: said once, at the first failure (every write after it fails the same way).
    fn fail(&self, e: &StoreError) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            tracing::error!(error = %e, hint = diagnosis(e),
                "the embedded store stops taking writes until the node restarts; every acknowledged message \
                 is in its log, and the restart replays it");
            metrics::gauge!("switchboard_store_failed").set(1.0);
            *failed = Some(e.clone());
        }
    }
}

/// The fjall-backed store with its write-ahead log.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    threads: Mutex<Option<Threads>>,
}

struct Threads {
    to_writer: mpsc::Sender<Job>,
    writer: JoinHandle<()>,
    applier: JoinHandle<()>,
}

/// What an operator should do about a store failure.
pub fn diagnosis(e: &StoreError) -> &'static str {
    let text = e.to_string();
    if text.contains("No space left on device") || text.contains("StorageFull") {
        "the disk is full: free space on the data directory's file system, then restart the node"
    } else if matches!(e, StoreError::Corrupt(_)) {
        "a store file is damaged: restore the data directory from a backup, or move the named file away \
         (the messages in it are then lost) and restart (docs/operations.md)"
    } else {
        "an I/O error on the data directory: check the disk and the file system, then restart the node"
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Open (or create) the store in `dir`, replay the log into fjall, and start the writer and the applier.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, APPLY_EVERY, MAX_UNAPPLIED_BYTES)
    }

    /// [`EmbeddedStore::open`], with the applier gathering records for `apply_every`, and the writer waiting
    /// for it past `max_unapplied` bytes in the overlay.
    fn open_with(
        dir: &Path,
        apply_every: Duration,
        max_unapplied: usize,
    ) -> Result<Self, StoreError> {
        let old = dir.join(OLD_REDB_FILE);
        if old.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} is a store of an older Switchboard (redb), which this version does not read; \
                 move it away or use another data directory (docs/operations.md)",
                old.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        // Opened from a thread at idle priority, which fjall's flush and compaction workers, started by
        // `open`, inherit.
        let path = dir.join(STORE_DIR);
        let db = priority::spawn_idle("store-open", move || {
            SingleWriterTxDatabase::builder(path).open()
        })
        .map_err(unavailable)?
        .join()
        .map_err(|_| unavailable("opening fjall panicked"))?
        .map_err(unavailable)?;
        let ks = Keyspaces::open(&db)?;
        let applied = recover(&db, &ks, dir)?;
        let wal = Wal::create(dir, applied + 1).map_err(unavailable)?;
        let spares = Spares::start(dir, MAX_SEGMENT_BYTES).map_err(unavailable)?;
        let stored = ks.dedupe.approximate_len();
        let shared = Arc::new(Shared {
            db,
            ks,
            overlay: Mutex::new(Overlay::default()),
            applied: Mutex::new(applied),
            applied_changed: Condvar::new(),
            failed: Mutex::new(None),
        });
        let (to_applier, applier_rx) = mpsc::channel();
        let (to_writer, writer_rx) = mpsc::channel();
        let applier = {
            let (shared, dir) = (shared.clone(), dir.to_owned());
            priority::spawn_idle("store-applier", move || {
                Applier::new(shared, dir, apply_every).run(&applier_rx)
            })
            .map_err(unavailable)?
        };
        let dedupe = {
            let shared = shared.clone();
            DedupeFilter::start(
                Box::new(move |visit| scan_dedupe_keys(&shared, visit)),
                stored,
                dedupe::MAX_KEYS,
            )
            .map_err(unavailable)?
        };
        let writer = {
            let (shared, dir) = (shared.clone(), dir.to_owned());
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || {
                    Writer {
                        shared,
                        dir,
                        wal,
                        spares,
                        dedupe,
                        next_lsn: applied + 1,
                        to_applier,
                        last_seqs: HashMap::new(),
                        max_unapplied,
                    }
                    .run(&writer_rx)
                })
                .map_err(unavailable)?
        };
        Ok(Self {
            shared,
            threads: Mutex::new(Some(Threads {
                to_writer,
                writer,
                applier,
            })),
        })
    }

    /// Finish the queued writes, checkpoint (so the next open replays nothing) and stop both threads.
    pub fn shutdown(&self) {
        let threads = self.threads.lock().expect("threads lock").take();
        if let Some(t) = threads {
            drop(t.to_writer);
            let _ = t.writer.join();
            // The writer dropped its sender: the applier drains, checkpoints and stops.
            let _ = t.applier.join();
        }
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let threads = self.threads.lock().expect("threads lock");
            let t = threads
                .as_ref()
                .ok_or_else(|| unavailable("store closed"))?;
            t.to_writer
                .send(Job { op, reply })
                .map_err(|_| unavailable("store writer stopped"))?;
        }
        rx.await.map_err(|_| unavailable("store writer stopped"))?
    }

    /// Run `f` on Tokio's blocking pool with a snapshot: for what only the applier writes (conversations,
    /// members, the inbox), which it answers only once it is in fjall.
    async fn read_snapshot<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshot, &Keyspaces) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.read(move |shared| f(&shared.snapshot(), &shared.ks))
            .await
    }

    /// Run `f` on Tokio's blocking pool. A read of messages must take what it needs from the overlay
    /// before it opens its fjall snapshot ([`Shared::snapshot`]): the applier writes a message to fjall
    /// before it leaves the overlay, so in that order no message can be missed.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(unavailable)?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Write the log records after fjall's last checkpoint into fjall (durably), delete the log, and return
/// the last lsn fjall now holds.
fn recover(db: &SingleWriterTxDatabase, ks: &Keyspaces, dir: &Path) -> Result<u64, StoreError> {
    let mut applied = match db
        .read_tx()
        .get(&ks.meta, APPLIED_LSN)
        .map_err(unavailable)?
    {
        Some(raw) => decode_u64(&raw)?,
        None => 0,
    };
    let mut txn = db.write_tx().durability(Some(PersistMode::SyncData));
    let mut replayed = 0usize;
    let durable = applied;
    for (_, path) in wal::segments(dir).map_err(unavailable)? {
        let contents = wal::read_segment(&path).map_err(unavailable)?;
        if contents.ignored_bytes > 0 {
            tracing::warn!(segment = %path.display(), bytes = contents.ignored_bytes, "ignoring the torn tail of the store's log (never acknowledged)");
        }
        for raw in contents.records {
            let record = LogRecord::decode(&raw).map_err(|e| {
                corrupt(format!(
                    "{}: a record with a good CRC does not decode: {e}",
                    path.display()
                ))
            })?;
            if record.lsn <= applied {
                continue;
            }
            // Records are logged with consecutive lsns: a gap is acknowledged messages lost to damage.
            if record.lsn != applied + 1 {
                return Err(corrupt(format!(
                    "{}: the log jumps from record {applied} to {}: the records between are damaged \
                     (unreadable bytes at {:?}, as (offset, length))",
                    path.display(),
                    record.lsn,
                    contents.damaged
                )));
            }
            insert_messages(&mut txn, ks, &record.messages)?;
            applied = record.lsn;
            replayed += record.messages.len();
        }
        if !contents.damaged.is_empty() {
            // Only records fjall already held (a gap among the others returned above).
            tracing::warn!(segment = %path.display(), damaged = ?contents.damaged, durable,
                "damaged bytes in the store's log, in records already in fjall: ignored");
        }
    }
    txn.insert(&ks.meta, APPLIED_LSN, applied.to_be_bytes());
    txn.commit().map_err(unavailable)?;
    if replayed > 0 {
        tracing::info!(
            messages = replayed,
            "replayed the store's log into fjall after an unclean stop"
        );
    }
    wal::delete_durable(dir, applied, true).map_err(unavailable)?;
    Ok(applied)
}

/// The writer thread: plans appends, logs them, answers them.
struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    wal: Wal,
    /// The next preallocated segment, prepared in the background.
    spares: Spares,
    /// Which new messages surely have no earlier copy, without reading fjall.
    dedupe: DedupeFilter,
    next_lsn: u64,
    to_applier: mpsc::Sender<ToApplier>,
    /// The last seq of each conversation written lately. Every append goes through this thread, so it is
    /// exact; it saves the seq fence a read.
    last_seqs: HashMap<ConvId, u64>,
    /// Past this many bytes in the overlay, wait for the applier ([`MAX_UNAPPLIED_BYTES`]).
    max_unapplied: usize,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Job>) {
        // Jobs in the last group: a writer that took one job at a time is idle, and logs at once.
        let mut last_group = 1;
        while let Ok(first) = rx.recv() {
            // Sleep through the window rather than wait on the channel: a writer waiting on it would be
            // woken (a futex wake and a context switch) by every job that arrives.
            if last_group > 1 {
                std::thread::sleep(GROUP_WINDOW);
            }
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter().take(MAX_GROUP - 1));
            last_group = jobs.len();
            let started = Instant::now();
            self.group(jobs);
            metrics::histogram!("switchboard_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("switchboard_store_commit_jobs").record(last_group as f64);
            metrics::gauge!("switchboard_store_dedupe_filter_keys").set(self.dedupe.keys() as f64);
        }
    }

    /// Drop from the overlay what the applier has written, and wait while it still holds more than
    /// `max_unapplied` bytes. An error once the store has failed: the applier may never catch up.
    fn make_room(&self) -> Result<(), StoreError> {
        let mut applied = *self.shared.applied();
        let mut waited = false;
        loop {
            if let Some(e) = self.shared.failure() {
                return Err(e);
            }
            {
                let mut overlay = self.shared.overlay();
                overlay.prune(applied);
                metrics::gauge!("switchboard_store_unapplied_bytes").set(overlay.bytes as f64);
                if overlay.bytes <= self.max_unapplied {
                    return Ok(());
                }
                if !waited {
                    tracing::warn!(
                        bytes = overlay.bytes,
                        "the store's writer waits for its applier to catch up (messages not yet in fjall)"
                    );
                    waited = true;
                }
            }
            let seen = applied;
            let guard = self.shared.applied();
            // Woken when the applier publishes; the time-out only rechecks for a failure.
            let (guard, _) = self
                .shared
                .applied_changed
                .wait_timeout_while(guard, Duration::from_millis(100), |a| *a == seen)
                .unwrap_or_else(|e| e.into_inner());
            applied = *guard;
        }
    }

    /// Handle one group: changes go to the applier in order; appends are planned, logged and answered.
    fn group(&mut self, jobs: Vec<Job>) {
        if let Err(e) = self.make_room() {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
        if self.last_seqs.len() > MAX_CACHED_SEQS {
            self.last_seqs.clear();
        }
        // This group's new messages by conversation, in seq order, and the answers waiting for the log. By
        // conversation, so that a dedupe check scans only its own conversation's share of the group.
        let mut logged: HashMap<ConvId, Vec<Message>> = HashMap::new();
        let mut answers = Vec::new();
        for job in jobs {
            match job.op {
                WriteOp::Append {
                    conv,
                    first_seq,
                    batch,
                } => {
                    let earlier = logged.get(&conv).map_or(&[][..], Vec::as_slice);
                    let result = self.plan(earlier, &conv, first_seq, batch);
                    if let Ok(results) = &result {
                        let logged = logged.entry(conv).or_default();
                        logged.extend(results.iter().filter_map(|r| match r {
                            Appended::New(m) => Some(m.clone()),
                            Appended::Duplicate(_) => None,
                        }));
                    }
                    answers.push((job.reply, result.map(WriteOutcome::Appended)));
                }
                op => {
                    let job = Job {
                        op,
                        reply: job.reply,
                    };
                    if let Err(mpsc::SendError(ToApplier::Change(job))) =
                        self.to_applier.send(ToApplier::Change(job))
                    {
                        let _ = job.reply.send(Err(unavailable("store applier stopped")));
                    }
                }
            }
        }
        let logged: Vec<Message> = logged.into_values().flatten().collect();
        if !logged.is_empty() {
            if let Err(e) = self.log(logged) {
                // Not durable: nobody hears success, and nothing more is logged behind an unknown tail.
                self.last_seqs.clear();
                self.shared.fail(&e);
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }

    /// The seq fence and the dedupe of one append, against fjall, the overlay and what this group has
    /// already planned for the same conversation (`group`).
    fn plan(
        &mut self,
        group: &[Message],
        conv: &str,
        first_seq: u64,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StoreError> {
        let found = match self.last_seqs.get(conv) {
            Some(seq) => *seq,
            None => {
                let in_overlay = self.shared.overlay().last(conv).map(|m| m.seq);
                match in_overlay {
                    Some(seq) => seq,
                    // A snapshot taken after the overlay was read (see `EmbeddedStore::read`).
                    None => last_seq_in(&self.shared.snapshot(), &self.shared.ks, conv)?,
                }
            }
        };
        if found + 1 != first_seq {
            return Err(StoreError::SeqConflict {
                expected: first_seq,
                found,
            });
        }
        let mut keys = Vec::with_capacity(batch.len());
        let mut originals = Vec::with_capacity(batch.len());
        for m in &batch {
            let key = key::with_str(&[conv, &m.from], &m.msg_id)?;
            originals.push(if self.dedupe.surely_new(&key) {
                None
            } else {
                self.original(group, conv, &m.from, &m.msg_id, &key)?
            });
            keys.push(key);
        }
        let results = plan_append(conv, first_seq, batch, originals);
        for key in &keys {
            self.dedupe.insert(key);
        }
        let last = results
            .iter()
            .filter_map(|r| match r {
                Appended::New(m) => Some(m.seq),
                Appended::Duplicate(_) => None,
            })
            .max()
            .unwrap_or(found);
        match self.last_seqs.get_mut(conv) {
            Some(seq) => *seq = last,
            None => {
                self.last_seqs.insert(conv.to_owned(), last);
            }
        }
        Ok(results)
    }

    /// The stored message `(conv, from, msg_id)` names (its dedupe key: `dedupe_key`), if any: in this
    /// group (`group`: its messages for `conv`), the overlay, or fjall.
    fn original(
        &self,
        group: &[Message],
        conv: &str,
        from: &str,
        msg_id: &str,
        dedupe_key: &[u8],
    ) -> Result<Option<Message>, StoreError> {
        if let Some(m) = group.iter().find(|m| m.from == from && m.msg_id == msg_id) {
            return Ok(Some(m.clone()));
        }
        if let Some(m) = self.shared.overlay().original(conv, from, msg_id) {
            return Ok(Some(m.clone()));
        }
        // A snapshot taken after the overlay was read: one taken earlier (say, at the start of the group)
        // could miss a message the applier wrote to fjall and took out of the overlay in between.
        let snapshot = self.shared.snapshot();
        let ks = &self.shared.ks;
        let Some(seq) = snapshot.get(&ks.dedupe, dedupe_key).map_err(unavailable)? else {
            return Ok(None);
        };
        let seq = decode_u64(&seq)?;
        let raw = snapshot
            .get(&ks.messages, key::with_seq(&[conv], seq)?)
            .map_err(unavailable)?
            .ok_or_else(|| corrupt("dedupe entry without message"))?;
        let record: Record = postcard::from_bytes(&raw).map_err(corrupt)?;
        Ok(Some(record.into_message(conv, seq)))
    }

    /// Log the group's new messages (one record, one `fdatasync`), then show them to readers and hand
    /// them to the applier.
    fn log(&mut self, messages: Vec<Message>) -> Result<(), StoreError> {
        let full = self.wal.len() >= MAX_SEGMENT_BYTES;
        // A segment that grows (the first one, or one started when no spare was ready) is closed as soon as
        // a spare is ready.
        if full || !self.wal.preallocated() {
            if let Some(spare) = self.spares.take() {
                self.wal = Wal::from_spare(&self.dir, self.next_lsn, spare).map_err(unavailable)?;
            } else if full {
                self.wal = Wal::create(&self.dir, self.next_lsn).map_err(unavailable)?;
            }
        }
        let record = LogRecord {
            lsn: self.next_lsn,
            messages,
        };
        let raw = record.encode()?;
        self.wal.append(&raw).map_err(unavailable)?;
        self.next_lsn += 1;
        self.shared.overlay().add(&record);
        self.to_applier
            .send(ToApplier::Logged(record))
            .map_err(|_| unavailable("store applier stopped"))
    }
}

/// The applier thread: log records into fjall, durable checkpoints, conversation and membership changes.
struct Applier {
    shared: Arc<Shared>,
    dir: PathBuf,
    /// Whether fjall holds writes not yet made durable by a checkpoint.
    dirty: bool,
    last_checkpoint: Instant,
    /// How long records gather before they are written ([`APPLY_EVERY`]).
    apply_every: Duration,
}

impl Applier {
    fn new(shared: Arc<Shared>, dir: PathBuf, apply_every: Duration) -> Self {
        Self {
            shared,
            dir,
            dirty: false,
            last_checkpoint: Instant::now(),
            apply_every,
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<ToApplier>) {
        loop {
            let first = if self.dirty {
                let due = self.last_checkpoint + CHECKPOINT_EVERY;
                match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            };
            // Let records gather (a change, rare, is answered at once).
            if matches!(first, Some(ToApplier::Logged(_))) {
                std::thread::sleep(self.apply_every);
            }
            let batch: Vec<ToApplier> = first.into_iter().chain(rx.try_iter()).collect();
            if batch.is_empty() {
                // A checkpoint is due and nothing came: make what fjall holds durable.
                self.apply(batch);
                continue;
            }
            for chunk in chunks(batch, APPLY_CHUNK) {
                self.apply(chunk);
            }
        }
        // The writer is gone and everything it sent is applied: make it durable, and the log with it.
        if self.dirty {
            self.apply(Vec::new());
        }
        if self.shared.failure().is_none() {
            let applied = *self.shared.applied();
            if let Err(e) = wal::delete_durable(&self.dir, applied, true) {
                tracing::warn!(error = %e, "could not delete the store's log after the last checkpoint");
            }
        }
    }

    /// Write one batch to fjall in one transaction: durable (a checkpoint) when it holds a conversation or
    /// membership change or a checkpoint is due, else committed without an fsync. A read position does not
    /// force one: it is durable at the next checkpoint (within [`CHECKPOINT_EVERY`]), so a read per message
    /// received costs no fsync of its own (decision 0017).
    fn apply(&mut self, batch: Vec<ToApplier>) {
        let durable = self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || batch.iter().any(|m| {
                matches!(m, ToApplier::Change(job) if !matches!(job.op, WriteOp::SetRead { .. }))
            })
            || batch.is_empty();
        let started = Instant::now();
        let mut records = Vec::new();
        let mut changes = Vec::new();
        for m in batch {
            match m {
                ToApplier::Logged(r) => records.push(r),
                ToApplier::Change(job) => changes.push(job),
            }
        }
        let failed = self.shared.failure();
        let outcome = match failed {
            Some(e) => Err(e),
            None => self.commit(&records, &changes, durable),
        };
        match outcome {
            Ok(results) => {
                if let Some(last) = records.last() {
                    *self.shared.applied() = last.lsn;
                    self.shared.applied_changed.notify_all();
                }
                for (job, result) in changes.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
                if durable {
                    metrics::histogram!("switchboard_store_checkpoint_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.dirty = false;
                    self.last_checkpoint = Instant::now();
                    // Copied out first: the lock is not held across the deletions.
                    let applied = *self.shared.applied();
                    if let Err(e) = wal::delete_durable(&self.dir, applied, false) {
                        tracing::warn!(error = %e, "could not delete durable log segments");
                    }
                } else {
                    self.dirty = true;
                }
            }
            Err(e) => {
                // The records stay in the overlay (readers still see them) and in the log (a restart
                // replays them); writes stop until then.
                self.shared.fail(&e);
                for job in changes {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn commit(
        &self,
        records: &[LogRecord],
        changes: &[Job],
        durable: bool,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let ks = &self.shared.ks;
        let mut txn = self.shared.db.write_tx();
        for r in records {
            insert_messages(&mut txn, ks, &r.messages)?;
        }
        if let Some(last) = records.last() {
            txn.insert(&ks.meta, APPLIED_LSN, last.lsn.to_be_bytes());
        }
        let results = changes
            .iter()
            .map(|job| apply_change(&mut txn, ks, &job.op))
            .collect::<Result<Vec<_>, _>>()?;
        txn.commit().map_err(unavailable)?;
        // Not the transaction's own durability: fjall skips an empty transaction's commit, fsync and all,
        // and a checkpoint with nothing new to write must still make the earlier commits durable (they may
        // still be in fjall's journal buffer) before the log they came from is deleted.
        if durable {
            self.shared
                .db
                .persist(PersistMode::SyncData)
                .map_err(unavailable)?;
        }
        Ok(results)
    }
}

/// Split what the applier took into runs of at most `max` messages (a change counts as one), in order.
fn chunks(batch: Vec<ToApplier>, max: usize) -> Vec<Vec<ToApplier>> {
    let mut chunks: Vec<Vec<ToApplier>> = Vec::new();
    let mut size = max;
    for m in batch {
        let n = match &m {
            ToApplier::Logged(r) => r.messages.len().max(1),
            ToApplier::Change(_) => 1,
        };
        if size + n > max {
            chunks.push(Vec::new());
            size = 0;
        }
        size += n;
        chunks.last_mut().expect("a chunk was started").push(m);
    }
    chunks
}

/// Call `visit` with each dedupe key in fjall now, until it returns `false`.
fn scan_dedupe_keys(
    shared: &Shared,
    visit: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<(), StoreError> {
    for entry in shared.snapshot().iter(&shared.ks.dedupe) {
        if !visit(&entry.key().map_err(unavailable)?) {
            break;
        }
    }
    Ok(())
}

/// Write logged messages and their dedupe entries (idempotent: a replay may write them again).
fn insert_messages(
    txn: &mut WriteTransaction<'_>,
    ks: &Keyspaces,
    messages: &[Message],
) -> Result<(), StoreError> {
    for m in messages {
        let raw = postcard::to_stdvec(&Record::of(m)).map_err(corrupt)?;
        txn.insert(&ks.messages, key::with_seq(&[&m.conv], m.seq)?, raw);
        txn.insert(
            &ks.dedupe,
            key::with_str(&[&m.conv, &m.from], &m.msg_id)?,
            m.seq.to_be_bytes(),
        );
    }
    Ok(())
}

/// Apply one conversation or membership change inside the applier's transaction. The outer `Result` aborts
/// the whole transaction (an I/O failure); the inner one is this change's own answer. Every change reads
/// what it needs before it writes, so one that fails on its own has written nothing.
fn apply_change(
    txn: &mut WriteTransaction<'_>,
    ks: &Keyspaces,
    op: &WriteOp,
) -> Result<Result<WriteOutcome, StoreError>, StoreError> {
    let result = match op {
        WriteOp::Create { info, members } => create(txn, ks, info, members),
        WriteOp::AddMember { conv, user } => (|| {
            let member = key::with_str(&[conv], user)?;
            let added = !txn
                .contains_key(&ks.members, &member)
                .map_err(unavailable)?;
            txn.insert(&ks.members, member, now_ms().to_be_bytes());
            txn.insert(&ks.user_conversations, key::with_str(&[user], conv)?, []);
            Ok(WriteOutcome::Changed(added))
        })(),
        WriteOp::RemoveMember { conv, user } => (|| {
            let member = key::with_str(&[conv], user)?;
            let removed = txn
                .contains_key(&ks.members, &member)
                .map_err(unavailable)?;
            txn.remove(&ks.members, member.clone());
            txn.remove(&ks.owners, member);
            txn.remove(&ks.user_conversations, key::with_str(&[user], conv)?);
            Ok(WriteOutcome::Changed(removed))
        })(),
        WriteOp::SetOwner { conv, user, owner } => (|| {
            let row = key::with_str(&[conv], user)?;
            let was = txn.contains_key(&ks.owners, &row).map_err(unavailable)?;
            if *owner {
                txn.insert(&ks.owners, row, []);
            } else {
                txn.remove(&ks.owners, row);
            }
            Ok(WriteOutcome::Changed(was != *owner))
        })(),
        WriteOp::SetRead { conv, user, seq } => (|| {
            let position = key::with_str(&[user], conv)?;
            let stored = txn
                .get(&ks.read_positions, &position)
                .map_err(unavailable)?
                .map(|raw| decode_u64(&raw))
                .transpose()?;
            let moved = stored.is_none_or(|stored| *seq > stored);
            if moved {
                txn.insert(&ks.read_positions, position, seq.to_be_bytes());
            }
            Ok(WriteOutcome::Changed(moved))
        })(),
        WriteOp::Append { .. } => Err(corrupt("an append reached the applier")),
    };
    match result {
        Err(e @ StoreError::Unavailable(_)) => Err(e),
        other => Ok(other),
    }
}

fn create(
    txn: &mut WriteTransaction<'_>,
    ks: &Keyspaces,
    info: &ConversationInfo,
    members: &[UserId],
) -> Result<WriteOutcome, StoreError> {
    // Encode before writing anything: a job that fails on its own must leave no partial write.
    let raw = postcard::to_stdvec(info).map_err(corrupt)?;
    let member_keys = members
        .iter()
        .map(|user| {
            Ok((
                key::with_str(&[&info.id], user)?,
                key::with_str(&[user], &info.id)?,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if info.kind == ConversationKind::Dm {
        let (a, b) = dm_pair(members);
        let pair = key::with_str(&[a], b)?;
        if let Some(id) = txn.get(&ks.dm_pairs, &pair).map_err(unavailable)? {
            let raw = txn
                .get(&ks.conversations, &id)
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("dm pair without conversation"))?;
            let info = postcard::from_bytes(&raw).map_err(corrupt)?;
            return Ok(WriteOutcome::Created(info, false));
        }
        txn.insert(&ks.dm_pairs, pair, info.id.as_bytes());
    }
    txn.insert(&ks.conversations, info.id.as_bytes(), raw);
    for (member, inbox) in member_keys {
        txn.insert(&ks.members, member, info.created_at.to_be_bytes());
        txn.insert(&ks.user_conversations, inbox, []);
    }
    Ok(WriteOutcome::Created(info.clone(), true))
}

/// The last fields of the keys that start with `first`, in order.
fn second_keys(
    snap: &Snapshot,
    keyspace: &SingleWriterTxKeyspace,
    first: &str,
) -> Result<Vec<String>, StoreError> {
    let prefix = key::prefix(&[first])?;
    snap.prefix(keyspace, &prefix)
        .map(|entry| key::last_str(&entry.key().map_err(unavailable)?, &prefix))
        .collect()
}

/// The newest message's seq in `conv` (0 when it has none).
fn last_seq_in(reader: &impl Readable, ks: &Keyspaces, conv: &str) -> Result<u64, StoreError> {
    match reader
        .prefix(&ks.messages, key::prefix(&[conv])?)
        .next_back()
    {
        Some(entry) => key::last_seq(&entry.key().map_err(unavailable)?),
        None => Ok(0),
    }
}

fn now_ms() -> u64 {
    switchboard_actors::conversation::now_ms()
}

fn read_conversation(
    snap: &Snapshot,
    ks: &Keyspaces,
    conv: &str,
) -> Result<Option<ConversationInfo>, StoreError> {
    let raw = snap.get(&ks.conversations, conv).map_err(unavailable)?;
    raw.map(|r| postcard::from_bytes(&r).map_err(corrupt))
        .transpose()
}

/// A message from its `messages` entry.
fn read_message(conv: &str, entry: fjall::Guard) -> Result<Message, StoreError> {
    let (key, value) = entry.into_inner().map_err(unavailable)?;
    let record: Record = postcard::from_bytes(&value).map_err(corrupt)?;
    Ok(record.into_message(conv, key::last_seq(&key)?))
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    fn failure(&self) -> Option<String> {
        self.shared
            .failure()
            .map(|e| format!("{e} ({})", diagnosis(&e)))
    }

    fn close(&self) {
        self.shutdown();
    }

    async fn create_conversation(
        &self,
        info: ConversationInfo,
        members: Vec<UserId>,
    ) -> Result<(ConversationInfo, bool), StoreError> {
        match self.write(WriteOp::Create { info, members }).await? {
            WriteOutcome::Created(info, created) => Ok((info, created)),
            _ => Err(corrupt("unexpected write outcome")),
        }
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConversationInfo>, StoreError> {
        let conv = conv.to_owned();
        self.read_snapshot(move |snap, ks| read_conversation(snap, ks, &conv))
            .await
    }

    async fn members(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let conv = conv.to_owned();
        self.read_snapshot(move |snap, ks| second_keys(snap, &ks.members, &conv))
            .await
    }

    async fn membership(&self, conv: &str, user: &str) -> Result<Membership, StoreError> {
        let (conv, user) = (conv.to_owned(), user.to_owned());
        self.read_snapshot(move |snap, ks| {
            let member = key::with_str(&[&conv], &user)?;
            if snap
                .contains_key(&ks.members, member)
                .map_err(unavailable)?
            {
                return Ok(Membership::Member);
            }
            let exists = snap
                .contains_key(&ks.conversations, &conv)
                .map_err(unavailable)?;
            Ok(if exists {
                Membership::NotMember
            } else {
                Membership::Unknown
            })
        })
        .await
    }

    async fn add_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        match self
            .write(WriteOp::AddMember {
                conv: conv.to_owned(),
                user: user.to_owned(),
            })
            .await?
        {
            WriteOutcome::Changed(c) => Ok(c),
            _ => Err(corrupt("unexpected write outcome")),
        }
    }

    async fn remove_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        match self
            .write(WriteOp::RemoveMember {
                conv: conv.to_owned(),
                user: user.to_owned(),
            })
            .await?
        {
            WriteOutcome::Changed(c) => Ok(c),
            _ => Err(corrupt("unexpected write outcome")),
        }
    }

    async fn owners(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let conv = conv.to_owned();
        self.read_snapshot(move |snap, ks| second_keys(snap, &ks.owners, &conv))
            .await
    }

    async fn set_owner(&self, conv: &str, user: &str, owner: bool) -> Result<bool, StoreError> {
        match self
            .write(WriteOp::SetOwner {
                conv: conv.to_owned(),
                user: user.to_owned(),
                owner,
            })
            .await?
        {
            WriteOutcome::Changed(c) => Ok(c),
            _ => Err(corrupt("unexpected write outcome")),
        }
    }

    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<(), StoreError> {
        self.write(WriteOp::SetRead {
            conv: conv.to_owned(),
            user: user.to_owned(),
            seq,
        })
        .await
        .map(drop)
    }

    async fn read_positions(&self, user: &str) -> Result<HashMap<ConvId, u64>, StoreError> {
        let user = user.to_owned();
        self.read_snapshot(move |snap, ks| {
            let prefix = key::prefix(&[&user])?;
            snap.prefix(&ks.read_positions, &prefix)
                .map(|entry| {
                    let (key, value) = entry.into_inner().map_err(unavailable)?;
                    Ok((key::last_str(&key, &prefix)?, decode_u64(&value)?))
                })
                .collect()
        })
        .await
    }

    async fn user_conversations(&self, user: &str) -> Result<Vec<ConvId>, StoreError> {
        let user = user.to_owned();
        self.read_snapshot(move |snap, ks| second_keys(snap, &ks.user_conversations, &user))
            .await
    }

    async fn last_message(&self, conv: &str) -> Result<Option<Message>, StoreError> {
        let conv = conv.to_owned();
        self.read(move |shared| {
            // The overlay first (see `read`): it holds the newest messages, if any.
            if let Some(m) = shared.overlay().last(&conv) {
                return Ok(Some(m.clone()));
            }
            let snap = shared.snapshot();
            let last = snap
                .prefix(&shared.ks.messages, key::prefix(&[&conv])?)
                .next_back();
            last.map(|e| read_message(&conv, e)).transpose()
        })
        .await
    }

    async fn append(
        &self,
        conv: &str,
        first_seq: u64,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StoreError> {
        match self
            .write(WriteOp::Append {
                conv: conv.to_owned(),
                first_seq,
                batch,
            })
            .await?
        {
            WriteOutcome::Appended(r) => Ok(r),
            _ => Err(corrupt("unexpected write outcome")),
        }
    }

    async fn messages(&self, conv: &str, query: HistoryQuery) -> Result<Page, StoreError> {
        let conv = conv.to_owned();
        self.read(move |shared| {
            let low = query.after.map_or(0, |a| a.saturating_add(1));
            let high = query.before.map_or(u64::MAX, |b| b.saturating_sub(1));
            if low > high || query.before == Some(0) {
                return Ok(Page {
                    messages: Vec::new(),
                    has_more: false,
                });
            }
            // The overlay first (see `read`), then fjall's end of the range nearest the start of travel;
            // the page is the first `limit` of their union in the direction of travel.
            let newest = shared.overlay().range(&conv, low, high);
            let forward = query.after.is_some();
            let snap = shared.snapshot();
            let range = snap.range(
                &shared.ks.messages,
                key::with_seq(&[&conv], low)?..=key::with_seq(&[&conv], high)?,
            );
            let mut found = BTreeMap::new();
            let stored: Box<dyn Iterator<Item = _>> = if forward {
                Box::new(range)
            } else {
                Box::new(range.rev())
            };
            for entry in stored.take(query.limit + 1) {
                let m = read_message(&conv, entry)?;
                found.insert(m.seq, m);
            }
            for m in newest {
                found.insert(m.seq, m);
            }
            let has_more = found.len() > query.limit;
            let mut messages: Vec<Message> = if forward {
                found.into_values().take(query.limit).collect()
            } else {
                found.into_values().rev().take(query.limit).collect()
            };
            if !forward {
                messages.reverse();
            }
            Ok(Page { messages, has_more })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_with_the_old_redb_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(OLD_REDB_FILE), b"redb").unwrap();
        let Err(StoreError::Unavailable(why)) = EmbeddedStore::open(dir.path()) else {
            panic!("a directory holding switchboard.redb must be refused");
        };
        assert!(why.contains("switchboard.redb"), "{why}");
        assert!(
            !dir.path().join(STORE_DIR).exists(),
            "nothing is created beside it"
        );
    }

    fn message(conv: &str, seq: u64, msg_id: &str) -> Message {
        Message {
            conv: conv.into(),
            seq,
            id: format!("id-{seq}"),
            msg_id: msg_id.into(),
            from: "alice".into(),
            body: format!("body {seq}"),
            ts: 1_000 + seq,
        }
    }

    #[test]
    fn the_applier_writes_in_chunks_of_at_most_the_limit_keeping_the_order() {
        let record = |lsn: u64, n: u64| {
            ToApplier::Logged(LogRecord {
                lsn,
                messages: (0..n).map(|i| message("c", lsn * 100 + i, "m")).collect(),
            })
        };
        let (reply, _rx) = oneshot::channel();
        let change = ToApplier::Change(Job {
            op: WriteOp::AddMember {
                conv: "c".into(),
                user: "bob".into(),
            },
            reply,
        });
        let batch = vec![
            record(1, 3),
            record(2, 2),
            change,
            record(3, 9),
            record(4, 4),
        ];
        let shape: Vec<Vec<String>> = chunks(batch, 5)
            .iter()
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|m| match m {
                        ToApplier::Logged(r) => format!("{}x{}", r.lsn, r.messages.len()),
                        ToApplier::Change(_) => "change".into(),
                    })
                    .collect()
            })
            .collect();
        // 3 + 2 fill a chunk; the change starts the next; a record over the limit is a chunk of its own.
        assert_eq!(
            shape,
            vec![
                vec!["1x3".to_string(), "2x2".into()],
                vec!["change".into()],
                vec!["3x9".into()],
                vec!["4x4".into()],
            ]
        );
    }

    /// A new message from alice with the id `msg_id`.
    fn new(msg_id: &str) -> NewMessage {
        NewMessage {
            id: format!("id-{msg_id}"),
            msg_id: msg_id.into(),
            from: "alice".into(),
            body: "hi".into(),
            ts: 7,
        }
    }

    fn history(store: &EmbeddedStore, conv: &str) -> Vec<Message> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Every page: a slow machine makes the preallocation test append more than one page's worth.
        let mut all: Vec<Message> = Vec::new();
        loop {
            let query = HistoryQuery {
                after: Some(all.last().map_or(0, |m| m.seq)),
                before: None,
                limit: 100,
            };
            let page = rt.block_on(store.messages(conv, query)).unwrap();
            all.extend(page.messages);
            if !page.has_more {
                return all;
            }
        }
    }

    #[test]
    fn opening_replays_the_log_after_the_last_checkpoint_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash leaves: logged (acknowledged) records that never reached fjall, then a torn one.
        let mut log = Wal::create(dir.path(), 1).unwrap();
        for lsn in 1..=2 {
            let record = LogRecord {
                lsn,
                messages: vec![message("c", lsn, &format!("m{lsn}"))],
            };
            log.append(&record.encode().unwrap()).unwrap();
        }
        drop(log);
        let segment = wal::segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&segment, &bytes).unwrap();

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            history(&store, "c"),
            vec![message("c", 1, "m1"), message("c", 2, "m2")]
        );
        // The replayed records are in fjall and the old log is gone: a restart replays nothing twice.
        drop(store);
        assert!(wal::segments(dir.path()).unwrap().is_empty());
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(history(&store, "c").len(), 2);
    }

    #[test]
    fn a_damaged_record_with_acknowledged_records_after_it_refuses_to_open_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Wal::create(dir.path(), 1).unwrap();
        let mut ends = Vec::new();
        for lsn in 1..=3 {
            let record = LogRecord {
                lsn,
                messages: vec![message("c", lsn, &format!("m{lsn}"))],
            };
            log.append(&postcard::to_stdvec(&record).unwrap()).unwrap();
            ends.push(log.len());
        }
        drop(log);
        let segment = wal::segments(dir.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&segment).unwrap();
        // A bit flipped inside the second record's payload; the third is intact.
        bytes[ends[0] as usize + 12] ^= 0x01;
        std::fs::write(&segment, &bytes).unwrap();
        let Err(e) = EmbeddedStore::open(dir.path()) else {
            panic!("opened over a damaged log");
        };
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        assert!(
            e.to_string().contains(&segment.display().to_string()),
            "{e}"
        );
        assert!(diagnosis(&e).contains("damaged"));
        // Nothing was deleted: the operator still has every byte.
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    }

    #[test]
    fn a_message_reads_the_same_before_and_after_the_applier_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        // An applier that lets records gather for 2 s: the reads below, within microseconds of the append,
        // are served from the overlay.
        let store =
            EmbeddedStore::open_with(dir.path(), Duration::from_secs(2), MAX_UNAPPLIED_BYTES)
                .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let newest_two = |store: &EmbeddedStore| {
            let query = HistoryQuery {
                after: None,
                before: None,
                limit: 2,
            };
            rt.block_on(store.messages("c", query)).unwrap()
        };
        rt.block_on(store.append("c", 1, vec![new("a"), new("b"), new("c")]))
            .unwrap();
        assert_eq!(store.shared.overlay().range("c", 0, u64::MAX).len(), 3);
        let early = history(&store, "c");
        assert_eq!(
            early.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let early_newest = newest_two(&store);
        assert_eq!(early_newest.messages, early[1..].to_vec());
        assert!(early_newest.has_more);
        let resend = rt.block_on(store.append("c", 4, vec![new("b")])).unwrap();
        assert_eq!(resend, vec![Appended::Duplicate(early[1].clone())]);
        // Shut down (the applier drains into fjall) and reopen: the same reads, now from fjall.
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(store.shared.overlay().convs.is_empty());
        assert_eq!(history(&store, "c"), early);
        let late_newest = newest_two(&store);
        assert_eq!(late_newest.messages, early_newest.messages);
        assert!(late_newest.has_more);
        let resend = rt.block_on(store.append("c", 4, vec![new("b")])).unwrap();
        assert_eq!(resend, vec![Appended::Duplicate(early[1].clone())]);
    }

    /// Copy `from` into `to` as the disk has it: what a `kill -9` leaves (nothing of a process's buffers).
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn a_checkpoint_makes_fjall_hold_every_applied_message_on_disk_without_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Appended at once after the open: the applier writes them without an fsync, and nothing follows, so
        // the checkpoint a second later is one with nothing new to write.
        rt.block_on(store.append("c", 1, vec![new("a"), new("b")]))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while *store.shared.applied() < 1 {
            assert!(
                Instant::now() < deadline,
                "the applier never wrote the record"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(CHECKPOINT_EVERY + Duration::from_millis(500));
        // The log may be deleted once a checkpoint covers it: fjall's files alone, as the disk has them
        // while the store still runs, must hold both messages.
        let crashed = tempfile::tempdir().unwrap();
        copy_tree(&dir.path().join(STORE_DIR), &crashed.path().join(STORE_DIR));
        let copy = EmbeddedStore::open(crashed.path()).unwrap();
        assert_eq!(
            history(&copy, "c")
                .iter()
                .map(|m| m.msg_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        drop(store);
    }

    #[test]
    fn the_writer_waits_while_the_overlay_is_over_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let one = footprint(&message("c", 1, "m"));
        // Room for one message; the applier takes its records 500 ms after the first arrives.
        let store = EmbeddedStore::open_with(dir.path(), Duration::from_millis(500), one).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        rt.block_on(store.append("c", 1, vec![new("a")])).unwrap();
        rt.block_on(store.append("c", 2, vec![new("b")])).unwrap();
        // Two messages held: the third waits until the applier has written them to fjall.
        rt.block_on(store.append("c", 3, vec![new("c")])).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "the third append waited for the applier: {:?}",
            started.elapsed()
        );
        assert_eq!(
            history(&store, "c")
                .iter()
                .map(|m| m.msg_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn the_dedupe_scan_reads_the_keys_the_writer_checks_and_resends_stay_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        rt.block_on(store.append("c", 1, vec![new("a"), new("b")]))
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut scanned = Vec::new();
        scan_dedupe_keys(&store.shared, &mut |key| {
            scanned.push(key.to_vec());
            true
        })
        .unwrap();
        let expected: Vec<Vec<u8>> = ["a", "b"]
            .iter()
            .map(|id| key::with_str(&["c", "alice"], id).unwrap())
            .collect();
        assert_eq!(scanned, expected);
        // Give the writer's scan of those two keys time to end, then check through its filter: a resend of
        // a stored message, one of a message planned since, and a new one.
        std::thread::sleep(Duration::from_millis(300));
        let stored = history(&store, "c");
        let appended = rt
            .block_on(store.append("c", 3, vec![new("b"), new("d"), new("d"), new("e")]))
            .unwrap();
        assert_eq!(appended[0], Appended::Duplicate(stored[1].clone()));
        let Appended::New(d) = &appended[1] else {
            panic!("{appended:?}")
        };
        assert_eq!((d.seq, d.msg_id.as_str()), (3, "d"));
        assert_eq!(appended[2], Appended::Duplicate(d.clone()));
        assert!(matches!(&appended[3], Appended::New(e) if e.seq == 4));
        let resent = rt.block_on(store.append("c", 5, vec![new("d")])).unwrap();
        assert_eq!(resent, vec![Appended::Duplicate(d.clone())]);
    }

    #[test]
    fn the_writer_moves_to_a_preallocated_segment_once_one_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sizes = || {
            wal::segments(dir.path())
                .unwrap()
                .iter()
                .map(|(_, path)| std::fs::metadata(path).unwrap().len())
                .collect::<Vec<_>>()
        };
        let mut seq = 1;
        let mut append = || {
            rt.block_on(store.append("c", seq, vec![new(&format!("m{seq}"))]))
                .unwrap();
            seq += 1;
        };
        // The first segment grows; the first group after the spare is ready goes to the spare.
        let deadline = Instant::now() + Duration::from_secs(30);
        while sizes().last() != Some(&MAX_SEGMENT_BYTES) {
            assert!(Instant::now() < deadline, "no spare taken: {:?}", sizes());
            append();
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..10 {
            append();
        }
        // (The first segment may be gone already: the applier wrote its records to fjall.)
        assert_eq!(
            sizes().last(),
            Some(&MAX_SEGMENT_BYTES),
            "appends did not grow it"
        );
        let logged = history(&store, "c");
        assert_eq!(logged.len() as u64, seq - 1);
        assert!(logged.iter().zip(1..).all(|(m, seq)| m.seq == seq));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_applier_and_fjalls_workers_run_at_idle_priority_and_the_writer_does_not() {
        use priority::tests::policies_of_threads_named;
        let dir = tempfile::tempdir().unwrap();
        let _store = EmbeddedStore::open(dir.path()).unwrap();
        // Other tests' stores may be open too: every such thread must be idle, every writer normal. A new
        // thread has its name (and the applier its priority) only once it has started: wait for that.
        let (idle, normal) = (libc::SCHED_IDLE as u32, libc::SCHED_OTHER as u32);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = [
                ("fjall:worker", idle),
                ("store-applier", idle),
                ("store-writer", normal),
            ]
            .map(|(name, policy)| {
                let policies = policies_of_threads_named(name);
                (
                    name,
                    !policies.is_empty() && policies.iter().all(|p| *p == policy),
                    policies,
                )
            });
            if found.iter().all(|(_, ok, _)| *ok) {
                break;
            }
            assert!(Instant::now() < deadline, "{found:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn keys_sort_like_their_fields() {
        let k = |conv: &str, seq| key::with_seq(&[conv], seq).unwrap();
        assert!(k("a", 2) < k("a", 256));
        assert!(
            k("a", u64::MAX) < k("ab", 0),
            "a conversation's keys are contiguous"
        );
        let prefix = key::prefix(&["a"]).unwrap();
        assert!(!k("ab", 1).starts_with(&prefix));
        assert_eq!(key::last_seq(&k("a", 7)).unwrap(), 7);
        let member = key::with_str(&["conv"], "user").unwrap();
        assert_eq!(
            key::last_str(&member, &key::prefix(&["conv"]).unwrap()).unwrap(),
            "user"
        );
    }
}
