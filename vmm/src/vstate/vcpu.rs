//! vCPUs: configuration for Linux boot, the run loop that dispatches port and MMIO exits to the
//! device buses, and the thread each vCPU runs on.

use std::borrow::Cow;
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vm::Vm;
use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::Bus;

/// Errors from creating, configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM_CREATE_VCPU failed for vCPU {index}: {source}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    /// Building the boot MSR list failed.
    #[error(transparent)]
    Msrs(#[from] msr::MsrError),
    /// `KVM_SET_MSRS` failed or set fewer MSRs than asked.
    #[error("KVM_SET_MSRS set {set} of {asked} MSRs")]
    SetMsrs {
        /// MSRs set.
        set: usize,
        /// MSRs asked.
        asked: usize,
    },
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrsIoctl(kvm_ioctls::Error),
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed on vCPU {index}: {source}")]
    Run {
        /// vCPU index.
        index: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Registering the kick signal handler failed.
    #[error("cannot register the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// Spawning the vCPU thread failed.
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    SpawnThread {
        /// vCPU index.
        index: u8,
        /// The OS error.
        source: std::io::Error,
    },
    /// A state ioctl failed while saving or restoring the vCPU.
    #[error("{ioctl} failed: {source}")]
    State {
        /// The ioctl, e.g. `KVM_GET_XSAVE`.
        ioctl: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Building a CPUID or MSR list for restore failed.
    #[error("cannot build the {0} list of a saved vCPU")]
    StateList(&'static str),
    /// KVM refused to restore a saved MSR.
    #[error("KVM_SET_MSRS refused MSR {index:#x} = {value:#x}")]
    RestoreMsr {
        /// The MSR.
        index: u32,
        /// Its saved value.
        value: u64,
    },
    /// The vCPU thread did not answer a request in time, or is gone.
    #[error("vCPU {index} did not answer the {request} request")]
    NoAnswer {
        /// vCPU index.
        index: u8,
        /// The request.
        request: &'static str,
    },
    /// The vCPU's state was asked for while it runs.
    #[error("vCPU {0} must be paused to save its state")]
    NotPaused(u8),
}

fn state_err(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::State { ioctl, source }
}

/// Everything KVM holds for one vCPU, in plain serializable form.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (APIC ID).
    pub index: u8,
    /// CPUID as KVM applies it (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers (absent without an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Model-specific registers KVM reports as saveable.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM tells it.
    pub tsc_khz: Option<u32>,
}

/// This host's TSC frequency as KVM gives it to a new vCPU, in kHz, and whether KVM can run a
/// guest at another frequency (`KVM_CAP_TSC_CONTROL`); `None` if KVM cannot tell. Asked once
/// (a throwaway VM and vCPU), then remembered.
pub fn host_tsc() -> Option<(u32, bool)> {
    static TSC: OnceLock<Option<(u32, bool)>> = OnceLock::new();
    *TSC.get_or_init(|| {
        let kvm = Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        let khz = vcpu.get_tsc_khz().ok()?;
        Some((khz, kvm.check_extension(kvm_ioctls::Cap::TscControl)))
    })
}

/// The CPU feature flags of this host (`flags` of `/proc/cpuinfo`), sorted; empty if unknown.
pub fn host_cpu_features() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
        return Vec::new();
    };
    let mut flags: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    flags.sort();
    flags.dedup();
    flags
}

/// The MSRs KVM can save and restore on this host.
fn saveable_msrs() -> Result<&'static [u32], VcpuError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let kvm = Kvm::new().map_err(state_err("open /dev/kvm"))?;
    let list = kvm
        .get_msr_index_list()
        .map_err(state_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(LIST.get_or_init(|| list.as_slice().to_vec()))
}

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 `0xFE`): how a Linux guest with `reboot=k` ends.
    Reset,
    /// A vCPU executed `HLT` with no in-kernel irqchip to wake it (tiny test guests).
    Halted,
    /// The guest triple-faulted.
    Shutdown,
    /// The monitor was asked to stop (signal, API).
    Stopped,
    /// The VM now runs on another host: it was migrated there.
    Migrated,
    /// A vCPU failed (entry failure, internal error, ioctl failure).
    Error(String),
}

