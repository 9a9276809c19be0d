//! Health supervision through the `vmr` binary, with TAPs in a network namespace of the test's
//! own: a primary whose TAP goes down hands the VM over to its synchronised standby (which
//! runs it from the last epoch, none lost), as does one whose disk image is deleted; one
//! without a standby only reports it, in `GET /replication`, `GET /vm/resources` and the
//! metrics.

use std::path::Path;
use std::time::{Duration, Instant};

use virtio_net_tap::testutil::{ip, NetNs, TapPeer};
use vmm::api::{ApiClient, TapState};

use super::common::standby::{key_file, replication, wait_replication, writer_args, StandbyProc};
use super::common::{scratch, tiny_elf, vmr, wait_for_socket, Vmr};
use super::{promoted_epoch, ready, wait_taken_over};

/// Enters a network namespace of this test thread's own (the `vmr` processes it starts
/// inherit it), with loopback up for the replication link.
fn netns() -> Option<NetNs> {
    let ns = NetNs::enter()?;
    ip(&["link", "set", "lo", "up"]);
    Some(ns)
}

/// An epoch writer with a key (so that it may be protected) and `extra` arguments, its API at
/// `<name>.sock`.
fn writer(name: &str, key: &Path, extra: &[&str]) -> (Vmr, std::path::PathBuf) {
    let kernel = tiny_elf("epoch_writer");
    let api = scratch(&format!("{name}.sock"));
    let mut args = writer_args(&kernel);
    args.push("--key-file".into());
    args.push(key.display().to_string());
    args.extend(["--api".to_string(), api.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let vm = Vmr::spawn(name, &args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for_socket(&api);
    (vm, api)
}

/// The state of the TAP named `tap` in a status's health.
fn tap_state(status: &serde_json::Value, tap: &str) -> Option<String> {
    status["health"]["taps"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == tap)
        .and_then(|t| t["state"].as_str())
        .map(String::from)
}

/// The attributes of the node `id` of `vmr ctl resources`.
fn node_attrs(api: &Path, id: &str) -> serde_json::Value {
    let graph = super::common::standby::ctl_json(api, "resources");
    graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in {graph}"))["attrs"]
        .clone()
}

/// `vmr ctl metrics`.
fn metrics(api: &Path) -> String {
    let out = vmr(&["ctl", "--api", api.to_str().unwrap(), "metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_primary_whose_tap_goes_down_hands_the_vm_over_to_its_standby() {
    let Some(ns) = netns() else { return };
    let primary_tap = TapPeer::persistent(&ns, "hp");
    let standby_tap = TapPeer::persistent(&ns, "hs");
    let key = key_file("health-handover.key", 21);
    let standby = StandbyProc::spawn(
        "health-standby",
        &key,
        &["--allow-pvm", "--net", &format!("tap={}", standby_tap.name)],
    );
    let tap = format!("tap={}", primary_tap.name);
    let (mut p, api) = writer(
        "health-primary",
        &key,
        &["--net", &tap, "--protect", &standby.addr],
    );
    wait_replication(standby.api(), ready);
    // Both hosts supervise their own TAP: the primary holds its own open (up, running), the
    // standby's waits for a takeover (up).
    let status = wait_replication(&api, |s| {
        s["protected"] == true && tap_state(s, &primary_tap.name).as_deref() == Some("up")
    });
    assert_eq!(
        status["health"]["guest"]["state"], "progressing",
        "{status}"
    );
    let s = replication(standby.api());
    assert_eq!(
        tap_state(&s, &standby_tap.name).as_deref(),
        Some("up"),
        "{s}"
    );
    assert!(
        s["health"]["guest"].is_null(),
        "a standby runs no guest: {s}"
    );

    // The primary's TAP goes down: the primary says so and hands the VM over.
    ip(&["link", "set", "dev", &primary_tap.name, "down"]);
    let client = ApiClient::new(&api);
    let t0 = Instant::now();
    let seen = loop {
        match client.replication() {
            Ok(s) => {
                let down = s.health.as_ref().is_some_and(|h| {
                    h.taps
                        .iter()
                        .any(|t| t.name == primary_tap.name && t.state == TapState::Down)
                });
                if down {
                    break s;
                }
            }
            Err(e) => panic!("the primary's API ended before it showed its TAP down: {e}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", p.log());
        std::thread::sleep(Duration::from_millis(5));
    };
    let message = seen.message.unwrap_or_default();
    assert!(
        message.contains(&format!("TAP {} is down", primary_tap.name)),
        "{message}"
    );
    // It ends cleanly once the standby holds the last epoch; the standby runs the VM from
    // that epoch: none lost.
    assert!(p.wait(), "the primary did not end cleanly: {}", p.log());
    let vm = wait_taken_over(&standby);
    assert_eq!(vm["state"], "running", "{vm}");
    let epoch = promoted_epoch(&standby);
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("VM handed over (TAP") && l.contains("is down): this monitor ends"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("epoch={epoch}")), "{line}");
    assert!(line.contains("WARN"), "{line}");
    // The VM runs on the standby's host, which supervises its own TAP, now held open.
    let status = wait_replication(standby.api(), |s| {
        tap_state(s, &standby_tap.name).as_deref() == Some("up")
            && s["health"]["guest"]["state"] == "progressing"
    });
    assert_eq!(status["role"], "unprotected", "{status}");
    assert_eq!(status["term"], 1, "{status}");
}

#[test]
fn without_a_standby_a_failed_tap_is_only_reported_in_the_status_resources_and_metrics() {
    let Some(ns) = netns() else { return };
    let tap = TapPeer::persistent(&ns, "hu");
    let key = key_file("health-report.key", 22);
    let (mut vm, api) = writer(
        "health-unprotected",
        &key,
        &["--net", &format!("tap={}", tap.name)],
    );
    let up = wait_replication(&api, |s| {
        tap_state(s, &tap.name).as_deref() == Some("up")
            && s["health"]["guest"]["state"] == "progressing"
    });
    assert!(
        up["message"]
            .as_str()
            .is_some_and(|m| m.contains("unprotected")),
        "{up}"
    );
    let exits = up["health"]["guest"]["exits"].as_u64().unwrap();
    // The guest progresses: KVM counts its vCPUs' exits.
    wait_replication(&api, |s| {
        s["health"]["guest"]["exits"].as_u64() > Some(exits)
    });
    let attrs = node_attrs(&api, &format!("tap:{}", tap.name));
    assert_eq!(attrs["health"], "up", "{attrs}");
    let vcpu = node_attrs(&api, "vcpu0");
    assert_eq!(vcpu["progress"], "progressing", "{vcpu}");
    let text = metrics(&api);
    assert!(
        text.contains(&format!("vmr_tap_up{{tap=\"{}\"}} 1\n", tap.name)),
        "{text}"
    );
    assert!(text.contains("vmr_guest_progressing 1\n"), "{text}");

    ip(&["link", "set", "dev", &tap.name, "down"]);
    let down = wait_replication(&api, |s| tap_state(s, &tap.name).as_deref() == Some("down"));
    let message = down["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("TAP {} is down", tap.name))
            && message.contains("cannot be moved"),
        "{down}"
    );
    assert_eq!(
        node_attrs(&api, &format!("tap:{}", tap.name))["health"],
        "down"
    );
    let text = metrics(&api);
    assert!(
        text.contains(&format!("vmr_tap_up{{tap=\"{}\"}} 0\n", tap.name)),
        "{text}"
    );
    // Paused, the guest is not stalled: it is paused.
    let ctl = |action: &str| {
        let out = vmr(&["ctl", "--api", api.to_str().unwrap(), action]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl("pause");
    wait_replication(&api, |s| s["health"]["guest"]["state"] == "paused");
    assert!(metrics(&api).contains("vmr_guest_progressing 0\n"));
    ctl("resume");
    // Deleted, the TAP is gone; the VM runs on all along.
    ip(&["link", "del", "dev", &tap.name]);
    let gone = wait_replication(&api, |s| tap_state(s, &tap.name).as_deref() == Some("gone"));
    assert!(
        gone["message"].as_str().is_some_and(|m| m.contains("gone")),
        "{gone}"
    );
    assert!(vm.child.try_wait().unwrap().is_none(), "{}", vm.log());
    assert!(vm.log().contains("health: TAP"), "{}", vm.log());
}

#[test]
fn a_primary_whose_disk_image_is_deleted_hands_the_vm_over_to_its_standby() {
    let key = key_file("health-disk.key", 23);
    let (ours, theirs) = (scratch("health-p.raw"), scratch("health-s.raw"));
    for image in [&ours, &theirs] {
        std::fs::write(image, vec![0u8; 1 << 20]).unwrap();
    }
    let standby = StandbyProc::spawn(
        "health-disk-standby",
        &key,
        &["--allow-pvm", "--disk", theirs.to_str().unwrap()],
    );
    let (mut p, api) = writer(
        "health-disk-primary",
        &key,
        &["--disk", ours.to_str().unwrap(), "--protect", &standby.addr],
    );
    wait_replication(standby.api(), ready);
    let status = wait_replication(&api, |s| s["protected"] == true);
    assert_eq!(status["health"]["disks"][0]["state"], "ok", "{status}");
    let s = replication(standby.api());
    assert_eq!(s["health"]["disks"][0]["state"], "ok", "{s}");

    std::fs::remove_file(&ours).unwrap();
    assert!(p.wait(), "the primary did not end cleanly: {}", p.log());
    wait_taken_over(&standby);
    let epoch = promoted_epoch(&standby);
    let log = p.log();
    let deleted = format!("VM handed over (disk {} was deleted)", ours.display());
    let line = log
        .lines()
        .find(|l| l.contains(&deleted))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("epoch={epoch}")), "{line}");
    // The standby's host runs the VM on its own image, which it supervises.
    let status = wait_replication(standby.api(), |s| {
        s["health"]["guest"]["state"] == "progressing"
    });
    assert_eq!(
        status["health"]["disks"][0]["path"],
        theirs.to_str().unwrap(),
        "{status}"
    );
    assert_eq!(status["health"]["disks"][0]["state"], "ok", "{status}");
}
