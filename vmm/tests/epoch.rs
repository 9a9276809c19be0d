//! Epoch checkpoints on this host's `/dev/kvm` with the epoch writer guest
//! (`tests/guests/epoch_writer.S`), which writes records into random pages while epochs are
//! taken at about 100 Hz: replaying the captures in order onto the first (full) one must give,
//! at every epoch, the memory the VM held at that epoch's pause (compared page by page, the
//! reference copied inside the pause), whether the pages were copied inside the pause (naive)
//! or after it (copy-before-write), and whoever copied them (the copier or the fault handler).

#[path = "common/tiny_elf.rs"]
mod tiny_elf;

/// The tiny guests, linked as ELF kernels, and scratch files (the tests that run the `vmr`
/// binary have their own, in the root package's `tests/cli/common`).
mod common {
    use std::path::PathBuf;

    /// This test process's scratch directory.
    fn scratch_dir() -> PathBuf {
        std::env::temp_dir().join(format!("vmr-epoch-{}", std::process::id()))
    }

    /// A path in this test process's scratch directory.
    pub fn scratch(name: &str) -> PathBuf {
        let dir = scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// Links `tests/guests/NAME.S` into an ELF executable at 2 MiB.
    pub fn tiny_elf(name: &str) -> PathBuf {
        super::tiny_elf::tiny_elf(name, &scratch_dir())
    }
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::config::{SerialConfig, VmConfig};
use vmm::epoch::{EpochCapture, EpochMode, EpochOptions, EpochTracker};
use vmm::microvm::MicroVmThread;
use vmm::vstate::memory::PAGE_SIZE;

const CTRL: u64 = 0x70_0000;

/// The epoch writer guest in a 64 MiB VM, writing records continuously into `pages` pages.
fn writer(pages: u64) -> MicroVmThread {
    let mut config = VmConfig::new(common::tiny_elf("epoch_writer"));
    config.mem_mib = 64;
    config.allow_pvm = true;
    config.serial = SerialConfig::None;
    MicroVmThread::spawn(config, move |vm| {
        let mem = vm.vm().memory();
        mem.write_obj(0u64, GuestAddress(CTRL)).unwrap();
        mem.write_obj(pages - 1, GuestAddress(CTRL + 32)).unwrap();
    })
    .expect("the epoch writer guest starts")
}

fn progress(vm: &MicroVmThread) -> u64 {
    vm.vm.memory().read_obj(GuestAddress(CTRL + 24)).unwrap()
}

/// Applies `capture` onto `image`.
fn apply(image: &mut [u8], capture: &EpochCapture) {
    for (pfn, contents) in capture.pages() {
        let at = pfn as usize * PAGE_SIZE;
        image[at..at + PAGE_SIZE].copy_from_slice(contents);
    }
}

/// The first page where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .position(|(x, y)| x != y)
        .or(Some(usize::MAX))
}

/// Takes `epochs` epochs about every `period`, the `mode` of each from `mode_of`, and checks
/// that replaying them gives the memory of each pause; returns the captures' copy figures
/// (pages copied by the copier, by the fault handler).
fn replay_matches_every_pause(
    vm: &MicroVmThread,
    epochs: usize,
    period: Duration,
    options: impl Fn(usize) -> EpochOptions,
) -> (u64, u64) {
    let tracker = Arc::new(EpochTracker::new(&vm.vm, true).unwrap());
    let first = EpochOptions {
        full: true,
        reference_image: true,
        ..Default::default()
    };
    let capture = vm.freezes.epoch(&tracker, &first).unwrap().wait().unwrap();
    let mut image = capture.data.clone();
    assert_eq!(image.len() as u64, 64 << 20);
    assert!(Some(&image) == capture.reference_image.as_ref());
    let (mut by_copier, mut by_fault) = (0, 0);
    let mut compared = 0;
    for n in 0..epochs {
        let t0 = Instant::now();
        let options = options(n);
        let capture = vm
            .freezes
            .epoch(&tracker, &options)
            .unwrap()
            .wait()
            .unwrap();
        assert!(!capture.state.is_empty());
        apply(&mut image, &capture);
        if let Some(reference) = &capture.reference_image {
            let differ = first_difference(&image, reference);
            assert!(
                differ.is_none(),
                "epoch {} ({:?}, {} pages, {} copied on fault): page {:?} of the replayed \
                 memory differs from the memory at its pause",
                capture.epoch,
                options.mode,
                capture.pfns.len(),
                capture.copy.by_fault,
                differ
            );
            compared += 1;
        }
        if std::env::var_os("EPOCH_TEST_DEBUG").is_some() {
            eprintln!(
                "epoch {} {:?} pages {} pause {:?} copy {:?} fault {} total {:?}",
                capture.epoch,
                options.mode,
                capture.pfns.len(),
                capture.pause,
                capture.copy.after_resume,
                capture.copy.by_fault,
                t0.elapsed()
            );
        }
        by_copier += capture.copy.by_copier;
        by_fault += capture.copy.by_fault;
        tracker.recycle(capture);
        std::thread::sleep(period.saturating_sub(t0.elapsed()));
    }
    assert!(compared > 0);
    (by_copier, by_fault)
}

#[test]
fn replayed_epochs_equal_the_memory_at_each_pause() {
    let vm = writer(4096);
    let before = progress(&vm);
    let (by_copier, _) = replay_matches_every_pause(&vm, 120, Duration::from_millis(10), |n| {
        EpochOptions {
            // Copy-before-write protecting before the pause or inside it, the default (small
            // epochs copied in the pause), naive: each and their successions.
            mode: if n % 4 == 3 {
                EpochMode::Naive
            } else {
                EpochMode::CopyBeforeWrite
            },
            inline_copy_max_pages: if n % 4 < 2 { 0 } else { 1024 },
            protect_before_pause: n % 4 != 1,
            reference_image: n % 10 == 9,
            ..Default::default()
        }
    });
    assert!(by_copier > 0);
    assert!(progress(&vm) > before + 1000, "the guest did not run");
    vm.stop().unwrap();
}

#[test]
fn pages_written_right_after_the_resume_are_captured_as_they_were_at_the_pause() {
    // 64 hot pages rewritten within microseconds of every resume, and a copier that starts
    // late: the guest's writes reach protected pages first, the fault handler copies them.
    let vm = writer(64);
    let (_, by_fault) =
        replay_matches_every_pause(&vm, 60, Duration::from_millis(10), |n| EpochOptions {
            reference_image: n % 4 == 3,
            copier_delay: Duration::from_millis(5),
            inline_copy_max_pages: 0,
            protect_before_pause: n % 2 == 0,
            ..Default::default()
        });
    assert!(by_fault > 0, "no guest write reached a protected page");
    vm.stop().unwrap();
}

#[test]
fn copy_before_write_needs_a_write_protecting_tracker() {
    let vm = writer(64);
    let tracker = Arc::new(EpochTracker::new(&vm.vm, false).unwrap());
    assert!(matches!(
        vm.freezes.epoch(&tracker, &EpochOptions::default()),
        Err(vmm::epoch::EpochError::NoWriteProtect)
    ));
    let naive = EpochOptions {
        mode: EpochMode::Naive,
        ..Default::default()
    };
    let capture = vm.freezes.epoch(&tracker, &naive).unwrap().wait().unwrap();
    assert!(capture.copy.by_fault == 0 && capture.pause.protect.is_zero());
    vm.stop().unwrap();
}

#[test]
fn pages_given_back_after_a_failed_send_come_with_the_next_epoch() {
    let vm = writer(4096);
    let tracker = Arc::new(EpochTracker::new(&vm.vm, true).unwrap());
    std::thread::sleep(Duration::from_millis(20));
    let options = EpochOptions {
        inline_copy_max_pages: 0,
        ..Default::default()
    };
    let lost = vm
        .freezes
        .epoch(&tracker, &options)
        .unwrap()
        .wait()
        .unwrap();
    assert!(!lost.pfns.is_empty());
    tracker.give_back(&lost);
    let next = vm
        .freezes
        .epoch(&tracker, &options)
        .unwrap()
        .wait()
        .unwrap();
    let missing: Vec<u64> = lost
        .pfns
        .iter()
        .filter(|p| next.pfns.binary_search(p).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "pages given back but not sent again: {missing:?}"
    );
    vm.stop().unwrap();
}

#[test]
fn every_pause_steps_the_devices_into_the_next_epoch() {
    let disk = common::scratch("epoch-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = VmConfig::new(common::tiny_elf("epoch_writer"));
    config.mem_mib = 64;
    config.allow_pvm = true;
    config.serial = SerialConfig::None;
    config.disks.push(vmm::config::DiskConfig {
        path: disk,
        read_only: false,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let vm = MicroVmThread::spawn(config, move |vm| {
        let mem = vm.vm().memory();
        mem.write_obj(0u64, GuestAddress(CTRL)).unwrap();
        mem.write_obj(63u64, GuestAddress(CTRL + 32)).unwrap();
        let ports = vm.set_replication(vmm::devices::replication::ReplicationMode::On {
            epoch: 1,
            inbound_capacity: 16,
        });
        tx.send(ports).unwrap();
    })
    .unwrap();
    let tracker = Arc::new(EpochTracker::new(&vm.vm, true).unwrap());
    let ports: vmm::devices::replication::ReplicationPorts = rx.recv().unwrap();
    tracker.attach_pause_step(Box::new(ports.switch()));
    for expected in 1..=3 {
        let capture = vm
            .freezes
            .epoch(&tracker, &EpochOptions::default())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(capture.epoch, expected);
        assert_eq!(capture.disk_writes.len(), 1, "one disk");
        assert_eq!(capture.disk_writes[0].epoch, expected);
    }
    vm.stop().unwrap();
}
