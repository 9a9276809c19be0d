//! Fast tests on this host's own `/dev/kvm` with tiny long-mode guests (no interrupts, no
//! exceptions), assembled from `tests/guests/*.S` with binutils: the vCPU run loop, port and
//! MMIO exits, the serial console, the i8042 reset, and dirty-page tracking by KVM's log and by
//! the monitor's bitmap.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::{msr, regs};
use vmm::devices::bus::{Bus, BusDevice};
use vmm::devices::legacy::i8042::I8042;
use vmm::devices::legacy::serial::SerialDevice;
use vmm::devices::legacy::EventFdTrigger;
use vmm::vstate::memory::{create_guest_memory, PAGE_SIZE};
use vmm::vstate::vcpu::{register_kick_handler, ExitReason, Vcpu, VcpuHandle, VmRunState};
use vmm::vstate::vm::Vm;

const LOAD_ADDR: u64 = 0x10_0000;
const MEM_SIZE: u64 = 16 << 20;

/// Assembles `tests/guests/NAME.S` into a flat binary linked at [`LOAD_ADDR`].
fn assemble(name: &str) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/guests/{name}.S"));
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vmr-tiny-{}-{name}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join("guest.o");
    let bin = dir.join("guest.bin");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("binutils (as, ld) must be installed");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-e", "_start", "--oformat=binary"])
        .arg(format!("-Ttext={LOAD_ADDR:#x}"))
        .arg("-o")
        .arg(&bin)
        .arg(&obj));
    let code = std::fs::read(&bin).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    code
}

/// A writer whose bytes the test can read.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bus device that records writes and answers reads with a fixed value.
#[derive(Default)]
struct Recorder {
    read_value: u32,
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let bytes = self.read_value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct TinyGuest {
    vm: Vm,
    vcpu: Option<Vcpu>,
    console: SharedBuf,
    mmio_dev: Arc<Mutex<Recorder>>,
    port80: Arc<Mutex<Recorder>>,
    run_state: Arc<VmRunState>,
}

impl TinyGuest {
    /// A 1-vCPU VM with dirty logging, its code at [`LOAD_ADDR`], in long mode.
    fn new(name: &str) -> Self {
        let kvm = Kvm::new().expect("/dev/kvm must be usable");
        let mem = create_guest_memory(MEM_SIZE).unwrap();
        regs::write_boot_structures(&mem).unwrap();
        mem.write_slice(&assemble(name), GuestAddress(LOAD_ADDR))
            .unwrap();
        let vm = Vm::new(&kvm, mem, true).unwrap();

        let console = SharedBuf::default();
        let mut pio = Bus::new();
        let serial = SerialDevice::<EventFdTrigger>::new(
            EventFdTrigger::new().unwrap(),
            Box::new(console.clone()),
        );
        pio.insert(Arc::new(Mutex::new(serial)), 0x3f8, 8).unwrap();
        let run_state = Arc::new(VmRunState::new().unwrap());
        let i8042 = I8042::new(run_state.clone());
        pio.insert(Arc::new(Mutex::new(i8042)), 0x60, 5).unwrap();
        let port80 = Arc::new(Mutex::new(Recorder::default()));
        pio.insert(port80.clone(), 0x80, 1).unwrap();
        let mut mmio = Bus::new();
        let mmio_dev = Arc::new(Mutex::new(Recorder {
            read_value: 41,
            ..Default::default()
        }));
        mmio.insert(mmio_dev.clone(), 0xd000_0000, 0x1000).unwrap();

        let vcpu = Vcpu::new(&vm, 0, pio, mmio).unwrap();
        regs::setup_long_mode_sregs(vcpu.fd()).unwrap();
        regs::setup_regs(vcpu.fd(), LOAD_ADDR, 0).unwrap();
        regs::setup_fpu(vcpu.fd()).unwrap();
        TinyGuest {
            vm,
            vcpu: Some(vcpu),
            console,
            mmio_dev,
            port80,
            run_state,
        }
    }

    /// Starts the vCPU on its thread.
    fn start(&mut self) -> (VcpuHandle, Arc<VmRunState>) {
        register_kick_handler().unwrap();
        let run_state = self.run_state.clone();
        let handle = self.vcpu.take().unwrap().start(run_state.clone()).unwrap();
        (handle, run_state)
    }