impl ExitReason {
    /// Whether the guest ended as a guest should.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::Halted | ExitReason::Stopped | ExitReason::Migrated
        )
    }
}

/// What ended one `KVM_RUN`.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuEmulation {
    /// An exit handled by the monitor; run again.
    Handled,
    /// `KVM_RUN` was interrupted by a kick.
    Interrupted,
    /// The vCPU cannot continue.
    Stopped(ExitReason),
}

/// State shared by the monitor and all vCPU threads: the stop request and the VM's exit.
pub struct VmRunState {
    stop: AtomicBool,
    exit_reason: Mutex<Option<ExitReason>>,
    /// Signalled when the VM must stop (a vCPU stopped, the guest reset).
    pub exit_evt: EventFd,
    /// Whether vCPU threads wait before their first run (see [`VmRunState::hold_start`]).
    start_held: Mutex<bool>,
    start_released: Condvar,
    /// See [`VmRunState::release_held_back_msrs`].
    held_back_due: AtomicBool,
}

impl VmRunState {
    /// A fresh, running state.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            start_held: Mutex::new(false),
            start_released: Condvar::new(),
            held_back_due: AtomicBool::new(false),
        })
    }

    /// Makes vCPU threads launched from now on wait before they first run, until
    /// [`VmRunState::release_start`]: started one after the other, the first would run the
    /// guest alone, maybe spinning on a lock another vCPU (restored mid-way) holds.
    pub fn hold_start(&self) {
        *self.start_held.lock().expect("start gate poisoned") = true;
    }

    /// Lets every held vCPU thread run.
    pub fn release_start(&self) {
        *self.start_held.lock().expect("start gate poisoned") = false;
        self.start_released.notify_all();
    }

    /// Waits while the start is held.
    fn wait_start(&self) {
        let held = self.start_held.lock().expect("start gate poisoned");
        drop(
            self.start_released
                .wait_while(held, |held| *held)
                .expect("start gate poisoned"),
        );
    }

    /// Records why the VM ends (the first reason wins) and wakes the monitor.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut slot = self.exit_reason.lock().expect("exit reason lock poisoned");
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.exit_evt.write(1) {
            tracing::error!("cannot signal the VM exit: {e}");
        }
    }

    /// Has every vCPU give KVM the MSRs it held back at its restore, on its next way into the
    /// guest (the caller kicks the running ones).
    pub fn release_held_back_msrs(&self) {
        self.held_back_due.store(true, Ordering::SeqCst);
    }

    fn held_back_msrs_due(&self) -> bool {
        self.held_back_due.load(Ordering::SeqCst)
    }

    /// Whether the vCPUs have been asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The recorded exit reason, if any.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit_reason
            .lock()
            .expect("exit reason lock poisoned")
            .clone()
    }
}

thread_local! {
    // The `kvm_run` of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is the mmap'd `kvm_run` of the vCPU owned by this thread, set by
        // it before it first enters KVM_RUN and valid for the thread's life. Setting
        // `immediate_exit` makes a KVM_RUN about to start return EINTR at once, closing the race
        // between checking the stop flag and entering the guest.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal handler (process-wide; idempotent).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler)
}

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// KVM's count of a vCPU's exits (its binary statistics' `exits`: every time the vCPU left
/// the guest, whatever the reason, in the kernel or to this monitor), read with one `pread`.
#[derive(Debug)]
pub struct ExitCounter {
    stats: std::fs::File,
    offset: u64,
}

impl ExitCounter {
    /// The count now, or `None` if it cannot be read.
    pub fn read(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut value = [0u8; 8];
        self.stats.read_exact_at(&mut value, self.offset).ok()?;
        Some(u64::from_ne_bytes(value))
    }

