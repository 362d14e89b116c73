//! The embedded store: one redb file in the data directory.
//!
//! Writes from every conversation go to one writer thread, which takes all the jobs waiting (when it is busy,
//! also those that arrive within 250 µs of the first), applies them in one write transaction and commits
//! once — one fsync for the lot (group commit) — before answering any of them. Reads run on Tokio's blocking
//! pool against redb's MVCC snapshots and never wait for the writer.
//! See `docs/decisions/0003-embedded-store.md` for why redb.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use switchboard_actors::store::{
    dm_pair, plan_append, Appended, ConvId, ConversationInfo, ConversationKind, HistoryQuery,
    Membership, Message, MessageStore, NewMessage, Page, StoreError, UserId,
};
use tokio::sync::oneshot;

const CONVERSATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("conversations");
/// (conversation, user) → joined at (ms)
const MEMBERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("members");
/// (user, conversation) → () : the inbox index
const USER_CONVERSATIONS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("user_conversations");
/// (lesser user, greater user) → DM conversation id
const DM_PAIRS: TableDefinition<(&str, &str), &str> = TableDefinition::new("dm_pairs");
/// (conversation, seq) → postcard [`Record`]
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// (conversation, sender, msg_id) → seq : the dedupe index
const DEDUPE: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("dedupe");

/// When the writer is busy, how long it gathers jobs after the first before committing them together.
/// A commit costs ~0.3 ms of CPU here (an `fdatasync`, and redb's page writes) whatever its size; at
/// 10,000 DM msg/s on 2 cores, gathering for 250 µs took commits from ~5 to ~15 jobs each and the
/// send→deliver p99 from 28–54 ms to 8–10 ms (docs/benchmarks.md).
const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_micros(250);

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 1024;

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

