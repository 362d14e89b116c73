//! The HTTP hook: connect and message decisions made by a service in any language, over HTTP (like
//! Centrifugo's proxy). It is a [`Behaviour`] like any other, registered after the library's behaviours
//! when `hook_url` is set, so it runs where they run: `on_connect` at the edge of the node the client
//! connects to, `on_message` in the conversation's actor on its owner, before the store write.
//!
//! Each decision is one `POST` of JSON to `hook_url` (request and answer in `docs/extending.md`):
//!
//! - `{"hook":"connect","node":…,"user":…,"peer":…}`
//! - `{"hook":"message","node":…,"conv":…,"from":…,"msg_id":…,"body":…}`
//!
//! answered `{"result":"accept"}`, `{"result":"reject","reason":…}` or (messages only)
//! `{"result":"rewrite","body":…}`. A network error, a non-2xx status, an answer that is not one of these,
//! or no answer within `hook_timeout_ms` is a failure: with `hook_fail_open` the client is let through,
//! otherwise it gets `behaviour_failed`. Failures are counted as
//! `switchboard_behaviour_failures_total{hook,kind="http"}` and logged without the body.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use switchboard_actors::behaviour::{
    async_trait, Behaviour, Connecting, Hook, Incoming, MessageVerdict, Rejection, Verdict,
};
use switchboard_actors::protocol::ErrorCode;
use tracing::warn;

/// Behaviour budgets and the HTTP hook's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// Each behaviour's `on_message` budget.
    pub message_budget: Duration,
    /// Where decisions are `POST`ed; `None`: no HTTP hook.
    pub url: Option<String>,
    /// How long a decision may take.
    pub timeout: Duration,
    /// Accept when the hook fails (`true`) or refuse with `behaviour_failed` (`false`).
    pub fail_open: bool,
}

/// The HTTP hook as a behaviour.
#[derive(Debug)]
pub struct HttpHook {
    url: String,
    node: String,
    timeout: Duration,
    fail_open: bool,
    http: reqwest::Client,
}

/// What the hook's service answers.
#[derive(Debug, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer {
    Accept,
    Reject {
        #[serde(default)]
        reason: Option<String>,
    },
    Rewrite {
        body: String,
    },
}

impl HttpHook {
    /// A hook for node `node` posting to `url`.
    pub fn new(url: String, node: String, timeout: Duration, fail_open: bool) -> Self {
        Self {
            url,
            node,
            timeout,
            fail_open,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("a client with only a timeout"),
        }
    }

    async fn ask(&self, hook: Hook, request: serde_json::Value) -> Option<Answer> {
        let answer = async {
            let response = self.http.post(&self.url).json(&request).send().await?;
            response.error_for_status()?.json::<Answer>().await
        }
        .await;
        match answer {
            Ok(a) => Some(a),
            Err(e) => {
                metrics::counter!(
                    "switchboard_behaviour_failures_total",
                    "hook" => hook.as_str(),
                    "kind" => "http"
                )
                .increment(1);
                // reqwest's error names the URL and what failed, never the request body.
                warn!(hook = hook.as_str(), error = %e, fail_open = self.fail_open, "http hook failed");
                None
            }
        }
    }

    fn failed(&self, hook: Hook) -> Rejection {
        Rejection::with_code(
            ErrorCode::BehaviourFailed,
            format!("the {} hook did not answer; retry later", hook.as_str()),
        )
    }

    fn refused(reason: Option<String>) -> Rejection {
        Rejection::new(reason.unwrap_or_else(|| "refused by the server's hook".into()))
    }
}

#[async_trait]
impl Behaviour for HttpHook {
    fn name(&self) -> &str {
        "http_hook"
    }

    /// The HTTP timeout decides, not the node's budget (which is there for hooks that hang).
    fn budget(&self, hook: Hook) -> Option<Duration> {
        matches!(hook, Hook::Connect | Hook::Message).then(|| self.timeout + Duration::from_secs(1))
    }

    async fn on_connect(&self, conn: &mut Connecting) -> Verdict {
        let request = json!({
            "hook": "connect",
            "node": self.node,
            "user": conn.user,
            "peer": conn.peer.map(|p| p.to_string()),
        });
        match self.ask(Hook::Connect, request).await {
            Some(Answer::Accept) => Verdict::Accept,
            Some(Answer::Reject { reason }) => Verdict::Reject(Self::refused(reason)),
            // A rewrite means nothing for a connect: the service is confused, which is a failure.
            Some(Answer::Rewrite { .. }) | None if self.fail_open => Verdict::Accept,
            Some(Answer::Rewrite { .. }) | None => Verdict::Reject(self.failed(Hook::Connect)),
        }
    }

    async fn on_message(&self, msg: &Incoming<'_>) -> MessageVerdict {
        let request = json!({
            "hook": "message",
            "node": self.node,
            "conv": msg.conv,
            "from": msg.from,
            "msg_id": msg.msg_id,
            "body": msg.body,
        });
        match self.ask(Hook::Message, request).await {
            Some(Answer::Accept) => MessageVerdict::Accept,
            Some(Answer::Rewrite { body }) => MessageVerdict::Rewrite(body),
            Some(Answer::Reject { reason }) => MessageVerdict::Reject(Self::refused(reason)),
            None if self.fail_open => MessageVerdict::Accept,
            None => MessageVerdict::Reject(self.failed(Hook::Message)),
        }
    }
}
