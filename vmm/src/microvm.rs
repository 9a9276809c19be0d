//! A built microVM and its event loop: vCPU threads run the guest while the monitor's own
//! thread serves device events (queue notifications, TAP traffic) until the guest ends.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::DevicesState;
use crate::persist::Persist;
use crate::snapshot::{self, MicroVmState, ParentRef, SnapshotError, SnapshotKind};
use crate::vstate::vcpu::{ExitReason, Vcpu, VcpuError, VcpuHandle, VcpuState, VmRunState};
use crate::vstate::vm::{DirtyBitmap, Vm, VmError};

/// The event manager of the monitor's thread.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The monitor's event loop.
pub type EventLoop = EventManager<Subscriber>;

/// Errors while the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Starting a vCPU failed.
    #[error(transparent)]
    StartVcpu(#[from] VcpuError),
    /// The event loop failed.
    #[error("the event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

/// Errors from pausing, resuming or saving a running microVM. None of them stops the VM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The vCPUs have not been started, or have stopped.
    #[error("the VM is not running")]
    NotStarted,
    /// Pause asked of a paused VM.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// Resume asked of a running VM.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU did not pause or resume.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM-wide state could not be saved, or dirty logging set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Where a virtio device sits: its MMIO window and interrupt line.
pub struct VirtioSlot {
    /// Base of its MMIO window.
    pub base: u64,
    /// Its GSI.
    pub irq: u32,
    /// The transport, holding the device.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The devices of a microVM, for saving and describing them.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042>>,
    /// Virtio devices, in MMIO order.
    pub virtio: Vec<VirtioSlot>,
}

/// Locks a device mutex; a panic elsewhere does not make the device state unusable.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Devices {
    /// Saves every device. The VM must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio: self
                .virtio
                .iter()
                .map(|slot| lock(&slot.transport).save())
                .collect(),
        }
    }
}

/// Where a microVM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// Built, vCPUs not started.
    Created,
    /// vCPUs running the guest.
    Running,
    /// vCPUs parked; devices idle.
    Paused,
}

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Pages written.
    pub pages: u64,
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// How long the vCPUs were paused.
    pub pause: Duration,
    /// How long the whole snapshot took.
    pub total: Duration,
}

/// What a migration (or, later, replication) thread gets when it freezes the VM: the state of
/// the paused machine and the pages written since the last collection. The VM stays frozen -
/// vCPUs parked, device events not processed - until `outcome` is answered.
pub struct Frozen {
    /// When the vCPUs were asked to stop: the guest's downtime runs from here.
    pub since: Instant,
    /// Everything but memory.
    pub state: MicroVmState,
    /// Pages written since the last collection of the dirty log.
    pub dirty: DirtyBitmap,
    /// Answer with the outcome: the VM then ends (moved) or runs on (failed).
    pub outcome: Sender<FreezeOutcome>,
}

/// How a freeze ended.
pub enum FreezeOutcome {
    /// The VM runs elsewhere now: this one ends.
    Moved,
    /// The transfer failed: give back the dirty pages (still to be sent) and run on.
    Failed(DirtyBitmap),
}

/// What a transfer thread asks of the monitor thread, with where to answer.
enum FreezeRequest {
    /// Freeze the VM ([`FreezeHandle::freeze`]).
    Freeze(Sender<Result<Frozen, String>>),
    /// Rehearse the save ([`FreezeHandle::rehearse`]).
    Rehearse(Sender<Result<MicroVmState, String>>),
}

/// The monitor-thread side of freeze requests: the requester writes `wake` after sending.
pub struct FreezeChannel {
    requests: Receiver<FreezeRequest>,
    wake: EventFd,
}

/// The requester's side of a [`FreezeChannel`].
#[derive(Clone)]
pub struct FreezeHandle {
    requests: Sender<FreezeRequest>,
    wake: Arc<EventFd>,
}