    /// The `exits` statistic of the vCPU whose statistics file is `stats`, if it has one.
    fn find(stats: std::fs::File) -> Option<Self> {
        use std::os::unix::fs::FileExt;
        let u32_at = |buf: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
        };
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset,
        // data_offset.
        let mut header = [0u8; 24];
        stats.read_exact_at(&mut header, 0).ok()?;
        let name_size = u32_at(&header, 4)? as usize;
        let count = u32_at(&header, 8)? as usize;
        let (desc_offset, data_offset) = (u32_at(&header, 16)?, u32_at(&header, 20)?);
        // struct kvm_stats_desc: flags, exponent (s16), size (u16), offset, bucket_size, then
        // the name in `name_size` bytes.
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; desc_size.checked_mul(count).filter(|&n| n <= 1 << 20)?];
        stats
            .read_exact_at(&mut descs, u64::from(desc_offset))
            .ok()?;
        let offset = descs.chunks_exact(desc_size).find_map(|d| {
            let name = d[16..].split(|&b| b == 0).next()?;
            (name == b"exits").then(|| u32_at(d, 8))?
        })?;
        let counter = Self {
            stats,
            offset: u64::from(data_offset) + u64::from(offset),
        };
        counter.read().map(|_| counter)
    }
}

/// One vCPU and the buses its exits are dispatched to.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    has_lapic: bool,
    pio_bus: Bus,
    mmio_bus: Bus,
    /// The thread to run on, if started ahead ([`Vcpu::spawn_thread`]).
    thread: Option<VcpuThread>,
    /// Restored MSRs KVM holds at another value until the guest has run a while (see
    /// [`Vcpu::hold_back_msrs`]); what a save reports for them.
    held_back: Vec<kvm_msr_entry>,
}

/// A vCPU's thread, waiting for its vCPU: dropped instead, it ends.
struct VcpuThread {
    index: u8,
    launch: Sender<(Vcpu, Arc<VmRunState>)>,
    thread: JoinHandle<()>,
    requests: Sender<Numbered<VcpuRequest>>,
    responses: Receiver<Numbered<VcpuResponse>>,
    parked: Arc<AtomicBool>,
}

