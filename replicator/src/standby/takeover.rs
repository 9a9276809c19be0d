//! The takeover: a standby becomes the primary of its VM.
//!
//! In order ([`takeover`]):
//! 1. **Authority.** With a coordinator, the standby claims the VM from the ownership it knows:
//!    the owner key must hold the term of the standby's last committed epoch (the primary it
//!    followed); the claim makes it the owner with the next term. If the key already holds a
//!    later term, someone else took the VM over, or the primary went on without it and may have
//!    released output this standby never committed: refused ([`TakeoverError::NotOwner`]). The
//!    old primary's own claim (to go on unprotected) is the same compare-and-swap: exactly one
//!    of them wins. Without a coordinator (a manual `--force`) this step is skipped, and said so.
//! 2. **Promotion** ([`Standby::promote`]): the committed epoch becomes the VM, over the
//!    committed memory; the staging takes no epoch any more (a primary still sending gets a
//!    refusal, and never an ack to release output on).
//! 3. **Network.** Replication is turned off on the devices; the held output of epochs after
//!    the committed one is discarded (never released, so never seen) and that of the committed
//!    epochs released (the old primary may have died before their ack reached it); the
//!    inbound frames logged for the epochs after the committed one are re-injected into each
//!    network device's receive queue, in order; the guest is announced on its TAPs (RARP).
//!
//! The VM is returned ready to run ([`MicroVm::run`] starts its vCPUs).

use vmm::builder::RestoreOptions;
use vmm::devices::replication::ReplicationMode;
use vmm::microvm::MicroVm;

use super::committed::CommittedDisk;
use super::host::{Standby, StandbyError};
use crate::coordinator::{Claim, Coordinator, CoordinatorError, Ownership};

/// Why a takeover was refused or failed. One variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Reading the VM's ownership failed.
    #[error("takeover of {vm}: cannot read its ownership: {source}")]
    Current {
        /// The VM.
        vm: String,
        /// Why.
        source: CoordinatorError,
    },
    /// Nobody owns the VM in the coordinator: there is no term to take over from.
    #[error("takeover of {vm}: the coordinator holds no owner for it")]
    NoOwnership {
        /// The VM.
        vm: String,
    },
    /// Someone holds a later term than the standby's committed one (or won the claim first).
    #[error(
        "takeover refused: the VM is owned by {owner} with term {term}, the standby committed \
         term {committed_term}"
    )]
    NotOwner {
        /// The owner.
        owner: String,
        /// Its term.
        term: u64,
        /// The standby's committed term.
        committed_term: u64,
    },
    /// The coordinator's term is older than the standby's committed one: the key was reset.
    #[error(
        "takeover refused: the coordinator's term {term} (owner {owner}) is older than the \
         standby's committed term {committed_term}: the ownership key was reset"
    )]
    TermBehind {
        /// The owner.
        owner: String,
        /// The coordinator's term.
        term: u64,
        /// The standby's committed term.
        committed_term: u64,
    },
    /// The claim itself failed (unreachable coordinator...): nothing was taken over.
    #[error("takeover of {vm}: the claim failed: {source}")]
    Claim {
        /// The VM.
        vm: String,
        /// Why.
        source: CoordinatorError,
    },
    /// The promotion failed (the standby is unchanged; the claim, if made, stands).
    #[error("takeover: {0}")]
    Promote(#[from] StandbyError),
}

/// A VM taken over, ready to run.
pub struct TakenOver {
    /// The VM (vCPUs not started: [`MicroVm::run`]).
    pub vm: MicroVm,
    /// The term it now runs under (the committed one when taken over without a coordinator).
    pub term: u64,
    /// The committed epoch it resumes from.
    pub epoch: u64,
    /// Inbound frames re-injected into its receive queues.
    pub reinjected: usize,
    /// Logged inbound frames that could not be re-injected (a device the VM lacks, or the
    /// device could not be woken); each was logged.
    pub not_reinjected: usize,
}

/// Takes the VM over at `standby`'s committed epoch (see the module's documentation).
/// `authority` is the coordinator, the VM's id and this host's name; `None` is a manual,
/// forced takeover without a claim.
pub fn takeover<D: CommittedDisk>(
    standby: &Standby<D>,
    authority: Option<(&dyn Coordinator, &str, &str)>,
    options: &RestoreOptions,
) -> Result<TakenOver, TakeoverError> {
    standby.check_takeover()?;
    let (committed_epoch, committed_term) = {
        let s = standby.committed();
        (s.committed_epoch(), s.committed_term())
    };
    let term = match authority {
        Some((coordinator, vm, me)) => claim(standby, coordinator, vm, me)?.term,
        None => {
            tracing::warn!(
                epoch = committed_epoch,
                term = committed_term,
                "takeover forced without a coordinator: no claim made, nothing keeps the old \
                 primary from running beside this VM"
            );
            committed_term
        }
    };
    resume(standby, term, options)
}

