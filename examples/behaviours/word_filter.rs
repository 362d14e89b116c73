//! A word filter: refuses messages with a banned word (`Mode::Reject`, the sender gets `rejected`), or
//! masks each banned word with asterisks (`Mode::Mask`, the masked text is what is stored and delivered).
//! It runs in `on_message`, in the conversation's actor before the store write, so it holds for every send —
//! WebSocket or REST, from any node — and a refused message takes no seq.
// `pub` for `tests/extending.rs`, which includes this module as the example does.
#![allow(unreachable_pub)]

use std::collections::HashSet;

use switchboard::behaviour::{async_trait, Behaviour, Incoming, MessageVerdict, Rejection};

/// What to do with a banned word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse the message.
    Reject,
    /// Replace each banned word with as many `*`.
    Mask,
}

/// Refuses or masks banned words (whole words, case-insensitively).
#[derive(Debug)]
pub struct WordFilter {
    banned: HashSet<String>,
    mode: Mode,
}

impl WordFilter {
    /// A filter of `words` acting by `mode`.
    pub fn new<'a>(words: impl IntoIterator<Item = &'a str>, mode: Mode) -> Self {
        Self {
            banned: words.into_iter().map(str::to_lowercase).collect(),
            mode,
        }
    }

    fn is_banned(&self, word: &str) -> bool {
        self.banned.contains(&word.to_lowercase())
    }

    /// `body` with each banned word masked; `None` when it has none.
    pub fn mask(&self, body: &str) -> Option<String> {
        let mut out = String::with_capacity(body.len());
        let mut word = String::new();
        let mut masked = false;
        let mut flush = |word: &mut String, out: &mut String| {
            if self.is_banned(word) {
                masked = true;
                out.extend(word.chars().map(|_| '*'));
            } else {
                out.push_str(word);
            }
            word.clear();
        };
        for c in body.chars() {
            if c.is_alphanumeric() {
                word.push(c);
            } else {
                flush(&mut word, &mut out);
                out.push(c);
            }
        }
        flush(&mut word, &mut out);
        masked.then_some(out)
    }
}

#[async_trait]
impl Behaviour for WordFilter {
    fn name(&self) -> &str {
        "word_filter"
    }

    async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
        match (self.mask(msg.body), self.mode) {
            (None, _) => MessageVerdict::Accept,
            (Some(_), Mode::Reject) => {
                MessageVerdict::Reject(Rejection::new("the message contains a banned word"))
            }
            (Some(masked), Mode::Mask) => MessageVerdict::Rewrite(masked),
        }
    }
}
