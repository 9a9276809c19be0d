//! Snapshot, restore and live migration of a running VM, end to end through `vmr` and its API
//! socket on this host's `/dev/kvm`, with the workload guest (`tests/guests/workload.S`): it
//! fills 4 MiB page by page from an LCG over 30 rounds and prints a checksum of all of it, so
//! a restored or migrated guest only prints the right result if every page and register came
//! across exactly.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::openapi::openapi;
use common::{assert_refused, scratch, tiny_elf, vmr, wait_for_socket, Vmr};

/// What the workload guest prints at the end, computed here.
fn expected_result() -> String {
    const PAGES: usize = 1024;
    let mut x: u64 = 0x1234_5678;
    let mut buf = vec![[0u64; 512]; PAGES];
    for round in 0..30usize {
        for page in buf.iter_mut() {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            page[round & 511] = x;
        }
    }
    let sum = buf.iter().flatten().fold(0u64, |s, v| s.wrapping_add(*v));
    format!("result={sum:016x}")
}

/// The round number of a console line `round <16 hex digits>`.
fn round_of(line: &str) -> Option<u64> {
    let hex = line.strip_prefix("round ")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

fn rounds(console: &str) -> Vec<u64> {
    console.lines().filter_map(round_of).collect()
}

fn start_workload(name: &str) -> (Vmr, PathBuf) {
    let elf = tiny_elf("workload");
    let sock = scratch(&format!("{name}.sock"));
    let vm = Vmr::spawn(
        name,
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64",
            "--allow-pvm",
            "--api",
            sock.to_str().unwrap(),
        ],
    );
    wait_for_socket(&sock);
    (vm, sock)
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--api", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    vmr(&all)
}

fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        out.status.success(),
        "vmr ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn restore(name: &str, dir: &Path) -> Vmr {
    Vmr::spawn(
        name,
        &["restore", "--from", dir.to_str().unwrap(), "--allow-pvm"],
    )
}

/// Waits until the workload has printed round `n`.
fn wait_round(vm: &mut Vmr, n: u64) {
    vm.wait_console(&format!("round {n}"), |l| {
        round_of(l).is_some_and(|r| r >= n)
    });
}

fn json_u64(json: &str, key: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

/// Checks that `vm` (restored or received) ran to the end with the right result, starting
/// from round `from` or later - never from the beginning.
fn assert_continued(vm: &mut Vmr, from: u64) {
    assert!(vm.wait(), "vmr failed; log:\n{}", vm.log());
    let console = vm.console();
    assert!(
        console.contains(&expected_result()),
        "wrong or no result; console:\n{console}"
    );
    let r = rounds(&console);
    assert!(
        r.iter().all(|&round| round >= from),
        "the guest did not continue from round {from}: {r:?}"
    );
}

#[test]
fn snapshot_and_restore_continue_the_workload_exactly() {
    let (mut a, sock) = start_workload("snap-a");
    wait_round(&mut a, 3);
    assert!(ctl_ok(&sock, &["status"]).contains("\"running\""));
    ctl_ok(&sock, &["pause"]);
    assert!(ctl_ok(&sock, &["status"]).contains("\"paused\""));
    let dir = scratch("snap-full");
    let info = ctl_ok(&sock, &["snapshot", dir.to_str().unwrap()]);
    assert!(json_u64(&info, "pages") > 1024, "{info}");
    let done = *rounds(&a.console()).last().unwrap();
    a.kill();

    let mut b = restore("snap-b", &dir);
    assert_continued(&mut b, done);
}

#[test]
fn a_diff_chain_restores_the_latest_state() {
    let (mut a, sock) = start_workload("chain-a");
    wait_round(&mut a, 2);
    let full = scratch("chain-full");
    let full_pages = json_u64(
        &ctl_ok(&sock, &["snapshot", full.to_str().unwrap()]),
        "pages",
    );

    // A failed snapshot leaves the VM running and its dirty tracking intact.
    let out = ctl(&sock, &["snapshot", "--diff", "/nonexistent/dir/snap"]);
    assert!(!out.status.success());
    assert!(ctl_ok(&sock, &["status"]).contains("\"running\""));

    wait_round(&mut a, 5);
    let diff1 = scratch("chain-diff1");
    let diff1_pages = json_u64(
        &ctl_ok(&sock, &["snapshot", "--diff", diff1.to_str().unwrap()]),
        "pages",
    );
    assert!(
        diff1_pages < full_pages,
        "a diff holds only what changed ({diff1_pages} vs {full_pages} pages)"
    );
    wait_round(&mut a, 8);
    ctl_ok(&sock, &["pause"]);
    let diff2 = scratch("chain-diff2");
    ctl_ok(&sock, &["snapshot", "--diff", diff2.to_str().unwrap()]);
    let done = *rounds(&a.console()).last().unwrap();
    a.kill();

    let mut latest = restore("chain-latest", &diff2);
    assert_continued(&mut latest, done);
    let mut middle = restore("chain-middle", &diff1);
    assert_continued(&mut middle, 5);
    assert!(
        rounds(&middle.console()).first() < Some(&done),
        "the middle of the chain restores to its own point in time"
    );
}

/// Copies snapshot directory `from` to a new one named `name`.
fn copy_snapshot(from: &Path, name: &str) -> PathBuf {
    let to = scratch(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in ["state", "memory"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    to
}

/// Changes the 32-byte header of the snapshot `dir`'s state file by `edit`, then gives it the
/// checksum (bytes 28..32) of its new contents.
fn edit_state_header(dir: &Path, edit: impl FnOnce(&mut [u8; 32])) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("state"))
        .unwrap();
    let mut header = [0u8; 32];
    f.read_exact_at(&mut header, 0).unwrap();
    edit(&mut header);
    let crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&header, 0).unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
}