impl FreezeHandle {
    /// Wakes the monitor thread (to look at a finished transfer).
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::error!("cannot wake the monitor thread: {e}");
        }
    }

    /// Asks the monitor thread to freeze the VM; returns what it froze.
    pub fn freeze(&self) -> Result<Frozen, String> {
        self.ask(FreezeRequest::Freeze)
    }

    /// Asks the monitor thread to run the code of a freeze's save without pausing the VM
    /// ([`MicroVm::rehearse_save`]); returns what it saved, which is not a state of one moment.
    pub fn rehearse(&self) -> Result<MicroVmState, String> {
        self.ask(FreezeRequest::Rehearse)
    }

    fn ask<T>(&self, request: fn(Sender<Result<T, String>>) -> FreezeRequest) -> Result<T, String> {
        let (tx, rx) = channel();
        self.requests
            .send(request(tx))
            .map_err(|_| "the VM is gone".to_string())?;
        self.wake
            .write(1)
            .map_err(|e| format!("cannot wake the monitor thread: {e}"))?;
        rx.recv().map_err(|_| "the VM is gone".to_string())?
    }
}

/// A new freeze channel and the handle to give to a transfer thread.
pub fn freeze_channel() -> std::io::Result<(FreezeChannel, FreezeHandle)> {
    let (tx, rx) = channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let handle = FreezeHandle {
        requests: tx,
        wake: Arc::new(wake.try_clone()?),
    };
    Ok((FreezeChannel { requests: rx, wake }, handle))
}

impl FreezeChannel {
    /// The fd to watch ([`MicroVm::add_wakeup`]).
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

/// Wakes the event loop when a file descriptor becomes readable; the caller reads it.
struct Wakeup(RawFd);

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.0, EventSet::IN)) {
            tracing::error!("cannot watch fd {}: {e:?}", self.0);
        }
    }
}

/// Wakes the monitor's loop when the VM must end (a vCPU stopped, the guest reset it): the loop
/// then sees the stop request.
pub struct ExitHandler {
    run_state: Arc<VmRunState>,
}

impl ExitHandler {
    /// A handler of `run_state.exit_evt`.
    pub fn new(run_state: Arc<VmRunState>) -> Self {
        Self { run_state }
    }
}

impl MutEventSubscriber for ExitHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.run_state.exit_evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let event = Events::new_raw(self.run_state.exit_evt.as_raw_fd(), EventSet::IN);
        if let Err(e) = ops.add(event) {
            tracing::error!("cannot watch the exit event: {e:?}");
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.handles.drain(..).for_each(VcpuHandle::kick_and_join);
        crate::vstate::memory::release_guest_memory(self.vm.memory());
    }
}

/// The longest the monitor's loop sleeps without an event: the control hook and the serial
/// port's stalled-interrupt check run at least this often.
const EVENT_LOOP_TICK_MS: i32 = 100;
/// How long a restored guest runs before its vCPUs give KVM the MSRs their restore held back.
const HELD_BACK_MSR_DELAY: Duration = Duration::from_secs(1);

/// A microVM: its vCPUs, devices, memory and event loop.
pub struct MicroVm {
    // Field order is drop order: the vCPUs and devices go before the VM and its memory.
    handles: Vec<VcpuHandle>,
    vcpus: Vec<Vcpu>,
    event_loop: EventLoop,
    run_state: Arc<VmRunState>,
    devices: Devices,
    config: VmConfig,
    vm: Arc<Vm>,
    _kvm: Kvm,
    phase: VmPhase,
    started: Option<Instant>,
    last_snapshot: Option<ParentRef>,
    /// The vCPUs hold restored MSRs back from KVM until the guest has run a while.
    msrs_held_back: bool,
}

