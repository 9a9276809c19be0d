//! How fast an epoch goes through the wire and the staging area (a measurement, not a timed
//! test): `cargo test -p replicator --release --test throughput -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use replicator::epoch::EpochWriter;
use replicator::standby::committed::HeapMemory;
use replicator::standby::staging::{Received, Staging, StagingOptions};
use replicator::wire::{Direction, FrameAuth, FrameReader, FrameWriter, CONNECTION_NONCE_LEN};
use vmm::vstate::memory::PAGE_SIZE;

const NONCE: [u8; CONNECTION_NONCE_LEN] = [1; CONNECTION_NONCE_LEN];
const KEY: &[u8] = &[2; 32];

fn random_page(seed: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_exact_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn epoch_throughput() {
    let pages = 25_600u64; // 100 MiB
    for (name, zero_every, level) in [
        ("random, zstd 1", 0, Some(1)),
        ("random, no zstd", 0, None),
        ("half zero pages, zstd 1", 2, Some(1)),
    ] {
        let mut w = FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
            level,
        );
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let start = Instant::now();
        let mut e = EpochWriter::begin(&mut w, 1, 1).unwrap();
        for p in 0..pages {
            e.page_with(p, |buf| {
                if zero_every == 0 || p % zero_every != 0 {
                    random_page(&mut seed, buf)
                }
            })
            .unwrap();
        }
        e.state(vec![7; 64 << 10]).unwrap();
        e.end().unwrap();
        let sent = w.bytes_sent();
        let bytes = w.into_inner().unwrap();
        let send = start.elapsed();

        let start = Instant::now();
        let mut r = FrameReader::new(
            &bytes[..],
            FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
        );
        let mut s: Staging<HeapMemory, Vec<u8>> = Staging::new(
            HeapMemory::new(pages),
            Vec::new(),
            Vec::new(),
            (0, 0),
            StagingOptions::default(),
        );
        loop {
            if let Received::Committed { .. } = s.receive(r.recv().unwrap()).unwrap() {
                break;
            }
        }
        let receive = start.elapsed();
        let raw = pages as f64 * PAGE_SIZE as f64;
        println!(
            "{name:>24}: 100 MiB epoch, send {:>6.1} ms ({:>6.0} MiB/s), receive+stage+commit {:>6.1} ms ({:>6.0} MiB/s), sent/raw {:.3}",
            send.as_secs_f64() * 1e3,
            raw / send.as_secs_f64() / (1 << 20) as f64,
            receive.as_secs_f64() * 1e3,
            raw / receive.as_secs_f64() / (1 << 20) as f64,
            sent as f64 / raw,
        );
    }
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn parts_throughput() {
    use hmac::{Hmac, KeyInit, Mac};
    let mut buf = vec![0u8; 100 << 20];
    let mut seed = 1u64;
    let start = Instant::now();
    random_page(&mut seed, &mut buf);
    let gen = start.elapsed();
    let start = Instant::now();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY).unwrap();
    mac.update(&buf);
    std::hint::black_box(mac.finalize());
    let hmac = start.elapsed();
    let start = Instant::now();
    let z = zstd::bulk::compress(&buf, 1).unwrap();
    let zstd = start.elapsed();
    let start = Instant::now();
    std::hint::black_box(buf.clone());
    let copy = start.elapsed();
    let mibs = |d: std::time::Duration| 100.0 / d.as_secs_f64();
    println!(
        "100 MiB random: generate {:.0} MiB/s, HMAC-SHA256 {:.0} MiB/s, zstd 1 {:.0} MiB/s ({} bytes), copy {:.0} MiB/s",
        mibs(gen),
        mibs(hmac),
        mibs(zstd),
        z.len(),
        mibs(copy)
    );
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn fanout_throughput() {
    use replicator::wire::{Fanout, FrameEncoder};
    // 32 MiB of guest pages, every other one zero (their numbers only go on the wire), the
    // others random, or with a random quarter (compressible, as most guest pages are).
    let pages = 8192usize;
    for random_part in [PAGE_SIZE, PAGE_SIZE / 4] {
        let mut memory = vec![0u8; pages * PAGE_SIZE];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for (p, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if p % 2 == 1 {
                random_page(&mut seed, &mut page[..random_part]);
            }
        }
        let link = |k: u8| {
            FrameWriter::new(
                Vec::with_capacity(64 << 20),
                FrameAuth::new(KEY, &[k; CONNECTION_NONCE_LEN], Direction::ToStandby),
                Some(1),
            )
        };
        for standbys in 1..=3u8 {
            // The best of five of each: the machine may be busy with other work.
            let (mut each, mut once) = (Duration::MAX, Duration::MAX);
            for _ in 0..5 {
                let mut links: Vec<_> = (0..standbys).map(link).collect();
                let start = Instant::now();
                for w in &mut links {
                    let mut e = EpochWriter::begin(w, 1, 1).unwrap();
                    fill(&mut e, &memory);
                    e.end().unwrap();
                }
                each = each.min(start.elapsed());
                let mut links: Vec<_> = (0..standbys).map(link).collect();
                let mut encoder = FrameEncoder::new(Some(1));
                let start = Instant::now();
                let mut fanout = Fanout::new(&mut encoder, links.iter_mut());
                let mut e = EpochWriter::begin(&mut fanout, 1, 1).unwrap();
                fill(&mut e, &memory);
                e.end().unwrap();
                assert!(fanout.finish().iter().all(Option::is_none));
                once = once.min(start.elapsed());
            }
            println!(
            "32 MiB epoch (half zero pages, the others {}/4 random, zstd 1) to {standbys} standby(s): encoded per link {:>6.1} ms, encoded once {:>6.1} ms ({:.2}x)",
            random_part * 4 / PAGE_SIZE,
            each.as_secs_f64() * 1e3,
            once.as_secs_f64() * 1e3,
            each.as_secs_f64() / once.as_secs_f64()
        );
        }
    }
}

/// The pages of `memory` and a 64 KiB state, as one epoch's content.
fn fill<S: replicator::wire::FrameSink>(e: &mut EpochWriter<'_, S>, memory: &[u8]) {
    for (p, page) in memory.chunks_exact(PAGE_SIZE).enumerate() {
        e.page(p as u64, page).unwrap();
    }
    e.state(vec![7; 64 << 10]).unwrap();
}