/// `vmr restore` refuses `dir` with an error naming `needle`, and no vCPU ran.
fn assert_restore_refused(dir: &Path, needle: &str) {
    let console = scratch(&format!(
        "{}.console",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let out = vmr(&[
        "restore",
        "--from",
        dir.to_str().unwrap(),
        "--allow-pvm",
        "--serial",
        &format!("file:{}", console.display()),
    ]);
    assert_refused(&out, needle);
    assert!(
        std::fs::read(&console).unwrap_or_default().is_empty(),
        "the guest ran"
    );
}

#[test]
fn bad_snapshots_are_refused_before_any_vcpu_runs() {
    let (mut a, sock) = start_workload("bad-a");
    wait_round(&mut a, 2);
    ctl_ok(&sock, &["pause"]);
    let good = scratch("bad-good");
    ctl_ok(&sock, &["snapshot", good.to_str().unwrap()]);
    let other = scratch("bad-other");
    ctl_ok(&sock, &["snapshot", other.to_str().unwrap()]);
    let diff = scratch("bad-diff");
    ctl_ok(&sock, &["snapshot", "--diff", diff.to_str().unwrap()]);
    // A snapshot is never written over.
    let out = ctl(&sock, &["snapshot", good.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    a.kill();

    assert_restore_refused(&scratch("bad-missing"), "not a snapshot directory");

    let state_len = std::fs::metadata(good.join("state")).unwrap().len();
    let d = copy_snapshot(&good, "bad-state-truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("state"))
        .unwrap()
        .set_len(state_len / 2)
        .unwrap();
    assert_restore_refused(&d, "truncated");

    let d = copy_snapshot(&good, "bad-state-corrupt");
    flip_byte(&d.join("state"), state_len / 2);
    assert_restore_refused(&d, "corrupt");

    let d = copy_snapshot(&good, "bad-state-version");
    edit_state_header(&d, |header| {
        header[8..12].copy_from_slice(&99u32.to_le_bytes())
    });
    assert_restore_refused(&d, "version 99");

    // Another minor version of the same major (bytes 10..12) is read.
    let d = copy_snapshot(&good, "minor-version");
    edit_state_header(&d, |header| {
        let minor = u16::from_le_bytes([header[10], header[11]]) + 1;
        header[10..12].copy_from_slice(&minor.to_le_bytes());
    });
    let mut minor = restore("minor-version-restored", &d);
    assert_continued(&mut minor, 2);

    // The workload's buffer at 8 MiB holds data in every page.
    let d = copy_snapshot(&good, "bad-memory-corrupt");
    flip_byte(&d.join("memory"), 0x80_0000 + 8);
    assert_restore_refused(&d, "corrupt");

    let d = copy_snapshot(&good, "bad-memory-truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    assert_restore_refused(&d, "truncated");

    // The diff's parent (the last snapshot before it) replaced by another snapshot.
    std::fs::rename(&other, scratch("bad-other-moved")).unwrap();
    std::fs::rename(&good, &other).unwrap();
    assert_restore_refused(&diff, "is a diff of snapshot");
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_receiver(name: &str, port: u16) -> Vmr {
    let mut dest = Vmr::spawn(
        name,
        &[
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--allow-pvm",
        ],
    );
    let t0 = std::time::Instant::now();
    while !dest.log().contains("waiting for a migration") {
        assert!(
            dest.child.try_wait().unwrap().is_none(),
            "vmr receive ended: {}",
            dest.log()
        );
        assert!(t0.elapsed().as_secs() < 30, "vmr receive did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    dest
}

#[test]
fn live_migration_moves_the_running_workload() {
    let port = free_port();
    let mut dest = start_receiver("mig-dest", port);
    let (mut a, sock) = start_workload("mig-src");
    wait_round(&mut a, 3);
    let info = ctl_ok(&sock, &["migrate", &format!("127.0.0.1:{port}")]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(v["downtime_ms"].as_f64().unwrap() > 0.0, "{info}");
    assert!(v["pages_sent"].as_u64().unwrap() >= 1024, "{info}");
    assert!(
        a.wait(),
        "the source must end cleanly once moved: {}",
        a.log()
    );
    let done = *rounds(&a.console()).last().unwrap();
    assert!(
        !a.console().contains("result="),
        "the source stopped computing"
    );
    assert_continued(&mut dest, done);
    // Each end ran its part of the switch-over once before the pre-copy: the source saved
    // and encoded its running VM, the destination restored a scratch VM.
    assert!(
        !a.log().contains("rehearsal failed"),
        "the save's rehearsal failed: {}",
        a.log()
    );
    assert!(
        !dest.log().contains("rehearsal failed") && dest.log().contains("rehearsal: "),
        "the switch-over's rehearsal failed or did not run: {}",
        dest.log()
    );
}

#[test]
fn a_failed_migration_leaves_the_vm_running_and_can_be_retried() {
    let (mut a, sock) = start_workload("retry-src");
    wait_round(&mut a, 2);

    // Nobody listening.
    let out = ctl(&sock, &["migrate", &format!("127.0.0.1:{}", free_port())]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ctl_ok(&sock, &["status"]).contains("\"running\""));

    // A destination that hangs up mid-way.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let rude = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut buf);
    });
    let out = ctl(&sock, &["migrate", &format!("127.0.0.1:{port}")]);
    rude.join().unwrap();
    assert!(!out.status.success());
    assert!(ctl_ok(&sock, &["status"]).contains("\"running\""));

    // A real destination: the retry succeeds and the result is right.
    let port = free_port();
    let mut dest = start_receiver("retry-dest", port);
    ctl_ok(&sock, &["migrate", &format!("127.0.0.1:{port}")]);
    assert!(a.wait());
    let done = *rounds(&a.console()).last().unwrap();
    assert_continued(&mut dest, done);
}

/// Every operation of the API, on a running VM, answers as `vmm/api/openapi.yaml` says: right
/// and wrong requests alike.
#[test]
fn the_api_of_a_running_vm_answers_per_its_openapi_document() {
    let (mut vm, sock) = start_workload("api");
    let client = vmm::api::ApiClient::new(&sock);
    let snapshot_dir = scratch("api-snapshot");
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    let closed_port = free_port();
    let snapshot_body = format!(r#"{{"snapshot_path": "{}"}}"#, snapshot_dir.display());
    let migrate_body = format!(r#"{{"destination": "127.0.0.1:{closed_port}"}}"#);
    let calls: &[(&str, &str, Option<&str>, u16)] = &[
        ("GET", "/vm", None, 200),
        ("GET", "/vm/resources", None, 200),
        ("GET", "/metrics", None, 200),
        ("PUT", "/vm/resume", None, 409),
        ("PUT", "/vm/pause", None, 204),
        ("PUT", "/vm/pause", None, 409),
        ("GET", "/vm", None, 200),
        ("PUT", "/vm/resume", None, 204),
        ("PUT", "/snapshot/create", Some(&snapshot_body), 200),
        ("PUT", "/snapshot/create", Some(&snapshot_body), 409),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path": 7}"#),
            400,
        ),
        ("PUT", "/snapshot/create", Some("{not json"), 400),
        ("PUT", "/migrate", Some(&migrate_body), 502),
        (
            "PUT",
            "/migrate",
            Some(r#"{"destination": "nowhere"}"#),
            400,
        ),
        ("GET", "/no/such/thing", None, 404),
        ("DELETE", "/vm", None, 405),
    ];
    for (method, path, body, status) in calls {
        let response = client
            .call(
                method,
                path,
                body.map(str::as_bytes),
                std::time::Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(
            response.status,
            *status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        openapi().check(method, path, &response);
    }
    // The VM ran on through all of it, to the right result.
    assert!(vm.wait(), "vmr failed; log:\n{}", vm.log());
    assert!(vm.console().contains(&expected_result()));
}

/// What a fake destination does once it has answered `Hello`.
#[derive(Clone, Copy)]
enum FakeDestination {
    /// Hangs up at once.
    HangUp,
    /// Takes the pre-copy (answering `Sync`s) and the `Commit`, then goes silent, the
    /// connection open, until told to stop.
    SilentAfterCommit,
}

/// A destination speaking the wire protocol (`vmm::migration::wire`) as `behaviour` says, for
/// one migration; returns its port, the thread, the instant it took `Commit` (if it did) and
/// a sender that ends its silence.
fn fake_destination(
    behaviour: FakeDestination,
) -> (
    u16,
    std::thread::JoinHandle<Option<std::time::Instant>>,
    std::sync::mpsc::Sender<()>,
) {
    use vmm::migration::wire::{Message, MessageReader, MessageWriter};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = MessageReader::new(stream.try_clone().unwrap());
        let mut writer = MessageWriter::new(stream.try_clone().unwrap());
        match reader.recv().unwrap() {
            Message::Hello(_) => {}
            other => panic!("{other:?} before Hello"),
        }
        writer.send(&Message::Ack { seq: 0 }).unwrap();
        writer.flush().unwrap();
        match behaviour {
            FakeDestination::HangUp => {
                drop((reader, writer));
                let _ = stream.shutdown(std::net::Shutdown::Both);
                None
            }
            FakeDestination::SilentAfterCommit => loop {
                match reader.recv() {
                    Ok(Message::Sync { seq }) => {
                        writer.send(&Message::Ack { seq }).unwrap();
                        writer.flush().unwrap();
                    }
                    Ok(Message::Commit { .. }) => {
                        let at = std::time::Instant::now();
                        let _ = stop_rx.recv_timeout(std::time::Duration::from_secs(120));
                        return Some(at);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("the source's stream broke before Commit: {e}"),
                }
            },
        }
    });
    (port, thread, stop_tx)
}

/// Issue 22: a migration that fails once the destination answered `Hello` must not eat the
/// dirty log of the snapshots: a diff taken afterwards holds every page written since the
/// full snapshot, and the guest restored from both computes the right result.
#[test]
fn a_failed_migration_keeps_the_pages_of_the_next_diff_snapshot() {
    let (mut a, sock) = start_workload("lostdirty-src");
    wait_round(&mut a, 2);
    let full = scratch("lostdirty-full");
    ctl_ok(&sock, &["snapshot", full.to_str().unwrap()]);
    // The guest rewrites every page of its buffer each round.
    let after_full = *rounds(&a.console()).last().unwrap();
    wait_round(&mut a, after_full + 3);
    ctl_ok(&sock, &["pause"]);

    let (port, peer, _stop) = fake_destination(FakeDestination::HangUp);
    let out = ctl(&sock, &["migrate", &format!("127.0.0.1:{port}")]);
    peer.join().unwrap();
    assert!(!out.status.success(), "the migration cannot have succeeded");
    assert!(ctl_ok(&sock, &["status"]).contains("\"paused\""));

    let diff = scratch("lostdirty-diff");
    let info = ctl_ok(&sock, &["snapshot", "--diff", diff.to_str().unwrap()]);
    assert!(
        json_u64(&info, "pages") >= 1024,
        "the diff lost the pages the guest wrote since the full snapshot: {info}"
    );
    let done = *rounds(&a.console()).last().unwrap();
    a.kill();
    let mut b = restore("lostdirty-restored", &diff);
    assert_continued(&mut b, done);
}

/// Issue 22: a destination that takes `Commit` and goes silent does not keep the source
/// frozen: within the freeze's deadline (the allowed downtime plus a bounded margin) the
/// migration fails, the API answers and the guest runs on here.
#[test]
fn a_destination_silent_after_commit_does_not_hold_the_source_frozen() {
    let (mut a, sock) = start_workload("silent-src");
    wait_round(&mut a, 2);
    let (port, peer, stop) = fake_destination(FakeDestination::SilentAfterCommit);
    let max_downtime = std::time::Duration::from_millis(100);
    let out = ctl(
        &sock,
        &[
            "migrate",
            &format!("127.0.0.1:{port}"),
            "--max-downtime-ms",
            &max_downtime.as_millis().to_string(),
        ],
    );
    let answered = std::time::Instant::now();
    assert!(
        !out.status.success(),
        "no Ack came: the migration failed ({})",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = stop.send(());
    let committed = peer.join().unwrap().expect("the source sent Commit");
    let frozen_for = answered - committed;
    let bound = vmm::microvm::freeze_deadline(max_downtime) + std::time::Duration::from_secs(2);
    assert!(
        frozen_for < bound,
        "the API answered {frozen_for:?} after Commit, more than {bound:?}"
    );
    assert!(ctl_ok(&sock, &["status"]).contains("\"running\""));
    // The guest runs on here, to the right result.
    assert!(a.wait(), "vmr failed; log:\n{}", a.log());
    assert!(
        a.log().contains("within the freeze's deadline"),
        "the monitor did not say why it resumed: {}",
        a.log()
    );
    assert!(a.console().contains(&expected_result()));
}