impl VcpuThread {
    fn spawn(index: u8) -> Result<Self, VcpuError> {
        let (launch_tx, launch_rx) = channel::<(Vcpu, Arc<VmRunState>)>();
        let (request_tx, request_rx) = channel();
        let (response_tx, response_rx) = channel();
        let parked = Arc::new(AtomicBool::new(false));
        let thread_parked = parked.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Ok((vcpu, run_state)) = launch_rx.recv() {
                    vcpu.thread_main(&run_state, &request_rx, &response_tx, &thread_parked);
                }
            })
            .map_err(|source| VcpuError::SpawnThread { index, source })?;
        Ok(Self {
            index,
            launch: launch_tx,
            thread,
            requests: request_tx,
            responses: response_rx,
            parked,
        })
    }

    /// Runs `vcpu` (of this thread's index) here.
    fn launch(self, vcpu: Vcpu, run_state: Arc<VmRunState>) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        self.launch
            .send((vcpu, run_state))
            .map_err(|_| VcpuError::NoAnswer {
                index,
                request: "start",
            })?;
        Ok(VcpuHandle {
            index,
            thread: self.thread,
            requests: self.requests,
            responses: self.responses,
            parked: self.parked,
            timeout: REQUEST_TIMEOUT,
            next_id: AtomicU64::new(1),
        })
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(vm: &Vm, index: u8, pio_bus: Bus, mmio_bus: Bus) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::CreateVcpu { index, source })?;
        Ok(Self {
            fd,
            index,
            has_lapic: vm.has_irqchip(),
            pio_bus,
            mmio_bus,
            thread: None,
            held_back: Vec::new(),
        })
    }

    /// KVM's count of this vCPU's exits, if KVM keeps binary statistics (Linux 5.14 and later).
    pub fn exit_counter(&self) -> Option<ExitCounter> {
        // SAFETY: the fd is an open vCPU; KVM_GET_STATS_FD takes no argument and returns a new
        // fd or a negative value.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(&self.fd, KVM_GET_STATS_FD()) };
        if fd < 0 {
            tracing::debug!(
                vcpu = self.index,
                "no KVM statistics: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `fd` was just returned by KVM and is owned by nobody else.
        let stats = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        ExitCounter::find(stats)
    }

    /// Dispatches this vCPU's exits to `pio_bus` and `mmio_bus` (for a vCPU created before
    /// its devices, see [`crate::builder::PreparedVm`]).
    pub fn attach_buses(&mut self, pio_bus: Bus, mmio_bus: Bus) {
        self.pio_bus = pio_bus;
        self.mmio_bus = mmio_bus;
    }

    /// Sets CPUID (per-vCPU APIC ID and topology) and the boot MSRs.
    pub fn configure_cpu(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        let mut cpuid: CpuId = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::GetSupportedCpuid)?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        cpuid::filter_cpuid(&mut cpuid, self.index, count, tsc_deadline);
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        let msrs = msr::boot_msrs()?;
        let set = self.fd.set_msrs(&msrs).map_err(VcpuError::SetMsrsIoctl)?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::SetMsrs {
                set,
                asked: msrs.as_slice().len(),
            });
        }
        Ok(())
    }

    /// Prepares the boot vCPU to enter a 64-bit kernel at `entry` with `boot_params` at `rsi`.
    /// Application processors are started by the guest (INIT/SIPI) and need only LINTs.
    pub fn configure_boot(&self, entry: u64, rsi: u64) -> Result<(), VcpuError> {
        if self.index == 0 {
            regs::setup_regs(&self.fd, entry, rsi)?;
            regs::setup_fpu(&self.fd)?;
            regs::setup_long_mode_sregs(&self.fd)?;
        }
        regs::setup_lints(&self.fd)?;
        Ok(())
    }

    /// Saves the vCPU's state (DESIGN.md §5 order). The vCPU must not be running, and a
    /// pending port or MMIO exit must have been completed ([`Vcpu::complete_pending_exit`]).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(state_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(state_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(state_err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(state_err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(state_err("KVM_GET_XCRS"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(state_err("KVM_GET_DEBUGREGS"))?;
        let lapic = if self.has_lapic {
            Some(fd.get_lapic().map_err(state_err("KVM_GET_LAPIC"))?)
        } else {
            None
        };
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(state_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let mut msrs = self.save_msrs()?;
        for held in &self.held_back {
            if let Some(msr) = msrs.iter_mut().find(|m| m.index == held.index) {
                msr.data = held.data;
            }
        }
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(state_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            index: self.index,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Reads every saveable MSR; those KVM refuses to read are skipped.
    fn save_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut pending: Vec<u32> = saveable_msrs()?.to_vec();
        let mut saved = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let entries: Vec<kvm_msr_entry> = pending
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::StateList("MSR"))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(state_err("KVM_GET_MSRS"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            // KVM stops at the first MSR it cannot read: skip it and go on.
            pending.drain(..(read + 1).min(pending.len()));
        }
        Ok(saved)
    }

    /// Restores a saved state (DESIGN.md §5 order) into this freshly created vCPU, its TSC
    /// moved on by `advance` (as the VM's kvmclock, [`VmState::clock_advance`]), so that a
    /// TSC-deadline timer that fell due meanwhile fires at once.
    ///
    /// [`VmState::clock_advance`]: super::vm::VmState::clock_advance
    pub fn restore_state(&mut self, state: &VcpuState, advance: Duration) -> Result<(), VcpuError> {
        let fd = &self.fd;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::StateList("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(state_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::warn!(vcpu = self.index, "cannot scale the TSC to {khz} kHz: {e}");
                }
            }
        }
        fd.set_mp_state(state.mp_state)
            .map_err(state_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs)
            .map_err(state_err("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs)
            .map_err(state_err("KVM_SET_SREGS"))?;
        // SAFETY: `state.xsave` is a complete `kvm_xsave` as KVM_GET_XSAVE returned it.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(state_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs)
            .map_err(state_err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(state_err("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &state.lapic {
            fd.set_lapic(lapic).map_err(state_err("KVM_SET_LAPIC"))?;
        }
        let mut msrs = Cow::Borrowed(&state.msrs[..]);
        if !advance.is_zero() {
            let khz = state.tsc_khz.or_else(|| fd.get_tsc_khz().ok()).unwrap_or(0);
            let cycles = (advance.as_nanos() * u128::from(khz) / 1_000_000) as u64;
            for msr in msrs
                .to_mut()
                .iter_mut()
                .filter(|m| m.index == msr::MSR_IA32_TSC)
            {
                msr.data = msr.data.wrapping_add(cycles);
            }
        }
        self.restore_msrs(&msrs)?;
        self.held_back = self.hold_back_msrs(&msrs)?;
        // KVM_GET_VCPU_EVENTS reports a pending NMI and the SIPI vector without flagging them
        // valid; unflagged, KVM_SET_VCPU_EVENTS would drop them.
        let mut events = state.vcpu_events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        fd.set_vcpu_events(&events)
            .map_err(state_err("KVM_SET_VCPU_EVENTS"))?;
        // Tells a kvmclock guest it was paused, so its watchdogs do not fire; absent without
        // kvmclock in use.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }

    /// Writes saved MSRs. KVM stops at the first MSR it refuses; one it refuses but already
    /// holds with the saved value (a paravirtual MSR the guest's CPUID does not enable, left at
    /// zero) is skipped, any other refusal is an error: no state is silently dropped.
    fn restore_msrs(&self, saved: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let mut pending = saved;
        while !pending.is_empty() {
            let msrs = Msrs::from_entries(pending).map_err(|_| VcpuError::StateList("MSR"))?;
            let set = self.fd.set_msrs(&msrs).map_err(state_err("KVM_SET_MSRS"))?;
            let Some(refused) = pending.get(set) else {
                break;
            };
            if self.msr(refused.index) != Some(refused.data) {
                return Err(VcpuError::RestoreMsr {
                    index: refused.index,
                    value: refused.data,
                });
            }
            pending = &pending[set + 1..];
        }
        Ok(())
    }

    /// The value KVM holds for MSR `index`, if it gives one.
    pub fn msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (self.fd.get_msrs(&mut msrs).ok() == Some(1)).then(|| msrs.as_slice()[0].data)
    }

    /// Turns asynchronous page faults, just restored (so KVM accepted the value), off again
    /// until [`Vcpu::apply_held_back_msrs`]: KVM answers their enabling with a "wake all"
    /// interrupt, which would wake an idle vCPU the moment the restored guest starts. Traced
    /// in the lab: the woken vCPU catches the guest's timekeeping up with the pause, holding
    /// its lock, and a busy vCPU sharing the CPU spins on that lock. Turning them off drops the
    /// queued interrupt. Returns the MSRs held back.
    fn hold_back_msrs(&self, restored: &[kvm_msr_entry]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let held: Vec<kvm_msr_entry> = restored
            .iter()
            .filter(|m| {
                m.index == msr::MSR_KVM_ASYNC_PF_EN && m.data & msr::KVM_ASYNC_PF_ENABLED != 0
            })
            .copied()
            .collect();
        if !held.is_empty() {
            let off = [kvm_msr_entry {
                index: msr::MSR_KVM_ASYNC_PF_EN,
                ..Default::default()
            }];
            self.restore_msrs(&off)?;
        }
        Ok(held)
    }

    /// Whether the restore held MSRs back from KVM.
    pub fn holds_back_msrs(&self) -> bool {
        !self.held_back.is_empty()
    }

    /// Gives KVM the MSRs [`Vcpu::hold_back_msrs`] held back.
    pub fn apply_held_back_msrs(&mut self) -> Result<(), VcpuError> {
        let held = std::mem::take(&mut self.held_back);
        self.restore_msrs(&held)
    }

    /// Completes a port or MMIO exit already handled by the monitor (KVM finishes the guest
    /// instruction on the next entry) without running the guest further, so that the saved
    /// registers are consistent.
    pub fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(drop);
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(VcpuError::Run {
                index: self.index,
                source,
            }),
        }
    }

    /// The vCPU index (also its APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Logs where the guest was when it triple-faulted: the registers as KVM left them (as they
    /// were on Intel; already reset on AMD, where only the last exception still tells).
    fn log_triple_fault(&self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            tracing::error!(vcpu = self.index, "the guest triple-faulted");
            return;
        };
        let events = self.fd.get_vcpu_events().ok();
        tracing::error!(
            vcpu = self.index,
            rip = format_args!("{:#x}", regs.rip),
            rsp = format_args!("{:#x}", regs.rsp),
            rflags = format_args!("{:#x}", regs.rflags),
            cs = format_args!("{:#x}", sregs.cs.selector),
            cr0 = format_args!("{:#x}", sregs.cr0),
            cr2 = format_args!("{:#x}", sregs.cr2),
            cr3 = format_args!("{:#x}", sregs.cr3),
            cr4 = format_args!("{:#x}", sregs.cr4),
            efer = format_args!("{:#x}", sregs.efer),
            idt = format_args!("{:#x}/{:#x}", sregs.idt.base, sregs.idt.limit),
            gs = format_args!("{:#x}", sregs.gs.base),
            tr = format_args!("{:#x}", sregs.tr.base),
            exception = ?events.map(|e| (e.exception.injected, e.exception.nr, e.exception.error_code)),
            "the guest triple-faulted"
        );
    }

    /// Runs the vCPU until its next exit and handles it.
    pub fn run_once(&mut self) -> Result<VcpuEmulation, VcpuError> {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    VcpuEmulation::Handled
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio_bus.write(u64::from(port), data);
                    VcpuEmulation::Handled
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio_bus.read(addr, data) {
                        tracing::trace!(vcpu = index, "unhandled MMIO read at {addr:#x}");
                        data.fill(0);
                    }
                    VcpuEmulation::Handled
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio_bus.write(addr, data) {
                        tracing::trace!(vcpu = index, "unhandled MMIO write at {addr:#x}");
                    }
                    VcpuEmulation::Handled
                }
                VcpuExit::Hlt => VcpuEmulation::Stopped(ExitReason::Halted),
                VcpuExit::Shutdown => {
                    self.log_triple_fault();
                    VcpuEmulation::Stopped(ExitReason::Shutdown)
                }
                VcpuExit::FailEntry(reason, cpu) => VcpuEmulation::Stopped(ExitReason::Error(
                    format!("vCPU {index}: KVM entry failed (reason {reason:#x}, cpu {cpu})"),
                )),
                VcpuExit::InternalError => VcpuEmulation::Stopped(ExitReason::Error(format!(
                    "vCPU {index}: KVM internal error"
                ))),
                VcpuExit::SystemEvent(kind, _) => VcpuEmulation::Stopped(ExitReason::Error(
                    format!("vCPU {index}: system event {kind}"),
                )),
                other => VcpuEmulation::Stopped(ExitReason::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                ))),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(VcpuEmulation::Interrupted)
            }
            Err(source) => Err(VcpuError::Run { index, source }),
        }
    }

    /// Starts the vCPU on its own thread; it runs until `run_state` asks it to stop or the
    /// guest ends, which it reports through `run_state`, and obeys requests sent through the
    /// returned handle (pause, resume, save).
    pub fn start(mut self, run_state: Arc<VmRunState>) -> Result<VcpuHandle, VcpuError> {
        let thread = match self.thread.take() {
            Some(thread) => thread,
            None => VcpuThread::spawn(self.index)?,
        };
        thread.launch(self, run_state)
    }

    /// Starts the thread [`Vcpu::start`] will run this vCPU on, now: starting it then costs a
    /// wake-up rather than a new thread (a restored VM's, while the guest is stopped).
    pub fn spawn_thread(&mut self) -> Result<(), VcpuError> {
        if self.thread.is_none() {
            self.thread = Some(VcpuThread::spawn(self.index)?);
        }
        Ok(())
    }

    fn thread_main(
        mut self,
        run_state: &VmRunState,
        requests: &Receiver<Numbered<VcpuRequest>>,
        responses: &Sender<Numbered<VcpuResponse>>,
        parked: &AtomicBool,
    ) {
        let index = self.index;
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        run_state.wait_start();
        loop {
            let paused = parked.load(Ordering::SeqCst);
            let request = if paused {
                Some(requests.recv().unwrap_or((0, VcpuRequest::Exit)))
            } else {
                requests.try_recv().ok()
            };
            if let Some((id, request)) = request {
                let response = match request {
                    VcpuRequest::Exit => break,
                    VcpuRequest::Pause => {
                        if !paused {
                            if let Err(e) = self.complete_pending_exit() {
                                run_state.request_exit(ExitReason::Error(e.to_string()));
                            }
                            parked.store(true, Ordering::SeqCst);
                        }
                        VcpuResponse::Paused
                    }
                    VcpuRequest::Resume => {
                        parked.store(false, Ordering::SeqCst);
                        VcpuResponse::Resumed
                    }
                    VcpuRequest::SaveState => VcpuResponse::State(if paused {
                        self.save_state().map(Box::new)
                    } else {
                        Err(VcpuError::NotPaused(index))
                    }),
                    VcpuRequest::RehearseSave => {
                        VcpuResponse::State(self.save_state().map(Box::new))
                    }
                };
                // Answered under the request's id: an answer that comes after its requester
                // gave up is known for what it is.
                if responses.send((id, response)).is_err() {
                    break;
                }
                continue;
            }
            if run_state.stop_requested() {
                break;
            }
            if self.holds_back_msrs() && run_state.held_back_msrs_due() {
                if let Err(e) = self.apply_held_back_msrs() {
                    // The guest runs on without asynchronous page faults (KVM then resolves
                    // every fault synchronously).
                    tracing::warn!(vcpu = index, "cannot restore the held-back MSRs: {e}");
                }
            }
            match self.run_once() {
                Ok(VcpuEmulation::Handled | VcpuEmulation::Interrupted) => {}
                Ok(VcpuEmulation::Stopped(reason)) => {
                    tracing::debug!(vcpu = index, ?reason, "vCPU stopped");
                    run_state.request_exit(reason);
                }
                Err(e) => run_state.request_exit(ExitReason::Error(e.to_string())),
            }
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }
}

