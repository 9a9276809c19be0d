//! The virtio-net device of the monitor: the [`virtio_net_tap::NetDevice`] model driven by the
//! event loop (queue kicks, TAP readiness) behind the [`VirtioDevice`] interface.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_net_tap::device::{RX_QUEUE, TX_QUEUE};
use virtio_net_tap::{NetDevice, NetStats, Tap, TapError};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioDevice, VirtioInterrupt, TYPE_NET, VIRTIO_MMIO_INT_VRING};
use crate::vstate::memory::GuestMemoryMmap;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const TAP_TOKEN: u32 = 2;
const ACTIVATE_TOKEN: u32 = 3;

/// Errors from creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd for the network device: {0}")]
    EventFd(std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device on a host TAP.
pub struct Net {
    device: NetDevice,
    queue_evts: [EventFd; 2],
    activate_evt: EventFd,
    active: Option<Active>,
}

/// A random locally administered, unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // A random seed from the std hasher's keys (no extra dependency for six bytes).
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    mac.copy_from_slice(&seed.to_le_bytes()[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

impl Net {
    /// Opens TAP `tap_name` for a device with MAC `mac` (random if `None`).
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name)?;
        let event_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            device: NetDevice::new(tap, mac.unwrap_or_else(random_mac)),
            queue_evts: [event_fd()?, event_fd()?],
            activate_evt: event_fd()?,
            active: None,
        })
    }

    /// The device model (gate, ingress tap, MAC).
    pub fn device_mut(&mut self) -> &mut NetDevice {
        &mut self.device
    }

    /// Data-path counters.
    pub fn stats(&self) -> NetStats {
        self.device.stats()
    }

    fn process(&mut self, rx: bool, tx: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        if tx {
            match self.device.process_tx(&active.mem, &mut active.tx) {
                Ok(u) => used |= u,
                Err(e) => tracing::error!("virtio-net TX: {e}"),
            }
        }
        if rx {
            match self.device.process_rx(&active.mem, &mut active.rx) {
                Ok(u) => used |= u,
                Err(e) => tracing::error!("virtio-net RX: {e}"),
            }
        }
        if used {
            if let Err(e) = active.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("virtio-net: cannot raise the queue interrupt: {e}");
            }
        }
    }
}

fn drain(evt: &EventFd) {
    let _ = evt.read();
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.queue_evts[RX_QUEUE], RX_TOKEN, EventSet::IN),
            Events::with_data(&self.queue_evts[TX_QUEUE], TX_TOKEN, EventSet::IN),
            Events::with_data_raw(
                self.device.tap().as_raw_fd(),
                TAP_TOKEN,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN),
        ];
        for event in events {
            if let Err(e) = ops.add(event) {
                tracing::error!("virtio-net: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            // New RX buffers: a frame may be waiting for one.
            RX_TOKEN => {
                drain(&self.queue_evts[RX_QUEUE]);
                self.process(true, false);
            }
            TX_TOKEN => {
                drain(&self.queue_evts[TX_QUEUE]);
                self.process(false, true);
            }
            TAP_TOKEN => self.process(true, false),
            ACTIVATE_TOKEN => {
                drain(&self.activate_evt);
                tracing::debug!(tap = self.device.tap().name(), "virtio-net: activated");
                self.process(true, true);
            }
            other => tracing::warn!(token = other, "virtio-net: unexpected event"),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.device.avail_features()
    }

    fn acked_features(&self) -> u64 {
        self.device.acked_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.device.set_acked_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.device.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(offset, len = data.len(), "virtio-net: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let tx = queues.pop().expect("two queues");
        let rx = queues.pop().expect("two queues");
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        if let Err(e) = self.activate_evt.write(1) {
            self.active = None;
            return Err(ActivateError::ActivateEvent(e));
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.device.reset();
    }
}
