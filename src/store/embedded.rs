//! The embedded store: a fjall database (an LSM tree: one journal, memtables, sorted tables) in
//! `<data-dir>/store`.
//!
//! Writes from every conversation go to one writer thread, which takes all the jobs waiting (when it is busy,
//! also those that arrive within 250 µs of the first), applies them in one write transaction and commits
//! once — one journal append and one `fdatasync` for the lot (group commit) — before answering any of them.
//! A commit is visible to readers only after its `fdatasync`. Reads run on Tokio's blocking pool against
//! snapshots and never wait for the writer. See `docs/decisions/0010-embedded-store-fjall.md` for why fjall
//! (it replaced redb, decision 0003).

use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

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

/// The store's directory inside the data directory.
const STORE_DIR: &str = "store";

/// The file of the redb store this one replaced; a data directory holding it is refused, not ignored.
const OLD_REDB_FILE: &str = "switchboard.redb";

/// When the writer is busy, how long it gathers jobs after the first before committing them together.
/// A commit costs a journal write and an `fdatasync` whatever its size; on 2 cores, gathering for 250 µs
/// took commits from ~5 to ~15 jobs each at 10,000 DM msg/s and cut the send→deliver p99
/// (docs/benchmarks.md).
const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_micros(250);

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 1024;

/// Most conversations whose last seq the writer remembers; past it, it forgets them all and reads again.
const MAX_CACHED_SEQS: usize = 100_000;

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

/// Keys are byte strings that sort like the tuples they encode: every leading string field is written as
/// its length (u16, big-endian) and its bytes, so one field's end is never mistaken for another's; the last
/// field is written as is (a string's bytes, or a seq as u64 big-endian), so it sorts in its own order.
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

/// Every keyspace (fjall's name for a table: an LSM tree of its own, sharing the one journal).
#[derive(Clone)]
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
        })
    }
}

