//! End to end on this host's `/dev/kvm`: the epoch writer guest (vmm's
//! `tests/guests/epoch_writer.S`) writes records into random pages continuously while the
//! primary's epoch engine replicates it to standbys over loopback TCP or Unix sockets, with a
//! shared key. The standby's committed memory and state must equal the primary's at the pause
//! of the epoch it committed last (the test path copies all memory inside that pause); a
//! standby killed mid-stream is dropped and, with none left, the VM runs on unprotected; a
//! standby without the key is refused.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicator::auth::ReplicationKey;
use replicator::compat::{Hello, StandbyProfile, PROTOCOL};
use replicator::conn::Conn;
use replicator::pairing::PairError;
use replicator::primary::vm::VmThread;
use replicator::primary::{pair_standby, Engine, EngineError, EngineOptions, NewStandby};
use replicator::standby::host::{Standby, StandbyError};
use replicator::standby::staging::StagingOptions;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{SerialConfig, VmConfig};
use vmm::epoch::{image_hash, memory_hash, EpochOptions};

const CTRL: u64 = 0x70_0000;
const MEM: u64 = 64 << 20;

/// Links vmm's `tests/guests/NAME.S` into an ELF kernel at 2 MiB.
fn tiny_elf(name: &str) -> PathBuf {
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, Ordering::SeqCst);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../vmm/tests/guests/{name}.S"));
    let dir = std::env::temp_dir().join(format!("vmr-repl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join(format!("{name}-{n}.o"));
    let elf = dir.join(format!("{name}-{n}.elf"));
    let ok = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("binutils (as) must be installed")
        .success()
        && Command::new("ld")
            .args(["-m", "elf_x86_64", "-e", "_start", "-Ttext=0x200000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .expect("binutils (ld) must be installed")
            .success();
    assert!(ok, "cannot build {name}");
    elf
}

/// The epoch writer guest in a 64 MiB VM, writing records continuously into `pages` pages.
fn writer(pages: u64) -> VmThread {
    let mut config = VmConfig::new(tiny_elf("epoch_writer"));
    config.mem_mib = MEM >> 20;
    config.allow_pvm = true;
    config.serial = SerialConfig::None;
    VmThread::spawn(config, move |vm| {
        let mem = vm.vm().memory();
        mem.write_obj(0u64, GuestAddress(CTRL)).unwrap();
        mem.write_obj(pages - 1, GuestAddress(CTRL + 32)).unwrap();
    })
    .expect("the epoch writer guest starts")
}

fn progress(vm: &VmThread) -> u64 {
    vm.vm.memory().read_obj(GuestAddress(CTRL + 24)).unwrap()
}

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL,
        vm_id: "writer".into(),
        term: 1,
        mem_bytes: MEM,
        vcpus: 1,
        tsc_khz: 0,
        cpu_features: Vec::new(),
        devices: Vec::new(),
        disk_sizes: Vec::new(),
    }
}

fn profile() -> StandbyProfile {
    StandbyProfile {
        mem_bytes: MEM,
        vcpus: 1,
        tsc_khz: 0,
        tsc_scaling: false,
        cpu_features: Vec::new(),
        devices: Vec::new(),
        disk_sizes: Vec::new(),
    }
}

fn key(byte: u8) -> ReplicationKey {
    ReplicationKey::new(vec![byte; 32]).unwrap()
}

type StandbyThread = JoinHandle<(Arc<Standby<Vec<u8>>>, Result<String, StandbyError>)>;

/// A standby with key `k` serving the primary at the other end of `conn`, on a thread.
fn standby_on(conn: Conn, k: u8) -> StandbyThread {
    std::thread::spawn(move || {
        let s = Arc::new(
            Standby::new(profile(), key(k), Vec::new(), StagingOptions::default()).unwrap(),
        );
        let r = s.serve(conn).map(|(_, end)| end.to_string());
        (s, r)
    })
}

/// A standby over a Unix socket pair; the primary's end paired with key `kp`, and a handle on
/// the standby's stream (to kill it).
fn unix_standby(
    name: &str,
    kp: u8,
    ks: u8,
) -> (Result<NewStandby, EngineError>, Conn, StandbyThread) {
    let (a, b) = UnixStream::pair().unwrap();
    let theirs = Conn::Unix(b);
    let kill = theirs.try_clone().unwrap();
    let standby = standby_on(theirs, ks);
    let paired = pair_standby(
        name,
        Conn::Unix(a),
        &key(kp),
        &hello(),
        Duration::from_secs(2),
    )
    .map(|(conn, link, ack)| NewStandby {
        name: name.into(),
        conn,
        link,
        ack,
    });
    (paired, kill, standby)
}

#[test]
fn the_standby_commits_the_primarys_memory_and_state_at_each_epoch() {
    let vm = writer(1024);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let standby: Arc<Standby<Vec<u8>>> =
        Arc::new(Standby::new(profile(), key(7), Vec::new(), StagingOptions::default()).unwrap());
    let serving = standby.clone();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        serving
            .serve(Conn::Tcp(stream))
            .map(|(_, end)| end.to_string())
    });
    let (conn, link, ack) =
        replicator::primary::connect_standby(&addr, &key(7), &hello(), Duration::from_secs(2))
            .unwrap();
    let mut engine = Engine::start(
        &vm,
        vec![NewStandby {
            name: addr.clone(),
            conn,
            link,
            ack,
        }],
        EngineOptions::default(),
    )
    .unwrap();
    let before = progress(&vm);
    let t0 = Instant::now();
    for round in 0..4 {
        let target = engine.next_epoch() + 10;
        while engine.next_epoch() < target {
            engine.step().unwrap();
        }
        // An epoch whose pause also copies all memory (the reference), then its commit: the
        // standby then holds exactly that epoch (the next one is not taken yet).
        let (n, reference) = engine
            .epoch_now(EpochOptions {
                reference_image: true,
                ..Default::default()
            })
            .unwrap();
        let replicator::primary::Reference { image, state } = reference.unwrap();
        assert!(
            engine.wait_committed(n, Duration::from_secs(5)),
            "epoch {n} not acknowledged"
        );
        let committed = standby.committed();
        assert_eq!(committed.committed_epoch(), n, "round {round}");
        assert_eq!(
            committed.committed_state(),
            &state[..],
            "state of epoch {n}"
        );
        assert_eq!(
            memory_hash(committed.memory().guest_memory()),
            image_hash(&image),
            "the committed memory differs from the primary's at epoch {n}"
        );
    }
    let elapsed = t0.elapsed();
    let metrics = engine.metrics().lock().unwrap().clone();
    eprintln!("{elapsed:?} for {} epochs; {metrics:?}", metrics.epochs);
    assert!(metrics.protected);
    assert_eq!(metrics.last_committed_epoch, engine.committed_epoch());
    assert!(metrics.dirty_pages > 0 && metrics.bytes_sent > 0);
    assert!(progress(&vm) > before + 1000, "the guest did not run");
    engine.shutdown();
    server.join().unwrap().unwrap();
    vm.stop().unwrap();
}

