//! `--coordinator etcd://HOST:PORT[,...]`: who owns a protected VM, for the primary (which
//! takes the ownership of a VM it boots, and must win the next term before it goes on without
//! a standby) and for the standby (which claims the VM before it takes it over). See
//! [`replicator::coordinator`] for the fencing this gives.

use std::sync::Arc;

use replicator::coordinator::{Claim, Coordinator, Endpoints, EtcdCoordinator, DEFAULT_TIMEOUT};
use replicator::primary::Authority;

/// A coordinator and who this host is in it.
#[derive(Clone)]
pub struct Coordination {
    /// The coordinator.
    pub coordinator: Arc<dyn Coordinator>,
    /// Its endpoints, as given.
    pub endpoints: String,
    /// This host's name as an owner of VMs.
    pub me: String,
}

impl Coordination {
    /// Sets up the client of `--coordinator` (no call is made yet: an unreachable coordinator
    /// shows at the first claim). `host_id` names this host (default: the host name and
    /// `suffix`).
    pub fn connect(endpoints: &str, host_id: Option<String>, suffix: &str) -> Result<Self, String> {
        let parsed = Endpoints::parse(endpoints).map_err(|e| e.to_string())?;
        let coordinator = EtcdCoordinator::connect(&parsed, DEFAULT_TIMEOUT)
            .map_err(|e| format!("--coordinator {endpoints}: {e}"))?;
        let me = host_id.unwrap_or_else(|| format!("{}{suffix}", host_name()));
        Ok(Self {
            coordinator: Arc::new(coordinator),
            endpoints: parsed.to_string(),
            me,
        })
    }

    /// Takes the ownership of the VM `vm` this host boots: term 1 for a VM nobody owns, the
    /// next term for one this host owned (a restart). A VM owned by another host is refused:
    /// two primaries would run it.
    pub fn own(&self, vm: &str) -> Result<Authority, String> {
        let current = self
            .coordinator
            .current(vm)
            .map_err(|e| format!("cannot read the ownership of VM {vm}: {e}"))?
            .map(|(o, _)| o);
        if let Some(o) = &current {
            if o.owner != self.me {
                return Err(format!(
                    "VM {vm} is owned by {o} in the coordinator: a second primary would run \
                     beside it (give this VM another --vm-id, or fail it over from its standby)"
                ));
            }
        }
        match self.coordinator.claim(vm, current.as_ref(), &self.me) {
            Ok(Claim::Won(ownership)) => {
                tracing::info!(vm, %ownership, coordinator = self.endpoints, "VM owned");
                Ok(self.authority(vm, ownership))
            }
            Ok(Claim::Lost(o)) => Err(format!(
                "VM {vm} was claimed by {o} meanwhile: not starting a second primary"
            )),
            Err(e) => Err(format!("cannot claim VM {vm}: {e}")),
        }
    }

    /// The authority of this host over `vm` with `ownership` (won already).
    pub fn authority(&self, vm: &str, ownership: replicator::coordinator::Ownership) -> Authority {
        Authority {
            coordinator: self.coordinator.clone(),
            vm: vm.to_string(),
            me: self.me.clone(),
            ownership,
        }
    }
}

/// The host's name (`/proc/sys/kernel/hostname`), `localhost` if it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
