//! vCPUs: configuration for Linux boot, the run loop that dispatches port and MMIO exits to the
//! device buses, and the thread each vCPU runs on.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
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
    /// A vCPU failed (entry failure, internal error, ioctl failure).
    Error(String),
}

impl ExitReason {
    /// Whether the guest ended as a guest should.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Reset | ExitReason::Halted | ExitReason::Stopped)
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
}

impl VmRunState {
    /// A fresh, running state.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
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

/// One vCPU and the buses its exits are dispatched to.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio_bus: Bus,
    mmio_bus: Bus,
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
            pio_bus,
            mmio_bus,
        })
    }

    /// Sets CPUID (per-vCPU APIC ID and topology) and the boot MSRs.
    pub fn configure_cpu(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        let mut cpuid: CpuId = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::GetSupportedCpuid)?;
        cpuid::filter_cpuid(&mut cpuid, self.index, count);
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

    /// The vCPU index (also its APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
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
                VcpuExit::Shutdown => VcpuEmulation::Stopped(ExitReason::Shutdown),
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
    /// guest ends, which it reports through `run_state`.
    pub fn start(mut self, run_state: Arc<VmRunState>) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
                while !run_state.stop_requested() {
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
            })
            .map_err(|source| VcpuError::SpawnThread { index, source })?;
        Ok(VcpuHandle { thread })
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Kicks the vCPU out of `KVM_RUN` (it then sees the stop flag) and waits for its thread.
    pub fn kick_and_join(self) {
        // SAFETY: the thread is alive until joined below, so its pthread_t is valid; the kick
        // signal has a handler installed by `register_kick_handler`.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