    /// Waits until the vCPU stops, the guest resets, or `timeout` passes (then the vCPU is
    /// kicked out and `Stopped` returned).
    fn wait(&self, handle: VcpuHandle, run_state: &VmRunState, timeout: Duration) -> ExitReason {
        let mut fds = [libc::pollfd {
            fd: run_state.exit_evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd struct for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        assert!(n >= 0, "poll failed");
        // Ends it if it has not ended (the first reason recorded wins).
        run_state.request_exit(ExitReason::Stopped);
        handle.kick_and_join();
        run_state.exit_reason().unwrap()
    }

    /// Runs the guest to its end (or `timeout`).
    fn run(&mut self, timeout: Duration) -> ExitReason {
        let (handle, run_state) = self.start();
        self.wait(handle, &run_state, timeout)
    }
}

fn page_of(addr: u64) -> u64 {
    addr / PAGE_SIZE as u64
}

#[test]
fn serial_output_reaches_the_console() {
    let mut guest = TinyGuest::new("serial_hello");
    assert_eq!(guest.run(Duration::from_secs(10)), ExitReason::Halted);
    let console = guest.console.0.lock().unwrap().clone();
    assert_eq!(
        String::from_utf8_lossy(&console),
        "hello from a tiny guest\n"
    );
}

#[test]
fn mmio_and_port_exits_are_dispatched() {
    let mut guest = TinyGuest::new("mmio_echo");
    assert_eq!(guest.run(Duration::from_secs(10)), ExitReason::Halted);
    let dev = guest.mmio_dev.lock().unwrap();
    assert_eq!(
        dev.writes,
        vec![(4, 42u32.to_le_bytes().to_vec()), (8, vec![0xef, 0xbe])]
    );
    assert_eq!(guest.port80.lock().unwrap().writes, vec![(0, vec![42])]);
}

#[test]
fn i8042_reset_ends_the_vm() {
    let mut guest = TinyGuest::new("reset");
    assert_eq!(guest.run(Duration::from_secs(10)), ExitReason::Reset);
}

#[test]
fn a_looping_guest_is_kicked_out_of_kvm_run() {
    let mut guest = TinyGuest::new("counter");
    assert_eq!(guest.run(Duration::from_millis(300)), ExitReason::Stopped);
    let count: u64 = guest.vm.memory().read_obj(GuestAddress(0x60_0000)).unwrap();
    assert!(count > 1000, "the guest ran only {count} steps");
}

#[test]
fn dirty_log_reports_guest_and_monitor_writes() {
    let mut guest = TinyGuest::new("dirty_pages");
    // Forget the boot-time writes (page tables, code) made by the monitor.
    let consumer = guest.vm.register_dirty_consumer();
    guest.vm.take_dirty_pages(consumer).unwrap();
    // A second consumer (a diff snapshot's, beside a migration's) with its own set.
    let other = guest.vm.register_dirty_consumer();
    assert_eq!(guest.run(Duration::from_secs(10)), ExitReason::Halted);

    let dirty = guest.vm.take_dirty_pages(consumer).unwrap();
    let written: Vec<u64> = (0..16).map(|i| 0x80_0000 + i * 0x2000).collect();
    for addr in &written {
        assert!(
            dirty.is_dirty(0, *addr),
            "guest write at {addr:#x} not logged"
        );
        assert!(
            !dirty.is_dirty(0, addr + 0x1000),
            "untouched page {:#x} reported dirty",
            addr + 0x1000
        );
    }
    // Only the written pages, plus at most the page-table pages whose accessed/dirty bits the
    // CPU sets and the stack page.
    assert!(
        dirty.count() <= written.len() + 8,
        "{} dirty pages",
        dirty.count()
    );

    // The log was cleared by reading it.
    assert_eq!(guest.vm.take_dirty_pages(consumer).unwrap().count(), 0);

    // Writes by the monitor itself go through vm-memory and are caught by its bitmap.
    let monitor_addr = 0xa0_0000u64;
    guest
        .vm
        .memory()
        .write_obj(0xfeed_u64, GuestAddress(monitor_addr))
        .unwrap();
    let dirty = guest.vm.take_dirty_pages(consumer).unwrap();
    assert_eq!(dirty.count(), 1);
    assert!(dirty.is_dirty(0, monitor_addr));
    assert_eq!(page_of(monitor_addr), 0xa00);

    // The first consumer's reads of the log took nothing from the second's set.
    let theirs = guest.vm.take_dirty_pages(other).unwrap();
    for addr in written.iter().chain([&monitor_addr]) {
        assert!(
            theirs.is_dirty(0, *addr),
            "{addr:#x} lost to the other consumer"
        );
    }
    // Pages given back (a failed send) come again; the other consumer is not affected.
    guest.vm.return_dirty_pages(other, &theirs);
    assert_eq!(guest.vm.take_dirty_pages(other).unwrap(), theirs);
    assert_eq!(guest.vm.take_dirty_pages(consumer).unwrap().count(), 0);
}

const LCG_STEPS_ADDR: u64 = 0x70_0000;
const LCG_RESULT_ADDR: u64 = 0x60_0000;

/// What the LCG guest computes in `steps` steps, done here.
fn lcg_result(steps: u64) -> u64 {
    let mut x: u64 = 0x1234_5678;
    for _ in 0..steps {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    x
}

/// The LCG guest, set to take about a second on this host: vCPU speed differs widely between
/// hosts (native on VT-x/AMD-V, much slower on PVM), so it is measured first.
fn lcg_guest() -> (TinyGuest, u64) {
    let mut probe = TinyGuest::new("lcg");
    probe
        .vm
        .memory()
        .write_obj(u64::MAX, GuestAddress(LCG_STEPS_ADDR))
        .unwrap();
    let (handle, run_state) = probe.start();
    std::thread::sleep(Duration::from_millis(200));
    handle.pause().unwrap();
    let done = u64::MAX - handle.save_state().unwrap().regs.rcx;
    probe.wait(handle, &run_state, Duration::ZERO);
    let steps = (done * 5).max(1000);
    let guest = TinyGuest::new("lcg");
    guest
        .vm
        .memory()
        .write_obj(steps, GuestAddress(LCG_STEPS_ADDR))
        .unwrap();
    (guest, steps)
}

#[test]
fn save_and_restore_continue_a_computation_exactly() {
    let (mut guest, steps) = lcg_guest();
    let expected = std::thread::spawn(move || lcg_result(steps));
    let (handle, run_state) = guest.start();
    std::thread::sleep(Duration::from_millis(200));
    handle.pause().unwrap();
    let state = handle.save_state().unwrap();
    let steps_left = state.regs.rcx;
    assert!(
        steps_left > 0 && steps_left < steps,
        "paused mid-computation ({steps_left} of {steps} steps left)"
    );
    let memory: Vec<u8> = {
        let mut buf = vec![0u8; MEM_SIZE as usize];
        guest
            .vm
            .memory()
            .read_slice(&mut buf, GuestAddress(0))
            .unwrap();
        buf
    };
    // The original carries on after the pause...
    handle.resume().unwrap();
    assert_eq!(
        guest.wait(handle, &run_state, Duration::from_secs(60)),
        ExitReason::Halted
    );
    let original: u64 = guest
        .vm
        .memory()
        .read_obj(GuestAddress(LCG_RESULT_ADDR))
        .unwrap();

    // ...and a new VM restored from the saved state and memory reaches the same result.
    let kvm = Kvm::new().unwrap();
    let mem = create_guest_memory(MEM_SIZE).unwrap();
    mem.write_slice(&memory, GuestAddress(0)).unwrap();
    let vm = Vm::new(&kvm, mem, false).unwrap();
    let mut vcpu = Vcpu::new(&vm, 0, Bus::new(), Bus::new()).unwrap();
    vcpu.restore_state(&state, Duration::ZERO).unwrap();
    let restored_regs = vcpu.fd().get_regs().unwrap();
    assert_eq!(restored_regs.rcx, steps_left);
    assert_eq!(restored_regs.rip, state.regs.rip);
    let mut restored = TinyGuest {
        vm,
        vcpu: Some(vcpu),
        console: SharedBuf::default(),
        mmio_dev: Arc::default(),
        port80: Arc::default(),
        run_state: Arc::new(VmRunState::new().unwrap()),
    };
    assert_eq!(restored.run(Duration::from_secs(60)), ExitReason::Halted);
    let result: u64 = restored
        .vm
        .memory()
        .read_obj(GuestAddress(LCG_RESULT_ADDR))
        .unwrap();

    let expected = expected.join().unwrap();
    assert_eq!(original, expected);
    assert_eq!(result, expected);
}

#[test]
fn enabled_async_page_faults_reach_kvm_only_once_the_guest_ran() {
    // A guest that enabled KVM's asynchronous page faults: delivered as an interrupt, its
    // per-vCPU data at 0x2000.
    let enabled = 0x2000 | msr::KVM_ASYNC_PF_ENABLED | 1 << 3;
    let new_vcpu = || {
        let kvm = Kvm::new().unwrap();
        let mut vm = Vm::new(&kvm, create_guest_memory(MEM_SIZE).unwrap(), false).unwrap();
        vm.setup_irqchip().unwrap();
        let vcpu = Vcpu::new(&vm, 0, Bus::new(), Bus::new()).unwrap();
        vcpu.configure_cpu(&kvm, 1).unwrap();
        (vm, vcpu)
    };
    let (_vm, vcpu) = new_vcpu();
    let mut state = vcpu.save_state().unwrap();
    let saved = state
        .msrs
        .iter_mut()
        .find(|m| m.index == msr::MSR_KVM_ASYNC_PF_EN)
        .expect("KVM lists MSR_KVM_ASYNC_PF_EN as saveable");
    saved.data = enabled;

    let (_vm, mut restored) = new_vcpu();
    restored.restore_state(&state, Duration::ZERO).unwrap();
    // KVM has them off (its "wake all" interrupt dropped), a save still reports them on...
    assert!(restored.holds_back_msrs());
    assert_eq!(restored.msr(msr::MSR_KVM_ASYNC_PF_EN), Some(0));
    let again = restored.save_state().unwrap();
    let reported = again
        .msrs
        .iter()
        .find(|m| m.index == msr::MSR_KVM_ASYNC_PF_EN);
    assert_eq!(reported.map(|m| m.data), Some(enabled));
    // ...and KVM gets them when the vCPU is told to.
    restored.apply_held_back_msrs().unwrap();
    assert!(!restored.holds_back_msrs());
    assert_eq!(restored.msr(msr::MSR_KVM_ASYNC_PF_EN), Some(enabled));
}
