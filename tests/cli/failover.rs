//! Failover through the `vmr` binary on this host's `/dev/kvm`, with the epoch writer guest
//! and a real etcd: a standby with `--coordinator` takes a lost primary's VM over by itself
//! (the claim in etcd, the VM running in the standby's process, its API serving it), is
//! protected in turn by a new standby which takes it over again; of two standbys one takes
//! over and the other follows it; a standby that joins a VM is paired by itself; a primary
//! frozen long enough to be taken over is fenced when it wakes (its vCPUs paused, nothing
//! released); partitions (through proxies that drop everything) between primary and standby,
//! and between either and the coordinator, leave exactly one side releasing output; without a
//! coordinator the takeover is manual and must be forced. [`health`]: a primary whose TAP
//! fails hands the VM over to its standby.

mod common;
mod health;

#[path = "../../replicator/tests/support/etcd.rs"]
mod etcd;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::standby::{
    ctl_json, key_file, protect_ok, replication, wait_replication, writer_args, StandbyProc,
};
use common::{scratch, tiny_elf, vmr, wait_for_socket, Vmr};
use etcd::Etcd;
use replicator::coordinator::{Coordinator, Ownership};

/// The owner of `vm` in `etcd`.
fn owner(etcd: &Etcd, vm: &str) -> Ownership {
    etcd.coordinator()
        .current(vm)
        .unwrap()
        .unwrap_or_else(|| panic!("no owner of {vm}"))
        .0
}

/// `vmr ctl --api API status`, parsed.
fn vm_status(api: &Path) -> serde_json::Value {
    ctl_json(api, "status")
}

