//! The store writer's dedupe filter: which (conversation, sender, msg_id) keys surely have no message yet,
//! answered from memory.
//!
//! Every new message is checked for an earlier one with the same key (protocol.md: a `msg_id` is unique
//! forever, per sender and conversation), and the answer is "none" for all but a client's resend. Asking
//! fjall for that costs memtable lookups on the writer's thread, on every acknowledgement's path, and waits
//! on fjall's version lock whenever one of its idle-priority workers holds it. The filter answers "surely
//! none" for ~98 % of new keys without fjall: two Bloom filters, one of the keys fjall held when the store
//! opened (read by a scan in the background, at idle priority), one of the keys the writer planned since.
//! A Bloom filter has no false negatives, so a key in neither has no message. For any other key — one that
//! either filter may hold, or any key while the scan runs — the writer checks as before (its group, the
//! overlay, fjall): the answer stays exact.
//!
//! Each Bloom filter grows by adding a filter twice the size of the last, sized for a rate 0.85 times the
//! last's (scalable Bloom filters): the rate stays under 0.5 % / (1 − 0.85) ≈ 3.3 %, and is ~2 % after tens
//! of millions of keys. Memory: ~2 bytes a key. Past [`MAX_KEYS`] keys the filter turns itself off and frees
//! it, and every check goes to fjall again. See `docs/decisions/0014-store-writer-dedupe-filter.md`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use growable_bloom_filter::GrowableBloom;
use switchboard_actors::store::StoreError;

/// The false-positive rate each filter starts with (the share of new keys still checked in fjall).
const FALSE_POSITIVES: f64 = 0.005;

/// The keys the filter of keys planned since the start is first sized for; it doubles as it fills.
const RECENT_KEYS: usize = 1_000_000;

/// Past this many keys (about 100 MB of filters), the filter is turned off.
pub(super) const MAX_KEYS: usize = 50_000_000;

/// A scan of the stored keys: calls its argument with each key until that returns `false`.
pub(super) type Scan =
    Box<dyn FnOnce(&mut dyn FnMut(&[u8]) -> bool) -> Result<(), StoreError> + Send + 'static>;

/// What is known of the keys stored before the store opened.
enum AtOpen {
    /// The scan runs; its filter comes through the channel (which closes without one if it failed or
    /// found more than the limit).
    Scanning(mpsc::Receiver<GrowableBloom>),
    Ready(GrowableBloom),
    /// Too many keys, or the scan failed: every check goes to fjall.
    Off,
}

pub(super) struct DedupeFilter {
    at_open: AtOpen,
    /// The keys planned since the store opened.
    recent: GrowableBloom,
    max_keys: usize,
    stop: Arc<AtomicBool>,
    scanner: Option<JoinHandle<()>>,
}

impl DedupeFilter {
    /// Start scanning, in a thread at idle priority, the keys stored before now (`scan`, about
    /// `stored` of them); turn off past `max_keys` in all.
    pub(super) fn start(scan: Scan, stored: usize, max_keys: usize) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done, scanned) = mpsc::channel();
        let scanner = {
            let stop = stop.clone();
            super::priority::spawn_idle("store-dedupe", move || {
                let mut filter =
                    GrowableBloom::new(FALSE_POSITIVES, stored.min(max_keys).max(1_000));
                let mut too_many = false;
                let result = scan(&mut |key| {
                    filter.insert(key);
                    too_many = filter.len() > max_keys;
                    !too_many && !stop.load(Ordering::Relaxed)
                });
                match result {
                        Err(e) => tracing::warn!(error = %e,
                            "the store's dedupe filter could not read the stored keys; every dedupe check reads the store"),
                        Ok(()) if too_many => tracing::info!(max_keys,
                            "more stored messages than the store's dedupe filter holds; every dedupe check reads the store"),
                        Ok(()) if stop.load(Ordering::Relaxed) => {}
                        Ok(()) => {
                            let _ = done.send(filter);
                        }
                    }
            })?
        };
        Ok(Self {
            at_open: AtOpen::Scanning(scanned),
            recent: GrowableBloom::new(FALSE_POSITIVES, RECENT_KEYS),
            max_keys,
            stop,
            scanner: Some(scanner),
        })
    }

    /// Whether no message has `key` yet, surely; `false` when it may have one (then ask the store).
    pub(super) fn surely_new(&mut self, key: &[u8]) -> bool {
        if let AtOpen::Scanning(scanned) = &self.at_open {
            match scanned.try_recv() {
                Ok(filter) => self.at_open = AtOpen::Ready(filter),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => self.turn_off(),
            }
        }
        match &self.at_open {
            AtOpen::Ready(at_open) => !self.recent.contains(key) && !at_open.contains(key),
            AtOpen::Scanning(_) | AtOpen::Off => false,
        }
    }

    /// Note that a message has `key` now.
    pub(super) fn insert(&mut self, key: &[u8]) {
        if matches!(self.at_open, AtOpen::Off) {
            return;
        }
        self.recent.insert(key);
        if self.keys() > self.max_keys {
            tracing::info!(
                max_keys = self.max_keys,
                "the store's dedupe filter is full; every dedupe check reads the store from now on"
            );
            self.turn_off();
        }
    }

    /// The keys the filter holds (0 when off).
    pub(super) fn keys(&self) -> usize {
        match &self.at_open {
            AtOpen::Ready(at_open) => at_open.len() + self.recent.len(),
            AtOpen::Scanning(_) => self.recent.len(),
            AtOpen::Off => 0,
        }
    }

    fn turn_off(&mut self) {
        self.at_open = AtOpen::Off;
        self.recent = GrowableBloom::new(FALSE_POSITIVES, 1);
    }
}

