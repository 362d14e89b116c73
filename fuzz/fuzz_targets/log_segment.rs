//! The store's log read back from any file (`wal::read_segment`, what recovery reads after a crash), and
//! each record it returns decoded as recovery decodes it (`LogRecord`, postcard).
//!
//! Checked, besides "no panic": the records returned, appended again by the log's own writer, make exactly
//! the bytes they were read from (a prefix of the file); `ignored_bytes` counts the rest of the file up to its
//! last non-zero byte; a record that decodes encodes back to bytes that decode to the same record.
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

    let rewritten = write_log_segment(scratch_dir(), 1, &contents.records).unwrap();
    let prefix = std::fs::read(rewritten).unwrap();
    assert_eq!(
        prefix,
        data[..prefix.len()],
        "records read are not the file's prefix"
    );
    let tail = &data[prefix.len()..];
    let extent = tail.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    assert_eq!(contents.ignored_bytes, extent as u64);

    for raw in &contents.records {
        if let Ok((lsn, messages)) = decode_log_record(raw) {
            let again = encode_log_record(lsn, messages.clone()).unwrap();
            assert_eq!(decode_log_record(&again).unwrap(), (lsn, messages));
        }
    }
});