/// The second half of [`takeover`], once the VM is claimed for `term` (or the takeover is
/// forced): promotes the committed state into a VM, its network taken over.
pub fn resume<D: CommittedDisk>(
    standby: &Standby<D>,
    term: u64,
    options: &RestoreOptions,
) -> Result<TakenOver, TakeoverError> {
    let vm = standby.promote(options)?;
    let epoch = standby.committed().committed_epoch();
    let (reinjected, not_reinjected) = network_takeover(standby, &vm, epoch);
    tracing::info!(
        epoch,
        term,
        reinjected,
        not_reinjected,
        "taken over: the VM resumes from its committed epoch"
    );
    Ok(TakenOver {
        vm,
        term,
        epoch,
        reinjected,
        not_reinjected,
    })
}

/// The first half of [`takeover`]: claims the VM `vm` for `me` in `coordinator`, from the
/// ownership of `standby`'s committed term.
pub fn claim<D: CommittedDisk>(
    standby: &Standby<D>,
    coordinator: &dyn Coordinator,
    vm: &str,
    me: &str,
) -> Result<Ownership, TakeoverError> {
    standby.check_takeover()?;
    let committed_term = standby.committed().committed_term();
    let current = coordinator
        .current(vm)
        .map_err(|source| TakeoverError::Current {
            vm: vm.to_owned(),
            source,
        })?
        .map(|(o, _)| o)
        .ok_or_else(|| TakeoverError::NoOwnership { vm: vm.to_owned() })?;
    let not_owner = |o: Ownership| TakeoverError::NotOwner {
        owner: o.owner,
        term: o.term,
        committed_term,
    };
    if current.term < committed_term {
        return Err(TakeoverError::TermBehind {
            owner: current.owner,
            term: current.term,
            committed_term,
        });
    }
    if current.term > committed_term {
        // Our own claim of an earlier attempt (whose promotion failed) is ours to go on with.
        if current.owner == me && Some(current.term) == committed_term.checked_add(1) {
            tracing::info!(vm, ownership = %current, "already claimed by this host");
            return Ok(current);
        }
        return Err(not_owner(current));
    }
    match coordinator.claim(vm, Some(&current), me) {
        Ok(Claim::Won(o)) => {
            tracing::info!(vm, from = %current, to = %o, "claimed the VM");
            Ok(o)
        }
        Ok(Claim::Lost(o)) => Err(not_owner(o)),
        Err(source) => Err(TakeoverError::Claim {
            vm: vm.to_owned(),
            source,
        }),
    }
}

/// Replication off; held output after `epoch` discarded, up to it released; logged inbound
/// frames re-injected in order; the guest announced. Returns the frames re-injected and those
/// that could not be.
fn network_takeover<D: CommittedDisk>(
    standby: &Standby<D>,
    vm: &MicroVm,
    epoch: u64,
) -> (usize, usize) {
    let ports = vm.set_replication(ReplicationMode::Off);
    let discarded = ports.discard_after(epoch);
    let released = ports.release_through(epoch);
    tracing::info!(
        epoch,
        discarded,
        released,
        "held output: uncommitted discarded, committed released"
    );
    // Per device, in the order they were logged (by epoch, then arrival).
    let mut per_net: Vec<Vec<Vec<u8>>> = vec![Vec::new(); ports.net.len()];
    let mut missing = 0;
    for (e, f) in standby.committed().inbound() {
        match per_net.get_mut(f.net as usize) {
            Some(frames) => frames.push(f.frame.clone()),
            None => {
                tracing::error!(
                    epoch = e,
                    net = f.net,
                    devices = ports.net.len(),
                    "a logged inbound frame names a network device the VM lacks: dropped"
                );
                missing += 1;
            }
        }
    }
    let mut reinjected = 0;
    for (port, frames) in ports.net.iter().zip(per_net) {
        let n = frames.len();
        match port.inject(frames) {
            Ok(k) => reinjected += k,
            Err(e) => {
                tracing::error!("{e}: {n} logged inbound frames lost");
                missing += n;
            }
        }
    }
    vm.announce();
    (reinjected, missing)
}
