//! The primary's authority over its VM: the ownership it holds in the coordinator, and the
//! compare-and-swap it must win before it releases output that no standby acknowledged.
//!
//! # Why a deposed primary can never release output
//!
//! The primary holds ownership `(me, T)` and every epoch it sends carries term `T`. Output
//! (the frames the guest sent during epoch `N`) leaves the host by exactly two paths:
//!
//! 1. **An ack of `N` from every standby paired now.** A standby acknowledges an epoch only
//!    after committing it, and it commits only epochs of a term not older than its own
//!    ([`crate::standby::staging::Staging`] refuses older ones). A standby that was promoted
//!    takes no epoch at all any more (its staging is handed over), so it never acknowledges
//!    past the epoch it was promoted at: while it is among the primary's standbys, the
//!    primary's releases stop at that epoch, which the promoted VM holds too.
//! 2. **Going on without a standby**, or with fewer (a dropped standby may be the promoted
//!    one, and the acks of the others alone would release output the promoted VM never saw).
//!    This path needs a won [`Coordinator::claim`] from `(me, T)` to `(me, T + 1)`
//!    ([`Authority::claim_next`]). A promotion is the same claim from the same `(owner, T)`:
//!    of the two exactly one wins. If the standby won, the primary's claim is lost (or cannot
//!    be made: the coordinator is unreachable), and the primary is fenced: it pauses its vCPUs,
//!    discards the held output of every unacknowledged epoch (never released, so never seen)
//!    and releases nothing more ([`super::Decision::Fenced`]).
//!
//! Hence no periodic check of the ownership is needed while standbys acknowledge: the check is
//! made exactly when a release would no longer be backed by every standby of the pairing.
//! Without an authority (no coordinator configured), losing standbys makes the VM go on
//! unprotected as before, with no fencing: automatic failover is then off.

use std::fmt;
use std::sync::Arc;

use crate::coordinator::{Claim, Coordinator, Ownership};

/// Who the primary is in the coordinator, and the ownership it holds (its term is the term of
/// every epoch it sends).
#[derive(Clone)]
pub struct Authority {
    /// The coordinator.
    pub coordinator: Arc<dyn Coordinator>,
    /// The protected VM's id in the coordinator.
    pub vm: String,
    /// This host's name (the owner it claims as).
    pub me: String,
    /// The ownership held now (owner `me`, the term).
    pub ownership: Ownership,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("vm", &self.vm)
            .field("me", &self.me)
            .field("ownership", &self.ownership)
            .finish_non_exhaustive()
    }
}

/// Why a primary stopped: it lost its ownership, or could not prove it still had it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fenced {
    /// The owner it learnt (`None`: the coordinator did not answer).
    pub owner: Option<Ownership>,
    /// Why, on one line.
    pub reason: String,
    /// Held output frames discarded when it was fenced.
    pub discarded_frames: usize,
}

/// The outcome of [`Authority::claim_next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Won: the new ownership (term one more).
    Won(Ownership),
    /// Lost to `owner`: someone else owns the VM.
    Lost(Ownership),
    /// The coordinator did not answer, or answered with an error: ownership unproven.
    Failed(String),
}

impl Authority {
    /// Claims `(me, T) → (me, T + 1)`: what a primary must win before it releases output that
    /// not every standby of its pairing acknowledged. On a win the authority holds the new
    /// ownership.
    pub fn claim_next(&mut self) -> Renewal {
        match self
            .coordinator
            .claim(&self.vm, Some(&self.ownership), &self.me)
        {
            Ok(Claim::Won(o)) => {
                tracing::info!(vm = self.vm, from = %self.ownership, to = %o, "ownership renewed");
                self.ownership = o.clone();
                Renewal::Won(o)
            }
            Ok(Claim::Lost(o)) => Renewal::Lost(o),
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }
}
