//! A protected microVM on a monitor thread of its own, which runs jobs the epoch engine sends
//! it between two rounds of device events; and what the pause of an epoch does to its devices
//! ([`EpochSwitch`]): start the next epoch on them (egress gates, disk journals) *inside* the
//! pause, after they were saved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm::config::VmConfig;
use vmm::devices::replication::{
    DeviceSwitch, Epoch, EpochWrites, ReplicationMode, ReplicationPorts,
};
use vmm::epoch::{EpochError, EpochOptions, EpochTracker, PauseStep, PendingEpoch};
use vmm::microvm::{freeze_channel, FreezeHandle, MicroVm, VmPhase};
use vmm::vstate::vcpu::{ExitReason, VmRunState};
use vmm::vstate::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

/// Errors of the monitor thread.
#[derive(Debug, thiserror::Error)]
pub enum VmThreadError {
    /// The microVM could not be built.
    #[error("cannot build the microVM: {0}")]
    Build(String),
    /// The wake-up eventfd could not be made.
    #[error("cannot make the monitor's wake-up eventfd: {0}")]
    Wakeup(std::io::Error),
    /// The monitor thread could not be started.
    #[error("cannot start the monitor thread: {0}")]
    Spawn(std::io::Error),
    /// The monitor thread is gone (the VM ended).
    #[error("the VM's monitor thread is gone")]
    Gone,
    /// The monitor thread panicked.
    #[error("the VM's monitor thread panicked")]
    Panicked,
    /// The setup on the monitor thread failed (its one-line reason).
    #[error("{0}")]
    Setup(String),
    /// The VM's run loop failed.
    #[error("the VM's run loop failed: {0}")]
    Run(String),
}

type Job = Box<dyn FnOnce(&mut MicroVm) + Send>;

/// A microVM running on its own thread, taking jobs ([`VmThread::run`]) and freeze requests.
pub struct VmThread {
    /// The VM (memory, dirty tracking).
    pub vm: Arc<Vm>,
    /// Freezes (migration) and plain epochs.
    pub freezes: FreezeHandle,
    jobs: Sender<Job>,
    wake: Arc<EventFd>,
    run_state: Arc<VmRunState>,
    thread: Option<JoinHandle<Result<ExitReason, VmThreadError>>>,
}

impl VmThread {
    /// Builds the microVM of `config` on a new thread and runs it there; `setup` runs on that
    /// thread after the build, before the vCPUs start.
    pub fn spawn(
        config: VmConfig,
        setup: impl FnOnce(&MicroVm) + Send + 'static,
    ) -> Result<Self, VmThreadError> {
        Self::spawn_with(config, move |m| {
            setup(m);
            Ok(|_: &mut MicroVm| {})
        })
    }

    /// As [`VmThread::spawn`], but `setup` may fail (the spawn then fails with its reason, the
    /// guest never ran) and returns the hook the monitor thread calls after every round of
    /// device events, beside the jobs and freezes: the API's
    /// [`vmm::controller::Controller::poll`], for one. It is made on the monitor thread, so it
    /// need not be `Send`.
    pub fn spawn_with<S, H>(config: VmConfig, setup: S) -> Result<Self, VmThreadError>
    where
        S: FnOnce(&mut MicroVm) -> Result<H, String> + Send + 'static,
        H: FnMut(&mut MicroVm) + 'static,
    {
        Self::spawn_built(
            move || vmm::builder::build_microvm(&config).map_err(|e| e.to_string()),
            setup,
        )
    }

