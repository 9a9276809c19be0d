//! End to end on this host's `/dev/kvm`: the epoch writer guest (vmm's
//! `tests/guests/epoch_writer.S`) writes records into random pages continuously while the
//! primary's epoch engine replicates it to standbys over loopback TCP or Unix sockets, with a
//! shared key. The standby's committed memory and state must equal the primary's at the pause
//! of the epoch it committed last (the test path copies all memory inside that pause); a
//! standby killed mid-stream is dropped and, with none left, the VM runs on unprotected; a
//! standby without the key is refused. The committed epoch of a standby whose primary is gone
//! is written as a snapshot that restores and runs on, and promoted into a VM over the
//! committed memory that runs on from there.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicator::compat::{Hello, StandbyProfile};
use replicator::conn::Conn;
use replicator::pairing::PairError;
use replicator::primary::vm::VmThread;
use replicator::primary::{
    pair_standby, Engine, EngineError, EngineOptions, NewStandby, Reference, MAX_REST,
};
use replicator::standby::committed::{CommittedDisk, DiskImage};
use replicator::standby::host::{Standby, StandbyError};
use replicator::standby::staging::StagingOptions;
use vm_memory::GuestMemoryBackend;
use vmm::builder::restore_microvm;
use vmm::config::DiskConfig;
use vmm::devices::virtio::VirtioDeviceState;
use vmm::epoch::{image_hash, memory_hash, EpochOptions};
use vmm::microvm::MicroVm;
use vmm::migration::wire::{decode_payload, encode_payload};
use vmm::snapshot::{MicroVmState, SnapshotError};
use vmm::vstate::vcpu::ExitReason;

#[path = "support/guest.rs"]
mod guest;
use guest::{hello, key, profile, progress, progress_in, restore_options, writer_with, MEM};

/// The epoch writer guest in a 64 MiB VM, writing records continuously into `pages` pages.
fn writer(pages: u64) -> VmThread {
    writer_with_disks(pages, None, Vec::new())
}

/// [`writer`] with a root file system on the image `rootfs` and virtio-blk disks on the images
/// `disks` (the guest never touches them).
fn writer_with_disks(pages: u64, rootfs: Option<PathBuf>, disks: Vec<PathBuf>) -> VmThread {
    writer_with("repl", pages, |config| {
        config.rootfs = rootfs;
        config.disks = disks
            .into_iter()
            .map(|path| DiskConfig {
                path,
                read_only: false,
            })
            .collect();
    })
}

/// Runs `microvm` for `time` (its vCPUs started here); why it ended.
fn run_for(microvm: &mut MicroVm, time: Duration) -> ExitReason {
    let t0 = Instant::now();
    microvm
        .run_with(|m| {
            if t0.elapsed() >= time {
                m.run_state().request_exit(ExitReason::Stopped);
            }
        })
        .unwrap()
}

/// A sparse image of `bytes` at `path`.
fn image(path: &Path, bytes: u64) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    path.to_path_buf()
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

type Server = JoinHandle<Result<String, StandbyError>>;

/// The longest a standby's initial synchronisation (a copy of the 64 MiB VM, then its first
/// epochs) may take, on a machine busy with other tests.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// An engine replicating `vm` to `standby` with the default options: `standby` serves it over
/// a Unix socket pair on a thread, paired as "s" with key `k` and `hello`. The engine and the
/// serving thread (why it stopped).
fn replicate_to<D: CommittedDisk + Send + Sync + 'static>(
    vm: &VmThread,
    standby: &Arc<Standby<D>>,
    k: u8,
    hello: &Hello,
) -> (Engine, Server) {
    let (a, b) = UnixStream::pair().unwrap();
    let serving = standby.clone();
    let server =
        std::thread::spawn(move || serving.serve(Conn::Unix(b)).map(|(_, end)| end.to_string()));
    let (conn, link, ack) =
        pair_standby("s", Conn::Unix(a), &key(k), hello, Duration::from_secs(2)).unwrap();
    let engine = Engine::start(
        vm,
        vec![NewStandby {
            name: "s".into(),
            conn,
            link,
            ack,
        }],
        patient(),
    )
    .unwrap();
    (engine, server)
}

