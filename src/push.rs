//! Offline push: the node's [`Notifier`]. A conversation's write job hands it the members of each stored
//! batch who have no live connection anywhere; it queues the batch (bounded: a full queue drops it and counts
//! it, so a push never slows delivery), and one worker task sends one notification per user, at most
//! `per_user_per_minute` per user (governor's keyed limiter), to the sink:
//!
//! - **log** (the default): one debug line per notification;
//! - **webhook** (`--push-webhook URL`): `POST` JSON `{"user","conversation","sender","seq","count"}` plus
//!   `"preview"` (the newest message's body) only with `--push-preview`; retried with exponential backoff
//!   on a network error or a 5xx, never on a 4xx; at most [`IN_FLIGHT`] requests at once.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use switchboard_actors::notify::{Notifier, Offline};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

/// Most webhook requests in flight at once.
pub const IN_FLIGHT: usize = 32;
/// Attempts per notification (the first and the retries).
const ATTEMPTS: u32 = 5;
/// The first retry's wait; each next one doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How offline members are notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    /// The webhook to `POST` to; `None` logs instead.
    pub webhook: Option<String>,
    /// Include the newest message's body.
    pub preview: bool,
    /// Batches waiting for the worker; past that a batch is dropped.
    pub queue: usize,
    /// Notifications per user per minute; past that they are dropped.
    pub per_user_per_minute: NonZeroU32,
}

/// The node's notifier: queues batches for its worker.
#[derive(Debug)]
pub struct Pusher {
    queue: mpsc::Sender<Offline>,
}

fn count(outcome: &'static str, n: u64) {
    metrics::counter!("switchboard_push_total", "outcome" => outcome).increment(n);
}

impl Pusher {
    /// Start the worker on the current Tokio runtime.
    pub fn start(config: PushConfig) -> Arc<Self> {
        let (queue, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(Worker::new(config).run(rx));
        Arc::new(Self { queue })
    }
}

impl Notifier for Pusher {
    fn offline(&self, note: Offline) {
        let users = note.users.len() as u64;
        if self.queue.try_send(note).is_err() {
            count("dropped", users);
        }
    }
}

struct Worker {
    config: PushConfig,
    limiter: DefaultKeyedRateLimiter<String>,
    http: reqwest::Client,
    in_flight: Arc<Semaphore>,
}

impl Worker {
    fn new(config: PushConfig) -> Self {
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(config.per_user_per_minute)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client without TLS always builds"),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            config,
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Offline>) {
        let mut batches = 0u64;
        while let Some(note) = rx.recv().await {
            for user in &note.users {
                if self.limiter.check_key(user).is_err() {
                    count("rate_limited", 1);
                    continue;
                }
                self.send(user, &note).await;
            }
            batches += 1;
            if batches % 1024 == 0 {
                // Forget users whose quota is full again: the limiter's memory stays bounded.
                self.limiter.retain_recent();
            }
        }
    }

    async fn send(&self, user: &str, note: &Offline) {
        let Some(url) = &self.config.webhook else {
            debug!(user, conv_id = %note.conv, seq = note.latest.seq, "offline notification");
            count("logged", 1);
            return;
        };
        let mut body = json!({
            "user": user,
            "conversation": note.conv,
            "sender": note.latest.from,
            "seq": note.latest.seq,
            "count": note.count,
        });
        if self.config.preview {
            body["preview"] = json!(note.latest.body);
        }
        // Waits only when IN_FLIGHT requests are pending: the queue in front of the worker absorbs that.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let (http, url) = (self.http.clone(), url.clone());
        tokio::spawn(async move {
            let _permit = permit;
            post_with_retries(&http, &url, &body).await;
        });
    }
}

/// `POST` until a 2xx (sent), a 4xx (refused: not retried) or [`ATTEMPTS`] failures.
async fn post_with_retries(http: &reqwest::Client, url: &str, body: &serde_json::Value) {
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let failure = match http.post(url).json(body).send().await {
            Ok(r) if r.status().is_success() => return count("sent", 1),
            Ok(r) if r.status().is_client_error() => {
                warn!(status = %r.status(), "push webhook refused a notification");
                return count("failed", 1);
            }
            Ok(r) => r.status().to_string(),
            Err(e) => e.to_string(),
        };
        if attempt == ATTEMPTS {
            warn!(attempts = ATTEMPTS, error = %failure, "push webhook failed; notification dropped");
            return count("failed", 1);
        }
        count("retried", 1);
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}
