//! The embedded store's write-ahead log: segment files `<data-dir>/wal-<first lsn>.log`, each an
//! append-only file of framed records.
//!
//! Only the store's writer thread appends (recovery reads before that thread starts; the applier thread
//! deletes segments whose records are all durable in fjall). It knows nothing about messages — a record is an
//! opaque payload. Each record is framed as
//!
//! ```text
//! length: u32 LE | crc32(length bytes ‖ payload): u32 LE | payload (length bytes)
//! ```
//!
//! A crash can leave a torn tail (a record cut short, or bytes the disk never wrote). Reading stops at the
//! first record that is short or fails its CRC, and ignores it and everything after it: a record is only
//! answered after [`Wal::append`] returned, which is after its `fdatasync`, so a torn record was never
//! answered. Recovery deletes every segment once their records are in fjall, and appends go to a new segment,
//! so no new record is ever written behind a torn one.
//!
//! A segment is normally **preallocated**: a background thread ([`Spares`]) writes a spare file of zeros,
//! makes it durable, and the writer renames it into place. Appending then overwrites blocks the file
//! already has, so each `fdatasync` writes the record and nothing else; appending to a growing file also
//! commits the file system's journal (its new size and blocks) every time — one more write and flush, and
//! a wake-up of the journal's kernel thread, per acknowledged group. A zeroed header fails its CRC, so
//! reading stops at the end of what was written; zeros there are not a torn tail.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes before each payload: its length and its CRC.
const HEADER: usize = 8;

/// A spare is written in chunks of this size, each made durable before the next, with [`SPARE_PAUSE`]
/// between them: an `fdatasync` of the writer's never waits behind more than one chunk of zeros (on a
/// virtual disk, a flush makes the host write out everything written before it). 64 MiB take ~2 s.
const SPARE_CHUNK: usize = 512 * 1024;
const SPARE_PAUSE: Duration = Duration::from_millis(10);

/// The records read back from a log.
pub(crate) struct Contents {
    /// Every good record's payload, in the order they were appended.
    pub(crate) records: Vec<Vec<u8>>,
    /// Bytes after the last good record up to the last non-zero byte (a torn tail), ignored. The zeros of
    /// preallocated space never written are not counted.
    pub(crate) ignored_bytes: u64,
    /// Stretches (offset, length) that are not good records but have good records after them: damage, not
    /// a torn tail (nothing is appended after a record whose append failed). Whether acknowledged messages
    /// were lost in them is for the reader to tell from the records' lsns.
    pub(crate) damaged: Vec<(u64, u64)>,
}

/// An open log file. Not shared: one owner appends, truncates and reads it.
pub(crate) struct Wal {
    file: File,
    /// Bytes written since the last truncate (the file's length when nothing failed and it was not
    /// preallocated).
    len: u64,
    /// Reused frame buffer (a record is written with one `write` call).
    buf: Vec<u8>,
    /// Whether the file was preallocated (a spare).
    preallocated: bool,
}

impl Wal {
    /// Create the segment whose first record will carry `first_lsn`, in `dir`, and make its directory entry
    /// durable. A segment of that name left by an earlier run is replaced (recovery has read it already).
    pub(crate) fn create(dir: &Path, first_lsn: u64) -> io::Result<Self> {
        let path = segment_path(dir, first_lsn);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.sync_all()?;
        sync_dir(&path)?;
        Ok(Self {
            file,
            len: 0,
            buf: Vec::new(),
            preallocated: false,
        })
    }

    /// Make `spare` the segment whose first record will carry `first_lsn` (replacing an empty segment of
    /// that name, if any), and make its directory entry durable.
    pub(super) fn from_spare(dir: &Path, first_lsn: u64, spare: Spare) -> io::Result<Self> {
        let path = segment_path(dir, first_lsn);
        std::fs::rename(&spare.path, &path)?;
        sync_dir(&path)?;
        let mut file = spare.file;
        file.seek(SeekFrom::Start(0))?;
        Ok(Self {
            file,
            len: 0,
            buf: Vec::new(),
            preallocated: true,
        })
    }

    /// Whether appends overwrite preallocated space (until they pass its end) rather than grow the file.
    pub(super) fn preallocated(&self) -> bool {
        self.preallocated
    }

