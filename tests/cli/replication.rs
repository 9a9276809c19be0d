//! `vmr standby` and `vmr run --protect` on this host's `/dev/kvm`, with the epoch writer
//! guest (`vmm/tests/guests/epoch_writer.S`, writing records continuously): the standby
//! commits the primary's epochs (its API shows them), writes its committed epoch as a
//! snapshot that `vmr restore` runs, and keeps it when the primary is lost; `vmr ctl protect`
//! pairs a running VM; a primary without the key, or whose standby nobody serves or cannot
//! hold the VM, is refused in one line; the standby goes on after a refused connection.

mod common;

use std::time::Duration;

use common::standby::{
    free_port, key_file, protect, protect_ok, replication, wait_replication, writer_args,
    StandbyProc,
};
use common::{assert_refused, scratch, tiny_elf, vmr, wait_for_socket, Vmr};

#[test]
fn a_standby_refuses_a_primary_without_the_key_then_commits_a_protected_vms_epochs() {
    let key = key_file("repl.key", 7);
    let wrong = key_file("wrong.key", 8);
    let standby = StandbyProc::spawn("standby", &key, &[]);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);

    // Without the key: refused in one line on both sides, the standby goes on.
    let mut bad = args.clone();
    bad.extend(["--serial", "none", "--protect", &standby.addr, "--key-file"].map(String::from));
    bad.push(wrong.display().to_string());
    let out = vmr(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "replication key");
    let refused = standby.wait_log("refusal", |l| l.contains("refused a connection"));
    assert!(refused.contains("WARN"), "{refused}");
    assert_eq!(standby.log().matches("refused a connection").count(), 1);

    // With the key: the VM runs protected, the standby commits its epochs.
    args.extend(["--protect", &standby.addr, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    let primary_api = scratch("primary.sock");
    args.extend(["--api".to_string(), primary_api.display().to_string()]);
    let mut primary = Vmr::spawn(
        "protected",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    standby.wait_log("initial synchronisation", |l| {
        l.contains("initial synchronisation received")
    });
    let status = wait_replication(standby.api(), |s| {
        s["last_committed_epoch"].as_u64() >= Some(5)
    });
    assert_eq!(status["role"], "standby", "{status}");
    assert!(
        status["primary"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{status}"
    );
    // Protected once the standby keeps up (the initial synchronisation converged).
    let ours = wait_replication(&primary_api, |s| s["protected"] == true);
    assert_eq!(ours["role"], "primary", "{ours}");
    assert_eq!(ours["protected"], true, "{ours}");
    assert_eq!(ours["peers"][0]["name"], standby.addr.as_str(), "{ours}");
    assert_eq!(ours["peers"][0]["state"], "protecting", "{ours}");

    // Every answer of both monitors' replication API follows the OpenAPI document.
    let not_a_dir = format!(
        r#"{{"snapshot_path": "{}/a/b"}}"#,
        scratch("none").display()
    );
    for (api, method, path, body, status) in [
        (standby.api(), "GET", "/replication", None, 200),
        (standby.api(), "GET", "/metrics", None, 200),
        (standby.api(), "GET", "/vm", None, 409),
        (
            standby.api(),
            "PUT",
            "/snapshot/create",
            Some(not_a_dir.as_str()),
            400,
        ),
        (primary_api.as_path(), "GET", "/replication", None, 200),
        (primary_api.as_path(), "GET", "/metrics", None, 200),
    ] {
        let response = vmm::api::ApiClient::new(api)
            .call(
                method,
                path,
                body.map(str::as_bytes),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(
            response.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        common::openapi::openapi().check(method, path, &response);
    }

    // The committed epoch as a snapshot, which `vmr restore` runs.
    let snap = scratch("committed");
    let out = vmr(&[
        "ctl",
        "--api",
        standby.api().to_str().unwrap(),
        "snapshot",
        snap.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(written["pages"].as_u64() > Some(0), "{written}");
    assert!(
        primary.child.try_wait().unwrap().is_none(),
        "the primary ended: {}",
        primary.log()
    );
    // The primary is lost: the standby keeps its committed state and says so.
    primary.kill();
    standby.wait_log("the primary's loss", |l| l.contains("PRIMARY LOST"));
    let kept = standby.wait_log("no automatic failover", |l| {
        l.contains("automatic failover is off")
    });
    assert!(kept.contains("committed state is kept"), "{kept}");
    let kept = wait_replication(standby.api(), |s| {
        s["message"].as_str().is_some_and(|m| m.contains("kept"))
    });
    assert!(kept["last_committed_epoch"].as_u64() >= Some(5), "{kept}");
    // A new pairing is refused: the committed state is kept for failover.
    let mut again = writer_args(&kernel);
    again.extend(["--serial", "none", "--protect", &standby.addr, "--key-file"].map(String::from));
    again.push(key.display().to_string());
    let out = vmr(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "kept for failover");

    let restored_api = scratch("restored.sock");
    let mut restored = Vmr::spawn(
        "restored",
        &[
            "restore",
            "--from",
            snap.to_str().unwrap(),
            "--allow-pvm",
            "--api",
            restored_api.to_str().unwrap(),
        ],
    );
    wait_for_socket(&restored_api);
    std::thread::sleep(Duration::from_millis(500));
    let out = vmr(&["ctl", "--api", restored_api.to_str().unwrap(), "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(
        restored.child.try_wait().unwrap().is_none(),
        "the restored VM ended: {}",
        restored.log()
    );
    restored.kill();
}

#[test]
fn vmr_ctl_protect_pairs_a_running_vm_with_a_standby() {
    let key = key_file("ctl.key", 9);
    let standby = StandbyProc::spawn("ctl-standby", &key, &[]);
    let kernel = tiny_elf("epoch_writer");
    let api = scratch("ctl-primary.sock");
    let mut args = writer_args(&kernel);
    args.extend(["--key-file".into(), key.display().to_string()]);
    args.extend(["--api".into(), api.display().to_string()]);
    let _primary = Vmr::spawn(
        "ctl-primary",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_for_socket(&api);
    let before = replication(&api);
    assert_eq!(before["role"], "unprotected", "{before}");
    assert_eq!(before["key"], true, "{before}");
    let out = protect_ok(&api, &standby.addr);
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["protected"], true, "{after}");
    wait_replication(standby.api(), |s| {
        s["last_committed_epoch"].as_u64() >= Some(5)
    });
    // The same standby once more: it refuses, in one line (it holds this VM already).
    let out = protect(&api, &standby.addr);
    assert_refused(&out, "is serving VM");

    // A VM without a key cannot be protected.
    let bare_api = scratch("bare.sock");
    let mut bare = writer_args(&kernel);
    bare.extend(["--api".into(), bare_api.display().to_string()]);
    let _bare = Vmr::spawn("bare", &bare.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for_socket(&bare_api);
    let out = protect(&bare_api, &standby.addr);
    assert_refused(&out, "--key-file");
}

#[test]
fn protecting_with_an_unreachable_standby_or_without_a_key_is_refused_in_one_line() {
    let key = key_file("unreachable.key", 3);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);
    args.extend(["--serial", "none"].map(String::from));
    let nobody = format!("127.0.0.1:{}", free_port());
    let mut unreachable = args.clone();
    unreachable.extend(["--protect", &nobody, "--key-file"].map(String::from));
    unreachable.push(key.display().to_string());
    let out = vmr(&unreachable.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, &format!("cannot connect to standby {nobody}"));

    // The same from the config file's [replication] table.
    let config = scratch("unreachable.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\nmem = 64\nallow_pvm = true\nserial = \"none\"\n\
             [replication]\nstandbys = [{nobody:?}]\nkey_file = {:?}\nepoch_ms = 20\n",
            kernel.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let out = vmr(&["run", "--config", config.to_str().unwrap()]);
    assert_refused(&out, &format!("cannot connect to standby {nobody}"));

    let mut keyless = args.clone();
    keyless.extend(["--protect", &nobody].map(String::from));
    let out = vmr(&keyless.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "--key-file");
}

#[test]
fn a_standby_that_cannot_hold_the_vm_refuses_it_on_both_sides() {
    let key = key_file("misfit.key", 4);
    let disk = scratch("misfit.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // The standby has a disk, the VM none.
    let standby = StandbyProc::spawn("misfit", &key, &["--disk", disk.to_str().unwrap()]);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);
    args.extend(["--serial", "none", "--protect", &standby.addr, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    let out = vmr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "device lists differ");
    let line = standby.wait_log("refusal", |l| l.contains("refused to pair"));
    assert!(line.contains("device lists differ"), "{line}");
}

#[test]
fn a_lost_standby_is_dropped_the_vm_runs_on_and_can_be_protected_again() {
    let key = key_file("lost.key", 5);
    let mut first = StandbyProc::spawn("lost-first", &key, &[]);
    let kernel = tiny_elf("epoch_writer");
    let api = scratch("lost-primary.sock");
    let mut args = writer_args(&kernel);
    args.extend(["--protect", &first.addr, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    args.extend(["--standby-timeout-ms".into(), "1000".into()]);
    args.extend(["--api".into(), api.display().to_string()]);
    let mut primary = Vmr::spawn(
        "lost-primary",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_replication(first.api(), |s| {
        s["last_committed_epoch"].as_u64() >= Some(5)
    });
    // The standby's host is lost: the primary drops it and runs on, unprotected.
    let _ = first.child.kill();
    let _ = first.child.wait();
    let status = wait_replication(&api, |s| s["role"] == "unprotected");
    assert_eq!(status["protected"], false, "{status}");
    assert_eq!(status["peers"][0]["state"], "dropped", "{status}");
    assert!(status["peers"][0]["reason"].is_string(), "{status}");
    assert!(
        primary.child.try_wait().unwrap().is_none(),
        "the primary ended: {}",
        primary.log()
    );
    // A fresh standby protects it again.
    let second = StandbyProc::spawn("lost-second", &key, &[]);
    protect_ok(&api, &second.addr);
    wait_replication(second.api(), |s| {
        s["last_committed_epoch"].as_u64() >= Some(5)
    });
    primary.kill();
}
