//! One conformance suite for every `MessageStore` back end. Each back end provides a [`Backend`]; every
//! check runs against each: the embedded store, and Cassandra on a real node (`scripts/cassandra`).

mod common;

use std::sync::Arc;

use switchboard::store::cassandra::{CassandraConfig, CassandraStore};
use switchboard::store::embedded::EmbeddedStore;
use switchboard_actors::store::{
    Appended, ConversationInfo, ConversationKind, HistoryQuery, Membership, MessageStore,
    NewMessage, StoreError, MAX_MEMBERS,
};

/// A back end under test: open a store, and reopen it on the same data (a restart).
trait Backend {
    async fn open(&mut self) -> Arc<dyn MessageStore>;
    async fn reopen(&mut self) -> Arc<dyn MessageStore>;
}

struct Embedded {
    dir: tempfile::TempDir,
    current: Option<Arc<EmbeddedStore>>,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            current: None,
        }
    }
}

impl Backend for Embedded {
    async fn open(&mut self) -> Arc<dyn MessageStore> {
        let store = Arc::new(EmbeddedStore::open(self.dir.path()).unwrap());
        self.current = Some(store.clone());
        store
    }

    async fn reopen(&mut self) -> Arc<dyn MessageStore> {
        if let Some(old) = self.current.take() {
            old.shutdown();
        }
        self.open().await
    }
}

/// A fresh keyspace on the test Cassandra node.
struct Cassandra {
    config: CassandraConfig,
}

impl Cassandra {
    fn new() -> Self {
        Self {
            config: CassandraConfig::parse(&common::cassandra_url()).unwrap(),
        }
    }
}

impl Backend for Cassandra {
    async fn open(&mut self) -> Arc<dyn MessageStore> {
        Arc::new(CassandraStore::open(self.config.clone()).await.unwrap())
    }

    async fn reopen(&mut self) -> Arc<dyn MessageStore> {
        self.open().await
    }
}

fn info(id: &str, kind: ConversationKind, created_at: u64) -> ConversationInfo {
    ConversationInfo {
        id: id.into(),
        kind,
        name: None,
        created_by: "alice".into(),
        created_at,
    }
}

fn msg(from: &str, msg_id: &str, body: &str) -> NewMessage {
    NewMessage {
        id: format!("id-{msg_id}"),
        msg_id: msg_id.into(),
        from: from.into(),
        body: body.into(),
        ts: 1,
    }
}

async fn group(store: &dyn MessageStore, id: &str, members: &[&str]) {
    let members = members.iter().map(|s| s.to_string()).collect();
    assert!(
        store
            .create_conversation(info(id, ConversationKind::Group, 1), members)
            .await
            .unwrap()
            .1
    );
}

fn new_seqs(results: &[Appended]) -> Vec<u64> {
    results
        .iter()
        .filter_map(|r| {
            if let Appended::New(m) = r {
                Some(m.seq)
            } else {
                None
            }
        })
        .collect()
}

