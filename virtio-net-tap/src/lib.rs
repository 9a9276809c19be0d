//! The TAP-backed virtio-net device of vmr.
//!
//! Beside moving frames between a TAP and the guest's virtqueues, the device offers what
//! replication needs and nothing of hosts or wire protocols:
//! - an **egress gate** ([`gate::EgressGate`]): outbound frames can be held, tagged with the
//!   epoch that produced them, until that epoch is committed (`release_through`), or dropped if
//!   it is lost (`discard_after`);
//! - an **ingress tap**: a copy of every inbound frame delivered to the guest, to mirror.

pub mod device;
pub mod gate;
pub mod tap;

pub use device::{NetDevice, NetError, NetStats};
pub use gate::{Admission, EgressGate, Epoch, GateMode};
pub use tap::{Tap, TapError, VNET_HDR_LEN};
