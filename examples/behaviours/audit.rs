//! An audit trail: every stored message appended to a file as one JSON line
//! (`{"conv","seq","id","msg_id","from","body","ts"}`). It runs in `on_stored`, off the hot path, once per
//! new message (a resend that the store deduplicates is not written again), in seq order within each
//! conversation. In a cluster each node writes the messages of the conversations it owns.
// `pub` for `tests/extending.rs`, which includes this module as the example does.
#![allow(unreachable_pub)]

use std::path::{Path, PathBuf};

use switchboard::behaviour::{async_trait, Behaviour, Message};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Appends every stored message to a file.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl Audit {
    /// An audit trail in `path` (created, or appended to).
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_owned(),
            file: Mutex::new(None),
        }
    }

    async fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().await;
        if file.is_none() {
            let opened = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            *file = Some(opened);
        }
        let file = file.as_mut().expect("just opened");
        file.write_all(line).await?;
        file.flush().await
    }
}

#[async_trait]
impl Behaviour for Audit {
    fn name(&self) -> &str {
        "audit"
    }

    async fn on_stored(&self, msg: &Message) {
        let mut line = serde_json::to_vec(msg).expect("a message serialises");
        line.push(b'\n');
        if let Err(e) = self.append(&line).await {
            tracing::error!(path = %self.path.display(), error = %e, "audit line not written");
        }
    }
}
