//! The TAP-backed virtio-net device of vmr.
//!
//! Beside moving frames between a TAP and the guest's virtqueues ([`NetDevice`]), the device
//! offers what replication needs, and nothing of hosts or wire protocols:
//! - an **egress gate** ([`Egress`]): outbound frames can be held, tagged with the epoch that
//!   produced them, until that epoch is committed ([`Egress::release_through`]), or dropped if
//!   it is lost ([`Egress::discard_after`]);
//! - an **ingress tap** ([`IngressSink`]): a copy of every inbound frame delivered to the guest,
//!   tagged with its epoch, to mirror; and [`NetDevice::inject_rx`] to deliver such frames again.
//!
//! Modules: [`tap`] (the host interface), [`header`] (the virtio-net header), [`features`]
//! (what is offered, and the TAP offloads that follow), [`ring`] (used-ring batches and
//! interrupt suppression), [`ctrl`] (the control queue), [`announce`] (the RARP after a move),
//! [`gate`], [`ingress`], [`mac`], [`device`].

pub mod announce;
pub mod ctrl;
pub mod device;
pub mod features;
pub mod gate;
pub mod header;
pub mod ingress;
pub mod mac;
pub mod ring;
pub mod tap;

#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

pub use ctrl::CTRL_QUEUE;
pub use device::{
    NetDevice, NetError, NetState, NetStats, CONFIG_LEN, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE,
};
pub use gate::{
    Admission, Egress, EgressGate, EgressState, EgressStats, Epoch, GateMode, HeldFrame,
    DEFAULT_HELD_LIMIT,
};
pub use header::VNET_HDR_LEN;
pub use ingress::{
    mirror_channel, IngressFrame, IngressSink, MirrorError, MirrorReceiver, MirrorSender, Mirrored,
};
pub use mac::{MacAddr, ParseMacError};
pub use tap::{Tap, TapError};
