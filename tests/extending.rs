//! Behaviours on a real node over real sockets: the examples' word filter, dice bot and audit trail, the
//! hooks' verdicts (connect, join, message, delivery) and their isolation (a panic or a hook over its budget
//! fails one send, the conversation goes on), arrival order kept across hooks that wait, and the HTTP hook
//! against an HTTP server the test runs, failing closed and open.

mod common;

#[path = "../examples/behaviours/audit.rs"]
mod audit;
#[path = "../examples/behaviours/dice_bot.rs"]
mod dice_bot;
#[path = "../examples/behaviours/word_filter.rs"]
mod word_filter;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::Client;
use serde_json::{json, Value};
use switchboard::behaviour::{
    async_trait, Behaviour, Connecting, Delivery, Disconnected, Incoming, MemberEvent, Message,
    MessageVerdict, PresenceChange, Rejection, Verdict,
};
use switchboard::testing::{Refused, TestNode};
use switchboard::{Config, Server, ServerBuilder};
use word_filter::{Mode, WordFilter};

async fn start(builder: ServerBuilder) -> TestNode {
    TestNode::start(builder).await.expect("node starts")
}

async fn client(node: &TestNode, user: &str) -> Client {
    Client::connect(node.addr(), &node.token(user)).await
}

/// The answer to the send `msg_id`: `ack` or `error`.
async fn answer(c: &mut Client, msg_id: &str) -> Value {
    loop {
        let f = c.frame().await;
        if (f["op"] == "ack" || f["op"] == "error") && f["msg_id"] == msg_id {
            return f;
        }
    }
}

/// A group of alice and bob, with a client each (bob's connected first, to hear all of alice's sends).
async fn alice_and_bob(node: &TestNode) -> (String, Client, Client) {
    let conv = node.group("alice", &["bob"]).await.unwrap();
    let bob = client(node, "bob").await;
    let alice = client(node, "alice").await;
    (conv, alice, bob)
}

/// Send these `(msg_id, body)` to `conv`, without waiting for answers.
async fn send_all(c: &mut Client, conv: &str, sends: &[(&str, &str)]) {
    for (msg_id, body) in sends {
        c.send_msg(conv, msg_id, body).await;
    }
}

/// The next `msg` frames are these `(seq, body)`, in order.
async fn expect_msgs(c: &mut Client, expected: &[(u64, &str)]) {
    for &(seq, body) in expected {
        let m = c.expect_op("msg").await;
        assert_eq!(
            (m["seq"].as_u64(), m["body"].as_str()),
            (Some(seq), Some(body)),
            "{m}"
        );
    }
}