/// What the monitor asks of a running vCPU thread.
#[derive(Debug)]
enum VcpuRequest {
    Pause,
    Resume,
    SaveState,
    /// Save while running (between two runs of the vCPU): a rehearsal, the state is not one.
    RehearseSave,
    Exit,
}

/// A vCPU thread's answers.
enum VcpuResponse {
    Paused,
    Resumed,
    State(Result<Box<VcpuState>, VcpuError>),
}

/// How long a vCPU thread may take to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request or its answer, with the request's id: ids grow by one per request of a handle,
/// and an answer carries the id of the request it answers.
type Numbered<T> = (u64, T);

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<Numbered<VcpuRequest>>,
    responses: Receiver<Numbered<VcpuResponse>>,
    /// The vCPU is paused, its thread waiting for requests: none needs a kick.
    parked: Arc<AtomicBool>,
    /// How long its thread may take to answer ([`REQUEST_TIMEOUT`]).
    timeout: Duration,
    /// The id of the next request.
    next_id: AtomicU64,
}

impl VcpuHandle {
    /// Has the vCPU look at the shared run state soon: kicked out of the guest, unless parked
    /// (a parked vCPU looks when it resumes).
    pub fn nudge(&self) {
        if !self.parked.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    fn kick(&self) {
        // SAFETY: the thread is joined only by `kick_and_join`, which consumes the handle, so
        // its pthread_t is valid here; the kick signal has a handler installed by
        // `register_kick_handler`, and a thread that already exited just ignores nothing.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }

    fn no_answer(&self, request: &'static str) -> VcpuError {
        VcpuError::NoAnswer {
            index: self.index,
            request,
        }
    }

    /// Sends `request` and, unless the vCPU is parked waiting for it, kicks the vCPU out of
    /// the guest to see it (a signal costs a parked thread a needless wake-up, in the pause).
    /// Returns the request's id, which its answer carries.
    fn send(&self, request: VcpuRequest, name: &'static str) -> Result<u64, VcpuError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.requests
            .send((id, request))
            .map_err(|_| self.no_answer(name))?;
        if !self.parked.load(Ordering::SeqCst) {
            self.kick();
        }
        Ok(id)
    }

    /// The vCPU's answer to request `id`. Answers to earlier requests, which came after their
    /// requester gave up waiting, are dropped: taken for this one's, a late `Resumed` would
    /// pass for a save's answer, or a pause's for a resume's.
    fn answer(&self, id: u64, name: &'static str) -> Result<VcpuResponse, VcpuError> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((answered, response)) if answered == id => return Ok(response),
                Ok((answered, _)) => {
                    tracing::debug!(
                        vcpu = self.index,
                        answered,
                        awaited = id,
                        "dropped a vCPU's answer to an earlier request"
                    );
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(self.no_answer(name))
                }
            }
        }
    }

