//! A built microVM and its event loop: vCPU threads run the guest while the monitor's own
//! thread serves device events (queue notifications, TAP traffic) until the guest ends.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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
use crate::epoch::{EpochError, EpochOptions, EpochTracker, PendingEpoch};
use crate::health::{Health, Supervisor};
use crate::persist::Persist;
use crate::snapshot::{self, MicroVmState, ParentRef, SnapshotError, SnapshotKind};
use crate::vstate::dirty::DirtyConsumer;
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

/// The least margin a freeze gets beyond the allowed downtime: time to save the state, send
/// the last pages and have the destination restore and answer.
pub const FREEZE_MARGIN_MIN: Duration = Duration::from_secs(1);
/// The most margin a freeze gets beyond the allowed downtime, however large that is.
pub const FREEZE_MARGIN_MAX: Duration = Duration::from_secs(10);

/// The longest a freeze for a transfer allowed `max_downtime` may keep the VM stopped: the
/// downtime plus a margin of twice as much, bounded by [`FREEZE_MARGIN_MIN`] and
/// [`FREEZE_MARGIN_MAX`]. The monitor thread resumes the VM once it has passed.
pub fn freeze_deadline(max_downtime: Duration) -> Duration {
    max_downtime + (max_downtime * 2).clamp(FREEZE_MARGIN_MIN, FREEZE_MARGIN_MAX)
}

/// What a migration (or, later, replication) thread gets when it freezes the VM: the state of
/// the paused machine and the pages written since its consumer last took them. The VM stays
/// frozen - vCPUs parked, device events not processed - until `outcome` is answered or
/// `deadline` passes, whichever comes first.
pub struct Frozen {
    /// When the vCPUs were asked to stop: the guest's downtime runs from here.
    pub since: Instant,
    /// When the monitor thread gives up waiting and resumes the VM: every wait of the
    /// requester on the network while frozen must end by then.
    pub deadline: Instant,
    /// Everything but memory.
    pub state: MicroVmState,
    /// Pages written since the requester's consumer last took them.
    pub dirty: DirtyBitmap,
    /// Answer with the outcome: the VM then ends (moved) or runs on (failed).
    pub outcome: FreezeOutcomeSender,
}

/// How a freeze ended.
pub enum FreezeOutcome {
    /// The VM runs elsewhere now: this one ends.
    Moved,
    /// The transfer failed: give back the dirty pages (still to be sent) and run on.
    Failed(DirtyBitmap),
}

/// A freeze's outcome as the monitor thread and the requester settle it: whoever comes first
/// - the requester's answer or the deadline - decides, once.
#[derive(Default)]
struct FreezeVerdict {
    /// `None` while pending; `Some(None)` once the deadline passed first.
    decided: Mutex<Option<Option<FreezeOutcome>>>,
    changed: Condvar,
}

impl FreezeVerdict {
    fn lock(&self) -> MutexGuard<'_, Option<Option<FreezeOutcome>>> {
        self.decided.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides `outcome` unless already decided; returns whether it did.
    fn decide(&self, outcome: FreezeOutcome) -> bool {
        let decided = self.decide_quietly(outcome);
        self.changed.notify_all();
        decided
    }

    /// Decides `outcome` unless already decided, without waking the monitor thread: from now on
    /// the deadline can no longer pass, and the monitor learns the outcome when woken (or at
    /// the deadline, at the latest).
    fn decide_quietly(&self, outcome: FreezeOutcome) -> bool {
        let mut decided = self.lock();
        if decided.is_some() {
            return false;
        }
        *decided = Some(Some(outcome));
        true
    }

