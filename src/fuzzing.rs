//! Entry points for the `cargo fuzz` targets in `fuzz/` (`docs/fuzzing.md`): the few pieces of the server
//! that take untrusted bytes and are not public API otherwise. Not part of the library's interface.
//!
//! Each function here calls the code the server runs, never a copy of it.
//!
//! - The WebSocket reader's decoding is [`http::ws::FrameDecoder`](crate::http::ws::FrameDecoder), and the
//!   REST bodies are [`http::rest`](crate::http::rest)'s body types with their `check`s; both are public
//!   where they live. The config file is [`Settings::from_toml`](crate::config::Settings::from_toml).
//! - The embedded store's log, private to the store, is reached through this module: segments are written
//!   with the store's own `wal::Wal` and read back as recovery reads them, and a record is encoded as the
//!   store's writer does and decoded as recovery does.

use std::io;
use std::path::{Path, PathBuf};

use switchboard_actors::store::{Message, StoreError};

use crate::store::embedded::{wal, LogRecord};

/// What reading a log segment back gives (see the store's `wal::Wal::read_all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogContents {
    /// Every good record's payload, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes after the last good record up to the last non-zero byte: a torn tail, ignored.
    pub ignored_bytes: u64,
    /// Stretches (offset, length) skipped because good records follow them: damage.
    pub damaged: Vec<(u64, u64)>,
}

/// Create the segment whose first record carries `first_lsn` in `dir`, append each payload as the store's
/// writer appends a record (framed, `fdatasync`ed), and return the segment's path.
pub fn write_log_segment(dir: &Path, first_lsn: u64, payloads: &[Vec<u8>]) -> io::Result<PathBuf> {
    let mut log = wal::Wal::create(dir, first_lsn)?;
    for payload in payloads {
        log.append(payload)?;
    }
    Ok(wal::segment_path(dir, first_lsn))
}

/// Read the segment at `path` back as recovery does.
pub fn read_log_segment(path: &Path) -> io::Result<LogContents> {
    let wal::Contents {
        records,
        ignored_bytes,
        damaged,
    } = wal::read_segment(path)?;
    Ok(LogContents {
        records,
        ignored_bytes,
        damaged,
    })
}

/// The bytes the store's writer logs for one record.
pub fn encode_log_record(lsn: u64, messages: Vec<Message>) -> Result<Vec<u8>, StoreError> {
    LogRecord { lsn, messages }.encode()
}

/// A log record's lsn and messages, decoded as recovery decodes them.
pub fn decode_log_record(raw: &[u8]) -> Result<(u64, Vec<Message>), StoreError> {
    let LogRecord { lsn, messages } = LogRecord::decode(raw)?;
    Ok((lsn, messages))
}
