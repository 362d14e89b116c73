//! A bot that is a member of conversations and answers `/roll` and `/help`. It is a user like any other
//! (add `dicebot` to a group, or open a DM with it); it reads what is stored (`on_stored`, off the hot path,
//! in seq order) and answers through the node's `Api`, as a member — its answer goes through every
//! behaviour's `on_message` and is stored, acked and delivered like any message. Its `msg_id` is derived
//! from the command's seq, so an answer that is sent twice is stored once.
// `pub` for `tests/extending.rs`, which includes this module as the example does.
#![allow(unreachable_pub)]

use std::sync::OnceLock;

use rand::Rng;
use switchboard::behaviour::{async_trait, Api, Behaviour, Message};

/// The help text.
pub const HELP: &str = "commands: /roll [NdM] (default 1d6, at most 20d1000), /help";

/// Answers `/roll` and `/help` in the conversations it is a member of.
#[derive(Debug)]
pub struct DiceBot {
    name: String,
    api: OnceLock<Api>,
}

impl DiceBot {
    /// A bot whose user id is `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            api: OnceLock::new(),
        }
    }

    /// The bot's answer to `body`, if it is a command.
    pub fn answer(from: &str, body: &str) -> Option<String> {
        let mut words = body.split_whitespace();
        match words.next()? {
            "/help" => Some(HELP.to_owned()),
            "/roll" => {
                let spec = words.next().unwrap_or("1d6");
                let Some((n, sides)) = parse_dice(spec) else {
                    return Some(format!("{from}: I cannot roll {spec:?}; {HELP}"));
                };
                let mut rng = rand::rng();
                let rolls: Vec<u32> = (0..n).map(|_| rng.random_range(1..=sides)).collect();
                let total: u32 = rolls.iter().sum();
                let shown: Vec<String> = rolls.iter().map(u32::to_string).collect();
                Some(format!(
                    "{from} rolled {n}d{sides}: {} = {total}",
                    shown.join(" + ")
                ))
            }
            _ => None,
        }
    }
}

/// `NdM` (or `dM`): N dice of M sides, within 1–20 dice of 2–1000 sides.
fn parse_dice(spec: &str) -> Option<(u32, u32)> {
    let (n, sides) = spec.split_once('d')?;
    let n = if n.is_empty() { 1 } else { n.parse().ok()? };
    let sides = sides.parse().ok()?;
    ((1..=20).contains(&n) && (2..=1000).contains(&sides)).then_some((n, sides))
}

#[async_trait]
impl Behaviour for DiceBot {
    fn name(&self) -> &str {
        "dice_bot"
    }

    fn started(&self, api: &Api) {
        let _ = self.api.set(api.clone());
    }

    async fn on_stored(&self, msg: &Message) {
        if msg.from == self.name {
            return;
        }
        let (Some(answer), Some(api)) = (Self::answer(&msg.from, &msg.body), self.api.get()) else {
            return;
        };
        let msg_id = format!("{}-{}", self.name, msg.seq);
        // Not a member of this conversation: not our business (the send is refused with not_member).
        let _ = api.send(&msg.conv, &self.name, &msg_id, &answer).await;
    }
}