/// Engine options for tests of what is replicated, not of timeouts: a standby that acks late
/// on a machine busy with other tests (a clean clone's CI runs two labs beside them) is not
/// dropped.
fn patient() -> EngineOptions {
    EngineOptions {
        standby_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// An epoch whose pause also copies all memory (the reference), waited for until the standby
/// acknowledged it: its number and the reference.
fn reference_epoch(engine: &mut Engine) -> (u64, Reference) {
    let (n, reference) = engine
        .epoch_now(EpochOptions {
            reference_image: true,
            ..Default::default()
        })
        .unwrap();
    assert!(
        engine.wait_committed(n, Duration::from_secs(5)),
        "epoch {n} not acknowledged"
    );
    (n, reference.unwrap())
}

/// Ends `count` epochs.
fn step_epochs(engine: &mut Engine, count: u64) {
    let target = engine.next_epoch() + count;
    while engine.next_epoch() < target {
        engine.step().unwrap();
    }
}

/// Asserts that `standby` committed epoch `n` exactly as the primary's `reference` of it
/// (machine state and memory); `what` names the check.
fn assert_holds(standby: &Standby<Vec<u8>>, n: u64, reference: &Reference, what: &str) {
    let committed = standby.committed();
    assert_eq!(committed.committed_epoch(), n, "{what}");
    assert_eq!(
        committed.committed_state(),
        &reference.state[..],
        "{what}: state of epoch {n}"
    );
    assert_eq!(
        memory_hash(committed.memory().guest_memory()),
        image_hash(&reference.image),
        "{what}: the committed memory differs from the primary's at epoch {n}"
    );
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
    // The standby's copy of the VM (64 MiB) runs beside the epochs; then it takes them all.
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    let before = progress(&vm);
    let t0 = Instant::now();
    for round in 0..4 {
        step_epochs(&mut engine, 10);
        // An epoch whose pause also copies all memory (the reference), then its commit: the
        // standby then holds exactly that epoch (the next one is not taken yet).
        let (n, reference) = reference_epoch(&mut engine);
        assert_holds(&standby, n, &reference, &format!("round {round}"));
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
fn two_standbys_commit_the_same_epochs_from_one_encoding() {
    let vm = writer(1024);
    let standbys: Vec<Arc<Standby<Vec<u8>>>> = (0..2)
        .map(|_| {
            Arc::new(
                Standby::new(profile(), key(7), Vec::new(), StagingOptions::default()).unwrap(),
            )
        })
        .collect();
    let mut servers = Vec::new();
    let mut links = Vec::new();
    for (i, standby) in standbys.iter().enumerate() {
        let (a, b) = UnixStream::pair().unwrap();
        let serving = standby.clone();
        servers.push(std::thread::spawn(move || {
            serving.serve(Conn::Unix(b)).map(|(_, end)| end.to_string())
        }));
        let name = format!("s{i}");
        let (conn, link, ack) = pair_standby(
            &name,
            Conn::Unix(a),
            &key(7),
            &hello(),
            Duration::from_secs(2),
        )
        .unwrap();
        links.push(NewStandby {
            name,
            conn,
            link,
            ack,
        });
    }
    let mut engine = Engine::start(&vm, links, patient()).unwrap();
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    for round in 0..3 {
        step_epochs(&mut engine, 10);
        let (n, reference) = reference_epoch(&mut engine);
        for (i, standby) in standbys.iter().enumerate() {
            assert_holds(
                standby,
                n,
                &reference,
                &format!("standby {i}, round {round}"),
            );
        }
    }
    let metrics = engine.metrics().lock().unwrap().clone();
    assert!(metrics.protected && metrics.standbys == 2, "{metrics:?}");
    engine.shutdown();
    for server in servers {
        server.join().unwrap().unwrap();
    }
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
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    let next = engine.next_epoch();
    while engine.next_epoch() <= next + 10 {
        engine.step().unwrap();
    }
    assert!(engine.wait_committed(next + 10, Duration::from_secs(5)));
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
    // Pairs, then neither reads nor acknowledges, and keeps the link open far longer than the
    // engine may take to drop it: a drop seen is the timeout's, not the link's end.
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let mute = std::thread::spawn(move || {
        let conn = Conn::Unix(b);
        let reader = conn.try_clone().unwrap();
        let (link, _) =
            replicator::pairing::accept(reader, conn, &key(5), &profile(), (0, 0), None).unwrap();
        let _ = wait.recv_timeout(Duration::from_secs(60));
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
    // 300 ms allowed; the bound leaves room for a machine busy with other tests.
    while engine.is_protected() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the mute standby was not dropped"
        );
        engine.step().unwrap();
    }
    let metrics = engine.metrics().lock().unwrap().clone();
    assert_eq!(metrics.last_committed_epoch, 0);
    assert!(metrics.dropped[0].contains("mute"), "{:?}", metrics.dropped);
    engine.shutdown();
    done.send(()).unwrap();
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
fn a_resting_engine_ends_at_most_one_epoch_per_rest() {
    let vm = writer(256);
    let (a, _, standby) = unix_standby("resting", 4, 4);
    // Every epoch is followed by the longest rest: at most one epoch per MAX_REST, where the
    // 10-ms period alone would end ten.
    let options = EngineOptions {
        rest: 1e6,
        ..Default::default()
    };
    let engine = Engine::start(&vm, vec![a.unwrap()], options)
        .unwrap()
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while engine.metrics().last_committed_epoch == 0 {
        assert!(t0.elapsed() < SYNC_TIMEOUT, "not protected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (t1, first) = (Instant::now(), engine.metrics().epochs);
    std::thread::sleep(Duration::from_secs(1));
    let (elapsed, epochs) = (t1.elapsed(), engine.metrics().epochs - first);
    let most = (elapsed.as_secs_f64() / MAX_REST.as_secs_f64()).ceil() as u64 + 1;
    engine.stop().unwrap();
    assert!(
        epochs <= most,
        "{epochs} epochs in {elapsed:?}, resting {MAX_REST:?} after each"
    );
    let (_, end) = standby.join().unwrap();
    assert!(end.is_ok(), "{end:?}");
    vm.stop().unwrap();
}

#[test]
fn the_engine_runs_on_its_own_thread() {
    let vm = writer(256);
    let (a, _, standby) = unix_standby("a", 4, 4);
    let engine = Engine::start(&vm, vec![a.unwrap()], EngineOptions::default())
        .unwrap()
        .spawn()
        .unwrap();
    // Epochs come every 100 ms while the standby is copied, then at the period (10 ms).
    let t0 = Instant::now();
    while engine.metrics().epochs < 2 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no epoch");
        // The copy's progress never passes its total.
        let syncing = engine.metrics().syncing;
        assert!(
            syncing.iter().all(|p| p.copied_bytes <= p.total_bytes),
            "{syncing:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Epochs keep coming on the engine's own thread, nobody driving it. The rate is printed,
    // not asserted: on a loaded machine (parallel tests, builds) it is the scheduler's.
    let (t1, first) = (Instant::now(), engine.metrics().epochs);
    while engine.metrics().epochs < first + 20 {
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "epochs stopped at {}",
            engine.metrics().epochs
        );
        assert!(engine.is_running());
        std::thread::sleep(Duration::from_millis(10));
    }
    let rate = (engine.metrics().epochs - first) as f64 / t1.elapsed().as_secs_f64();
    // The standby's copy of the VM (64 MiB) may still be going on a busy machine.
    let t2 = Instant::now();
    while engine.metrics().last_committed_epoch == 0 {
        assert!(t2.elapsed() < SYNC_TIMEOUT, "nothing committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let metrics = engine.metrics();
    engine.stop().unwrap();
    eprintln!("{rate:.0} epochs/s (period 10 ms): {metrics:?}");
    assert!(metrics.protected);
    assert!(metrics.last_committed_epoch > 0);
    let (s, end) = standby.join().unwrap();
    assert!(end.is_ok(), "{end:?}");
    assert!(s.committed().committed_epoch() >= metrics.last_committed_epoch);
    vm.stop().unwrap();
}

#[test]
fn the_committed_epoch_becomes_a_snapshot_and_a_promoted_vm_that_run_on() {
    // Of two sizes: a restore opening them in the wrong order fails.
    const ROOT: u64 = 1 << 20;
    const DISK: u64 = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let primary_root = image(&dir.path().join("primary-root.img"), ROOT);
    let primary_disk = image(&dir.path().join("primary.img"), DISK);
    let standby_root = image(&dir.path().join("standby-root.img"), ROOT);
    let standby_disk = image(&dir.path().join("standby.img"), DISK);
    // The primary's images hold data between holes; the standby's start as something else:
    // the standby is given a copy of the primary's.
    {
        use std::os::unix::fs::FileExt;
        let root = std::fs::OpenOptions::new()
            .write(true)
            .open(&primary_root)
            .unwrap();
        root.write_all_at(&[0x5a; 4096], 0).unwrap();
        root.write_all_at(&[0xa5; 3 << 10], ROOT - (3 << 10))
            .unwrap();
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&primary_disk)
            .unwrap();
        disk.write_all_at(&vec![0x11; 1536 << 10], 512 << 10)
            .unwrap();
        std::fs::write(&standby_root, vec![0xee; ROOT as usize]).unwrap();
    }
    let vm = writer_with_disks(1024, Some(primary_root.clone()), vec![primary_disk.clone()]);
    let standby = Arc::new(
        Standby::new(
            StandbyProfile {
                disk_sizes: vec![ROOT, DISK],
                ..profile()
            },
            key(6),
            vec![
                DiskImage::open(&standby_root).unwrap(),
                DiskImage::open(&standby_disk).unwrap(),
            ],
            StagingOptions::default(),
        )
        .unwrap(),
    );

    // Nothing committed yet: no snapshot, nothing written, no promotion.
    let early = dir.path().join("early");
    let err = standby.write_snapshot(&early).unwrap_err();
    assert!(matches!(err, StandbyError::NothingCommitted), "{err}");
    assert!(!early.exists());
    let err = standby
        .promote(&restore_options())
        .err()
        .expect("promoted before any commit");
    assert!(matches!(err, StandbyError::NothingCommitted), "{err}");

    // Several epochs, the last with a reference image; then the primary is gone.
    let hello = Hello {
        disk_sizes: vec![ROOT, DISK],
        ..hello()
    };
    let (mut engine, server) = replicate_to(&vm, &standby, 6, &hello);
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    let next = engine.next_epoch();
    while engine.next_epoch() <= next + 5 {
        engine.step().unwrap();
    }
    let (n, Reference { image, state }) = reference_epoch(&mut engine);
    for (primary, standby) in [
        (&primary_root, &standby_root),
        (&primary_disk, &standby_disk),
    ] {
        assert!(
            std::fs::read(primary).unwrap() == std::fs::read(standby).unwrap(),
            "the standby's {} is not a copy of {}",
            standby.display(),
            primary.display()
        );
    }
    engine.shutdown();
    vm.stop().unwrap();
    server.join().unwrap().unwrap();
    let info = standby.info();
    assert_eq!(info.committed_epoch, n);
    assert_eq!(info.committed_term, 1);
    assert_eq!(info.open_epoch, None);
    assert!(!info.poisoned && !info.promoted);
    assert_eq!(info.mem_bytes, MEM);

    // The snapshot: exactly the committed epoch, its disk the standby's image.
    let snap = dir.path().join("snap");
    let t0 = Instant::now();
    let written = standby.write_snapshot(&snap).unwrap();
    let write_time = t0.elapsed();
    let loaded = vmm::snapshot::load(&snap).unwrap();
    assert_eq!(loaded.newest().meta.id, written.id);
    let mem = loaded.restore_memory().unwrap();
    assert_eq!(
        memory_hash(&mem),
        image_hash(&image),
        "the snapshot's memory is not the primary's at epoch {n}"
    );
    let saved = &loaded.newest().microvm;
    assert_eq!(saved.vcpus.len(), 1);
    assert_eq!(saved.config.disks.len(), 1);
    assert_eq!(saved.config.rootfs.as_ref(), Some(&standby_root));
    assert_eq!(saved.config.disks[0].path, standby_disk);
    let blocks: Vec<_> = saved
        .devices
        .virtio
        .iter()
        .filter_map(|m| match &m.device {
            VirtioDeviceState::Block(b) => Some(b.path.clone()),
            VirtioDeviceState::Net(_) => None,
        })
        .collect();
    assert_eq!(blocks, vec![standby_root.clone(), standby_disk.clone()]);
    // The state is the primary's at that epoch but for the disk's path.
    let mut expected: MicroVmState = decode_payload(&state).unwrap();
    assert_eq!(expected.config.rootfs.as_ref(), Some(&primary_root));
    assert_eq!(expected.config.disks[0].path, primary_disk);
    expected.config.rootfs = Some(standby_root.clone());
    expected.config.disks[0].path = standby_disk.clone();
    let mut standby_images = [&standby_root, &standby_disk].into_iter();
    for m in &mut expected.devices.virtio {
        if let VirtioDeviceState::Block(b) = &mut m.device {
            b.path = standby_images.next().unwrap().clone();
        }
    }
    assert_eq!(
        encode_payload(saved).unwrap(),
        encode_payload(&expected).unwrap()
    );

    // A directory that exists is refused and left as it was.
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    let err = standby.write_snapshot(&taken).unwrap_err();
    assert!(
        matches!(
            err,
            StandbyError::Snapshot {
                source: SnapshotError::Exists(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&taken).unwrap().count(), 0);
    let err = standby.write_snapshot(&snap).unwrap_err();
    assert!(matches!(err, StandbyError::Snapshot { .. }), "{err}");
    assert_eq!(
        vmm::snapshot::load(&snap).unwrap().newest().meta.id,
        written.id
    );
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "primary-root.img",
            "primary.img",
            "snap",
            "standby-root.img",
            "standby.img",
            "taken"
        ]
    );

    // Restored, the guest runs on from the committed epoch.
    let at_commit = progress_in(&mem);
    let t0 = Instant::now();
    let mut restored = restore_microvm(&loaded, &restore_options()).unwrap();
    let restore_time = t0.elapsed();
    assert_eq!(progress_in(restored.vm().memory()), at_commit);
    assert_eq!(
        run_for(&mut restored, Duration::from_secs(1)),
        ExitReason::Stopped
    );
    let ran = progress_in(restored.vm().memory());
    assert!(
        ran > at_commit + 1000,
        "the restored guest did not run on: {at_commit} -> {ran}"
    );
    drop(restored);

    // Promoted: the same epoch runs over the committed memory itself.
    let t0 = Instant::now();
    let mut promoted = standby.promote(&restore_options()).unwrap();
    let promote_time = t0.elapsed();
    assert!(std::ptr::eq(
        promoted.vm().memory().iter().next().unwrap().as_ptr(),
        standby
            .committed()
            .memory()
            .guest_memory()
            .iter()
            .next()
            .unwrap()
            .as_ptr()
    ));
    assert_eq!(progress_in(promoted.vm().memory()), at_commit);
    assert_eq!(promoted.config().rootfs.as_ref(), Some(&standby_root));
    assert_eq!(promoted.config().disks[0].path, standby_disk);
    assert_eq!(
        run_for(&mut promoted, Duration::from_secs(1)),
        ExitReason::Stopped
    );
    let ran = progress_in(promoted.vm().memory());
    assert!(
        ran > at_commit + 1000,
        "the promoted guest did not run on: {at_commit} -> {ran}"
    );
    drop(promoted);
    // The standby is done: no more epochs, snapshots or promotions.
    let info = standby.info();
    assert!(info.promoted);
    assert_eq!(info.committed_epoch, n);
    let err = standby
        .write_snapshot(&dir.path().join("late"))
        .unwrap_err();
    assert!(
        matches!(err, StandbyError::Promoted { epoch } if epoch == n),
        "{err}"
    );
    let err = standby
        .promote(&restore_options())
        .err()
        .expect("promoted twice");
    assert!(matches!(err, StandbyError::Promoted { .. }), "{err}");
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    let err = standby.serve(Conn::Unix(b)).unwrap_err();
    assert!(matches!(err, StandbyError::Promoted { .. }), "{err}");
    eprintln!(
        "epoch {n}: snapshot of {} pages written in {write_time:?}, restored in \
         {restore_time:?}; promoted in {promote_time:?}",
        written.pages
    );
}

#[test]
fn a_standby_without_the_vms_disk_is_refused_and_one_in_memory_cannot_be_opened() {
    const DISK: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let vm = writer_with_disks(64, None, vec![image(&dir.path().join("vm.img"), DISK)]);
    // A standby told of no disk, and one holding its disk in memory.
    let without: Arc<Standby<Vec<u8>>> =
        Arc::new(Standby::new(profile(), key(2), Vec::new(), StagingOptions::default()).unwrap());
    let in_memory: Arc<Standby<Vec<u8>>> = Arc::new(
        Standby::new(
            StandbyProfile {
                disk_sizes: vec![DISK],
                ..profile()
            },
            key(2),
            vec![vec![0; DISK as usize]],
            StagingOptions::default(),
        )
        .unwrap(),
    );
    let mut peers = Vec::new();
    let mut servers = Vec::new();
    for (name, standby, disks) in [
        ("without", &without, vec![]),
        ("in-memory", &in_memory, vec![DISK]),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let serving = standby.clone();
        servers.push(std::thread::spawn(move || {
            serving.serve(Conn::Unix(b)).map(|(_, end)| end.to_string())
        }));
        let hello = Hello {
            disk_sizes: disks,
            ..hello()
        };
        let (conn, link, ack) =
            pair_standby(name, Conn::Unix(a), &key(2), &hello, Duration::from_secs(2)).unwrap();
        peers.push(NewStandby {
            name: name.into(),
            conn,
            link,
            ack,
        });
    }
    let mut engine = Engine::start(&vm, peers, EngineOptions::default()).unwrap();
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    let next = engine.next_epoch();
    while engine.next_epoch() <= next + 3 {
        engine.step().unwrap();
    }
    assert!(engine.wait_committed(next + 3, Duration::from_secs(5)));
    let dropped = engine.metrics().lock().unwrap().dropped.clone();
    assert!(
        dropped.len() == 1 && dropped[0].starts_with("without: "),
        "{dropped:?}"
    );
    engine.shutdown();
    vm.stop().unwrap();
    let mut ends = servers.into_iter().map(|s| s.join().unwrap());
    // The copy of the VM's disk was refused: the standby has none.
    let end = ends.next().unwrap().unwrap();
    assert!(
        end.to_string().contains("disk 0"),
        "the standby without the disk ended with: {end}"
    );
    ends.next().unwrap().unwrap();
    let snap = dir.path().join("snap");
    let err = without.write_snapshot(&snap).unwrap_err();
    assert!(matches!(err, StandbyError::NothingCommitted), "{err}");
    let err = in_memory.write_snapshot(&snap).unwrap_err();
    assert!(
        matches!(err, StandbyError::DiskNotAFile { index: 0 }),
        "{err}"
    );
    assert!(!snap.exists());
    // Refused, neither was handed over: both still serve.
    assert!(!without.info().promoted && !in_memory.info().promoted);
}

#[test]
fn a_standby_promoted_while_serving_refuses_the_primarys_next_epochs() {
    let vm = writer(256);
    let standby: Arc<Standby<Vec<u8>>> =
        Arc::new(Standby::new(profile(), key(9), Vec::new(), StagingOptions::default()).unwrap());
    let (mut engine, server) = replicate_to(&vm, &standby, 9, &hello());
    assert!(engine.wait_synchronised(SYNC_TIMEOUT));
    let next = engine.next_epoch();
    while engine.next_epoch() <= next + 5 {
        engine.step().unwrap();
    }
    assert!(engine.wait_committed(next + 5, Duration::from_secs(5)));
    // Promoted between two messages of the link: the primary still runs and sends epochs.
    let mut promoted = standby.promote(&restore_options()).unwrap();
    let epoch = standby.info().committed_epoch;
    assert!(epoch >= 5);
    let at_promotion = progress_in(promoted.vm().memory());
    let t0 = Instant::now();
    while engine.is_protected() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the promoted standby still takes epochs"
        );
        engine.step().unwrap();
    }
    // The standby refused the epoch and hung up: the primary sees the refusal or the closed
    // link, whichever comes first.
    let dropped = engine.metrics().lock().unwrap().dropped.clone();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    engine.shutdown();
    let end = server.join().unwrap().unwrap();
    assert!(end.contains("promoted"), "{end}");
    let info = standby.info();
    assert!(info.promoted && info.open_epoch.is_none());
    assert_eq!(info.committed_epoch, epoch);
    vm.stop().unwrap();
    assert_eq!(
        run_for(&mut promoted, Duration::from_secs(1)),
        ExitReason::Stopped
    );
    let ran = progress_in(promoted.vm().memory());
    assert!(
        ran > at_promotion + 1000,
        "the promoted guest did not run on: {at_promotion} -> {ran}"
    );
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
