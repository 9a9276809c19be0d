//! The epoch writer guest (vmm's `tests/guests/epoch_writer.S`) as the replication tests run
//! it, and the hello, profile and keys of its pairing. Shared by the tests that replicate it
//! (`#[path = "support/guest.rs"] mod guest;`).

#![allow(dead_code)]

use std::path::PathBuf;

use replicator::auth::ReplicationKey;
use replicator::compat::{Hello, StandbyProfile, PROTOCOL};
use replicator::primary::vm::VmThread;
use vm_memory::{Bytes, GuestAddress};
use vmm::builder::RestoreOptions;
use vmm::config::{SerialConfig, VmConfig};
use vmm::vstate::memory::GuestMemoryMmap;

#[path = "../../../vmm/tests/common/tiny_elf.rs"]
mod tiny_elf;

/// Where the epoch writer's control block sits in guest memory.
pub const CTRL: u64 = 0x70_0000;
/// The epoch writer VM's memory, in bytes.
pub const MEM: u64 = 64 << 20;

/// Links vmm's `tests/guests/NAME.S` into an ELF kernel at 2 MiB, in this test process's
/// scratch directory `vmr-TEST-PID`.
pub fn tiny_elf(test: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmr-{test}-{}", std::process::id()));
    tiny_elf::tiny_elf(name, &dir)
}

/// The epoch writer guest in a 64 MiB VM writing records continuously into `pages` pages, its
/// configuration (built in the scratch directory of `test`) changed by `configure` first.
pub fn writer_with(test: &str, pages: u64, configure: impl FnOnce(&mut VmConfig)) -> VmThread {
    let mut config = VmConfig::new(tiny_elf(test, "epoch_writer"));
    config.mem_mib = MEM >> 20;
    config.allow_pvm = true;
    config.serial = SerialConfig::None;
    configure(&mut config);
    VmThread::spawn(config, move |vm| {
        let mem = vm.vm().memory();
        mem.write_obj(0u64, GuestAddress(CTRL)).unwrap();
        mem.write_obj(pages - 1, GuestAddress(CTRL + 32)).unwrap();
    })
    .expect("the epoch writer guest starts")
}

/// The records the epoch writer wrote, in its memory `mem`.
pub fn progress_in(mem: &GuestMemoryMmap) -> u64 {
    mem.read_obj(GuestAddress(CTRL + 24)).unwrap()
}

/// The records the epoch writer in `vm` wrote.
pub fn progress(vm: &VmThread) -> u64 {
    progress_in(vm.vm.memory())
}

pub fn restore_options() -> RestoreOptions {
    RestoreOptions {
        serial: SerialConfig::None,
        allow_pvm: true,
        ..RestoreOptions::default()
    }
}

/// The primary's hello for the epoch writer VM (term 1).
pub fn hello() -> Hello {
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

/// A standby's profile that fits the epoch writer VM.
pub fn profile() -> StandbyProfile {
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

/// The replication key of 32 bytes `byte`.
pub fn key(byte: u8) -> ReplicationKey {
    ReplicationKey::new(vec![byte; 32]).unwrap()
}
