//! The store's log read back from any file (`wal::read_segment`, what recovery reads after a crash), and
//! each record it returns decoded as recovery decodes it (`LogRecord`, postcard).
//!
//! Checked, besides "no panic": the records returned, each appended again by the log's own writer, and the
//! damaged stretches skipped between them, in offset order, make exactly the bytes they were read from (a
//! prefix of the file); `ignored_bytes` counts the rest of the file up to its last non-zero byte; a record
//! that decodes encodes back to bytes that decode to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::fuzzing::{
    decode_log_record, encode_log_record, read_log_segment, write_log_segment,
};
use switchboard_fuzz::scratch_dir;

fuzz_target!(|data: &[u8]| {
    let path = scratch_dir().join("segment");
    std::fs::write(&path, data).unwrap();
    let contents = read_log_segment(&path).unwrap();

    // Walk the file: damage where a stretch starts, else the next record, framed as the writer frames it.
    let mut at = 0usize;
    let mut damage = contents.damaged.iter().peekable();
    let mut records = contents.records.iter();
    loop {
        if let Some(&&(offset, len)) = damage.peek() {
            if offset as usize == at {
                assert!(len > 0, "an empty damaged stretch");
                at += len as usize;
                damage.next();
                continue;
            }
        }
        let Some(record) = records.next() else { break };
        let framed = std::fs::read(
            write_log_segment(scratch_dir(), 1, std::slice::from_ref(record)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            framed,
            data[at..at + framed.len()],
            "a record read is not the bytes at its place"
        );
        at += framed.len();
    }
    assert!(
        damage.next().is_none(),
        "a damaged stretch after the last record"
    );
    let tail = &data[at..];
    let extent = tail.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    assert_eq!(contents.ignored_bytes, extent as u64);

    for raw in &contents.records {
        if let Ok((lsn, messages)) = decode_log_record(raw) {
            let again = encode_log_record(lsn, messages.clone()).unwrap();
            assert_eq!(decode_log_record(&again).unwrap(), (lsn, messages));
        }
    }
});
