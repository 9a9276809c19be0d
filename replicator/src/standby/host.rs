//! The standby host's side of a pairing: committed memory of the VM's size (the vmm's guest
//! memory, ready to run), the staging area, and serving a primary's epochs over a [`Conn`].
//!
//! The first epoch after pairing carries all of memory (the initial synchronisation); it is
//! staged whole before it is applied, so the standby holds up to twice the VM's memory during
//! it (acceptable for the tiny guests and small VMs of today; a large VM wants the initial
//! synchronisation applied in place, before the first commit).

use std::sync::{Mutex, MutexGuard, PoisonError};

use vmm::vstate::memory::create_guest_memory;

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
}
