//! The standby host's side of a pairing: committed memory of the VM's size (the vmm's guest
//! memory, ready to run), the staging area, and serving a primary's epochs over a [`Conn`].
//!
//! The initial synchronisation (`Join`, then memory and disks outside any epoch) is written
//! straight into the committed memory and images, nothing committed until the first epoch
//! completes it. A primary older than protocol 1.2 sends all of memory as the first epoch
//! instead, staged whole before it is applied (twice the VM's memory meanwhile).
//!
//! The committed epoch can leave the standby two ways: written as an ordinary snapshot
//! directory ([`Standby::write_snapshot`], for `vmr restore` here or elsewhere), or promoted
//! into a running VM over the committed memory itself ([`Standby::promote`], the failover: no
//! copy, no file). In both the VM's disks are the standby's images, not the primary's.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use virtio_net_tap::GateMode;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm::builder::{restore_from_state, BuildError, PreparedVm, RestoreOptions};
use vmm::devices::virtio::VirtioDeviceState;
use vmm::microvm::MicroVm;
use vmm::migration::wire::{decode_payload, WireError};
use vmm::snapshot::{MicroVmState, SnapshotError, WrittenSnapshot};
use vmm::vstate::memory::{create_guest_memory, GuestMemoryMmap, PAGE_SIZE};
use vmm::vstate::vm::ClockRestore;

use super::committed::{CommittedDisk, GuestRam};
use super::staging::{Staging, StagingOptions};
use super::{serve_on, ServeError};
use crate::auth::ReplicationKey;
use crate::compat::{Hello, StandbyProfile};
use crate::conn::Conn;
use crate::pairing::{self, Link, PairError};

/// Errors of a standby host. One variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// The committed memory could not be made.
    #[error("cannot make {bytes} bytes of standby memory: {reason}")]
    Memory {
        /// Its size.
        bytes: u64,
        /// Why.
        reason: String,
    },
    /// The connection could not be split in a reader and a writer.
    #[error("cannot use the connection: {0}")]
    Conn(std::io::Error),
    /// Pairing with the primary failed (refused, or not authenticated).
    #[error("pairing refused: {0}")]
    Pair(#[from] PairError),
    /// No epoch is committed yet: there is no machine to snapshot or promote.
    #[error("no epoch is committed yet: the standby holds no machine")]
    NothingCommitted,
    /// A failed apply damaged the committed state.
    #[error(
        "the committed state was damaged by a failed apply (epoch {epoch} or the next): \
         a full resynchronisation is needed"
    )]
    Poisoned {
        /// The last epoch committed whole.
        epoch: u64,
    },
    /// The standby was promoted: its committed memory runs the VM now.
    #[error("this standby was promoted at epoch {epoch}: its committed state runs as the VM")]
    Promoted {
        /// The epoch it was promoted at.
        epoch: u64,
    },
    /// The committed machine state does not decode.
    #[error("the machine state of committed epoch {epoch} does not decode: {source}")]
    DecodeState {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: WireError,
    },
    /// The committed state is not one a takeover may resume: the initial synchronisation had
    /// not converged, and the primary released output this standby never held.
    #[error(
        "the committed epoch {committed} cannot be taken over: {}",
        match .through {
            Some(t) => format!("the primary released the output of epochs up to {t} without this standby"),
            None => "the initial synchronisation had not converged (the VM was not protected yet)".to_string(),
        }
    )]
    NotProtected {
        /// The committed epoch.
        committed: u64,
        /// The epoch needed, if the primary said it.
        through: Option<u64>,
    },
    /// The committed state's disks are not the standby's.
    #[error(
        "the committed state has {configured} disks configured and {devices} block devices, \
         the standby holds {standby} images"
    )]
    DiskCount {
        /// Disks in the VM's configuration (its root file system first).
        configured: usize,
        /// Block devices in its device state.
        devices: usize,
        /// Disk images of the standby.
        standby: usize,
    },
    /// A disk of the standby is no file (an image in memory).
    #[error("the standby's disk {index} is not a file: a VM cannot open it")]
    DiskNotAFile {
        /// The disk.
        index: usize,
    },
    /// Writing the snapshot failed (nothing is left behind).
    #[error("cannot write the committed epoch {epoch} as a snapshot: {source}")]
    Snapshot {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: SnapshotError,
    },
    /// The VM could not be restored over the committed memory (the standby is unchanged).
    #[error("cannot restore committed epoch {epoch} as a running VM: {source}")]
    Restore {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: BuildError,
    },
}