async fn seqs_and_dedupe(store: &dyn MessageStore) {
    group(store, "c1", &["alice", "bob"]).await;
    assert_eq!(store.last_seq("c1").await.unwrap(), 0);
    let r = store
        .append(
            "c1",
            1,
            vec![
                msg("alice", "a", "1"),
                msg("bob", "a", "2"),
                msg("alice", "b", "3"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        new_seqs(&r),
        vec![1, 2, 3],
        "same msg_id from another sender is another message"
    );
    // A resend in a later batch, and a repeat inside one batch, take no seq.
    let r = store
        .append(
            "c1",
            4,
            vec![
                msg("alice", "a", "changed"),
                msg("alice", "c", "4"),
                msg("alice", "c", "4 again"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(new_seqs(&r), vec![4]);
    match &r[0] {
        Appended::Duplicate(m) => {
            assert_eq!((m.seq, m.body.as_str(), m.id.as_str()), (1, "1", "id-a"))
        }
        other => panic!("expected duplicate, got {other:?}"),
    }
    assert!(matches!(&r[2], Appended::Duplicate(m) if m.seq == 4));
    assert_eq!(store.last_seq("c1").await.unwrap(), 4);
    // The fence: appending anywhere but last + 1 fails and writes nothing.
    for wrong in [1, 4, 6] {
        match store
            .append("c1", wrong, vec![msg("alice", "z", "x")])
            .await
        {
            Err(StoreError::SeqConflict { found, .. }) => assert_eq!(found, 4),
            other => panic!("expected a seq conflict at {wrong}, got {other:?}"),
        }
    }
    assert_eq!(store.last_seq("c1").await.unwrap(), 4);
    let dup_only = store
        .append("c1", 5, vec![msg("bob", "a", "again")])
        .await
        .unwrap();
    assert!(new_seqs(&dup_only).is_empty());
    assert_eq!(store.last_seq("c1").await.unwrap(), 4);
}

async fn paging_edges(store: &dyn MessageStore) {
    group(store, "p", &["alice"]).await;
    let q = |before, after, limit| HistoryQuery {
        before,
        after,
        limit,
    };
    let page = store.messages("p", q(None, None, 50)).await.unwrap();
    assert!(
        page.messages.is_empty() && !page.has_more,
        "empty conversation"
    );
    let batch: Vec<_> = (1..=100)
        .map(|i| msg("alice", &format!("m{i}"), &i.to_string()))
        .collect();
    store.append("p", 1, batch).await.unwrap();
    let seqs =
        |p: &switchboard_actors::store::Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let exact = store.messages("p", q(None, None, 100)).await.unwrap();
    assert_eq!(
        (seqs(&exact).len(), exact.has_more),
        (100, false),
        "exactly one page"
    );
    let newest = store.messages("p", q(None, None, 30)).await.unwrap();
    assert_eq!(
        (seqs(&newest), newest.has_more),
        ((71..=100).collect(), true)
    );
    let older = store.messages("p", q(Some(71), None, 30)).await.unwrap();
    assert_eq!((seqs(&older), older.has_more), ((41..=70).collect(), true));
    let first = store.messages("p", q(Some(31), None, 30)).await.unwrap();
    assert_eq!((seqs(&first), first.has_more), ((1..=30).collect(), false));
    let fwd = store.messages("p", q(None, Some(0), 30)).await.unwrap();
    assert_eq!((seqs(&fwd), fwd.has_more), ((1..=30).collect(), true));
    let last = store.messages("p", q(None, Some(70), 30)).await.unwrap();
    assert_eq!((seqs(&last), last.has_more), ((71..=100).collect(), false));
    let past = store.messages("p", q(None, Some(100), 30)).await.unwrap();
    assert!(past.messages.is_empty() && !past.has_more);
    let window = store.messages("p", q(Some(50), Some(40), 5)).await.unwrap();
    assert_eq!(
        (seqs(&window), window.has_more),
        ((41..=45).collect(), true)
    );
    let before_one = store.messages("p", q(Some(1), None, 30)).await.unwrap();
    assert!(before_one.messages.is_empty() && !before_one.has_more);
    let none = store.messages("p", q(Some(10), Some(9), 30)).await.unwrap();
    assert!(
        none.messages.is_empty() && !none.has_more,
        "an empty window"
    );
    assert!(store
        .messages("nope", q(None, None, 10))
        .await
        .unwrap()
        .messages
        .is_empty());
}

async fn conversations_members_and_inbox(store: &dyn MessageStore) {
    let dm = info("d1", ConversationKind::Dm, 10);
    let (created, is_new) = store
        .create_conversation(dm, vec!["ann".into(), "ben".into()])
        .await
        .unwrap();
    assert!(is_new);
    let again = info("d2", ConversationKind::Dm, 11);
    let (existing, is_new) = store
        .create_conversation(again, vec!["ben".into(), "ann".into()])
        .await
        .unwrap();
    assert!(!is_new, "one DM per pair, whichever side asks");
    assert_eq!(existing, created);
    assert!(store.conversation("d2").await.unwrap().is_none());

    group(store, "g1", &["ann", "cat"]).await;
    assert_eq!(store.members("g1").await.unwrap(), vec!["ann", "cat"]);
    assert_eq!(
        store.membership("g1", "cat").await.unwrap(),
        Membership::Member
    );
    assert_eq!(
        store.membership("g1", "ben").await.unwrap(),
        Membership::NotMember
    );
    assert_eq!(
        store.membership("zz", "ben").await.unwrap(),
        Membership::Unknown
    );
    assert!(store.add_member("g1", "ben").await.unwrap());
    assert!(!store.add_member("g1", "ben").await.unwrap());
    // Owners: recorded and dropped idempotently, sorted, and gone with the membership.
    assert!(store.owners("g1").await.unwrap().is_empty());
    assert!(store.set_owner("g1", "cat", true).await.unwrap());
    assert!(!store.set_owner("g1", "cat", true).await.unwrap());
    assert!(store.set_owner("g1", "ann", true).await.unwrap());
    assert_eq!(store.owners("g1").await.unwrap(), vec!["ann", "cat"]);
    assert!(store.set_owner("g1", "ann", false).await.unwrap());
    assert!(!store.set_owner("g1", "ann", false).await.unwrap());
    assert_eq!(store.owners("g1").await.unwrap(), vec!["cat"]);
    assert!(store.remove_member("g1", "cat").await.unwrap());
    assert!(
        store.owners("g1").await.unwrap().is_empty(),
        "a removed member is no owner"
    );
    assert!(!store.remove_member("g1", "cat").await.unwrap());
    assert_eq!(store.members("g1").await.unwrap(), vec!["ann", "ben"]);
    let mut carol = store.user_conversations("cat").await.unwrap();
    carol.sort();
    assert!(
        carol.is_empty(),
        "a removed member loses the conversation from the inbox: {carol:?}"
    );
    let mut bob = store.user_conversations("ben").await.unwrap();
    bob.sort();
    assert_eq!(bob, vec!["d1", "g1"]);

    // Inbox order: newest activity first.
    let mut m = msg("ann", "x", "latest");
    m.ts = 500;
    store.append("d1", 1, vec![m]).await.unwrap();
    let inbox = switchboard_actors::history::inbox(store, "ann")
        .await
        .unwrap();
    assert_eq!(
        inbox.iter().map(|(i, _)| i.id.as_str()).collect::<Vec<_>>(),
        vec!["d1", "g1"]
    );
    assert_eq!(inbox[0].1.as_ref().unwrap().body, "latest");
}

async fn large_group(store: &dyn MessageStore) {
    let members: Vec<String> = (0..MAX_MEMBERS).map(|i| format!("user{i:05}")).collect();
    let (_, created) = store
        .create_conversation(info("big", ConversationKind::Group, 1), members.clone())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(store.members("big").await.unwrap(), members);
    assert_eq!(
        store.membership("big", "user04999").await.unwrap(),
        Membership::Member
    );
    assert_eq!(
        store.user_conversations("user02500").await.unwrap(),
        vec!["big"]
    );
}

async fn unicode_bodies(store: &dyn MessageStore) {
    group(store, "u", &["zoë"]).await;
    let bodies = [
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🎉👩‍👩‍👧",
        "rtl עברית",
        "nul \u{0} inside",
        "",
    ];
    let batch: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| msg("zoë", &format!("u{i}"), b))
        .collect();
    store.append("u", 1, batch).await.unwrap();
    let page = store
        .messages(
            "u",
            HistoryQuery {
                before: None,
                after: Some(0),
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.messages
            .iter()
            .map(|m| m.body.as_str())
            .collect::<Vec<_>>(),
        bodies
    );
    assert!(page
        .messages
        .iter()
        .all(|m| m.from == "zoë" && m.conv == "u"));
}

async fn restart_recovery(backend: &mut impl Backend) {
    let store = backend.reopen().await;
    group(&*store, "r", &["alice"]).await;
    store
        .append(
            "r",
            1,
            (1..=7)
                .map(|i| msg("alice", &format!("r{i}"), "x"))
                .collect(),
        )
        .await
        .unwrap();
    drop(store);
    let store = backend.reopen().await;
    assert_eq!(
        store.last_seq("r").await.unwrap(),
        7,
        "the last seq is read back"
    );
    assert_eq!(store.members("r").await.unwrap(), vec!["alice"]);
    let r = store
        .append(
            "r",
            8,
            vec![msg("alice", "r3", "resent"), msg("alice", "r8", "x")],
        )
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Appended::Duplicate(m) if m.seq == 3),
        "the dedupe index survives a restart"
    );
    assert_eq!(new_seqs(&r), vec![8]);

    // Read positions only move forward, are kept per (user, conversation), and survive a restart.
    group(&*store, "r2", &["alice", "bob"]).await;
    assert!(store.read_positions("alice").await.unwrap().is_empty());
    store.set_read("r", "alice", 5).await.unwrap();
    store.set_read("r", "alice", 3).await.unwrap();
    store.set_read("r2", "alice", 0).await.unwrap();
    store.set_read("r2", "bob", 2).await.unwrap();
    drop(store);
    let store = backend.reopen().await;
    let alice = store.read_positions("alice").await.unwrap();
    assert_eq!(
        alice,
        [("r".to_owned(), 5), ("r2".to_owned(), 0)].into(),
        "a lower position does not move it back"
    );
    store.set_read("r", "alice", 8).await.unwrap();
    assert_eq!(store.read_positions("alice").await.unwrap()["r"], 8);
    assert_eq!(
        store.read_positions("bob").await.unwrap(),
        [("r2".to_owned(), 2)].into()
    );
}

async fn run_suite(mut backend: impl Backend) {
    let store = backend.open().await;
    seqs_and_dedupe(&*store).await;
    paging_edges(&*store).await;
    conversations_members_and_inbox(&*store).await;
    large_group(&*store).await;
    unicode_bodies(&*store).await;
    drop(store);
    restart_recovery(&mut backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    run_suite(Embedded::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_store_conforms() {
    run_suite(Cassandra::new()).await;
}

/// Concurrent appends to many conversations share commits (group commit) and all stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_group_commit_under_concurrency() {
    let mut backend = Embedded::new();
    let store = backend.open().await;
    for c in 0..50 {
        group(&*store, &format!("gc{c}"), &["alice"]).await;
    }
    let tasks = (0..50).map(|c| {
        let store = store.clone();
        tokio::spawn(async move {
            let conv = format!("gc{c}");
            for i in 0..20u64 {
                store
                    .append(&conv, i + 1, vec![msg("alice", &format!("{i}"), "x")])
                    .await
                    .unwrap();
            }
        })
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .for_each(Result::unwrap);
    for c in 0..50 {
        assert_eq!(store.last_seq(&format!("gc{c}")).await.unwrap(), 20);
    }
}