    fn request(&self, request: VcpuRequest, name: &'static str) -> Result<VcpuResponse, VcpuError> {
        let id = self.send(request, name)?;
        self.answer(id, name)
    }

    /// Takes the vCPU out of the guest, completes its pending exit and parks it.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request(VcpuRequest::Pause, "pause").map(drop)
    }

    /// Lets a paused vCPU run the guest again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.request(VcpuRequest::Resume, "resume").map(drop)
    }

    /// Pauses every vCPU of `handles` at once: all are asked, then all answers awaited, so
    /// the pause takes as long as the slowest vCPU rather than the sum.
    pub fn pause_all(handles: &[VcpuHandle]) -> Result<(), VcpuError> {
        Self::all(handles, || VcpuRequest::Pause, "pause").map(drop)
    }

    /// Resumes every vCPU of `handles`.
    pub fn resume_all(handles: &[VcpuHandle]) -> Result<(), VcpuError> {
        Self::all(handles, || VcpuRequest::Resume, "resume").map(drop)
    }

    /// The states of every (paused) vCPU of `handles`, in their order, saved by all at once.
    pub fn save_all(handles: &[VcpuHandle]) -> Result<Vec<VcpuState>, VcpuError> {
        Self::all_states(handles, || VcpuRequest::SaveState)
    }

    /// Has every vCPU thread save its vCPU between two of its runs, without pausing the VM: the
    /// code of [`VcpuHandle::save_all`] runs, but the states are not of one moment.
    pub fn rehearse_save_all(handles: &[VcpuHandle]) -> Result<Vec<VcpuState>, VcpuError> {
        Self::all_states(handles, || VcpuRequest::RehearseSave)
    }

    fn all_states(
        handles: &[VcpuHandle],
        request: fn() -> VcpuRequest,
    ) -> Result<Vec<VcpuState>, VcpuError> {
        Self::all(handles, request, "save")?
            .into_iter()
            .zip(handles)
            .map(|(answer, handle)| handle.state_from(answer))
            .collect()
    }

    /// Sends `request` to every vCPU, then collects every answer.
    fn all(
        handles: &[VcpuHandle],
        request: fn() -> VcpuRequest,
        name: &'static str,
    ) -> Result<Vec<VcpuResponse>, VcpuError> {
        let sent: Vec<Result<u64, VcpuError>> =
            handles.iter().map(|h| h.send(request(), name)).collect();
        let mut answers = Vec::with_capacity(handles.len());
        let mut result = Ok(());
        for (handle, sent) in handles.iter().zip(sent) {
            match sent.and_then(|id| handle.answer(id, name)) {
                Ok(answer) => answers.push(answer),
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result.map(|()| answers)
    }

    /// The state of a paused vCPU.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let answer = self.request(VcpuRequest::SaveState, "save")?;
        self.state_from(answer)
    }

    fn state_from(&self, answer: VcpuResponse) -> Result<VcpuState, VcpuError> {
        match answer {
            VcpuResponse::State(state) => state.map(|s| *s),
            VcpuResponse::Paused | VcpuResponse::Resumed => Err(VcpuError::NoAnswer {
                index: self.index,
                request: "save",
            }),
        }
    }

    /// Stops the vCPU thread (running or paused) and waits for it.
    pub fn kick_and_join(self) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let _ = self.requests.send((id, VcpuRequest::Exit));
        self.kick();
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_answer_is_not_taken_for_the_next_requests() {
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::spawn(move || {
            while let Ok((id, request)) = req_rx.recv() {
                let response = match request {
                    VcpuRequest::Resume => {
                        std::thread::sleep(Duration::from_millis(300));
                        VcpuResponse::Resumed
                    }
                    VcpuRequest::SaveState => VcpuResponse::State(Err(VcpuError::NotPaused(0))),
                    _ => VcpuResponse::Paused,
                };
                if resp_tx.send((id, response)).is_err() {
                    break;
                }
            }
        });
        let handle = VcpuHandle {
            index: 0,
            thread,
            requests: req_tx,
            responses: resp_rx,
            parked: Arc::new(AtomicBool::new(true)),
            timeout: Duration::from_millis(100),
            next_id: AtomicU64::new(1),
        };
        let err = handle.resume().unwrap_err();
        assert!(
            matches!(
                err,
                VcpuError::NoAnswer {
                    request: "resume",
                    ..
                }
            ),
            "{err}"
        );
        // The late answer to the resume has come by now.
        std::thread::sleep(Duration::from_millis(400));
        let Err(err) = handle.save_state() else {
            panic!("a state from the fake vCPU");
        };
        assert!(matches!(err, VcpuError::NotPaused(0)), "{err}");
        assert!(handle.pause().is_ok());
    }
}