impl Drop for DedupeFilter {
    /// Stop a scan still running, and wait for it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(scanner) = self.scanner.take() {
            let _ = scanner.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A scan of `keys` that first waits for `go`.
    fn scan_of(keys: Vec<Vec<u8>>, go: mpsc::Receiver<()>) -> Scan {
        Box::new(move |visit| {
            let _ = go.recv();
            for key in &keys {
                if !visit(key) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Wait until the scan is done: a key never stored is then surely new.
    fn wait_for_scan(filter: &mut DedupeFilter) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !filter.surely_new(b"never stored") {
            assert!(Instant::now() < deadline, "the scan never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn nothing_is_surely_new_until_the_scan_is_done_then_only_keys_never_seen_are() {
        let stored: Vec<Vec<u8>> = (0..5_000)
            .map(|i| format!("stored-{i}").into_bytes())
            .collect();
        let (go, wait) = mpsc::channel();
        let mut filter =
            DedupeFilter::start(scan_of(stored.clone(), wait), 5_000, MAX_KEYS).unwrap();
        filter.insert(b"planned");
        assert!(
            !filter.surely_new(b"fresh"),
            "answered before the scan finished"
        );
        go.send(()).unwrap();
        wait_for_scan(&mut filter);
        // No false negative, ever: every stored and every planned key may exist.
        assert!(stored.iter().all(|key| !filter.surely_new(key)));
        assert!(!filter.surely_new(b"planned"));
        // (A Bloom filter counts a key it may hold already as not inserted: a few are not counted.)
        assert!(
            (4_900..=5_001).contains(&filter.keys()),
            "{}",
            filter.keys()
        );
        // And most keys never seen are answered without the store.
        let fresh = (0..10_000)
            .filter(|i| filter.surely_new(format!("fresh-{i}").as_bytes()))
            .count();
        assert!(
            fresh > 9_900,
            "only {fresh} of 10,000 new keys were surely new"
        );
    }

    #[test]
    fn a_grown_filter_still_rules_out_most_new_keys() {
        let (go, wait) = mpsc::channel();
        let mut filter = DedupeFilter::start(scan_of(vec![], wait), 0, MAX_KEYS).unwrap();
        go.send(()).unwrap();
        wait_for_scan(&mut filter);
        // Three times what the filter of planned keys starts with: it has grown twice.
        for i in 0..3 * RECENT_KEYS as u64 {
            filter.insert(&i.to_le_bytes());
        }
        assert!((0..1_000u64).all(|i| !filter.surely_new(&(i * 2_999).to_le_bytes())));
        let fresh = (0..100_000u64)
            .filter(|i| filter.surely_new(&(u64::MAX - i).to_le_bytes()))
            .count();
        assert!(
            fresh > 98_500,
            "only {fresh} of 100,000 new keys were surely new"
        );
    }

    #[test]
    fn past_its_limit_the_filter_turns_off_and_every_key_goes_to_the_store() {
        // Too many stored keys: the scan gives up.
        let stored: Vec<Vec<u8>> = (0..100).map(|i| vec![i]).collect();
        let (go, wait) = mpsc::channel();
        let mut filter = DedupeFilter::start(scan_of(stored, wait), 100, 50).unwrap();
        go.send(()).unwrap();
        drop(filter.scanner.take().unwrap().join());
        assert!(!filter.surely_new(b"fresh"));
        assert_eq!(filter.keys(), 0);
        // Too many planned keys: the filter turns off at the limit.
        let (go, wait) = mpsc::channel();
        let mut filter = DedupeFilter::start(scan_of(vec![], wait), 0, 50).unwrap();
        go.send(()).unwrap();
        wait_for_scan(&mut filter);
        for i in 0..50u32 {
            filter.insert(&i.to_le_bytes());
        }
        assert!(filter.surely_new(b"fresh"));
        filter.insert(b"one too many");
        assert!(!filter.surely_new(b"fresh"));
        assert_eq!(filter.keys(), 0);
    }

    #[test]
    fn dropping_the_filter_stops_a_scan_in_progress() {
        let scan: Scan = Box::new(|visit| {
            let mut i = 0u64;
            while visit(&i.to_le_bytes()) {
                i += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(())
        });
        let filter = DedupeFilter::start(scan, 0, MAX_KEYS).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        drop(filter);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