/// What a standby holds, for `GET /replication` on a standby host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StandbyInfo {
    /// The last committed epoch (0: none).
    pub committed_epoch: u64,
    /// Its term.
    pub committed_term: u64,
    /// The epoch being staged, if any.
    pub open_epoch: Option<u64>,
    /// Whether a failed apply damaged the committed state.
    pub poisoned: bool,
    /// Whether the committed state was promoted into a running VM.
    pub promoted: bool,
    /// The epoch a takeover needs committed (the end of the initial synchronisation), once
    /// the primary said it.
    pub protected_through: Option<u64>,
    /// Inbound frames logged for replay (of epochs after the committed one).
    pub inbound_frames: u64,
    /// Their bytes.
    pub inbound_bytes: u64,
    /// Guest memory, in bytes.
    pub mem_bytes: u64,
}

/// A standby of one VM: its committed state and what it can hold.
pub struct Standby<D: CommittedDisk> {
    profile: StandbyProfile,
    key: ReplicationKey,
    staging: Mutex<Staging<GuestRam, D>>,
}

impl<D: CommittedDisk> Standby<D> {
    /// A standby holding nothing yet (epoch 0) for a VM of `profile`, with `disks` (their
    /// images, in order).
    pub fn new(
        profile: StandbyProfile,
        key: ReplicationKey,
        disks: Vec<D>,
        options: StagingOptions,
    ) -> Result<Self, StandbyError> {
        let bytes = profile.mem_bytes;
        let mem = create_guest_memory(bytes).map_err(|e| StandbyError::Memory {
            bytes,
            reason: e.to_string(),
        })?;
        let staging = Mutex::new(Staging::new(
            GuestRam::new(mem),
            disks,
            Vec::new(),
            (0, 0),
            options,
        ));
        Ok(Self {
            profile,
            key,
            staging,
        })
    }

    /// Pairs with the primary at the other end of `conn` and serves its epochs until the link
    /// ends; the primary's `Hello` and why serving stopped. Each commit is acknowledged; the
    /// committed state is never left half-applied.
    pub fn serve(&self, conn: Conn) -> Result<(Hello, ServeError), StandbyError> {
        let reader = conn.try_clone().map_err(StandbyError::Conn)?;
        let committed = {
            let s = self.committed();
            if s.is_handed_over() {
                return Err(StandbyError::Promoted {
                    epoch: s.committed_epoch(),
                });
            }
            (s.committed_epoch(), s.committed_term())
        };
        let (mut link, hello) =
            pairing::accept(reader, conn, &self.key, &self.profile, committed, None)?;
        let end = self.serve_link(&mut link, &hello);
        Ok((hello, end))
    }

    /// Serves the epochs of the primary of `hello` on `link`, paired already (as
    /// [`pairing::accept_with`] does for a standby sized from the `Hello`), until the link
    /// ends; why it ended.
    pub fn serve_link(&self, link: &mut Link<Conn, Conn>, hello: &Hello) -> ServeError {
        let committed = self.committed().committed_epoch();
        tracing::info!(vm = %hello.vm_id, committed, "serving a primary");
        let end = serve_on(link, &self.staging);
        tracing::debug!(
            vm = %hello.vm_id,
            committed_epoch = self.committed().committed_epoch(),
            "the primary's link ended: {end}"
        );
        end
    }