#[test]
fn a_standby_killed_mid_stream_is_dropped_and_the_vm_goes_on_unprotected() {
    let vm = writer(256);
    let (a, kill_a, sa) = unix_standby("a", 3, 3);
    let (b, kill_b, sb) = unix_standby("b", 3, 3);
    let options = EngineOptions {
        standby_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let mut engine = Engine::start(&vm, vec![a.unwrap(), b.unwrap()], options).unwrap();
    while engine.next_epoch() <= 10 {
        engine.step().unwrap();
    }
    assert!(engine.wait_committed(10, Duration::from_secs(5)));
    let dropped = engine.metrics().lock().unwrap().dropped.clone();
    assert!(dropped.is_empty(), "{dropped:?}");
    // Standby a dies while epochs flow: b alone commits from then on.
    kill_a.shutdown();
    let t0 = Instant::now();
    while engine.metrics().lock().unwrap().standbys == 2 {
        assert!(t0.elapsed() < Duration::from_secs(5), "a was not dropped");
        engine.step().unwrap();
    }
    assert!(engine.is_protected());
    let next = engine.next_epoch();
    while engine.next_epoch() <= next + 5 {
        engine.step().unwrap();
    }
    assert!(engine.wait_committed(next + 5, Duration::from_secs(5)));
    // Then b dies: nobody is left, the VM goes on unprotected.
    kill_b.shutdown();
    let t0 = Instant::now();
    while engine.is_protected() {
        assert!(t0.elapsed() < Duration::from_secs(5), "b was not dropped");
        engine.step().unwrap();
    }
    let metrics = engine.metrics().lock().unwrap().clone();
    assert!(!metrics.protected);
    assert_eq!(metrics.standbys, 0);
    assert_eq!(metrics.dropped.len(), 2, "{:?}", metrics.dropped);
    let before = progress(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert!(progress(&vm) > before, "the guest stopped");
    engine.shutdown();
    for s in [sa, sb] {
        let (s, end) = s.join().unwrap();
        assert!(end.is_ok(), "{end:?}");
        assert!(s.committed().committed_epoch() >= 10);
    }
    vm.stop().unwrap();
}

#[test]
fn a_standby_that_stops_acknowledging_is_dropped_after_the_timeout() {
    let vm = writer(64);
    let (a, b) = UnixStream::pair().unwrap();
    // Pairs, then neither reads nor acknowledges.
    let mute = std::thread::spawn(move || {
        let conn = Conn::Unix(b);
        let reader = conn.try_clone().unwrap();
        let (link, _) =
            replicator::pairing::accept(reader, conn, &key(5), &profile(), (0, 0), None).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(link);
    });
    let (conn, link, ack) = pair_standby(
        "mute",
        Conn::Unix(a),
        &key(5),
        &hello(),
        Duration::from_millis(300),
    )
    .unwrap();
    let options = EngineOptions {
        standby_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let mut engine = Engine::start(
        &vm,
        vec![NewStandby {
            name: "mute".into(),
            conn,
            link,
            ack,
        }],
        options,
    )
    .unwrap();
    let t0 = Instant::now();
    while engine.is_protected() {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the mute standby was not dropped"
        );
        engine.step().unwrap();
    }
    let metrics = engine.metrics().lock().unwrap().clone();
    assert_eq!(metrics.last_committed_epoch, 0);
    assert!(metrics.dropped[0].contains("mute"), "{:?}", metrics.dropped);
    engine.shutdown();
    mute.join().unwrap();
    vm.stop().unwrap();
}

#[test]
fn a_standby_without_the_key_is_refused_on_both_ends() {
    let (paired, _, standby) = unix_standby("wrong-key", 1, 2);
    let err = paired.err().expect("paired without the key");
    assert!(
        matches!(
            err,
            EngineError::Pair {
                source: PairError::Auth(_),
                ..
            }
        ),
        "{err}"
    );
    let (s, end) = standby.join().unwrap();
    assert!(
        matches!(end, Err(StandbyError::Pair(PairError::Auth(_)))),
        "{end:?}"
    );
    assert_eq!(s.committed().committed_epoch(), 0);
}

#[test]
fn the_engine_runs_on_its_own_thread_at_its_period() {
    let vm = writer(256);
    let (a, _, standby) = unix_standby("a", 4, 4);
    let engine = Engine::start(&vm, vec![a.unwrap()], EngineOptions::default())
        .unwrap()
        .spawn()
        .unwrap();
    // The first epoch carries all memory; then epochs come at the period (10 ms).
    let t0 = Instant::now();
    while engine.metrics().epochs < 2 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no epoch");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (t1, first) = (Instant::now(), engine.metrics().epochs);
    std::thread::sleep(Duration::from_millis(500));
    assert!(engine.is_running());
    let metrics = engine.metrics();
    let rate = (metrics.epochs - first) as f64 / t1.elapsed().as_secs_f64();
    engine.stop().unwrap();
    eprintln!("{rate:.0} epochs/s: {metrics:?}");
    assert!(metrics.protected);
    assert!(rate >= 10.0, "{rate:.1} epochs/s");
    assert!(metrics.last_committed_epoch > 0);
    let (s, end) = standby.join().unwrap();
    assert!(end.is_ok(), "{end:?}");
    assert!(s.committed().committed_epoch() >= metrics.last_committed_epoch);
    vm.stop().unwrap();
}

/// A measurement, not a test: the pause and ack latency of the engine's epochs (one standby
/// over a Unix socket, the writer guest dirtying `pages` pages).
#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn engine_pause_and_ack_latency() {
    for pages in [256, 2560] {
        let vm = writer(pages);
        let (a, _, standby) = unix_standby("a", 4, 4);
        let mut engine = Engine::start(&vm, vec![a.unwrap()], EngineOptions::default()).unwrap();
        engine.step().unwrap();
        let (mut pauses, mut acks, mut dirty) = (Vec::new(), Vec::new(), 0);
        let t0 = Instant::now();
        for _ in 0..300 {
            engine.step().unwrap();
            let m = engine.metrics().lock().unwrap().clone();
            pauses.push(m.last_pause_us);
            acks.push(m.last_ack_latency_us);
            dirty += m.last_dirty_pages;
        }
        let rate = 300.0 / t0.elapsed().as_secs_f64();
        let m = engine.metrics().lock().unwrap().clone();
        engine.shutdown();
        standby.join().unwrap().1.unwrap();
        vm.stop().unwrap();
        let pct = |v: &mut Vec<u64>, p: f64| {
            v.sort_unstable();
            v[((v.len() - 1) as f64 * p) as usize]
        };
        println!(
            "pages {pages}: {rate:.0} epochs/s, {:.0} dirty pages/epoch; pause p50 {} us p99 {} \
             us max {} us; ack latency p50 {} us p99 {} us; bytes sent/raw {:.3}",
            dirty as f64 / 300.0,
            pct(&mut pauses, 0.5),
            pct(&mut pauses, 0.99),
            pauses.last().unwrap(),
            pct(&mut acks, 0.5),
            pct(&mut acks, 0.99),
            m.bytes_sent as f64 / m.bytes_raw as f64,
        );
    }
}