/// The fjall-backed store.
pub struct EmbeddedStore {
    db: SingleWriterTxDatabase,
    ks: Keyspaces,
    writer: Mutex<Option<(mpsc::Sender<Job>, JoinHandle<()>)>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Open (or create) the store in `dir/store` and start the writer thread.
    ///
    /// A directory that still holds the redb file of an older Switchboard is refused with an error that
    /// says so: starting empty beside it would look like lost history.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let old = dir.join(OLD_REDB_FILE);
        if old.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} is a store of an older Switchboard (redb), which this version does not read; \
                 move it away or use another data directory (docs/operations.md)",
                old.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        let db = SingleWriterTxDatabase::builder(dir.join(STORE_DIR))
            .open()
            .map_err(unavailable)?;
        let ks = Keyspaces::open(&db)?;
        let (tx, rx) = mpsc::channel();
        let (writer_db, writer_ks) = (db.clone(), ks.clone());
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(&writer_db, &writer_ks, &rx))
            .map_err(unavailable)?;
        Ok(Self {
            db,
            ks,
            writer: Mutex::new(Some((tx, handle))),
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
        f: impl FnOnce(&Snapshot, &Keyspaces) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (db, ks) = (self.db.clone(), self.ks.clone());
        tokio::task::spawn_blocking(move || f(&db.read_tx(), &ks))
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
fn write_loop(db: &SingleWriterTxDatabase, ks: &Keyspaces, rx: &mpsc::Receiver<Job>) {
    // Jobs in the last group: a writer that committed one job at a time is idle, and commits at once.
    let mut last_group = 1;
    // The last seq of each conversation written lately. Every write goes through this thread, so it is
    // exact; it saves the append's seq fence a reverse scan of the messages tree.
    let mut last_seqs = LastSeqs::default();
    while let Ok(first) = rx.recv() {
        let gather = if last_group > 1 {
            GROUP_WINDOW
        } else {
            std::time::Duration::ZERO
        };
        // Sleep through the window rather than wait on the channel: a writer waiting on it would be woken
        // (a futex wake and a context switch) by every job that arrives.
        if !gather.is_zero() {
            std::thread::sleep(gather);
        }
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter().take(MAX_GROUP - 1));
        let started = std::time::Instant::now();
        // The journal is appended and `fdatasync`ed before the transaction's writes reach the memtables, so
        // no reader sees a write that a crash could still lose.
        let mut txn = db.write_tx().durability(Some(PersistMode::SyncData));
        if last_seqs.0.len() > MAX_CACHED_SEQS {
            last_seqs.0.clear();
        }
        let outcome = jobs
            .iter()
            .map(|j| apply(&mut txn, ks, &mut last_seqs, &j.op))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|results| txn.commit().map(|()| results).map_err(unavailable));
        if outcome.is_err() {
            // The group's seqs were never written.
            last_seqs.0.clear();
        }
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

/// Apply one job inside the group's transaction. The outer `Result` aborts the whole group (an I/O
/// failure); the inner one is this job's own answer (a fence conflict, a corrupt record). Every job reads
/// what it needs before it writes, so a job that fails on its own has written nothing.
fn apply(
    txn: &mut WriteTransaction<'_>,
    ks: &Keyspaces,
    last_seqs: &mut LastSeqs,
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
            txn.remove(&ks.members, member);
            txn.remove(&ks.user_conversations, key::with_str(&[user], conv)?);
            Ok(WriteOutcome::Changed(removed))
        })(),
        WriteOp::Append {
            conv,
            first_seq,
            batch,
        } => append(txn, ks, last_seqs, conv, *first_seq, batch),
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

/// The writer's memory of each conversation's last seq (see [`write_loop`]).
#[derive(Default)]
struct LastSeqs(std::collections::HashMap<ConvId, u64>);

fn append(
    txn: &mut WriteTransaction<'_>,
    ks: &Keyspaces,
    last_seqs: &mut LastSeqs,
    conv: &str,
    first_seq: u64,
    batch: &[NewMessage],
) -> Result<WriteOutcome, StoreError> {
    let found = match last_seqs.0.get(conv) {
        Some(seq) => *seq,
        None => last_seq_in(txn, ks, conv)?,
    };
    if found + 1 != first_seq {
        return Err(StoreError::SeqConflict {
            expected: first_seq,
            found,
        });
    }
    // Read phase: what is already stored (a corrupt original fails the job before anything is written).
    let dedupe_keys = batch
        .iter()
        .map(|m| key::with_str(&[conv, &m.from], &m.msg_id))
        .collect::<Result<Vec<_>, _>>()?;
    let originals = dedupe_keys
        .iter()
        .map(|dk| {
            let Some(seq) = txn.get(&ks.dedupe, dk.as_slice()).map_err(unavailable)? else {
                return Ok(None);
            };
            let seq = decode_u64(&seq)?;
            let raw = txn
                .get(&ks.messages, key::with_seq(&[conv], seq)?)
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("dedupe entry without message"))?;
            let record: Record = postcard::from_bytes(&raw).map_err(corrupt)?;
            Ok(Some(record.into_message(conv, seq)))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let results = plan_append(conv, first_seq, batch.to_vec(), originals);
    // Encode every new record before the first write, then write.
    let encoded: Vec<(Vec<u8>, Vec<u8>, Vec<u8>, u64)> = results
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
            Ok((
                key::with_seq(&[conv], m.seq)?,
                postcard::to_stdvec(&record).map_err(corrupt)?,
                key::with_str(&[conv, &m.from], &m.msg_id)?,
                m.seq,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    let mut last = found;
    for (message_key, raw, dedupe_key, seq) in encoded {
        txn.insert(&ks.messages, message_key, raw);
        txn.insert(&ks.dedupe, dedupe_key, seq.to_be_bytes());
        last = seq;
    }
    match last_seqs.0.get_mut(conv) {
        Some(seq) => *seq = last,
        None => {
            last_seqs.0.insert(conv.to_owned(), last);
        }
    }
    Ok(WriteOutcome::Appended(results))
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
        self.read(move |snap, ks| read_conversation(snap, ks, &conv))
            .await
    }

    async fn members(&self, conv: &str) -> Result<Vec<UserId>, StoreError> {
        let conv = conv.to_owned();
        self.read(move |snap, ks| second_keys(snap, &ks.members, &conv))
            .await
    }

    async fn membership(&self, conv: &str, user: &str) -> Result<Membership, StoreError> {
        let (conv, user) = (conv.to_owned(), user.to_owned());
        self.read(move |snap, ks| {
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

    async fn user_conversations(&self, user: &str) -> Result<Vec<ConvId>, StoreError> {
        let user = user.to_owned();
        self.read(move |snap, ks| second_keys(snap, &ks.user_conversations, &user))
            .await
    }

    async fn last_message(&self, conv: &str) -> Result<Option<Message>, StoreError> {
        let conv = conv.to_owned();
        self.read(move |snap, ks| {
            let last = snap
                .prefix(&ks.messages, key::prefix(&[&conv])?)
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
        self.read(move |snap, ks| {
            let low = query.after.map_or(0, |a| a.saturating_add(1));
            let high = query.before.map_or(u64::MAX, |b| b.saturating_sub(1));
            if low > high || query.before == Some(0) {
                return Ok(Page {
                    messages: Vec::new(),
                    has_more: false,
                });
            }
            let range = snap.range(
                &ks.messages,
                key::with_seq(&[&conv], low)?..=key::with_seq(&[&conv], high)?,
            );
            // With `after`, travel forward from it; otherwise travel back from `before` (or the newest).
            let mut messages = Vec::with_capacity(query.limit);
            let mut has_more = false;
            let mut take = |entry: fjall::Guard| -> Result<bool, StoreError> {
                if messages.len() == query.limit {
                    has_more = true;
                    return Ok(false);
                }
                messages.push(read_message(&conv, entry)?);
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