    /// What this standby holds.
    pub fn profile(&self) -> &StandbyProfile {
        &self.profile
    }

    /// The committed state (memory, disks, machine state, epoch), locked: while it is held,
    /// no epoch is committed, and a reader never sees half of one.
    pub fn committed(&self) -> MutexGuard<'_, Staging<GuestRam, D>> {
        self.staging.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the standby holds now.
    pub fn info(&self) -> StandbyInfo {
        let s = self.committed();
        let (inbound_frames, inbound_bytes) = s
            .inbound()
            .fold((0, 0), |(n, b), (_, f)| (n + 1, b + f.frame.len() as u64));
        StandbyInfo {
            committed_epoch: s.committed_epoch(),
            committed_term: s.committed_term(),
            open_epoch: s.open_epoch(),
            poisoned: s.is_poisoned(),
            promoted: s.is_handed_over(),
            protected_through: s.protected_through(),
            inbound_frames,
            inbound_bytes,
            mem_bytes: self.profile.mem_bytes,
        }
    }

    /// Writes the last committed epoch to the new directory `dir` as an ordinary full
    /// snapshot, which `vmr restore --from DIR` (or [`vmm::snapshot::load`] and
    /// [`vmm::builder::restore_microvm`]) brings back to life with the standby's disk images.
    /// The snapshot is exactly one committed epoch: its memory (the non-zero pages) and
    /// state are copied while no epoch commits, then written while the standby goes on
    /// committing (writing it all under the lock held the primary's acks for seconds in the
    /// lab, long enough for the primary to drop the standby). Refused before the first commit,
    /// on a damaged or promoted standby, and if `dir` exists.
    pub fn write_snapshot(&self, dir: &Path) -> Result<WrittenSnapshot, StandbyError> {
        let (epoch, term, mut state, mem) = {
            let staging = self.committed();
            let epoch = staging.committed_epoch();
            let state = committed_machine(&staging)?;
            let mem = copy_memory(staging.memory().guest_memory()).map_err(|reason| {
                StandbyError::Memory {
                    bytes: self.profile.mem_bytes,
                    reason,
                }
            })?;
            (epoch, staging.committed_term(), state, mem)
        };
        stand_alone(&mut state);
        let written = vmm::snapshot::write(dir, state, &mem, None)
            .map_err(|source| StandbyError::Snapshot { epoch, source })?;
        tracing::info!(
            epoch,
            term,
            dir = %dir.display(),
            pages = written.pages,
            "committed epoch written as a snapshot"
        );
        Ok(written)
    }

    /// Whether the committed state may be taken over: the primary said the VM was protected
    /// (its initial synchronisation converged) and the epoch that needs is committed.
    pub fn check_takeover(&self) -> Result<(), StandbyError> {
        let s = self.committed();
        let committed = s.committed_epoch();
        match s.protected_through() {
            Some(t) if committed >= t => Ok(()),
            through => Err(StandbyError::NotProtected { committed, through }),
        }
    }

    /// Promotes the standby: restores the last committed epoch as a VM over the committed
    /// memory itself (shared, not copied), with the standby's disk images, its clocks caught
    /// up with the time since that epoch's pause. Its vCPUs are not started
    /// ([`MicroVm::run`] resumes the guest). From then on the standby takes no epochs
    /// ([`StandbyError::Promoted`] to a new primary, a refusal to a connected one): they would
    /// write into the running guest. On failure nothing changes and the standby goes on.
    /// The inbound frames logged after that epoch stay readable in [`Standby::committed`]
    /// ([`Staging::inbound`]) for the caller to re-inject; taking the VIP and the term is the
    /// caller's too.
    pub fn promote(&self, options: &RestoreOptions) -> Result<MicroVm, StandbyError> {
        let mut staging = self.committed();
        let epoch = staging.committed_epoch();
        let state = committed_machine(&staging)?;
        // The same mappings: guest memory is reference-counted regions.
        let mem = staging.memory().guest_memory().clone();
        let vcpus = state.config.vcpus;
        let microvm = restore_from_state(
            &state,
            || PreparedVm::new(vcpus, mem, false, options.allow_pvm),
            options,
            None,
            ClockRestore::CatchUp,
        )
        .map_err(|source| StandbyError::Restore { epoch, source })?;
        staging.hand_over();
        tracing::info!(
            epoch,
            term = staging.committed_term(),
            "promoted: the committed epoch is the VM now"
        );
        Ok(microvm)
    }
}