/// A protected epoch writer, its API at `api`.
fn primary(name: &str, key: &Path, standby: &str, extra: &[&str]) -> (Vmr, std::path::PathBuf) {
    let kernel = tiny_elf("epoch_writer");
    let api = scratch(&format!("{name}.sock"));
    let mut args = writer_args(&kernel);
    args.extend(["--protect", standby, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    args.extend(["--api".to_string(), api.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let vm = Vmr::spawn(name, &args.iter().map(String::as_str).collect::<Vec<_>>());
    (vm, api)
}

/// A standby with the coordinator, as `host` (its detection bound one that debug builds two
/// at a time keep on a loaded host).
fn standby_of(name: &str, key: &Path, coordinator: &str, host: &str) -> StandbyProc {
    StandbyProc::spawn(
        name,
        key,
        &[
            "--coordinator",
            coordinator,
            "--host-id",
            host,
            "--allow-pvm",
            "--detect-ms",
            "300",
        ],
    )
}

/// Whether a standby's status says it may take the VM over (synchronised, protected).
fn ready(status: &serde_json::Value) -> bool {
    status["message"]
        .as_str()
        .is_some_and(|m| m.contains("ready to take it over"))
}

/// Waits until the standby's log says it took the VM over, and its API serves the VM running.
fn wait_taken_over(standby: &StandbyProc) -> serde_json::Value {
    let line = standby.wait_log("the takeover", |l| l.contains("TAKEN OVER"));
    assert!(line.contains("resume_ms"), "{line}");
    let t0 = Instant::now();
    loop {
        let out = vmr(&["ctl", "--api", standby.api().to_str().unwrap(), "status"]);
        if out.status.success() {
            let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if vm["state"] == "running" {
                return vm;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the VM taken over does not run: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            standby.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lost_primary_is_taken_over_by_its_standby_which_is_protected_and_taken_over_in_turn() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("failover.key", 3);
    let first = standby_of("failover-first", &key, &coordinator, "first");
    let (mut p, api) = primary(
        "failover-primary",
        &key,
        &first.addr,
        &[
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm1",
            "--host-id",
            "primary",
        ],
    );
    wait_replication(first.api(), ready);
    assert_eq!(owner(&etcd, "vm1").owner, "primary");
    assert_eq!(owner(&etcd, "vm1").term, 1);
    let ours = replication(&api);
    assert_eq!(ours["term"], 1, "{ours}");

    // The primary's host is lost: the standby claims the VM and runs it.
    p.kill();
    let vm = wait_taken_over(&first);
    assert_eq!(vm["state"], "running", "{vm}");
    let o = owner(&etcd, "vm1");
    assert_eq!((o.owner.as_str(), o.term), ("first", 2), "{o}");
    let status = replication(first.api());
    assert_eq!(status["term"], 2, "{status}");
    assert_eq!(status["role"], "unprotected", "{status}");
    // It runs on: its uptime grows.
    let before = vm["uptime_ms"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = vm_status(first.api());
    assert!(after["uptime_ms"].as_u64().unwrap() > before, "{after}");

    // A new standby protects the VM now running at the first standby.
    let second = standby_of("failover-second", &key, &coordinator, "second");
    protect_ok(first.api(), &second.addr);
    let synced = wait_replication(second.api(), ready);
    assert_eq!(synced["term"], 2, "{synced}");
    // The first standby's process is lost in turn: the second takes the VM over.
    let mut first = first;
    let _ = first.child.kill();
    let _ = first.child.wait();
    wait_taken_over(&second);
    let o = owner(&etcd, "vm1");
    assert_eq!((o.owner.as_str(), o.term), ("second", 3), "{o}");
}

#[test]
fn a_frozen_primary_taken_over_is_fenced_when_it_wakes() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("fence.key", 4);
    let standby = standby_of("fence-standby", &key, &coordinator, "standby");
    let (mut p, api) = primary(
        "fence-primary",
        &key,
        &standby.addr,
        &[
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm2",
            "--host-id",
            "primary",
        ],
    );
    wait_replication(standby.api(), ready);
    // The primary stops (a partition, a host frozen): its standby takes the VM over.
    let pid = p.child.id() as i32;
    // SAFETY: signals a child process of this test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    wait_taken_over(&standby);
    assert_eq!(owner(&etcd, "vm2").owner, "standby");
    // It wakes: its link to the standby is gone, its claim of the next term is lost, so it
    // is fenced: vCPUs paused, nothing released, said in its status.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let fenced = wait_replication(&api, |s| {
        s["message"].as_str().is_some_and(|m| m.contains("FENCED"))
    });
    assert_eq!(fenced["protected"], false, "{fenced}");
    assert!(
        fenced["message"].as_str().unwrap().contains("standby"),
        "{fenced}"
    );
    assert_eq!(vm_status(&api)["state"], "paused");
    assert_eq!(owner(&etcd, "vm2").owner, "standby");
    p.kill();
}

#[test]
fn without_a_coordinator_a_takeover_is_manual_and_forced() {
    let key = key_file("manual.key", 6);
    let standby = StandbyProc::spawn(
        "manual-standby",
        &key,
        &["--allow-pvm", "--detect-ms", "300"],
    );
    let api = standby.api().to_str().unwrap().to_string();
    // Nothing to take over yet.
    let out = vmr(&["ctl", "--api", &api, "failover", "--force"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no VM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut p, primary_api) = primary("manual-primary", &key, &standby.addr, &[]);
    wait_replication(standby.api(), ready);
    let status = replication(&primary_api);
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("automatic failover is off")),
        "{status}"
    );
    // While the primary replicates to it, the standby refuses to take over.
    let out = vmr(&["ctl", "--api", &api, "failover", "--force"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the primary is alive"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.kill();
    standby.wait_log("no automatic failover", |l| {
        l.contains("automatic failover is off")
    });
    // Not forced: refused, saying why.
    let out = vmr(&["ctl", "--api", &api, "failover"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no coordinator") && err.contains("--force"),
        "{err}"
    );
    // Forced: the VM runs here.
    let out = vmr(&["ctl", "--api", &api, "failover", "--force"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        standby.log()
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["role"], "unprotected", "{status}");
    wait_for_socket(standby.api());
    assert_eq!(vm_status(standby.api())["state"], "running");
    wait_taken_over(&standby);
}

#[test]
fn of_two_standbys_one_takes_over_the_other_follows_it_and_takes_over_in_turn() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("elect.key", 9);
    let mut standbys: Vec<StandbyProc> = ["a", "b"]
        .iter()
        .map(|host| standby_of(&format!("elect-{host}"), &key, &coordinator, host))
        .collect();
    let kernel = tiny_elf("epoch_writer");
    let api = scratch("elect-primary.sock");
    let mut args = writer_args(&kernel);
    for s in &standbys {
        args.extend(["--protect".to_string(), s.addr.clone()]);
    }
    args.extend(["--key-file".to_string(), key.display().to_string()]);
    args.extend(
        [
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm3",
            "--host-id",
            "p",
            "--api",
        ]
        .map(String::from),
    );
    args.push(api.display().to_string());
    let mut p = Vmr::spawn(
        "elect-primary",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for s in &standbys {
        wait_replication(s.api(), ready);
    }
    // Both see the primary go; exactly one takes the VM over, the other follows it.
    p.kill();
    let t0 = Instant::now();
    let winner = loop {
        if let Some(i) = standbys.iter().position(|s| s.log().contains("TAKEN OVER")) {
            break i;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nobody took over:\n{}\n{}",
            standbys[0].log(),
            standbys[1].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let loser = 1 - winner;
    assert_eq!(owner(&etcd, "vm3").term, 2);
    standbys[loser].wait_log("following", |l| l.contains("fresh again"));
    assert!(
        !standbys[loser].log().contains("TAKEN OVER"),
        "{}",
        standbys[loser].log()
    );
    // The new primary pairs with the one that followed it, by itself.
    let followed = wait_replication(standbys[loser].api(), |s| {
        s["term"].as_u64() == Some(2) && ready(s)
    });
    assert!(
        followed["last_committed_epoch"].as_u64() > Some(0),
        "{followed}"
    );
    // The new primary counts itself protected once it has the follower's ack of that epoch.
    let status = wait_replication(standbys[winner].api(), |s| s["protected"] == true);
    assert_eq!(status["role"], "primary", "{status}");
    assert_eq!(status["protected"], true, "{status}");
    // The new primary is lost in turn: the follower takes the VM over.
    let _ = standbys[winner].child.kill();
    let _ = standbys[winner].child.wait();
    wait_taken_over(&standbys[loser]);
    assert_eq!(owner(&etcd, "vm3").term, 3);
}

#[test]
fn a_standby_that_joins_an_unprotected_vm_protects_it_by_itself() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("join.key", 10);
    let kernel = tiny_elf("epoch_writer");
    let api = scratch("join-primary.sock");
    let mut args = writer_args(&kernel);
    args.extend(["--key-file".to_string(), key.display().to_string()]);
    args.extend(
        [
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm4",
            "--host-id",
            "p",
            "--api",
        ]
        .map(String::from),
    );
    args.push(api.display().to_string());
    let _p = Vmr::spawn(
        "join-primary",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_for_socket(&api);
    assert_eq!(replication(&api)["role"], "unprotected");
    let s = StandbyProc::spawn(
        "join-standby",
        &key,
        &[
            "--coordinator",
            &coordinator,
            "--join",
            "vm4",
            "--allow-pvm",
            "--detect-ms",
            "300",
        ],
    );
    let status = wait_replication(&api, |s| s["protected"] == true);
    assert_eq!(status["peers"][0]["name"], s.addr.as_str(), "{status}");
    wait_replication(s.api(), |s| s["last_committed_epoch"].as_u64() >= Some(5));
}

#[test]
fn standbys_added_to_a_protected_vm_join_it_and_take_it_over() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("add.key", 12);
    let first = standby_of("add-first", &key, &coordinator, "a");
    let (mut p, api) = primary(
        "add-primary",
        &key,
        &first.addr,
        &[
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm6",
            "--host-id",
            "p",
        ],
    );
    wait_replication(&api, |s| s["protected"] == true);
    // A second standby, by `vmr ctl protect`: it answers once the standby protects the VM.
    let second = standby_of("add-second", &key, &coordinator, "b");
    let added = protect_ok(&api, &second.addr);
    let added: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    let states = |s: &serde_json::Value| -> Vec<String> {
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}={}",
                    p["name"].as_str().unwrap(),
                    p["state"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        states(&added),
        [
            format!("{}=protecting", first.addr),
            format!("{}=protecting", second.addr)
        ],
        "{added}"
    );
    assert_eq!(added["protected"], true, "{added}");
    wait_replication(second.api(), ready);
    // A third, by `vmr standby --join`: the primary pairs it by itself.
    let third = StandbyProc::spawn(
        "add-third",
        &key,
        &[
            "--coordinator",
            &coordinator,
            "--join",
            "vm6",
            "--host-id",
            "c",
            "--allow-pvm",
            "--detect-ms",
            "300",
        ],
    );
    let three = wait_replication(&api, |s| {
        states(s).len() == 3 && states(s).iter().all(|p| p.ends_with("=protecting"))
    });
    assert_eq!(three["term"], 1, "{three}");
    wait_replication(third.api(), ready);
    // The first standby is lost: the primary wins the next term and goes on protected by the
    // two that joined.
    let mut first = first;
    let _ = first.child.kill();
    let _ = first.child.wait();
    let two = wait_replication(&api, |s| s["term"] == 2);
    assert_eq!(two["protected"], true, "{two}");
    let committed = two["last_committed_epoch"].as_u64().unwrap();
    wait_replication(&api, |s| {
        s["last_committed_epoch"].as_u64() > Some(committed + 5)
    });
    // The primary is lost: one of the two takes the VM over from its committed state, the
    // other follows it.
    p.kill();
    let t0 = Instant::now();
    let (winner, loser) = loop {
        if second.log().contains("TAKEN OVER") {
            break (&second, &third);
        }
        if third.log().contains("TAKEN OVER") {
            break (&third, &second);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nobody took over:\n{}\n{}",
            second.log(),
            third.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let vm = wait_taken_over(winner);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(owner(&etcd, "vm6").term, 3);
    loser.wait_log("following", |l| l.contains("fresh again"));
}

/// The epoch a standby's log says it promoted (took the VM over at).
fn promoted_epoch(standby: &StandbyProc) -> u64 {
    let line = standby.wait_log("the promotion", |l| {
        l.contains("promoted: the committed epoch")
    });
    line.split("epoch=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {line:?}"))
}

/// A primary and its standby joined through a proxy that can be cut, both with the
/// coordinator, each through its own proxy too.
struct Partitioned {
    etcd: Etcd,
    link: Proxy,
    primary_coordinator: Proxy,
    standby_coordinator: Proxy,
    standby: StandbyProc,
    primary: Vmr,
    api: std::path::PathBuf,
}

fn partitioned(name: &str, vm: &str) -> Partitioned {
    let etcd = Etcd::start();
    let target = etcd.endpoints.hosts()[0].clone();
    let (primary_coordinator, standby_coordinator) = (Proxy::start(&target), Proxy::start(&target));
    let key = key_file(&format!("{name}.key"), 11);
    let standby = StandbyProc::spawn(
        &format!("{name}-standby"),
        &key,
        &[
            "--coordinator",
            &format!("etcd://{}", standby_coordinator.addr),
            "--host-id",
            "standby",
            "--allow-pvm",
            "--detect-ms",
            "300",
        ],
    );
    let link = Proxy::start(&standby.addr);
    let (primary, api) = primary(
        &format!("{name}-primary"),
        &key,
        &link.addr,
        &[
            "--coordinator",
            &format!("etcd://{}", primary_coordinator.addr),
            "--vm-id",
            vm,
            "--host-id",
            "primary",
            "--standby-timeout-ms",
            "1000",
        ],
    );
    wait_replication(standby.api(), ready);
    Partitioned {
        etcd,
        link,
        primary_coordinator,
        standby_coordinator,
        standby,
        primary,
        api,
    }
}

#[test]
fn a_partition_between_primary_and_standby_leaves_exactly_one_side_releasing_output() {
    // Both sides reach the coordinator: the standby takes over, the primary is fenced and
    // never released anything the standby's VM does not hold.
    let mut p = partitioned("split", "vm5");
    p.link.cut();
    wait_taken_over(&p.standby);
    let epoch = promoted_epoch(&p.standby);
    let fenced = wait_replication(&p.api, |s| {
        s["message"].as_str().is_some_and(|m| m.contains("FENCED"))
    });
    let released = fenced["last_committed_epoch"].as_u64().unwrap();
    assert!(
        released <= epoch,
        "the old primary released epoch {released}, the new one resumed from {epoch}"
    );
    assert_eq!(vm_status(&p.api)["state"], "paused");
    assert_eq!(owner(&p.etcd, "vm5").owner, "standby");
    p.primary.kill();
}

#[test]
fn a_standby_cut_off_from_the_coordinator_never_runs_the_vm_and_follows_the_primary() {
    // The standby loses the primary and the coordinator; the primary reaches the coordinator,
    // wins the next term and goes on unprotected. Healed, the standby's claim is lost: it
    // never ran the VM, and it follows the primary (fresh again).
    let p = partitioned("cutoff", "vm6");
    p.standby_coordinator.cut();
    p.link.cut();
    let status = wait_replication(&p.api, |s| s["role"] == "unprotected");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("no standby left"),
        "{status}"
    );
    assert_eq!(
        owner(&p.etcd, "vm6"),
        Ownership {
            owner: "primary".into(),
            term: 2
        }
    );
    assert_eq!(vm_status(&p.api)["state"], "running");
    p.standby
        .wait_log("the failed claim", |l| l.contains("retrying"));
    p.standby_coordinator.heal();
    p.standby
        .wait_log("following", |l| l.contains("fresh again"));
    assert!(
        !p.standby.log().contains("TAKEN OVER"),
        "{}",
        p.standby.log()
    );
    // The primary pairs with it again by itself, through the healed link.
    p.link.heal();
    wait_replication(&p.api, |s| s["protected"] == true);
}

#[test]
fn a_primary_cut_off_from_the_coordinator_is_fenced_when_its_standby_takes_over() {
    // The other way round: the standby reaches the coordinator and takes over; the primary
    // cannot prove its ownership, so it is fenced.
    let p = partitioned("fenced", "vm7");
    p.primary_coordinator.cut();
    p.link.cut();
    wait_taken_over(&p.standby);
    let fenced = wait_replication(&p.api, |s| {
        s["message"].as_str().is_some_and(|m| m.contains("FENCED"))
    });
    assert!(
        fenced["last_committed_epoch"].as_u64().unwrap() <= promoted_epoch(&p.standby),
        "{fenced}"
    );
    assert_eq!(vm_status(&p.api)["state"], "paused");
    assert_eq!(owner(&p.etcd, "vm7").owner, "standby");
}

#[test]
fn a_planned_switch_over_hands_the_vm_to_its_standby_and_ends_the_primary() {
    let etcd = Etcd::start();
    let coordinator = etcd.endpoints.to_string();
    let key = key_file("handover.key", 12);
    let standby = standby_of("handover-standby", &key, &coordinator, "standby");
    let (mut p, api) = primary(
        "handover-primary",
        &key,
        &standby.addr,
        &[
            "--coordinator",
            &coordinator,
            "--vm-id",
            "vm8",
            "--host-id",
            "primary",
        ],
    );
    wait_replication(standby.api(), ready);
    let out = vmr(&["ctl", "--api", api.to_str().unwrap(), "failover"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log()
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("handed over")),
        "{status}"
    );
    // The primary ends cleanly; the standby runs the VM from the last epoch, with no loss.
    assert!(p.wait(), "the primary did not end cleanly: {}", p.log());
    wait_taken_over(&standby);
    let epoch = promoted_epoch(&standby);
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("VM handed over: this monitor ends"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("epoch={epoch}")), "{line}");
    assert_eq!(
        owner(&etcd, "vm8"),
        Ownership {
            owner: "standby".into(),
            term: 2
        }
    );
    // Asked of a primary without a standby, it is refused.
    let out = vmr(&["ctl", "--api", standby.api().to_str().unwrap(), "failover"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not protected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