    /// Waits for the outcome until `deadline`; `None` if the deadline passed first (from then
    /// on, the requester's answer is refused).
    fn wait_until(&self, deadline: Instant) -> Option<FreezeOutcome> {
        let mut decided = self.lock();
        loop {
            if let Some(outcome) = decided.as_mut() {
                return outcome.take();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *decided = Some(None);
                return None;
            }
            decided = self
                .changed
                .wait_timeout(decided, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The freeze's deadline passed before the requester answered: the monitor thread resumed
/// the VM here.
#[derive(Debug, thiserror::Error)]
#[error("the freeze's deadline passed: the VM was resumed here")]
pub struct FreezeExpired;

/// The requester's side of a freeze's outcome. Dropped unanswered, the freeze failed (the VM
/// runs on; the pages it took are given back from the monitor's copy).
pub struct FreezeOutcomeSender(Arc<FreezeVerdict>);

impl FreezeOutcomeSender {
    /// The VM runs elsewhere now: this one ends. Refused once the deadline passed (the VM has
    /// been resumed here). Decided at once, so the deadline cannot pass any more; the monitor
    /// thread is woken when the returned [`MovedNotice`] is dropped, so the requester can first
    /// let the moved guest have this host's CPUs.
    pub fn moved(self) -> Result<MovedNotice, FreezeExpired> {
        if self.0.decide_quietly(FreezeOutcome::Moved) {
            Ok(MovedNotice(self.0.clone()))
        } else {
            Err(FreezeExpired)
        }
    }

    /// The transfer failed: `dirty` (the pages still to be sent) goes back to the consumer and
    /// the VM runs on.
    pub fn failed(self, dirty: DirtyBitmap) {
        self.0.decide(FreezeOutcome::Failed(dirty));
    }
}

/// A move decided: wakes the monitor thread, which ends this VM, when dropped.
pub struct MovedNotice(Arc<FreezeVerdict>);

impl Drop for MovedNotice {
    fn drop(&mut self) {
        self.0.changed.notify_all();
    }
}

impl Drop for FreezeOutcomeSender {
    fn drop(&mut self) {
        // Unanswered (the requester failed or panicked): the pages come from the monitor's copy.
        self.0.decide(FreezeOutcome::Failed(DirtyBitmap::default()));
    }
}

/// What a requester asks for when it freezes the VM.
#[derive(Debug, Clone, Copy)]
pub struct FreezeTerms {
    /// Whose dirty pages the freeze takes (and gets back if the transfer fails).
    pub consumer: DirtyConsumer,
    /// How long the VM may stay frozen at most (see [`freeze_deadline`]).
    pub max_freeze: Duration,
}

/// What a transfer thread asks of the monitor thread, with where to answer.
enum FreezeRequest {
    /// Freeze the VM ([`FreezeHandle::freeze`]).
    Freeze(FreezeTerms, Sender<Result<Frozen, String>>),
    /// Rehearse the save ([`FreezeHandle::rehearse`]).
    Rehearse(Sender<Result<MicroVmState, String>>),
    /// Take an epoch checkpoint ([`FreezeHandle::epoch`]).
    Epoch(
        Arc<EpochTracker>,
        EpochOptions,
        Sender<Result<PendingEpoch, EpochError>>,
    ),
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

    /// Asks the monitor thread to freeze the VM, taking `terms.consumer`'s dirty pages, for
    /// at most `terms.max_freeze`; returns what it froze.
    pub fn freeze(&self, terms: FreezeTerms) -> Result<Frozen, String> {
        self.ask(|reply| FreezeRequest::Freeze(terms, reply))
    }

    /// Asks the monitor thread to run the code of a freeze's save without pausing the VM
    /// ([`MicroVm::rehearse_save`]); returns what it saved, which is not a state of one moment.
    pub fn rehearse(&self) -> Result<MicroVmState, String> {
        self.ask(FreezeRequest::Rehearse)
    }

    /// Asks the monitor thread for an epoch checkpoint ([`MicroVm::checkpoint_epoch`]); returns
    /// once the VM runs again, with the epoch whose copy goes on.
    pub fn epoch(
        &self,
        tracker: &Arc<EpochTracker>,
        options: &EpochOptions,
    ) -> Result<PendingEpoch, EpochError> {
        let (tx, rx) = channel();
        let gone = || EpochError::Control(ControlError::NotStarted);
        self.requests
            .send(FreezeRequest::Epoch(tracker.clone(), options.clone(), tx))
            .map_err(|_| gone())?;
        self.wake();
        rx.recv().map_err(|_| gone())?
    }

    fn ask<T>(
        &self,
        request: impl FnOnce(Sender<Result<T, String>>) -> FreezeRequest,
    ) -> Result<T, String> {
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
    /// The diff snapshots' own set of dirty pages (registered with the first snapshot, or at
    /// restore): a migration reading the dirty log does not take pages from it.
    snapshot_dirty: Option<DirtyConsumer>,
    /// The vCPUs hold restored MSRs back from KVM until the guest has run a while.
    msrs_held_back: bool,
    /// Checks the TAPs, disk images and guest progress from the event loop.
    supervisor: Supervisor,
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
        // A restored VM tracking dirty pages diffs against the snapshot it came from.
        let snapshot_dirty =
            (last_snapshot.is_some() && vm.dirty_logging()).then(|| vm.register_dirty_consumer());
        let supervisor = Supervisor::new(vcpus.iter().filter_map(Vcpu::exit_counter).collect());
        Self {
            supervisor,
            snapshot_dirty,
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

    /// The health of the VM's resources, as the event loop last checked it.
    pub fn health(&self) -> Health {
        self.supervisor.health()
    }

    /// Checks the health of the VM's resources if a check is due (see [`Supervisor`]).
    fn check_health(&mut self) {
        let now = Instant::now();
        if !self.supervisor.due(now) {
            return;
        }
        let disks = self
            .devices
            .virtio
            .iter()
            .filter_map(|slot| lock(lock(&slot.transport).device()).disk_health())
            .collect();
        let taps: Vec<&str> = self.config.net.iter().map(|n| n.tap.as_str()).collect();
        let running = match self.phase {
            VmPhase::Created => None,
            VmPhase::Running => Some(true),
            VmPhase::Paused => Some(false),
        };
        self.supervisor.check(now, &taps, disks, running);
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
            self.check_health();
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
    /// sends a RARP broadcast from the guest's MAC, so bridges and switches learn its new port,
    /// and asks a driver that negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE` to announce the guest's
    /// addresses itself (a configuration change with `VIRTIO_NET_S_ANNOUNCE`).
    pub fn announce(&self) {
        for slot in &self.devices.virtio {
            lock(&slot.transport).announce();
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
        if kind == SnapshotKind::Diff
            && (self.last_snapshot.is_none()
                || self.snapshot_dirty.is_none()
                || !self.vm.dirty_logging())
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

    /// Serves a pending freeze request, if any: pauses the VM, hands its state and the
    /// requester's dirty pages over and waits (device events held) for the outcome, but never
    /// past the freeze's deadline. `Moved` ends the VM; `Failed`, or the deadline passing,
    /// gives the pages back and resumes it (if it was running).
    ///
    /// Resuming at the deadline is what keeps a silent destination from holding this VM
    /// stopped (and its API unanswered). It is safe only where the destination does not run
    /// the guest before the source's go-ahead: the standby-staging work (issue 22) makes the
    /// destination wait for that. Today's `vmr receive` runs the guest once it has sent its
    /// `Ack` to `Commit`, so an `Ack` that comes after the deadline may leave two copies of
    /// the guest running: this one (resumed, its migration reported failed) and the
    /// destination's. That risk remains until the staging work lands.
    pub fn serve_freeze(&mut self, freezes: &FreezeChannel) {
        let _ = freezes.wake.read();
        while let Ok(request) = freezes.requests.try_recv() {
            let (terms, reply) = match request {
                FreezeRequest::Freeze(terms, reply) => (terms, reply),
                FreezeRequest::Rehearse(reply) => {
                    let _ = reply.send(self.rehearse_save().map_err(|e| e.to_string()));
                    continue;
                }
                FreezeRequest::Epoch(tracker, options, reply) => {
                    let _ = reply.send(self.checkpoint_epoch(&tracker, &options));
                    continue;
                }
            };
            let was_running = self.phase == VmPhase::Running;
            let since = Instant::now();
            let deadline = since + terms.max_freeze;
            let verdict = Arc::new(FreezeVerdict::default());
            // The pages handed over, kept to give back if no answer comes in time.
            let mut handed_over = None;
            match self.freeze(terms.consumer) {
                Ok((state, dirty)) => {
                    handed_over = Some(dirty.clone());
                    let frozen = Frozen {
                        since,
                        deadline,
                        state,
                        dirty,
                        outcome: FreezeOutcomeSender(verdict.clone()),
                    };
                    // A requester gone drops `frozen`, which decides `Failed`.
                    let _ = reply.send(Ok(frozen));
                }
                Err(e) => {
                    verdict.decide(FreezeOutcome::Failed(DirtyBitmap::default()));
                    let _ = reply.send(Err(e.to_string()));
                }
            }
            let outcome = verdict.wait_until(deadline);
            let give_back = match outcome {
                Some(FreezeOutcome::Moved) => {
                    tracing::info!("the VM moved to another host: ending here");
                    self.run_state.request_exit(ExitReason::Migrated);
                    return;
                }
                Some(FreezeOutcome::Failed(dirty)) => {
                    // The monitor's copy holds every page handed over; the requester's, at
                    // most those. Either way, nothing taken is lost.
                    handed_over.unwrap_or(dirty)
                }
                None => {
                    tracing::error!(
                        max_freeze_ms = terms.max_freeze.as_millis() as u64,
                        "the transfer did not finish within the freeze's deadline: resuming \
                         the VM here"
                    );
                    handed_over.unwrap_or_default()
                }
            };
            self.vm.return_dirty_pages(terms.consumer, &give_back);
            if was_running && self.phase == VmPhase::Paused {
                if let Err(e) = self.resume() {
                    tracing::error!("cannot resume the VM after a failed transfer: {e}");
                }
            }
        }
    }

    fn freeze(
        &mut self,
        consumer: DirtyConsumer,
    ) -> Result<(MicroVmState, DirtyBitmap), ControlError> {
        let t0 = Instant::now();
        if self.phase == VmPhase::Running {
            self.pause()?;
        }
        let paused = t0.elapsed();
        let state = self.save_state()?;
        let saved = t0.elapsed();
        let dirty = self.vm.take_dirty_pages(consumer)?;
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
        let consumer = *self
            .snapshot_dirty
            .get_or_insert_with(|| self.vm.register_dirty_consumer());
        let dirty = self.vm.take_dirty_pages(consumer)?;
        let diff = match (kind, &self.last_snapshot) {
            (SnapshotKind::Diff, Some(parent)) => Some((&dirty, parent.clone())),
            _ => None,
        };
        match snapshot::write(dir, state, self.vm.memory(), diff) {
            Ok(written) => Ok(written),
            Err(e) => {
                self.vm.return_dirty_pages(consumer, &dirty);
                Err(e.into())
            }
        }
    }

    /// Turns replication on or off on the devices and returns their ports (see
    /// [`crate::devices::replication`]).
    pub fn set_replication(
        &self,
        mode: crate::devices::replication::ReplicationMode,
    ) -> crate::devices::replication::ReplicationPorts {
        crate::devices::replication::set_replication(&self.devices, mode)
    }
}

/// A microVM running on a thread of its own, which serves freeze and epoch requests: what a
/// replication engine, a test or a benchmark drives from another thread.
pub struct MicroVmThread {
    /// The VM (its memory and dirty tracking).
    pub vm: Arc<Vm>,
    /// Freezes and epochs ([`FreezeHandle::epoch`]).
    pub freezes: FreezeHandle,
    run_state: Arc<VmRunState>,
    thread: Option<std::thread::JoinHandle<Result<ExitReason, String>>>,
}

impl MicroVmThread {
    /// Builds the microVM of `config` on a new thread and runs it there; `setup` runs on that
    /// thread after the build, before the vCPUs start (to write the guest's inputs).
    pub fn spawn(
        config: VmConfig,
        setup: impl FnOnce(&MicroVm) + Send + 'static,
    ) -> Result<Self, String> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let built = crate::builder::build_microvm(&config)
                    .map_err(|e| e.to_string())
                    .and_then(|vm| {
                        let (chan, handle) = freeze_channel().map_err(|e| e.to_string())?;
                        Ok((vm, chan, handle))
                    });
                let (mut microvm, chan, handle) = match built {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                microvm.add_wakeup(chan.fd());
                setup(&microvm);
                let _ = tx.send(Ok((microvm.vm().clone(), handle, microvm.run_state())));
                microvm
                    .run_with(|m| m.serve_freeze(&chan))
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?;
        let (vm, freezes, run_state) =
            rx.recv().map_err(|_| "the VM thread ended".to_string())??;
        Ok(Self {
            vm,
            freezes,
            run_state,
            thread: Some(thread),
        })
    }

    /// Stops the guest and waits for the thread; why the VM ended.
    pub fn stop(mut self) -> Result<ExitReason, String> {
        self.end()
    }

    fn end(&mut self) -> Result<ExitReason, String> {
        self.run_state.request_exit(ExitReason::Stopped);
        self.freezes.wake();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "the VM thread panicked".to_string())?,
            None => Ok(ExitReason::Stopped),
        }
    }
}

impl Drop for MicroVmThread {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> (Arc<FreezeVerdict>, FreezeOutcomeSender) {
        let verdict = Arc::new(FreezeVerdict::default());
        (verdict.clone(), FreezeOutcomeSender(verdict))
    }

    #[test]
    fn a_freeze_unanswered_by_its_deadline_expires_and_a_late_move_is_refused() {
        let (verdict, sender) = pending();
        let t0 = Instant::now();
        assert!(verdict.wait_until(t0 + Duration::from_millis(50)).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(sender.moved().is_err(), "a move after the deadline");
    }

    #[test]
    fn an_answer_before_the_deadline_decides() {
        let (verdict, sender) = pending();
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            sender.moved().map(drop)
        });
        let outcome = verdict.wait_until(Instant::now() + Duration::from_secs(10));
        assert!(matches!(outcome, Some(FreezeOutcome::Moved)));
        assert!(answer.join().unwrap().is_ok());

        // A requester gone without answering failed.
        let (verdict, sender) = pending();
        drop(sender);
        let outcome = verdict.wait_until(Instant::now() + Duration::from_secs(10));
        assert!(matches!(outcome, Some(FreezeOutcome::Failed(_))));
    }

    #[test]
    fn a_move_decided_before_the_deadline_holds_however_late_the_monitor_is_woken() {
        // The requester gives the CPU away between deciding and waking the monitor: the
        // deadline passing meanwhile must not resume the VM here (two running copies).
        let (verdict, sender) = pending();
        let notice = sender.moved().expect("decided before the deadline");
        let outcome = verdict.wait_until(Instant::now() + Duration::from_millis(30));
        assert!(matches!(outcome, Some(FreezeOutcome::Moved)));
        drop(notice);
    }

    #[test]
    fn the_freeze_deadline_is_the_downtime_and_a_bounded_margin() {
        assert_eq!(
            freeze_deadline(Duration::from_millis(100)),
            Duration::from_millis(100) + FREEZE_MARGIN_MIN
        );
        assert_eq!(
            freeze_deadline(Duration::from_secs(2)),
            Duration::from_secs(6)
        );
        assert_eq!(
            freeze_deadline(Duration::from_secs(60)),
            Duration::from_secs(60) + FREEZE_MARGIN_MAX
        );
    }
}