/// A copy of guest memory `src` in a new mapping of the same layout, its zero pages left
/// untouched (so unallocated).
fn copy_memory(src: &GuestMemoryMmap) -> Result<GuestMemoryMmap, String> {
    let total: u64 = src.iter().map(|r| r.len()).sum();
    let dst = create_guest_memory(total).map_err(|e| e.to_string())?;
    let mut page = [0u8; PAGE_SIZE];
    for region in src.iter() {
        let base = region.start_addr();
        for off in (0..region.len()).step_by(PAGE_SIZE) {
            let addr = base.unchecked_add(off);
            src.read_slice(&mut page, addr).map_err(|e| e.to_string())?;
            if page.iter().any(|&b| b != 0) {
                dst.write_slice(&page, addr).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(dst)
}

/// The committed machine state of `staging`, decoded, its disks the standby's images.
fn committed_machine<D: CommittedDisk>(
    staging: &Staging<GuestRam, D>,
) -> Result<MicroVmState, StandbyError> {
    let epoch = staging.committed_epoch();
    if staging.is_handed_over() {
        return Err(StandbyError::Promoted { epoch });
    }
    if staging.is_poisoned() {
        return Err(StandbyError::Poisoned { epoch });
    }
    if epoch == 0 {
        return Err(StandbyError::NothingCommitted);
    }
    let mut state: MicroVmState = decode_payload(staging.committed_state())
        .map_err(|source| StandbyError::DecodeState { epoch, source })?;
    use_standby_disks(&mut state, staging.disks())?;
    Ok(state)
}

/// A snapshot runs on its own, with no epoch engine to release its output: every network
/// device's egress gate opens, and the frames it held are dropped (they are of the epoch after
/// the committed one: never released, so never seen by anyone). Without this, the restored
/// guest's output would be held for ever (seen in the lab: a restored redis never answered).
fn stand_alone(state: &mut MicroVmState) {
    for m in &mut state.devices.virtio {
        if let VirtioDeviceState::Net(net) = &mut m.device {
            net.egress.mode = GateMode::PassThrough;
            net.egress.held.clear();
        }
    }
}

/// Points every disk of `state` (configuration and block devices, in order: the root file
/// system first) at the standby's images `disks`; the primary's paths mean nothing here.
fn use_standby_disks<D: CommittedDisk>(
    state: &mut MicroVmState,
    disks: &[D],
) -> Result<(), StandbyError> {
    let config = &mut state.config;
    let configured = usize::from(config.rootfs.is_some()) + config.disks.len();
    let mut devices: Vec<&mut PathBuf> = state
        .devices
        .virtio
        .iter_mut()
        .filter_map(|m| match &mut m.device {
            VirtioDeviceState::Block(block) => Some(&mut block.path),
            VirtioDeviceState::Net(_) => None,
        })
        .collect();
    if configured != disks.len() || devices.len() != disks.len() {
        return Err(StandbyError::DiskCount {
            configured,
            devices: devices.len(),
            standby: disks.len(),
        });
    }
    let configured = config
        .rootfs
        .iter_mut()
        .chain(config.disks.iter_mut().map(|d| &mut d.path));
    for (index, ((disk, configured), device)) in
        disks.iter().zip(configured).zip(&mut devices).enumerate()
    {
        let path = disk.path().ok_or(StandbyError::DiskNotAFile { index })?;
        *configured = path.to_path_buf();
        **device = path.to_path_buf();
    }
    Ok(())
}