    /// Open an existing segment to read it back.
    fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            len,
            buf: Vec::new(),
            preallocated: false,
        })
    }

    /// The log's length in bytes.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Read every good record of the file ([`parse`]).
    pub(super) fn read_all(&mut self) -> io::Result<Contents> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(parse(&bytes))
    }

    /// Append one record and `fdatasync` the file. When this returns `Ok`, the record survives a crash.
    /// After an error the file's tail is unknown (the record may or may not be there): the caller must not
    /// append again before the log has been read back and truncated (that is, before a restart).
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record over 4 GiB"))?;
        let len_bytes = len.to_le_bytes();
        self.buf.clear();
        self.buf.extend_from_slice(&len_bytes);
        self.buf
            .extend_from_slice(&checksum(&len_bytes, payload).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.file.write_all(&self.buf)?;
        self.len += self.buf.len() as u64;
        self.file.sync_data()
    }
}

/// Every good record in a segment's bytes, in order. A stretch that is not a good record (short, or failing
/// its CRC) is skipped when a good record follows it, and listed in [`Contents::damaged`]; at the end of what
/// was written it is a torn tail ([`Contents::ignored_bytes`]). The zeros of preallocated space never
/// written are neither.
pub(super) fn parse(bytes: &[u8]) -> Contents {
    // A record starts before the last non-zero byte: its header's CRC is not all zeros.
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let mut contents = Contents {
        records: Vec::new(),
        ignored_bytes: 0,
        damaged: Vec::new(),
    };
    let mut at = 0;
    while at < end {
        if let Some(payload) = record_at(bytes, at) {
            contents.records.push(payload.to_vec());
            at += HEADER + payload.len();
            continue;
        }
        match (at + 1..end).find(|&next| record_at(bytes, next).is_some()) {
            Some(next) => {
                contents.damaged.push((at as u64, (next - at) as u64));
                at = next;
            }
            None => {
                contents.ignored_bytes = (end - at) as u64;
                break;
            }
        }
    }
    contents
}

/// The payload of the record starting at `at`, if a whole one with a good CRC is there (zeros never are:
/// the CRC of a zero length is not zero).
fn record_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let payload = bytes.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    (checksum(&header[..4], payload) == crc).then_some(payload)
}

/// A durable file of zeros, ready to become a segment ([`Wal::from_spare`]).
pub(super) struct Spare {
    file: File,
    path: PathBuf,
}

/// The thread that keeps one spare ready: it prepares one at start, and another each time the last is
/// taken. It runs at idle priority. Dropping this stops it (within a chunk) and deletes a spare not taken.
pub(super) struct Spares {
    want: Option<mpsc::Sender<()>>,
    ready: mpsc::Receiver<Spare>,
    thread: Option<JoinHandle<()>>,
}

impl Spares {
    /// Start preparing spares of `bytes` in `dir` (`<dir>/wal-spare-<n>.tmp`, not segments until taken),
    /// after deleting those an earlier run left.
    pub(super) fn start(dir: &Path, bytes: u64) -> io::Result<Self> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_spare)
            {
                std::fs::remove_file(&path)?;
            }
        }
        let (want, wanted) = mpsc::channel();
        let (made, ready) = mpsc::channel();
        let dir = dir.to_owned();
        let thread = super::priority::spawn_idle("store-spares", move || {
            // Each spare has a name of its own: the last one taken may not be renamed yet.
            let mut n = 0u64;
            while wanted.recv().is_ok() {
                n += 1;
                let path = dir.join(format!("{SPARE_PREFIX}{n}{SPARE_SUFFIX}"));
                match prepare_spare(&path, bytes, &wanted) {
                    Ok(Some(spare)) => {
                        if made.send(spare).is_err() {
                            break;
                        }
                    }
                    // Stopped while preparing.
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, path = %path.display(),
                                "could not preallocate the store's next log segment; the log grows its files instead");
                        let _ = std::fs::remove_file(&path);
                        break;
                    }
                }
            }
        })?;
        want.send(()).expect("the thread was just started");
        Ok(Self {
            want: Some(want),
            ready,
            thread: Some(thread),
        })
    }

    /// The spare, if one is ready; the next one is then prepared.
    pub(super) fn take(&mut self) -> Option<Spare> {
        let spare = self.ready.try_recv().ok()?;
        if let Some(want) = &self.want {
            let _ = want.send(());
        }
        Some(spare)
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.want = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        while let Ok(spare) = self.ready.try_recv() {
            let _ = std::fs::remove_file(&spare.path);
        }
    }
}

