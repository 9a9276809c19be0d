//! The standby's staging of decoded messages: whatever arrives, a refused message never
//! changes the committed state, and a commit moves it exactly one epoch on.
//!
//! The input is a sequence of (length u16, message payload). An `EpochEnd` whose digest is all
//! zeros gets the true digest of what the target saw staged since the last `EpochBegin`, so
//! that the fuzzer reaches commits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::epoch::EpochDigest;
use replicator::standby::committed::{memory_digest, HeapMemory};
use replicator::standby::staging::{Received, Staging, StagingOptions};
use replicator::wire::Message;

const PAGES: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let mut s = Staging::new(
        HeapMemory::new(PAGES),
        vec![vec![0u8; 8192]],
        Vec::new(),
        (0, 0),
        StagingOptions {
            max_staged_bytes: 1 << 16,
            max_inbound_bytes: 1 << 12,
            sync_disks: false,
        },
    );
    let mut digest: Option<EpochDigest> = None;
    let mut input = data;
    while input.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([input[0], input[1]])).min(input.len() - 2);
        let payload = &input[2..2 + len];
        input = &input[2 + len..];
        let Ok(mut msg) = Message::decode(payload) else {
            continue;
        };
        match &mut msg {
            Message::EpochBegin { epoch, term } => digest = Some(EpochDigest::new(*epoch, *term)),
            Message::Pages(b) => {
                if let Some(d) = &mut digest {
                    b.iter().for_each(|(p, c)| d.page(p, c));
                }
            }
            Message::State(st) => {
                if let Some(d) = &mut digest {
                    d.state(st);
                }
            }
            Message::DiskWrite {
                disk,
                offset,
                bytes,
            } => {
                if let Some(d) = &mut digest {
                    d.disk_write(*disk, *offset, bytes);
                }
            }
            Message::EpochEnd {
                digest: announced, ..
            } if *announced == [0; 16] => {
                if let Some(d) = &digest {
                    *announced = d.finish();
                }
            }
            _ => {}
        }
        let before = (
            memory_digest(s.memory()),
            s.committed_state().to_vec(),
            s.disks()[0].clone(),
            s.committed_epoch(),
            s.committed_term(),
        );
        let name = msg.name();
        let result = s.receive(msg);
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!("{name}: {result:?}");
        }
        match result {
            Ok(Received::Committed { epoch, term }) => {
                assert_eq!(epoch, before.3 + 1);
                assert!(term >= before.4);
                assert_eq!(s.committed_epoch(), epoch);
                assert_eq!(s.open_epoch(), None);
            }
            Ok(_) => {
                assert_eq!(memory_digest(s.memory()), before.0);
                assert_eq!(s.committed_epoch(), before.3);
            }
            Err(_) => {
                assert!(!s.is_poisoned());
                let after = (
                    memory_digest(s.memory()),
                    s.committed_state().to_vec(),
                    s.disks()[0].clone(),
                    s.committed_epoch(),
                    s.committed_term(),
                );
                assert_eq!(after, before);
            }
        }
        assert!(s.inbound().all(|(e, _)| e > s.committed_epoch()));
    }
});