/// The redb-backed store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: std::sync::Mutex<Option<(mpsc::Sender<Job>, JoinHandle<()>)>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Open (or create) `dir/switchboard.redb` and start the writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        let db = Arc::new(Database::create(dir.join("switchboard.redb")).map_err(unavailable)?);
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(CONVERSATIONS).map_err(unavailable)?;
            txn.open_table(MEMBERS).map_err(unavailable)?;
            txn.open_table(USER_CONVERSATIONS).map_err(unavailable)?;
            txn.open_table(DM_PAIRS).map_err(unavailable)?;
            txn.open_table(MESSAGES).map_err(unavailable)?;
            txn.open_table(DEDUPE).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(&writer_db, &rx))
            .map_err(unavailable)?;
        Ok(Self {
            db,
            writer: std::sync::Mutex::new(Some((tx, handle))),
        })
    }

    /// Finish the queued writes and stop the writer thread.
    pub fn shutdown(&self) {
        let writer = self.writer.lock().expect("writer lock").take();
        if let Some((tx, handle)) = writer {
            drop(tx);
            let _ = handle.join();
        }
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let writer = self.writer.lock().expect("writer lock");
            let (tx, _) = writer.as_ref().ok_or_else(|| unavailable("store closed"))?;
            tx.send(Job { op, reply })
                .map_err(|_| unavailable("store writer stopped"))?;
        }
        rx.await.map_err(|_| unavailable("store writer stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read().map_err(unavailable)?))
            .await
            .map_err(unavailable)?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The writer thread: group commit.
fn write_loop(db: &Database, rx: &mpsc::Receiver<Job>) {
    // Jobs in the last group: a writer that committed one job at a time is idle, and commits at once.
    let mut last_group = 1;
    while let Ok(first) = rx.recv() {
        let gather = if last_group > 1 {
            GROUP_WINDOW
        } else {
            std::time::Duration::ZERO
        };
        let window = std::time::Instant::now() + gather;
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.recv_timeout(window.saturating_duration_since(std::time::Instant::now())) {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let outcome = db.begin_write().map_err(unavailable).and_then(|txn| {
            let results: Vec<_> = {
                let mut tables = Tables::open(&txn)?;
                jobs.iter()
                    .map(|j| apply(&mut tables, &j.op))
                    .collect::<Result<_, _>>()?
            };
            txn.commit().map_err(unavailable)?;
            Ok(results)
        });
        metrics::histogram!("switchboard_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("switchboard_store_commit_jobs").record(jobs.len() as f64);
        last_group = jobs.len();
        match outcome {
            Ok(results) => {
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Every table, opened once per group transaction (opening a table per job cost more than its writes).
struct Tables<'t> {
    conversations: redb::Table<'t, &'static str, &'static [u8]>,
    members: redb::Table<'t, (&'static str, &'static str), u64>,
    user_conversations: redb::Table<'t, (&'static str, &'static str), ()>,
    dm_pairs: redb::Table<'t, (&'static str, &'static str), &'static str>,
    messages: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    dedupe: redb::Table<'t, (&'static str, &'static str, &'static str), u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            conversations: txn.open_table(CONVERSATIONS).map_err(unavailable)?,
            members: txn.open_table(MEMBERS).map_err(unavailable)?,
            user_conversations: txn.open_table(USER_CONVERSATIONS).map_err(unavailable)?,
            dm_pairs: txn.open_table(DM_PAIRS).map_err(unavailable)?,
            messages: txn.open_table(MESSAGES).map_err(unavailable)?,
            dedupe: txn.open_table(DEDUPE).map_err(unavailable)?,
        })
    }
}

/// Apply one job inside the group's transaction. The outer `Result` aborts the whole group (an I/O
/// failure); the inner one is this job's own answer (a fence conflict, a corrupt record). Every job reads
/// what it needs before it writes, so a job that fails on its own has written nothing.
fn apply(t: &mut Tables<'_>, op: &WriteOp) -> Result<Result<WriteOutcome, StoreError>, StoreError> {
    let result = match op {
        WriteOp::Create { info, members } => create(t, info, members),
        WriteOp::AddMember { conv, user } => (|| {
            let added = t
                .members
                .insert((conv.as_str(), user.as_str()), now_ms())
                .map_err(unavailable)?
                .is_none();
            t.user_conversations
                .insert((user.as_str(), conv.as_str()), ())
                .map_err(unavailable)?;
            Ok(WriteOutcome::Changed(added))
        })(),
        WriteOp::RemoveMember { conv, user } => (|| {
            let removed = t
                .members
                .remove((conv.as_str(), user.as_str()))
                .map_err(unavailable)?
                .is_some();
            t.user_conversations
                .remove((user.as_str(), conv.as_str()))
                .map_err(unavailable)?;
            Ok(WriteOutcome::Changed(removed))
        })(),
        WriteOp::Append {
            conv,
            first_seq,
            batch,
        } => append(t, conv, *first_seq, batch),
    };
    match result {
        Err(e @ StoreError::Unavailable(_)) => Err(e),
        other => Ok(other),
    }
}

fn create(
    t: &mut Tables<'_>,
    info: &ConversationInfo,
    members: &[UserId],
) -> Result<WriteOutcome, StoreError> {
    // Encode before writing anything: a job that fails on its own must leave no partial write.
    let raw = postcard::to_stdvec(info).map_err(corrupt)?;
    if info.kind == ConversationKind::Dm {
        let (a, b) = dm_pair(members);
        let existing = t
            .dm_pairs
            .get((a, b))
            .map_err(unavailable)?
            .map(|v| v.value().to_owned());
        if let Some(id) = existing {
            let raw = t
                .conversations
                .get(id.as_str())
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("dm pair without conversation"))?;
            let info = postcard::from_bytes(raw.value()).map_err(corrupt)?;
            return Ok(WriteOutcome::Created(info, false));
        }
        t.dm_pairs
            .insert((a, b), info.id.as_str())
            .map_err(unavailable)?;
    }
    t.conversations
        .insert(info.id.as_str(), raw.as_slice())
        .map_err(unavailable)?;
    for user in members {
        t.members
            .insert((info.id.as_str(), user.as_str()), info.created_at)
            .map_err(unavailable)?;
        t.user_conversations
            .insert((user.as_str(), info.id.as_str()), ())
            .map_err(unavailable)?;
    }
    Ok(WriteOutcome::Created(info.clone(), true))
}

fn append(
    t: &mut Tables<'_>,
    conv: &str,
    first_seq: u64,
    batch: &[NewMessage],
) -> Result<WriteOutcome, StoreError> {
    let Tables {
        messages, dedupe, ..
    } = t;
    let found = last_seq_in(messages, conv)?;
    if found + 1 != first_seq {
        return Err(StoreError::SeqConflict {
            expected: first_seq,
            found,
        });
    }
    // Read phase: what is already stored (a corrupt original fails the job before anything is written).
    let originals = batch
        .iter()
        .map(|m| {
            let Some(seq) = dedupe
                .get((conv, m.from.as_str(), m.msg_id.as_str()))
                .map_err(unavailable)?
                .map(|v| v.value())
            else {
                return Ok(None);
            };
            let raw = messages
                .get((conv, seq))
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("dedupe entry without message"))?;
            let record: Record = postcard::from_bytes(raw.value()).map_err(corrupt)?;
            Ok(Some(record.into_message(conv, seq)))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let results = plan_append(conv, first_seq, batch.to_vec(), originals);
    // Encode every new record before the first write, then write.
    let encoded: Vec<(&Message, Vec<u8>)> = results
        .iter()
        .filter_map(|r| match r {
            Appended::New(m) => Some(m),
            Appended::Duplicate(_) => None,
        })
        .map(|m| {
            let record = Record {
                id: m.id.clone(),
                msg_id: m.msg_id.clone(),
                from: m.from.clone(),
                body: m.body.clone(),
                ts: m.ts,
            };
            postcard::to_stdvec(&record)
                .map(|raw| (m, raw))
                .map_err(corrupt)
        })
        .collect::<Result<_, _>>()?;
    for (m, raw) in &encoded {
        messages
            .insert((conv, m.seq), raw.as_slice())
            .map_err(unavailable)?;
        dedupe
            .insert((conv, m.from.as_str(), m.msg_id.as_str()), m.seq)
            .map_err(unavailable)?;
    }
    Ok(WriteOutcome::Appended(results))
}

/// The second halves of the `(first, second)` keys that start with `first`, in order.
fn second_keys<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    first: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for entry in table.range((first, "")..).map_err(unavailable)? {
        let (key, _) = entry.map_err(unavailable)?;
        let (f, second) = key.value();
        if f != first {
            break;
        }
        out.push(second.to_owned());
    }
    Ok(out)
}

fn last_seq_in(
    messages: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    conv: &str,
) -> Result<u64, StoreError> {
    let last = messages
        .range((conv, 0)..=(conv, u64::MAX))
        .map_err(unavailable)?
        .next_back();
    match last {
        Some(entry) => Ok(entry.map_err(unavailable)?.0.value().1),
        None => Ok(0),
    }
}

fn now_ms() -> u64 {
    switchboard_actors::conversation::now_ms()
}

fn read_conversation(
    txn: &ReadTransaction,
    conv: &str,
) -> Result<Option<ConversationInfo>, StoreError> {
    let convs = txn.open_table(CONVERSATIONS).map_err(unavailable)?;
    let raw = convs.get(conv).map_err(unavailable)?;
    raw.map(|r| postcard::from_bytes(r.value()).map_err(corrupt))
        .transpose()
}

fn read_message(
    conv: &str,
    entry: (
        redb::AccessGuard<'_, (&str, u64)>,
        redb::AccessGuard<'_, &[u8]>,
    ),
) -> Result<Message, StoreError> {
    let seq = entry.0.value().1;
    let record: Record = postcard::from_bytes(entry.1.value()).map_err(corrupt)?;
    Ok(record.into_message(conv, seq))
}

#[async_trait]
impl MessageStore for EmbeddedStore {
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
        self.read(move |txn| read_conversation(txn, &conv)).await
    }

    async fn members(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let conv = conv.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MEMBERS).map_err(unavailable)?;
            second_keys(&table, &conv)
        })
        .await
    }

    async fn membership(&self, conv: &str, user: &str) -> Result<Membership, StoreError> {
        let (conv, user) = (conv.to_owned(), user.to_owned());
        self.read(move |txn| {
            let members = txn.open_table(MEMBERS).map_err(unavailable)?;
            if members
                .get((conv.as_str(), user.as_str()))
                .map_err(unavailable)?
                .is_some()
            {
                return Ok(Membership::Member);
            }
            let convs = txn.open_table(CONVERSATIONS).map_err(unavailable)?;
            let exists = convs.get(conv.as_str()).map_err(unavailable)?.is_some();
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

    async fn user_conversations(&self, user: &str) -> Result<Vec<ConvId>, StoreError> {
        let user = user.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(USER_CONVERSATIONS).map_err(unavailable)?;
            second_keys(&table, &user)
        })
        .await
    }

    async fn last_message(&self, conv: &str) -> Result<Option<Message>, StoreError> {
        let conv = conv.to_owned();
        self.read(move |txn| {
            let messages = txn.open_table(MESSAGES).map_err(unavailable)?;
            let last = messages
                .range((conv.as_str(), 0)..=(conv.as_str(), u64::MAX))
                .map_err(unavailable)?
                .next_back();
            last.map(|e| read_message(&conv, e.map_err(unavailable)?))
                .transpose()
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
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES).map_err(unavailable)?;
            let low = query.after.map_or(0, |a| a.saturating_add(1));
            let high = query.before.map_or(u64::MAX, |b| b.saturating_sub(1));
            if low > high || query.before == Some(0) {
                return Ok(Page {
                    messages: Vec::new(),
                    has_more: false,
                });
            }
            let range = table
                .range((conv.as_str(), low)..=(conv.as_str(), high))
                .map_err(unavailable)?;
            // With `after`, travel forward from it; otherwise travel back from `before` (or the newest).
            let mut messages = Vec::with_capacity(query.limit);
            let mut has_more = false;
            let mut take = |entry: Result<_, redb::StorageError>| -> Result<bool, StoreError> {
                if messages.len() == query.limit {
                    has_more = true;
                    return Ok(false);
                }
                messages.push(read_message(&conv, entry.map_err(unavailable)?)?);
                Ok(true)
            };
            if query.after.is_some() {
                for e in range {
                    if !take(e)? {
                        break;
                    }
                }
            } else {
                for e in range.rev() {
                    if !take(e)? {
                        break;
                    }
                }
                messages.reverse();
            }
            Ok(Page { messages, has_more })
        })
        .await
    }
}
