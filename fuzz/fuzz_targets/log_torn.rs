//! The store's log after a crash, structure-aware: records of messages encoded as the store's writer
//! encodes them and appended by the log's own writer (`Wal::append`), then a tail that is
//! - garbage: reading gives exactly the records written, followed by what the garbage alone reads as
//!   (framing resumes where the good records end), its damaged stretches included;
//! - one more record cut short (a torn write): exactly the records written;
//! - one more record whose bytes from some offset on never reached the disk (zeros, maybe followed by the
//!   zeros of preallocated space): exactly the records written, plus that record only when the zeros were
//!   what it held anyway.
//!
//! Every record read back decodes, as recovery decodes it, to the lsn and messages written.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use switchboard::fuzzing::{
    decode_log_record, encode_log_record, read_log_segment, write_log_segment, LogContents,
};
use switchboard_actors::store::Message;
use switchboard_fuzz::scratch_dir;

#[derive(Arbitrary, Debug)]
struct Input {
    records: Vec<Record>,
    tail: Tail,
}

#[derive(Arbitrary, Debug, Clone)]
struct Record {
    lsn: u64,
    messages: Vec<Msg>,
}

#[derive(Arbitrary, Debug, Clone)]
struct Msg {
    conv: String,
    seq: u64,
    id: String,
    msg_id: String,
    from: String,
    body: String,
    ts: u64,
}

#[derive(Arbitrary, Debug)]
enum Tail {
    Garbage(Vec<u8>),
    Cut {
        record: Record,
        at: u32,
    },
    Zeroed {
        record: Record,
        from: u32,
        zeros: u16,
    },
}

impl Record {
    fn messages(&self) -> Vec<Message> {
        self.messages
            .iter()
            .map(|m| Message {
                conv: m.conv.clone(),
                seq: m.seq,
                id: m.id.clone(),
                msg_id: m.msg_id.clone(),
                from: m.from.clone(),
                body: m.body.clone(),
                ts: m.ts,
            })
            .collect()
    }

    fn encode(&self) -> Vec<u8> {
        encode_log_record(self.lsn, self.messages()).unwrap()
    }
}

fuzz_target!(|input: Input| {
    let dir = scratch_dir();
    let payloads: Vec<Vec<u8>> = input.records.iter().map(Record::encode).collect();
    let read = |bytes: &[u8]| -> LogContents {
        let path = dir.join("torn");
        std::fs::write(&path, bytes).unwrap();
        read_log_segment(&path).unwrap()
    };

    let (file, expected) = match &input.tail {
        Tail::Garbage(garbage) => {
            let path = write_log_segment(dir, 1, &payloads).unwrap();
            let mut file = std::fs::read(path).unwrap();
            let alone = read(garbage);
            file.extend_from_slice(garbage);
            let mut records = payloads.clone();
            records.extend(alone.records);
            let shift = (file.len() - garbage.len()) as u64;
            (
                file,
                LogContents {
                    records,
                    ignored_bytes: alone.ignored_bytes,
                    damaged: alone.damaged.iter().map(|&(o, l)| (o + shift, l)).collect(),
                },
            )
        }
        Tail::Cut { record, at }
        | Tail::Zeroed {
            record, from: at, ..
        } => {
            let good = std::fs::read(write_log_segment(dir, 1, &payloads).unwrap()).unwrap();
            let mut all = payloads.clone();
            all.push(record.encode());
            let mut file = std::fs::read(write_log_segment(dir, 1, &all).unwrap()).unwrap();
            let framed = file.len() - good.len();
            let at = good.len() + *at as usize % framed;
            let mut records = payloads.clone();
            match &input.tail {
                Tail::Zeroed { zeros, .. } => {
                    let whole = file[at..].iter().all(|b| *b == 0);
                    file[at..].fill(0);
                    file.resize(file.len() + usize::from(*zeros), 0);
                    if whole {
                        records.push(all.pop().unwrap());
                    }
                }
                _ => file.truncate(at),
            }
            let extent = if records.len() > payloads.len() {
                0
            } else {
                file[good.len()..]
                    .iter()
                    .rposition(|b| *b != 0)
                    .map_or(0, |i| i + 1)
            };
            (
                file,
                LogContents {
                    records,
                    ignored_bytes: extent as u64,
                    damaged: Vec::new(),
                },
            )
        }
    };
    assert_eq!(read(&file), expected);

    let mut written = input.records.clone();
    if let (Tail::Zeroed { record, .. }, true) =
        (&input.tail, expected.records.len() > payloads.len())
    {
        written.push(record.clone());
    }
    for (raw, record) in expected.records.iter().zip(&written) {
        assert_eq!(
            decode_log_record(raw).unwrap(),
            (record.lsn, record.messages())
        );
    }
});