/// Wait for a condition, polling.
async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_word_filter_refuses_a_message_which_then_takes_no_seq() {
    let filter = WordFilter::new(["darn"], Mode::Reject);
    let node = start(Server::builder().behaviour(filter)).await;
    let (conv, mut alice, mut bob) = alice_and_bob(&node).await;
    alice.send_msg(&conv, "m1", "hello").await;
    alice.send_msg(&conv, "m2", "you DARN thing").await;
    alice.send_msg(&conv, "m3", "bye").await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    let refused = answer(&mut alice, "m2").await;
    assert_eq!(refused["op"], "error");
    assert_eq!(refused["code"], "rejected");
    assert_eq!(answer(&mut alice, "m3").await["seq"], 2);
    expect_msgs(&mut bob, &[(1, "hello"), (2, "bye")]).await;
    // REST sends go through the same actor, so the same hook.
    let refused = node.try_send("alice", &conv, "r1", "darn").await.unwrap();
    assert_eq!(refused.unwrap_err().code, "rejected");
    let stored: Vec<Value> = node.history("alice", &conv).await.unwrap();
    assert_eq!(stored.len(), 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_word_filter_masks_what_is_stored_and_delivered() {
    let filter = WordFilter::new(["darn", "heck"], Mode::Mask);
    let node = start(Server::builder().behaviour(filter)).await;
    let (conv, mut alice, mut bob) = alice_and_bob(&node).await;
    alice.send_msg(&conv, "m1", "darn it, what the Heck").await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    let m = bob.expect_op("msg").await;
    assert_eq!(m["body"], "**** it, what the ****");
    assert_eq!(
        node.history("bob", &conv).await.unwrap()[0]["body"],
        m["body"]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dice_bot_answers_roll_and_help_where_it_is_a_member() {
    let node = start(Server::builder().behaviour(dice_bot::DiceBot::new("dicebot"))).await;
    let with_bot = node.group("alice", &["dicebot"]).await.unwrap();
    let without = node.group("alice", &["bob"]).await.unwrap();
    let mut alice = client(&node, "alice").await;
    alice.send_msg(&with_bot, "m1", "/roll 2d6").await;
    let roll = alice.expect_op("msg").await;
    assert_eq!(roll["from"], "dicebot");
    assert_eq!(roll["seq"], 2);
    let text = roll["body"].as_str().unwrap();
    let total: u32 = text
        .strip_prefix("alice rolled 2d6: ")
        .and_then(|t| t.rsplit_once(" = "))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or_else(|| panic!("not a roll: {text}"));
    assert!((2..=12).contains(&total), "{text}");
    alice.send_msg(&with_bot, "m2", "/help").await;
    let help = alice.expect_op("msg").await;
    assert_eq!(
        (help["from"].as_str(), help["body"].as_str()),
        (Some("dicebot"), Some(dice_bot::HELP))
    );
    // Where the bot is not a member it says nothing.
    alice.send_msg(&without, "m3", "/roll").await;
    assert_eq!(answer(&mut alice, "m3").await["seq"], 1);
    assert!(alice.silent_for(Duration::from_millis(500)).await);
    assert_eq!(node.history("alice", &without).await.unwrap().len(), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_has_every_stored_message_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let node = start(Server::builder().behaviour(audit::Audit::new(&path))).await;
    let conv = node.group("alice", &["bob"]).await.unwrap();
    let mut alice = client(&node, "alice").await;
    send_all(
        &mut alice,
        &conv,
        &[("m1", "one"), ("m2", "two"), ("m3", "three")],
    )
    .await;
    // A resend: the store answers with the original, and nothing new is stored.
    alice.send_msg(&conv, "m2", "two").await;
    for id in ["m1", "m2", "m3", "m2"] {
        assert_eq!(answer(&mut alice, id).await["op"], "ack");
    }
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    eventually("three audit lines", || lines().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = lines();
    let seen: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["seq"].as_u64().unwrap(), l["body"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [(1, "one"), (2, "two"), (3, "three")]);
    assert!(lines
        .iter()
        .all(|l| l["conv"] == conv.as_str() && l["from"] == "alice"));
    node.stop().await;
}

/// Panics on "boom", waits an hour on "slow", waits a little on "later", accepts the rest.
struct Fragile;

#[async_trait]
impl Behaviour for Fragile {
    async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
        match msg.body {
            "boom" => panic!("a bug in a behaviour"),
            "slow" => tokio::time::sleep(Duration::from_secs(3600)).await,
            b if b.ends_with("later") => tokio::time::sleep(Duration::from_millis(15)).await,
            _ => {}
        }
        MessageVerdict::Accept
    }
}

fn with_budget(ms: u64) -> ServerBuilder {
    let mut config = Config::for_data_dir("unused");
    config.hooks.message_budget = Duration::from_millis(ms);
    Server::builder().config(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behaviour_that_panics_or_hangs_fails_one_send_and_the_conversation_goes_on() {
    let node = start(with_budget(200).behaviour(Fragile)).await;
    let (conv, mut alice, mut bob) = alice_and_bob(&node).await;
    send_all(
        &mut alice,
        &conv,
        &[
            ("m1", "ok"),
            ("m2", "boom"),
            ("m3", "slow"),
            ("m4", "after"),
        ],
    )
    .await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    for id in ["m2", "m3"] {
        let failed = answer(&mut alice, id).await;
        assert_eq!(
            (failed["op"].as_str(), failed["code"].as_str()),
            (Some("error"), Some("behaviour_failed"))
        );
    }
    assert_eq!(answer(&mut alice, "m4").await["seq"], 2);
    expect_msgs(&mut bob, &[(1, "ok"), (2, "after")]).await;
    let metrics = node.metrics().await.unwrap();
    for kind in ["panic", "timeout"] {
        let line =
            format!("switchboard_behaviour_failures_total{{hook=\"on_message\",kind=\"{kind}\"}}");
        assert!(metrics.contains(&line), "{line} missing from /metrics");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_keep_their_order_when_some_hooks_wait() {
    let node = start(Server::builder().behaviour(Fragile)).await;
    let (conv, mut alice, mut bob) = alice_and_bob(&node).await;
    let bodies: Vec<String> = (1..=30)
        .map(|i| {
            if i % 3 == 0 {
                format!("{i} later")
            } else {
                format!("{i} now")
            }
        })
        .collect();
    for (i, body) in bodies.iter().enumerate() {
        alice.send_msg(&conv, &format!("m{}", i + 1), body).await;
    }
    for i in 1..=30u64 {
        let ack = answer(&mut alice, &format!("m{i}")).await;
        assert_eq!(ack["seq"], i, "{ack}");
    }
    let expected: Vec<(u64, &str)> = (1..).zip(bodies.iter().map(String::as_str)).collect();
    expect_msgs(&mut bob, &expected).await;
    node.stop().await;
}

/// Who connected with what, who left, who joined, and presence, as a behaviour saw them.
#[derive(Default)]
struct Seen {
    disconnected: Mutex<Vec<(String, Option<String>)>>,
    left: Mutex<Vec<String>>,
    presence: Mutex<Vec<(String, bool)>>,
}

struct Tag(String);

/// Refuses mallory's connections and membership, tags everyone else's connection.
struct Gate(Arc<Seen>);

#[async_trait]
impl Behaviour for Gate {
    async fn on_connect(&self, conn: &mut Connecting) -> Verdict {
        if conn.user == "mallory" {
            return Verdict::Reject(Rejection::new("mallory is banned"));
        }
        conn.attachments.insert(Tag(format!("tag-{}", conn.user)));
        Verdict::Accept
    }

    async fn on_disconnect(&self, conn: &Disconnected) {
        let tag = conn.attachments.get::<Tag>().map(|t| t.0.clone());
        self.0
            .disconnected
            .lock()
            .unwrap()
            .push((conn.user.clone(), tag));
    }

    async fn on_join(&self, event: &MemberEvent) -> Verdict {
        if event.user == "mallory" {
            return Verdict::Reject(Rejection::new("mallory is banned"));
        }
        Verdict::Accept
    }

    async fn on_leave(&self, event: &MemberEvent) {
        self.0.left.lock().unwrap().push(event.user.clone());
    }

    async fn on_presence(&self, change: &PresenceChange) {
        self.0
            .presence
            .lock()
            .unwrap()
            .push((change.user.clone(), change.online));
    }
}

fn http_status(e: tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
        other => panic!("not an HTTP refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_join_hooks_refuse_attach_and_observe() {
    let seen = Arc::new(Seen::default());
    let node = start(Server::builder().behaviour(Gate(seen.clone()))).await;
    let refused = Client::try_connect(node.addr(), &node.token("mallory")).await;
    assert_eq!(http_status(refused.err().expect("refused")), 403);
    let alice = client(&node, "alice").await;
    eventually("alice online", || {
        seen.presence
            .lock()
            .unwrap()
            .contains(&("alice".into(), true))
    })
    .await;
    alice.close().await;
    eventually("alice's farewell", || {
        !seen.disconnected.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        seen.disconnected.lock().unwrap()[0],
        ("alice".to_owned(), Some("tag-alice".to_owned()))
    );
    // Members listed at creation go through on_join too: a group or a DM with mallory is not created.
    for refused in [
        node.group("alice", &["bob", "mallory"]).await,
        node.dm("alice", "mallory").await,
    ] {
        let e = refused.expect_err("created with mallory in it");
        assert_eq!(
            e.downcast_ref::<Refused>(),
            Some(&Refused {
                status: 403,
                code: "rejected".into()
            })
        );
    }
    let conv = node.group("alice", &["bob"]).await.unwrap();
    let refused = node.add_member("alice", &conv, "mallory").await.unwrap();
    assert_eq!(
        (
            refused.clone().unwrap_err().status,
            refused.unwrap_err().code.as_str()
        ),
        (403, "rejected")
    );
    assert_eq!(
        node.add_member("alice", &conv, "carol").await.unwrap(),
        Ok(true)
    );
    let removed = reqwest::Client::new()
        .delete(format!(
            "http://{}/v1/conversations/{conv}/members/carol",
            node.addr()
        ))
        .bearer_auth(node.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    eventually("carol left", || {
        seen.left.lock().unwrap().as_slice() == ["carol"]
    })
    .await;
    node.stop().await;
}

/// Redacts what bob gets and hides it from carol.
struct NeedToKnow;

#[async_trait]
impl Behaviour for NeedToKnow {
    fn filters_delivery(&self) -> bool {
        true
    }

    fn on_deliver(&self, _msg: &Message, to: &str) -> Delivery {
        match to {
            "bob" => Delivery::Redact("[redacted]".into()),
            "carol" => Delivery::Skip,
            _ => Delivery::Deliver,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_is_filtered_per_recipient() {
    let node = start(Server::builder().behaviour(NeedToKnow)).await;
    let conv = node
        .group("alice", &["bob", "carol", "dave"])
        .await
        .unwrap();
    let mut bob = client(&node, "bob").await;
    let mut carol = client(&node, "carol").await;
    let mut dave = client(&node, "dave").await;
    let mut alice = client(&node, "alice").await;
    alice.send_msg(&conv, "m1", "the plan").await;
    alice.send_msg(&conv, "m2", "the other plan").await;
    assert_eq!(answer(&mut alice, "m2").await["seq"], 2);
    expect_msgs(&mut bob, &[(1, "[redacted]"), (2, "[redacted]")]).await;
    expect_msgs(&mut dave, &[(1, "the plan"), (2, "the other plan")]).await;
    assert!(carol.silent_for(Duration::from_millis(300)).await);
    // The sender's own connection gets its ack, not a copy.
    assert!(alice.silent_for(Duration::from_millis(100)).await);

    // What the filter hides cannot be read back from the store: a sync replays it filtered (and still
    // ends at the last seq read), and so does REST history.
    for (c, expect) in [
        (&mut bob, vec![(1, "[redacted]"), (2, "[redacted]")]),
        (&mut carol, vec![]),
        (&mut dave, vec![(1, "the plan"), (2, "the other plan")]),
    ] {
        c.send(json!({"op":"sync","conv":conv,"after_seq":0})).await;
        let mut replayed = Vec::new();
        let synced = loop {
            let f = c.frame().await;
            match f["op"].as_str() {
                Some("msg") => replayed.push((
                    f["seq"].as_u64().unwrap(),
                    f["body"].as_str().unwrap().to_owned(),
                )),
                Some("synced") => break f,
                _ => {}
            }
        };
        let expect: Vec<(u64, String)> = expect.iter().map(|(q, b)| (*q, b.to_string())).collect();
        assert_eq!(replayed, expect);
        assert_eq!(synced["last_seq"], 2, "{synced}");
    }
    let bodies = |page: Vec<Value>| -> Vec<String> {
        page.iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        bodies(node.history("bob", &conv).await.unwrap()),
        ["[redacted]", "[redacted]"]
    );
    assert!(node.history("carol", &conv).await.unwrap().is_empty());
    assert_eq!(
        bodies(node.history("dave", &conv).await.unwrap()),
        ["the plan", "the other plan"]
    );
    node.stop().await;
}

/// The HTTP hook's service: refuses mallory, refuses "forbidden", shouts "shout", stalls on "stall".
async fn hook_service() -> Receiver {
    Receiver::start(|_, req| {
        let body = req["body"].as_str().unwrap_or_default();
        match req["hook"].as_str() {
            Some("connect") if req["user"] == "mallory" => {
                Reply::json(json!({"result": "reject", "reason": "not today"}))
            }
            Some("message") if body.contains("forbidden") => {
                Reply::json(json!({"result": "reject", "reason": "not that"}))
            }
            Some("message") if body.starts_with("shout") => {
                Reply::json(json!({"result": "rewrite", "body": body.to_uppercase()}))
            }
            Some("message") if body == "stall" => {
                Reply::json(json!({"result": "accept"})).after(Duration::from_secs(3))
            }
            _ => Reply::json(json!({"result": "accept"})),
        }
    })
    .await
}

fn hooked(url: String, fail_open: bool) -> ServerBuilder {
    let mut config = Config::for_data_dir("unused");
    config.hooks.url = Some(url);
    config.hooks.timeout = Duration::from_millis(300);
    config.hooks.fail_open = fail_open;
    Server::builder().config(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_hook_decides_connects_and_messages_and_fails_closed() {
    let service = hook_service().await;
    let node = start(hooked(service.url(), false)).await;
    let refused = Client::try_connect(node.addr(), &node.token("mallory")).await;
    assert_eq!(http_status(refused.err().expect("refused")), 403);
    let (conv, mut alice, mut bob) = alice_and_bob(&node).await;
    send_all(
        &mut alice,
        &conv,
        &[
            ("m1", "hello"),
            ("m2", "forbidden words"),
            ("m3", "shout this"),
            ("m4", "stall"),
        ],
    )
    .await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    assert_eq!(answer(&mut alice, "m2").await["code"], "rejected");
    assert_eq!(answer(&mut alice, "m3").await["seq"], 2);
    assert_eq!(answer(&mut alice, "m4").await["code"], "behaviour_failed");
    expect_msgs(&mut bob, &[(1, "hello"), (2, "SHOUT THIS")]).await;
    let asked = service.bodies();
    let message = asked
        .iter()
        .find(|r| r["hook"] == "message" && r["msg_id"] == "m1")
        .expect("m1 asked");
    assert_eq!(
        (
            message["conv"].as_str(),
            message["from"].as_str(),
            message["body"].as_str()
        ),
        (Some(conv.as_str()), Some("alice"), Some("hello"))
    );
    assert!(asked
        .iter()
        .any(|r| r["hook"] == "connect" && r["user"] == "bob"));
    let metrics = node.metrics().await.unwrap();
    assert!(
        metrics.contains("switchboard_behaviour_failures_total{hook=\"on_message\",kind=\"http\"}")
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_hook_can_fail_open() {
    let service = hook_service().await;
    let node = start(hooked(service.url(), true)).await;
    let conv = node.group("alice", &["bob"]).await.unwrap();
    let mut alice = client(&node, "alice").await;
    alice.send_msg(&conv, "m1", "stall").await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    // A hook that cannot be reached at all lets clients in too.
    let gone = start(hooked("http://127.0.0.1:9/hook".into(), true)).await;
    let conv = gone.group("alice", &["bob"]).await.unwrap();
    let mut alice = client(&gone, "alice").await;
    alice.send_msg(&conv, "m1", "hello").await;
    assert_eq!(answer(&mut alice, "m1").await["seq"], 1);
    gone.stop().await;
    node.stop().await;
}