impl MicroVm {
    /// Assembles a microVM from its built parts; `last_snapshot` is the snapshot its memory
    /// equals (a restored VM's), which a diff snapshot may then build on.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kvm: Kvm,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        devices: Devices,
        event_loop: EventLoop,
        run_state: Arc<VmRunState>,
        config: VmConfig,
        last_snapshot: Option<ParentRef>,
    ) -> Self {
        Self {
            handles: Vec::new(),
            vcpus,
            event_loop,
            run_state,
            devices,
            config,
            vm: Arc::new(vm),
            _kvm: kvm,
            phase: VmPhase::Created,
            started: None,
            last_snapshot,
            msrs_held_back: false,
        }
    }

    /// The VM (shared: a migration thread reads its dirty log while the guest runs).
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where it is in its life.
    pub fn phase(&self) -> VmPhase {
        self.phase
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The shared run state (to stop the VM from elsewhere).
    pub fn run_state(&self) -> Arc<VmRunState> {
        self.run_state.clone()
    }

    /// Makes the event loop return when `fd` becomes readable (the caller then reads it in
    /// the `control` hook of [`MicroVm::run_with`]).
    pub fn add_wakeup(&mut self, fd: RawFd) {
        self.event_loop
            .add_subscriber(Arc::new(Mutex::new(Wakeup(fd))));
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), RunError> {
        self.launch_vcpus()?;
        self.release_vcpus();
        Ok(())
    }

    /// Hands every vCPU to its thread, where it waits until [`MicroVm::release_vcpus`] (or
    /// [`MicroVm::abandon_vcpus`]): all then start together, at the cost of one wake-up.
    pub fn launch_vcpus(&mut self) -> Result<(), RunError> {
        self.run_state.hold_start();
        self.msrs_held_back = self.vcpus.iter().any(Vcpu::holds_back_msrs);
        for vcpu in std::mem::take(&mut self.vcpus) {
            match vcpu.start(self.run_state.clone()) {
                Ok(handle) => self.handles.push(handle),
                Err(e) => {
                    self.abandon_vcpus(ExitReason::Error(e.to_string()));
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Lets the launched vCPUs run.
    pub fn release_vcpus(&mut self) {
        self.run_state.release_start();
        self.phase = VmPhase::Running;
        self.started = Some(Instant::now());
        tracing::info!(vcpus = self.handles.len(), "vCPUs running");
    }

    /// Ends the launched vCPU threads without the guest having run.
    pub fn abandon_vcpus(&mut self, reason: ExitReason) {
        self.run_state.request_exit(reason);
        self.run_state.release_start();
        self.handles.drain(..).for_each(VcpuHandle::kick_and_join);
    }

    /// Runs the guest until it ends; returns why it ended.
    pub fn run(&mut self) -> Result<ExitReason, RunError> {
        self.run_with(|_| {})
    }

    /// Runs the guest until it ends, calling `control` after every round of device events (and
    /// at least every [`EVENT_LOOP_TICK_MS`]) on the monitor's thread, where it may pause, save
    /// or resume the VM.
    pub fn run_with(
        &mut self,
        mut control: impl FnMut(&mut MicroVm),
    ) -> Result<ExitReason, RunError> {
        if self.phase == VmPhase::Created {
            self.start()?;
        }
        let mut result = Ok(());
        while !self.run_state.stop_requested() {
            if let Err(e) = self.event_loop.run_with_timeout(EVENT_LOOP_TICK_MS) {
                self.run_state
                    .request_exit(ExitReason::Error(format!("event loop: {e:?}")));
                result = Err(RunError::EventLoop(e));
            }
            if self.phase == VmPhase::Running {
                let mut serial = lock(&self.devices.serial);
                serial.raise_stalled_interrupt();
                serial.flush_output();
            }
            control(self);
            self.release_held_back_msrs();
        }
        self.handles.drain(..).for_each(VcpuHandle::kick_and_join);
        lock(&self.devices.serial).flush_output();
        result?;
        Ok(self.run_state.exit_reason().unwrap_or(ExitReason::Stopped))
    }

    /// Once the guest has run for [`HELD_BACK_MSR_DELAY`], has the vCPUs give KVM the MSRs
    /// their restore held back (see `Vcpu::hold_back_msrs`).
    fn release_held_back_msrs(&mut self) {
        if self.msrs_held_back
            && self
                .started
                .is_some_and(|t| t.elapsed() >= HELD_BACK_MSR_DELAY)
        {
            self.msrs_held_back = false;
            self.run_state.release_held_back_msrs();
            self.handles.iter().for_each(VcpuHandle::nudge);
        }
    }

    /// Announces the guest on the host network (after it moved here): every network device
    /// sends a RARP broadcast from the guest's MAC, so bridges and switches learn its new port.
    pub fn announce(&self) {
        for slot in &self.devices.virtio {
            lock(lock(&slot.transport).device()).announce();
        }
    }

    /// Raises every running virtio device's interrupt once, for one the source may have raised
    /// as it stopped (see [`MmioTransport::raise_used_buffer_interrupt`]). Call after a
    /// restore or a migration.
    pub fn raise_device_interrupts(&self) {
        for slot in &self.devices.virtio {
            lock(&slot.transport).raise_used_buffer_interrupt();
        }
        lock(&self.devices.serial).raise_pending_interrupt();
    }

    /// Parks every vCPU. Device events wait until the monitor's thread runs its loop again.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        match self.phase {
            VmPhase::Created => Err(ControlError::NotStarted),
            VmPhase::Paused => Err(ControlError::AlreadyPaused),
            VmPhase::Running => {
                let result = VcpuHandle::pause_all(&self.handles);
                // Even a partial failure leaves some vCPUs parked: call it paused, so a
                // resume goes to all.
                self.phase = VmPhase::Paused;
                result.map_err(Into::into)
            }
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) -> Result<(), ControlError> {
        match self.phase {
            VmPhase::Created => Err(ControlError::NotStarted),
            VmPhase::Running => Err(ControlError::NotPaused),
            VmPhase::Paused => {
                VcpuHandle::resume_all(&self.handles)?;
                self.phase = VmPhase::Running;
                Ok(())
            }
        }
    }

    /// Saves everything but guest memory. The VM must be paused; devices are saved before
    /// the vCPUs.
    pub fn save_state(&self) -> Result<MicroVmState, ControlError> {
        if self.phase != VmPhase::Paused {
            return Err(ControlError::NotPaused);
        }
        self.capture_state(VcpuHandle::save_all)
    }

    /// Runs the code of [`MicroVm::save_state`] without pausing the VM, each vCPU saved by its
    /// thread between two of its runs: code runs slower the first time a process runs it (in
    /// the lab much slower, README), and a migration's freeze then does not run it for the
    /// first time with the guest stopped. What it returns is not a state of one moment.
    pub fn rehearse_save(&self) -> Result<MicroVmState, ControlError> {
        self.capture_state(VcpuHandle::rehearse_save_all)
    }

    fn capture_state(
        &self,
        save_vcpus: fn(&[VcpuHandle]) -> Result<Vec<VcpuState>, VcpuError>,
    ) -> Result<MicroVmState, ControlError> {
        let devices = self.devices.save();
        let vcpus = save_vcpus(&self.handles)?;
        Ok(MicroVmState {
            config: self.config.clone(),
            vm: self.vm.save_state()?,
            vcpus,
            devices,
        })
    }

    /// Writes a snapshot to the new directory `dir`: the VM is paused (unless it already is)
    /// while its state and memory are written, then resumed. A diff holds the pages written
    /// since the previous snapshot of this VM (or the one it was restored from). On failure
    /// nothing is left in `dir`, and the pages stay marked dirty for the next snapshot.
    pub fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<SnapshotReport, ControlError> {
        let t0 = Instant::now();
        if kind == SnapshotKind::Diff && (self.last_snapshot.is_none() || !self.vm.dirty_logging())
        {
            return Err(SnapshotError::NoParent.into());
        }
        let was_running = self.phase == VmPhase::Running;
        if was_running {
            self.pause()?;
        }
        let paused_at = Instant::now();
        let result = self.write_snapshot(dir, kind);
        let pause = paused_at.elapsed();
        if was_running {
            self.resume()?;
        }
        let written = result?;
        self.last_snapshot = Some(ParentRef {
            id: written.id,
            path: written.path.clone(),
        });
        Ok(SnapshotReport {
            path: written.path,
            kind,
            pages: written.pages,
            memory_bytes: written.memory_bytes,
            pause,
            total: t0.elapsed(),
        })
    }

    /// Serves a pending freeze request, if any: pauses the VM, hands its state and dirty pages
    /// to the requester and waits (device events held) for the outcome. `Moved` ends the VM;
    /// `Failed` gives the pages back and resumes it (if it was running).
    pub fn serve_freeze(&mut self, freezes: &FreezeChannel) {
        let _ = freezes.wake.read();
        while let Ok(request) = freezes.requests.try_recv() {
            let reply = match request {
                FreezeRequest::Freeze(reply) => reply,
                FreezeRequest::Rehearse(reply) => {
                    let _ = reply.send(self.rehearse_save().map_err(|e| e.to_string()));
                    continue;
                }
            };
            let was_running = self.phase == VmPhase::Running;
            let since = Instant::now();
            let frozen = self.freeze();
            let (outcome_tx, outcome_rx) = channel();
            let sent = match frozen {
                Ok((state, dirty)) => reply
                    .send(Ok(Frozen {
                        since,
                        state,
                        dirty,
                        outcome: outcome_tx,
                    }))
                    .is_ok(),
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                    false
                }
            };
            let outcome = if sent {
                outcome_rx
                    .recv()
                    .unwrap_or(FreezeOutcome::Failed(DirtyBitmap::default()))
            } else {
                FreezeOutcome::Failed(DirtyBitmap::default())
            };
            match outcome {
                FreezeOutcome::Moved => {
                    tracing::info!("the VM moved to another host: ending here");
                    self.run_state.request_exit(ExitReason::Migrated);
                    return;
                }
                FreezeOutcome::Failed(dirty) => {
                    self.vm.return_dirty_pages(dirty);
                    if was_running && self.phase == VmPhase::Paused {
                        if let Err(e) = self.resume() {
                            tracing::error!("cannot resume the VM after a failed transfer: {e}");
                        }
                    }
                }
            }
        }
    }

    fn freeze(&mut self) -> Result<(MicroVmState, DirtyBitmap), ControlError> {
        let t0 = Instant::now();
        if self.phase == VmPhase::Running {
            self.pause()?;
        }
        let paused = t0.elapsed();
        let state = self.save_state()?;
        let saved = t0.elapsed();
        let dirty = self.vm.collect_dirty_pages()?;
        tracing::info!(
            pause_us = paused.as_micros() as u64,
            save_us = (saved - paused).as_micros() as u64,
            dirty_log_us = (t0.elapsed() - saved).as_micros() as u64,
            "VM frozen"
        );
        Ok((state, dirty))
    }

    fn write_snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<snapshot::WrittenSnapshot, ControlError> {
        let state = self.save_state()?;
        // From here on, KVM logs the guest's writes: the next diff builds on this snapshot.
        self.vm.set_dirty_logging(true)?;
        let dirty = self.vm.collect_dirty_pages()?;
        let diff = match (kind, &self.last_snapshot) {
            (SnapshotKind::Diff, Some(parent)) => Some((&dirty, parent.clone())),
            _ => None,
        };
        match snapshot::write(dir, state, self.vm.memory(), diff) {
            Ok(written) => Ok(written),
            Err(e) => {
                self.vm.return_dirty_pages(dirty);
                Err(e.into())
            }
        }
    }
}
