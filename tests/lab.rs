//! End-to-end tests with real Linux guests, run inside the lab: boot with 2 vCPUs, networking
//! over a TAP, block storage across a reboot, redis reached from the host, a TCP connection kept
//! through snapshot/restore and live migration. Each scenario is
//! a script in `tests/lab/`; it fails on its first failed check and prints the guest console.

use vmr_tests::run_scenario;

fn scenario(name: &str) {
    let run = run_scenario(name);
    print!("{}", run.stdout());
    run.assert_success();
    assert!(
        run.stdout().contains(&format!("SCENARIO PASS {name}")),
        "scenario {name} did not reach its end"
    );
}

#[test]
fn linux_boots_with_two_vcpus() {
    scenario("boot");
}

#[test]
fn virtio_net_ping_and_tcp() {
    scenario("net");
}

#[test]
fn virtio_blk_data_survives_reboot() {
    scenario("blk");
}

#[test]
fn redis_set_get_from_the_host() {
    scenario("redis");
}

#[test]
fn a_tcp_connection_survives_snapshot_and_restore() {
    scenario("snapshot");
}

#[test]
fn a_tcp_connection_survives_live_migration() {
    scenario("migrate");
}

#[test]
fn redis_benchmark_runs_through_a_live_migration() {
    scenario("migrate_redis");
}