/// Write `bytes` of zeros to `path` (replacing what is there), durably, chunk by chunk; `None` when `stop`
/// disconnects meanwhile (the file is then deleted).
fn prepare_spare(path: &Path, bytes: u64, stop: &mpsc::Receiver<()>) -> io::Result<Option<Spare>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; SPARE_CHUNK];
    let mut written = 0u64;
    while written < bytes {
        if let Err(mpsc::TryRecvError::Disconnected) = stop.try_recv() {
            drop(file);
            std::fs::remove_file(path)?;
            return Ok(None);
        }
        let n = usize::try_from(bytes - written).map_or(SPARE_CHUNK, |left| left.min(SPARE_CHUNK));
        file.write_all(&zeros[..n])?;
        file.sync_data()?;
        written += n as u64;
        std::thread::sleep(SPARE_PAUSE);
    }
    file.sync_all()?;
    Ok(Some(Spare {
        file,
        path: path.to_owned(),
    }))
}

/// The segments in `dir`, by first lsn, oldest first.
pub(super) fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let lsn = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(lsn) = lsn {
            out.push((lsn, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Every good record of the segment at `path` (see [`Wal::read_all`]).
pub(crate) fn read_segment(path: &Path) -> io::Result<Contents> {
    Wal::open(path)?.read_all()
}

/// Delete the segments every record of which has an lsn ≤ `durable_lsn`: those followed by a segment that
/// starts at or before `durable_lsn + 1`. With `all`, the newest goes too (nothing appends to it any more).
pub(super) fn delete_durable(dir: &Path, durable_lsn: u64, all: bool) -> io::Result<()> {
    let segs = segments(dir)?;
    for (i, (_, path)) in segs.iter().enumerate() {
        let covered = match segs.get(i + 1) {
            Some((next_first, _)) => *next_first <= durable_lsn + 1,
            None => all,
        };
        if covered {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

const PREFIX: &str = "wal-";
const SUFFIX: &str = ".log";
/// A spare's name is `wal-spare-<n>.tmp` while it is prepared and until it is taken: not a segment's.
const SPARE_PREFIX: &str = "wal-spare-";
const SPARE_SUFFIX: &str = ".tmp";

fn is_spare(name: &str) -> bool {
    name.starts_with(SPARE_PREFIX) && name.ends_with(SPARE_SUFFIX)
}

/// The path of the segment whose first record carries `first_lsn`.
pub(crate) fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{first_lsn:020}{SUFFIX}"))
}

fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(payload);
    hasher.finalize()
}

/// Make a new file's directory entry durable (a no-op where directories cannot be opened).
fn sync_dir(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_in(dir: &tempfile::TempDir) -> (PathBuf, Wal) {
        let wal = Wal::create(dir.path(), 1).unwrap();
        (segment_path(dir.path(), 1), wal)
    }

    #[test]
    fn records_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut wal) = log_in(&dir);
        for payload in [&b"one"[..], b"", b"three"] {
            wal.append(payload).unwrap();
        }
        assert_eq!(wal.len(), 3 * HEADER as u64 + 8);
        drop(wal);
        let contents = read_segment(&path).unwrap();
        assert_eq!(
            contents.records,
            vec![b"one".to_vec(), vec![], b"three".to_vec()]
        );
        assert_eq!(contents.ignored_bytes, 0);
    }

    #[test]
    fn a_torn_tail_and_everything_after_it_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut wal) = log_in(&dir);
        wal.append(b"good").unwrap();
        let good_len = wal.len();
        wal.append(b"cut short").unwrap();
        wal.append(b"after the cut").unwrap();
        drop(wal);
        // Cut the second record in the middle of its payload.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(good_len + HEADER as u64 + 3).unwrap();
        drop(file);
        let contents = read_segment(&path).unwrap();
        assert_eq!(contents.records, vec![b"good".to_vec()]);
        assert_eq!(contents.ignored_bytes, HEADER as u64 + 3);
        assert!(
            contents.damaged.is_empty(),
            "a torn tail has nothing good after it"
        );
    }

    #[test]
    fn a_record_failing_its_crc_is_damage_when_good_records_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut wal) = log_in(&dir);
        wal.append(b"good").unwrap();
        let good_len = wal.len();
        wal.append(b"flipped").unwrap();
        wal.append(b"later").unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[good_len as usize + HEADER + 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let contents = read_segment(&path).unwrap();
        // What follows the damaged record is a good one: damage, skipped, not a torn tail.
        assert_eq!(contents.records, vec![b"good".to_vec(), b"later".to_vec()]);
        let flipped_len = (HEADER + b"flipped".len()) as u64;
        assert_eq!(contents.damaged, vec![(good_len, flipped_len)]);
        assert_eq!(contents.ignored_bytes, 0);
    }

    #[test]
    fn garbage_lengths_and_short_headers_are_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut wal) = log_in(&dir);
        wal.append(b"good").unwrap();
        drop(wal);
        for tail in [&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5][..], &[1, 0, 3]] {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.truncate(HEADER + 4);
            bytes.extend_from_slice(tail);
            std::fs::write(&path, &bytes).unwrap();
            let contents = read_segment(&path).unwrap();
            assert_eq!(contents.records, vec![b"good".to_vec()]);
            assert_eq!(contents.ignored_bytes, tail.len() as u64);
        }
    }

    /// A spare of `bytes`, prepared in `dir`.
    fn spare_in(dir: &Path, bytes: u64) -> Spare {
        let (_keep, stop) = mpsc::channel();
        prepare_spare(&dir.join("wal-spare-1.tmp"), bytes, &stop)
            .unwrap()
            .unwrap()
    }

    /// The spares in `dir`.
    fn spares_in(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| is_spare(e.as_ref().unwrap().file_name().to_str().unwrap()))
            .count()
    }

    #[test]
    fn appending_to_a_preallocated_segment_overwrites_its_zeros_without_growing_it() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 3 * SPARE_CHUNK as u64 + 100;
        let spare = spare_in(dir.path(), bytes);
        let mut wal = Wal::from_spare(dir.path(), 7, spare).unwrap();
        assert!(wal.preallocated());
        assert_eq!(spares_in(dir.path()), 0);
        let path = segment_path(dir.path(), 7);
        for payload in [&b"one"[..], b"two"] {
            wal.append(payload).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        drop(wal);
        let contents = read_segment(&path).unwrap();
        assert_eq!(contents.records, vec![b"one".to_vec(), b"two".to_vec()]);
        // The zeros after the last record were never written: not a torn tail.
        assert_eq!(contents.ignored_bytes, 0);
        assert_eq!(segments(dir.path()).unwrap(), vec![(7, path)]);
    }

    #[test]
    fn a_torn_record_in_preallocated_space_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::from_spare(dir.path(), 1, spare_in(dir.path(), 4096)).unwrap();
        wal.append(b"good").unwrap();
        let good_len = wal.len();
        wal.append(b"torn in the middle").unwrap();
        drop(wal);
        // The disk wrote the record's first 11 bytes; the rest are still the spare's zeros.
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[good_len as usize + 11..].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let contents = read_segment(&path).unwrap();
        assert_eq!(contents.records, vec![b"good".to_vec()]);
        assert_eq!(contents.ignored_bytes, 11);
    }

    #[test]
    fn spares_are_prepared_one_after_another_and_one_not_taken_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        // One an earlier run left goes at start.
        std::fs::write(dir.path().join("wal-spare-1.tmp"), b"left over").unwrap();
        let mut spares = Spares::start(dir.path(), 2 * SPARE_CHUNK as u64).unwrap();
        let mut take = || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(spare) = spares.take() {
                    return spare;
                }
                assert!(std::time::Instant::now() < deadline, "no spare came");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let first = take();
        assert_eq!(first.file.metadata().unwrap().len(), 2 * SPARE_CHUNK as u64);
        drop(Wal::from_spare(dir.path(), 1, first).unwrap());
        // Taking the first asked for a second, under another name.
        let second = take();
        assert_eq!(
            second.file.metadata().unwrap().len(),
            2 * SPARE_CHUNK as u64
        );
        drop(Wal::from_spare(dir.path(), 2, second).unwrap());
        // And taking that one for a third, which dropping the handle deletes, ready or not.
        drop(spares);
        assert_eq!(spares_in(dir.path()), 0);
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn segments_are_listed_oldest_first_and_deleted_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        for first in [1, 5, 12] {
            Wal::create(dir.path(), first)
                .unwrap()
                .append(b"x")
                .unwrap();
        }
        std::fs::write(dir.path().join("switchboard.redb"), b"not a segment").unwrap();
        let firsts = |dir: &Path| {
            segments(dir)
                .unwrap()
                .into_iter()
                .map(|(l, _)| l)
                .collect::<Vec<_>>()
        };
        assert_eq!(firsts(dir.path()), vec![1, 5, 12]);
        // lsn 4 is durable: segment 1 (lsns 1..=4) may go; segment 5 holds lsn 5, which is not.
        delete_durable(dir.path(), 4, false).unwrap();
        assert_eq!(firsts(dir.path()), vec![5, 12]);
        // Everything durable, but the newest segment is still being appended to.
        delete_durable(dir.path(), 100, false).unwrap();
        assert_eq!(firsts(dir.path()), vec![12]);
        delete_durable(dir.path(), 100, true).unwrap();
        assert!(firsts(dir.path()).is_empty());
        assert!(dir.path().join("switchboard.redb").exists());
    }
}
