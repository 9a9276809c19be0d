//! A built microVM and its event loop: vCPU threads run the guest while the monitor's own
//! thread serves device events (queue notifications, TAP traffic) until the guest ends.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use kvm_ioctls::Kvm;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vcpu::{ExitReason, Vcpu, VcpuError, VcpuHandle, VmRunState};
use crate::vstate::vm::Vm;

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

/// Ends the VM when the guest resets it or a vCPU stops.
pub struct ExitHandler {
    run_state: Arc<VmRunState>,
    reset_evt: EventFd,
}

impl ExitHandler {
    /// A handler ending the VM on `reset_evt` (from the i8042) or on `run_state.exit_evt`.
    pub fn new(run_state: Arc<VmRunState>, reset_evt: EventFd) -> Self {
        Self {
            run_state,
            reset_evt,
        }
    }
}

impl MutEventSubscriber for ExitHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            tracing::info!("guest reset the machine");
            self.run_state.request_exit(ExitReason::Reset);
        } else {
            let _ = self.run_state.exit_evt.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.reset_evt.as_raw_fd(),
            self.run_state.exit_evt.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch the exit events: {e:?}");
            }
        }
    }
}

/// A microVM ready to run.
pub struct MicroVm {
    // Field order is drop order: the vCPUs and devices go before the VM and its memory.
    vcpus: Vec<Vcpu>,
    event_loop: EventLoop,
    run_state: Arc<VmRunState>,
    vm: Vm,
    _kvm: Kvm,
}

impl MicroVm {
    /// Assembles a microVM from its built parts.
    pub fn new(
        kvm: Kvm,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        event_loop: EventLoop,
        run_state: Arc<VmRunState>,
    ) -> Self {
        Self {
            vcpus,
            event_loop,
            run_state,
            vm,
            _kvm: kvm,
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The shared run state (to stop the VM from elsewhere).
    pub fn run_state(&self) -> Arc<VmRunState> {
        self.run_state.clone()
    }

    /// Runs the guest until it ends; returns why it ended.
    pub fn run(&mut self) -> Result<ExitReason, RunError> {
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(self.run_state.clone()) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    self.run_state
                        .request_exit(ExitReason::Error(e.to_string()));
                    handles.into_iter().for_each(VcpuHandle::kick_and_join);
                    return Err(e.into());
                }
            }
        }
        let mut result = Ok(());
        while !self.run_state.stop_requested() {
            if let Err(e) = self.event_loop.run_with_timeout(1000) {
                self.run_state
                    .request_exit(ExitReason::Error(format!("event loop: {e:?}")));
                result = Err(RunError::EventLoop(e));
            }
        }
        handles.into_iter().for_each(VcpuHandle::kick_and_join);
        result?;
        Ok(self.run_state.exit_reason().unwrap_or(ExitReason::Stopped))
    }
}
