//! Emulated devices: the buses they sit on, legacy PC devices and virtio devices.

pub mod bus;
pub mod legacy;
pub mod replication;
pub mod virtio;

use std::sync::Arc;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use self::legacy::i8042::{I8042State, I8042};
use self::legacy::serial::{SerialDevice, SerialState};
use self::legacy::EventFdTrigger;
use self::virtio::mmio::MmioState;
use self::virtio::VirtioDeviceState;
use crate::persist::Persist;
use crate::vstate::vcpu::VmRunState;

/// The saved state of every device of a microVM.
///
/// Encoded as its fields, then [`DevicesAdditions`]: what later minor format versions added to
/// the devices' states. The state file and both wire protocols encode with postcard, which
/// lays fields out by position, so a field added inside a device's state would shift every
/// byte after it for a reader of an older minor version; at the very end of the payload an
/// older reader ignores it, and a newer reader finds an older writer's payload ending before
/// it. This holds because `DevicesState` is the last field of `MicroVmState`, which is the last
/// of the state file's payload and alone in the wire protocols' state messages: keep it so.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "DevicesStateRepr")]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices with their transports, in MMIO order.
    pub virtio: Vec<MmioState>,
}

/// What minor format versions added to the devices' states, encoded after [`DevicesState`]'s
/// own fields (see there); absent from older writers' payloads, every field is empty then.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DevicesAdditions {
    /// Since state file 1.1, migration protocol 3.1, replication protocol 1.2: for each virtio
    /// device in order, whether it is a virtio-net device whose announce waits for the
    /// driver's acknowledgement (`NetState::announce_pending`).
    net_announce_pending: Vec<bool>,
}

impl DevicesAdditions {
    fn of(state: &DevicesState) -> Self {
        let pending =
            |m: &MmioState| matches!(&m.device, VirtioDeviceState::Net(n) if n.announce_pending);
        Self {
            net_announce_pending: state.virtio.iter().map(pending).collect(),
        }
    }

    fn apply(self, state: &mut DevicesState) {
        for (m, pending) in state.virtio.iter_mut().zip(self.net_announce_pending) {
            if let VirtioDeviceState::Net(net) = &mut m.device {
                net.announce_pending = pending;
            }
        }
    }
}

impl Serialize for DevicesState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("DevicesState", 4)?;
        s.serialize_field("serial", &self.serial)?;
        s.serialize_field("i8042", &self.i8042)?;
        s.serialize_field("virtio", &self.virtio)?;
        s.serialize_field("additions", &DevicesAdditions::of(self))?;
        s.end()
    }
}

/// [`DevicesState`] as encoded.
#[derive(Deserialize)]
struct DevicesStateRepr {
    serial: SerialState,
    i8042: I8042State,
    virtio: Vec<MmioState>,
    #[serde(default, deserialize_with = "empty_if_absent")]
    additions: DevicesAdditions,
}

impl From<DevicesStateRepr> for DevicesState {
    fn from(repr: DevicesStateRepr) -> Self {
        let mut state = DevicesState {
            serial: repr.serial,
            i8042: repr.i8042,
            virtio: repr.virtio,
        };
        repr.additions.apply(&mut state);
        state
    }
}

/// The additions, or none where an older writer's payload ends before them (postcard then
/// reports the end of its input; self-describing formats use the field's default).
fn empty_if_absent<'de, D: Deserializer<'de>>(d: D) -> Result<DevicesAdditions, D::Error> {
    Ok(DevicesAdditions::deserialize(d).unwrap_or_default())
}

impl DevicesState {
    /// The legacy devices as a machine is built with them, and no virtio device.
    pub fn power_on() -> std::io::Result<Self> {
        let serial = SerialDevice::new(EventFdTrigger::new()?, Box::new(std::io::sink()));
        let i8042 = I8042::new(Arc::new(VmRunState::new()?));
        Ok(Self {
            serial: serial.save(),
            i8042: i8042.save(),
            virtio: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use virtio_net_tap::{EgressState, GateMode, MacAddr, NetState, NetStats};

    use super::*;

    /// `DevicesState` as minor version 0 of the formats had it.
    #[derive(Serialize, Deserialize)]
    struct DevicesStateV0 {
        serial: SerialState,
        i8042: I8042State,
        virtio: Vec<MmioState>,
    }

    fn net(announce_pending: bool) -> MmioState {
        MmioState {
            status: 0xf,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            interrupt_status: 0,
            queues: Vec::new(),
            active_queues: None,
            device: VirtioDeviceState::Net(NetState {
                tap_name: "tap0".into(),
                mac: MacAddr([6, 0, 0, 0, 0, 1]),
                avail_features: 0,
                acked_features: 0,
                rx_waiting: None,
                rx_backlog: vec![vec![1, 2, 3]],
                egress: EgressState {
                    mode: GateMode::PassThrough,
                    epoch: 4,
                    limit: 1 << 20,
                    held: Vec::new(),
                    stats: Default::default(),
                },
                stats: NetStats::default(),
                announce_pending,
            }),
        }
    }

    fn pending(state: &DevicesState) -> Vec<bool> {
        state
            .virtio
            .iter()
            .map(|m| matches!(&m.device, VirtioDeviceState::Net(n) if n.announce_pending))
            .collect()
    }

    #[test]
    fn additions_reach_newer_readers_and_older_ones_ignore_them() {
        let mut state = DevicesState::power_on().unwrap();
        state.virtio = vec![net(false), net(true)];
        // As the machine's state has it: after everything else.
        let payload = postcard::to_stdvec(&(7u32, &state)).unwrap();
        let (tag, back): (u32, DevicesState) = postcard::from_bytes(&payload).unwrap();
        assert_eq!((tag, pending(&back)), (7, vec![false, true]));
        assert_eq!(back.virtio, state.virtio);

        // A reader of minor version 0 reads the same devices, the additions left unread.
        let (_, old): (u32, DevicesStateV0) = postcard::from_bytes(&payload).unwrap();
        assert_eq!(old.virtio.len(), 2);
        assert_eq!(old.virtio[1].device, net(false).device);

        // A payload of minor version 0 reads with no announce pending.
        let old = DevicesStateV0 {
            serial: state.serial.clone(),
            i8042: state.i8042.clone(),
            virtio: state.virtio.clone(),
        };
        let payload = postcard::to_stdvec(&(7u32, &old)).unwrap();
        let (_, back): (u32, DevicesState) = postcard::from_bytes(&payload).unwrap();
        assert_eq!(pending(&back), vec![false, false]);
        assert_eq!(back.virtio.len(), 2);

        // Self-describing formats (the API, tests) go through the field's default.
        let mut json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["additions"]["net_announce_pending"][1], true);
        json.as_object_mut().unwrap().remove("additions");
        let back: DevicesState = serde_json::from_value(json).unwrap();
        assert_eq!(pending(&back), vec![false, false]);
    }
}