    /// As [`VmThread::spawn_with`], the microVM made by `build` on the monitor thread (a VM
    /// restored or taken over rather than booted); `build`'s one-line reason fails the spawn.
    pub fn spawn_built<B, S, H>(build: B, setup: S) -> Result<Self, VmThreadError>
    where
        B: FnOnce() -> Result<MicroVm, String> + Send + 'static,
        S: FnOnce(&mut MicroVm) -> Result<H, String> + Send + 'static,
        H: FnMut(&mut MicroVm) + 'static,
    {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VmThreadError::Wakeup)?;
        let their_wake = wake.try_clone().map_err(VmThreadError::Wakeup)?;
        let (jobs, job_rx) = channel::<Job>();
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let built = build().map_err(VmThreadError::Build).and_then(|vm| {
                    freeze_channel()
                        .map(|c| (vm, c))
                        .map_err(|e| VmThreadError::Build(e.to_string()))
                });
                let (mut microvm, (chan, handle)) = match built {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return Err(VmThreadError::Gone);
                    }
                };
                microvm.add_wakeup(chan.fd());
                microvm.add_wakeup(std::os::unix::io::AsRawFd::as_raw_fd(&their_wake));
                let mut hook = match setup(&mut microvm) {
                    Ok(hook) => hook,
                    Err(e) => {
                        let _ = tx.send(Err(VmThreadError::Setup(e)));
                        return Err(VmThreadError::Gone);
                    }
                };
                let _ = tx.send(Ok((microvm.vm().clone(), handle, microvm.run_state())));
                microvm
                    .run_with(|m| {
                        m.serve_freeze(&chan);
                        let _ = their_wake.read();
                        while let Ok(job) = job_rx.try_recv() {
                            job(m);
                        }
                        hook(m);
                    })
                    .map_err(|e| VmThreadError::Run(e.to_string()))
            })
            .map_err(VmThreadError::Spawn)?;
        let (vm, freezes, run_state) = match rx.recv() {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(match thread.join() {
                    Ok(_) => VmThreadError::Gone,
                    Err(_) => VmThreadError::Panicked,
                })
            }
        };
        Ok(Self {
            vm,
            freezes,
            jobs,
            wake: Arc::new(wake),
            run_state,
            thread: Some(thread),
        })
    }

    /// Runs `job` on the monitor thread and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut MicroVm) -> T + Send + 'static,
    ) -> Result<T, VmThreadError> {
        self.control().run(job)
    }

    /// A handle to send jobs from another thread.
    pub fn control(&self) -> VmControl {
        VmControl {
            jobs: self.jobs.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Stops the guest and waits for the thread; why the VM ended.
    pub fn stop(mut self) -> Result<ExitReason, VmThreadError> {
        self.end()
    }

    /// Waits until the VM ends by itself (the guest powers off or resets, or fails); why.
    pub fn wait(mut self) -> Result<ExitReason, VmThreadError> {
        self.join()
    }

    /// Whether the VM has ended (its monitor thread is done).
    pub fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn end(&mut self) -> Result<ExitReason, VmThreadError> {
        self.run_state.request_exit(ExitReason::Stopped);
        self.freezes.wake();
        self.join()
    }

    fn join(&mut self) -> Result<ExitReason, VmThreadError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| VmThreadError::Panicked)?,
            None => Ok(ExitReason::Stopped),
        }
    }
}

impl Drop for VmThread {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// Sends jobs to a [`VmThread`]'s monitor thread (cheap to clone, usable from any thread).
#[derive(Clone)]
pub struct VmControl {
    jobs: Sender<Job>,
    wake: Arc<EventFd>,
}

impl VmControl {
    /// Runs `job` on the monitor thread and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut MicroVm) -> T + Send + 'static,
    ) -> Result<T, VmThreadError> {
        let (tx, rx) = channel();
        self.jobs
            .send(Box::new(move |m| {
                let _ = tx.send(job(m));
            }))
            .map_err(|_| VmThreadError::Gone)?;
        if let Err(e) = self.wake.write(1) {
            tracing::error!("cannot wake the monitor thread: {e}");
        }
        rx.recv().map_err(|_| VmThreadError::Gone)
    }
}

/// The devices' step of the pause ([`DeviceSwitch`]) in the engine's numbering of epochs (set
/// by [`checkpoint`] before each pause), not the tracker's: the epoch tracker's [`PauseStep`].
#[derive(Clone)]
pub struct EpochSwitch {
    /// The egress gates and disk journals.
    pub devices: DeviceSwitch,
    /// The epoch the next pause starts on the devices.
    next: Arc<AtomicU64>,
}

impl EpochSwitch {
    /// The switch of `ports`.
    pub fn of(ports: &ReplicationPorts) -> Self {
        Self {
            devices: ports.switch(),
            next: Arc::default(),
        }
    }
}

impl PauseStep for EpochSwitch {
    /// Starts the epoch set by [`checkpoint`] on the devices; returns the writes of the epoch
    /// that ends, per disk.
    fn step(&self, _tracker_epoch: u64) -> Vec<EpochWrites> {
        self.devices.begin_epoch(self.next.load(Ordering::Acquire))
    }
}

/// On the monitor thread: takes the epoch (pause, dirty set, state, `switch` starting epoch
/// `next` on the devices, resume); its copy goes on in what it returns.
pub fn checkpoint(
    m: &mut MicroVm,
    tracker: &EpochTracker,
    options: &EpochOptions,
    switch: &EpochSwitch,
    next: Epoch,
) -> Result<PendingEpoch, EpochError> {
    switch.next.store(next, Ordering::Release);
    m.checkpoint_epoch(tracker, options)
}

/// On the monitor thread: turns replication on from epoch `first` (vCPUs paused, so the
/// first epoch's boundary is exact) and returns the ports.
pub fn replication_on(m: &mut MicroVm, first: Epoch, inbound_capacity: usize) -> ReplicationPorts {
    let was_running = m.phase() == VmPhase::Running;
    if was_running {
        if let Err(e) = m.pause() {
            tracing::warn!("cannot pause to turn replication on: {e}");
        }
    }
    let ports = m.set_replication(ReplicationMode::On {
        epoch: first,
        inbound_capacity,
    });
    if was_running && m.phase() == VmPhase::Paused {
        if let Err(e) = m.resume() {
            tracing::error!("cannot resume after turning replication on: {e}");
        }
    }
    ports
}
