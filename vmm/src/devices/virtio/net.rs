//! The virtio-net device of the monitor: the [`virtio_net_tap::NetDevice`] model behind the
//! [`VirtioDevice`] interface, driven by the event loop.
//!
//! The builder registers the device with the monitor's `EventManager` before the guest starts;
//! [`MutEventSubscriber::init`] then adds its seven event sources:
//! - the three queue eventfds (KVM signals them on `QueueNotify`): receive, transmit and control
//!   (the control queue is set up by drivers that negotiated `VIRTIO_NET_F_CTRL_VQ`; see
//!   [`virtio_net_tap::ctrl`]),
//! - the TAP fd (readable; edge-triggered, so every wake-up drains the TAP or remembers a frame),
//! - the activation eventfd, written by [`VirtioDevice::activate`] on the vCPU thread that saw
//!   `DRIVER_OK`, so that processing starts on the event-loop thread,
//! - the egress gate's room eventfd (transmission stopped because the gate was full),
//! - the injector's eventfd (inbound frames to deliver, queued from another thread by the
//!   replication engine: [`crate::devices::replication::NetPort::inject`]).
//!
//! **Replication** ([`VirtioDevice::set_replication`]): on, the egress gate holds output per
//! epoch and every inbound frame delivered is mirrored to a bounded channel; off (the default),
//! the gate is open and nothing is mirrored, as without replication.
//!
//! Events before activation are drained and ignored. After processing, the driver is
//! interrupted only if it asked to be (`VIRTIO_RING_F_EVENT_IDX` or the no-interrupt flag).
//!
//! **Announce** ([`VirtioDevice::announce`], after a restore, a migration or a takeover): the
//! RARP from the host, and with `VIRTIO_NET_F_GUEST_ANNOUNCE` the driver asked to announce the
//! guest itself through the configuration space, which the transport then signals as changed.
//!
//! **Save and restore** ([`Persist`]): the state is [`virtio_net_tap::NetState`]. The restore
//! opens a TAP (the saved one or another, e.g. on the destination host), sets the accepted
//! features and so the TAP offloads before the transport activates the device, and puts back
//! the MAC, the undelivered inbound frames (injected ones not yet taken by the event loop
//! included) and the egress gate with its held frames.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
use virtio_net_tap::{
    mirror_channel, Egress, GateMode, IngressSink, MacAddr, NetDevice, NetState, NetStats, Tap,
    TapError, CONFIG_LEN, CTRL_QUEUE, RX_QUEUE, TX_QUEUE,
};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::QueueRuntimeState;
use super::{
    ActivateError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, TYPE_NET,
    VIRTIO_MMIO_INT_VRING,
};
use crate::devices::replication::{DevicePort, Injector, NetPort, ReplicationMode};
use crate::persist::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The queues: receive, transmit, control.
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const TAP_TOKEN: u32 = 2;
const ACTIVATE_TOKEN: u32 = 3;
const ROOM_TOKEN: u32 = 4;
const INJECT_TOKEN: u32 = 5;
const CTRL_TOKEN: u32 = 6;

/// Errors from creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The device model cannot be created.
    #[error(transparent)]
    Device(#[from] virtio_net_tap::NetError),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd for the network device: {0}")]
    EventFd(io::Error),
}

/// What restoring a network device needs besides its state.
#[derive(Debug, Clone, Default)]
pub struct NetRestoreArgs {
    /// The TAP to open instead of the saved one (e.g. the destination host's).
    pub tap_name: Option<String>,
}

/// What the device works on once the driver has set it up.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// The control queue, if the driver negotiated it.
    ctrl: Option<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device on a host TAP.
pub struct Net {
    device: NetDevice,
    queue_evts: [EventFd; 3],
    activate_evt: EventFd,
    injector: Injector,
    active: Option<Active>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("device", &self.device)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Opens TAP `tap_name` for a device with MAC `mac` (random and locally administered if
    /// `None`), its egress gate in pass-through mode.
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name)?;
        let mac = mac.map_or_else(MacAddr::random, MacAddr);
        let net = Self::with_device(NetDevice::new(tap, mac)?)?;
        tracing::info!(
            tap = tap_name,
            %mac,
            features = format_args!("{:#x}", net.device.avail_features()),
            "virtio-net: device created"
        );
        Ok(net)
    }

    /// The device model `device` behind the monitor's interface, not activated.
    fn with_device(device: NetDevice) -> Result<Self, NetError> {
        let event_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            device,
            queue_evts: [event_fd()?, event_fd()?, event_fd()?],
            activate_evt: event_fd()?,
            injector: Injector::new().map_err(NetError::EventFd)?,
            active: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.device.mac()
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        self.device.tap().name()
    }

    /// The egress gate: a handle to keep (it may be used from any thread) to hold outbound
    /// frames per epoch and release or discard them.
    pub fn egress(&self) -> Egress {
        self.device.egress().clone()
    }

    /// Mirrors every inbound frame delivered to the guest to `sink` (`None`: stop), e.g. a
    /// `std::sync::mpsc::Sender<virtio_net_tap::IngressFrame>`.
    pub fn set_ingress_tap(&mut self, sink: Option<Box<dyn IngressSink>>) {
        self.device.set_ingress_tap(sink);
    }

    /// Delivers `frame` (virtio-net header + Ethernet frame, as mirrored) to the guest ahead of
    /// what the TAP has: at once if the device is active, else once it is.
    pub fn inject_rx(&mut self, frame: Vec<u8>) {
        self.device.inject_rx(frame);
        self.process(true, false, false);
    }

    /// Data-path counters.
    pub fn stats(&self) -> NetStats {
        self.device.stats()
    }

    /// Runs the data path and the control queue, then interrupts the driver if it wants to be.
    fn process(&mut self, rx: bool, tx: bool, ctrl: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut notify = false;
        if let (true, Some(queue)) = (ctrl, active.ctrl.as_mut()) {
            match self.device.process_ctrl(&active.mem, queue) {
                Ok(n) => notify |= n,
                Err(err) => tracing::error!(%err, "virtio-net: control queue"),
            }
        }
        if tx {
            match self.device.process_tx(&active.mem, &mut active.tx) {
                Ok(n) => notify |= n,
                Err(err) => tracing::error!(%err, "virtio-net: transmit queue"),
            }
        }
        if rx {
            match self.device.process_rx(&active.mem, &mut active.rx) {
                Ok(n) => notify |= n,
                Err(err) => tracing::error!(%err, "virtio-net: receive queue"),
            }
        }
        if notify {
            if let Err(err) = active.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!(%err, "virtio-net: cannot raise the queue interrupt");
            }
        }
    }
}

/// Reads an eventfd until it is empty.
fn drain(evt: &EventFd, what: &str) {
    match evt.read() {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
        Err(err) => tracing::error!(%err, "virtio-net: cannot read the {what} eventfd"),
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.queue_evts[RX_QUEUE], RX_TOKEN, EventSet::IN),
            Events::with_data(&self.queue_evts[TX_QUEUE], TX_TOKEN, EventSet::IN),
            Events::with_data(&self.queue_evts[CTRL_QUEUE], CTRL_TOKEN, EventSet::IN),
            Events::with_data_raw(
                self.device.tap().as_raw_fd(),
                TAP_TOKEN,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN),
            Events::with_data(self.device.egress().room_event(), ROOM_TOKEN, EventSet::IN),
            Events::with_data(self.injector.wake_event(), INJECT_TOKEN, EventSet::IN),
        ];
        for event in events {
            if let Err(err) = ops.add(event) {
                tracing::error!(?err, "virtio-net: cannot register with the event loop");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let (rx, tx, ctrl) = match events.data() {
            // New receive buffers: a frame may be waiting for them.
            RX_TOKEN => {
                drain(&self.queue_evts[RX_QUEUE], "receive queue");
                (true, false, false)
            }
            TX_TOKEN => {
                drain(&self.queue_evts[TX_QUEUE], "transmit queue");
                (false, true, false)
            }
            CTRL_TOKEN => {
                drain(&self.queue_evts[CTRL_QUEUE], "control queue");
                (false, false, true)
            }
            TAP_TOKEN => (true, false, false),
            ACTIVATE_TOKEN => {
                drain(&self.activate_evt, "activation");
                tracing::debug!(tap = self.tap_name(), "virtio-net: activated");
                (true, true, true)
            }
            ROOM_TOKEN => {
                drain(self.device.egress().room_event(), "egress room");
                (false, true, false)
            }
            INJECT_TOKEN => {
                drain(self.injector.wake_event(), "injection");
                // Queued even before activation: activation delivers them.
                for frame in self.injector.take() {
                    self.device.inject_rx(frame);
                }
                (true, false, false)
            }
            other => {
                tracing::warn!(token = other, "virtio-net: unexpected event");
                return;
            }
        };
        if self.active.is_none() {
            tracing::trace!("virtio-net: event before activation ignored");
            return;
        }
        self.process(rx, tx, ctrl);
    }
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetRestoreArgs;
    type Error = NetError;

    /// The device model's state; frames injected but not yet taken by the event loop are
    /// saved after its backlog, where they would have gone.
    fn save(&self) -> NetState {
        let mut state = self.device.save();
        state.rx_backlog.extend(self.injector.queued());
        state
    }

    /// Opens `args.tap_name` (else the saved TAP) and restores the device model on it, accepted
    /// features and TAP offloads included. The device is not activated: the transport's restore
    /// does that with the saved queues.
    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Self, NetError> {
        let tap_name = args.tap_name.as_deref().unwrap_or(&state.tap_name);
        let net = Self::with_device(NetDevice::restore(Tap::open(tap_name)?, state)?)?;
        tracing::info!(
            tap = tap_name,
            mac = %state.mac,
            acked = format_args!("{:#x}", state.acked_features),
            "virtio-net: device restored"
        );
        Ok(net)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
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
        if let Err(err) = self.device.set_acked_features(features) {
            tracing::error!(%err, "virtio-net: cannot apply the accepted features");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config: [u8; CONFIG_LEN] = self.device.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "virtio-net: write to the read-only configuration space ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        // The control queue is there when the driver negotiated it.
        let expected = if self.device.acked_features() & 1 << VIRTIO_NET_F_CTRL_VQ != 0 {
            3
        } else {
            2
        };
        let got = queues.len();
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx), ctrl) = (queues.next(), queues.next(), queues.next()) else {
            unreachable!("two or three queues");
        };
        self.device.activate(&rx, &tx);
        if let Some(ctrl) = &ctrl {
            self.device.activate_ctrl(ctrl);
        }
        self.active = Some(Active {
            mem,
            rx,
            tx,
            ctrl,
            interrupt,
        });
        // Processing starts on the event-loop thread.
        if let Err(err) = self.activate_evt.write(1) {
            self.active = None;
            return Err(ActivateError::ActivateEvent(err));
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

    fn announce(&mut self) -> bool {
        // A driver that has not started cannot answer; the bit waits for it in the state.
        self.device.announce() && self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueRuntimeState> {
        self.active
            .iter()
            .flat_map(|active| [Some(&active.rx), Some(&active.tx), active.ctrl.as_ref()])
            .flatten()
            .map(QueueRuntimeState::from)
            .collect()
    }

    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.save())
    }

    fn set_replication(&mut self, mode: ReplicationMode) -> Option<DevicePort> {
        let egress = self.egress();
        let inbound = match mode {
            ReplicationMode::Off => {
                egress.set_mode(GateMode::PassThrough);
                self.device.set_ingress_tap(None);
                None
            }
            ReplicationMode::On {
                epoch,
                inbound_capacity,
            } => {
                let (sink, receiver) = mirror_channel(inbound_capacity);
                egress.set_epoch(epoch);
                egress.set_mode(GateMode::Held);
                self.device.set_ingress_tap(Some(Box::new(sink)));
                Some(receiver)
            }
        };
        tracing::info!(tap = self.tap_name(), ?mode, "virtio-net: replication set");
        Some(DevicePort::Net(NetPort::new(
            self.tap_name().to_string(),
            egress,
            inbound,
            self.injector.clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_net_tap::testutil::{NetNs, TapPeer};
    use virtio_net_tap::{GateMode, IngressFrame, VNET_HDR_LEN};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const MAC: [u8; 6] = [6, 0, 0, 0, 0, 0x42];
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x1_0000;
    const RX_BUF: u64 = 0x2_0000;
    const TX_BUF: u64 = 0x3_0000;

    /// Moves the test thread into its own network namespace (so its TAP touches nothing else);
    /// false (skip) only when the host has no TUN/TAP.
    fn enter_netns() -> bool {
        NetNs::enter().is_some()
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    #[test]
    fn new_reports_the_tap_and_picks_a_local_mac() {
        if !enter_netns() {
            return;
        }
        let err = Net::new("lo", None).unwrap_err();
        assert!(err.to_string().contains("TAP lo"), "{err}");
        let net = Net::new("vmr-net0", None).unwrap();
        assert!(net.mac().is_local() && net.mac().is_unicast());
        assert_eq!(net.tap_name(), "vmr-net0");
        let net = Net::new("vmr-net1", Some(MAC)).unwrap();
        let mut config = [0u8; 8];
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &MAC);
        assert_eq!(config[6], 1, "link up");
        let mut beyond = [0xffu8; 4];
        net.read_config(6, &mut beyond);
        assert_eq!(beyond, [1, 0, 0, 0]);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert_eq!(net.queue_events().len(), 3);
    }

    #[test]
    fn event_loop_drives_the_device() {
        if !enter_netns() {
            return;
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut net = Net::new("vmr-loop", Some(MAC)).unwrap();
        let out = Command::new("ip")
            .args(["link", "set", "vmr-loop", "up"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let (ingress_tx, ingress_rx) = std::sync::mpsc::channel::<IngressFrame>();
        net.set_ingress_tap(Some(Box::new(ingress_tx)));
        let egress = net.egress();
        let rx_evt = net.queue_events()[RX_QUEUE].try_clone().unwrap();
        let tx_evt = net.queue_events()[TX_QUEUE].try_clone().unwrap();
        let net = Arc::new(Mutex::new(net));
        let mut event_loop = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        event_loop.add_subscriber(net.clone());

        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);

        // Kicks before activation are drained and ignored; injected frames wait.
        rx_evt.write(1).unwrap();
        tx_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 2);
        assert!(rx_evt.read().is_err() && tx_evt.read().is_err(), "drained");
        let inbound = frame(b"to the guest");
        net.lock().unwrap().inject_rx(inbound.clone());

        // Activation (from "a vCPU thread") wakes the loop, which delivers the frame.
        rxq.add_desc_chains(&[desc(RX_BUF, 2048, VRING_DESC_F_WRITE)], 0)
            .unwrap();
        {
            let mut net = net.lock().unwrap();
            net.set_acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
            let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
            net.activate(mem.clone(), queues, interrupt.clone())
                .unwrap();
            assert!(net.is_activated());
        }
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(rxq.used().idx().load(), 1);
        let mut got = vec![0u8; inbound.len()];
        mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[VNET_HDR_LEN..]);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        assert_eq!(
            interrupt.status() & VIRTIO_MMIO_INT_VRING,
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(
            ingress_rx.try_recv().unwrap().ethernet(),
            &inbound[VNET_HDR_LEN..]
        );

        // A transmit kick sends the frame to the TAP.
        let outbound = frame(b"from the guest");
        mem.write_slice(&outbound, GuestAddress(TX_BUF)).unwrap();
        txq.add_desc_chains(&[desc(TX_BUF, outbound.len() as u32, 0)], 0)
            .unwrap();
        tx_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(txq.used().idx().load(), 1);
        assert_eq!(egress.stats().sent_frames, 1);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);

        // A full gate stops transmission; its room event starts it again.
        egress.set_mode(GateMode::Held);
        egress.set_limit(outbound.len());
        txq.add_desc_chains(
            &[
                desc(TX_BUF, outbound.len() as u32, 0),
                desc(TX_BUF, outbound.len() as u32, 0),
            ],
            1,
        )
        .unwrap();
        tx_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(txq.used().idx().load(), 2);
        assert_eq!(egress.held_frames(), 1);
        assert_eq!(egress.release_through(0), 1);
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(txq.used().idx().load(), 3);
        assert_eq!(egress.release_through(0), 1);
        assert_eq!(egress.stats().sent_frames, 3);

        // After a reset, events are ignored again.
        net.lock().unwrap().reset();
        assert!(!net.lock().unwrap().is_activated());
        tx_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(net.lock().unwrap().acked_features(), 0);
    }

    #[test]
    fn a_running_device_is_restored_on_another_tap_with_its_frames() {
        use std::time::Duration;

        use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM};

        use crate::devices::virtio::mmio::testing::{bring_up, register_dump};
        use crate::devices::virtio::mmio::{MmioRestoreArgs, MmioState, MmioTransport};

        let Some(ns) = NetNs::enter() else { return };
        let src = TapPeer::persistent(&ns, "nsrc");
        let dst = TapPeer::persistent(&ns, "ndst");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let new_interrupt = || {
            Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ))
        };
        let net = Net::new(&src.name, Some(MAC)).unwrap();
        // No VIRTIO_RING_F_EVENT_IDX: MockSplitQueue puts the used ring over `used_event`.
        let mut features =
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF;
        let offload = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_CSUM;
        if net.avail_features() & offload == offload {
            features |= offload;
        }
        let egress = net.egress();
        let net = Arc::new(Mutex::new(net));
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        let mut transport = MmioTransport::new(mem.clone(), net.clone(), new_interrupt());
        bring_up(&mut transport, features, &[&rxq, &txq]);
        assert!(net.lock().unwrap().is_activated());

        // One frame delivered; one read from the TAP, waiting for buffers; one injected.
        rxq.add_desc_chains(&[desc(RX_BUF, 2048, VRING_DESC_F_WRITE)], 0)
            .unwrap();
        net.lock().unwrap().inject_rx(frame(b"first"));
        assert_eq!(rxq.used().idx().load(), 1);
        let second = frame(b"second, from the TAP");
        src.wait_link_up();
        src.send(&second[VNET_HDR_LEN..]);
        for _ in 0..400 {
            let mut net = net.lock().unwrap();
            net.process(true, false, false);
            if net.device.rx_pending() {
                break;
            }
            drop(net);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            net.lock().unwrap().device.rx_pending(),
            "no frame from the TAP"
        );
        let third = frame(b"third, injected");
        net.lock().unwrap().inject_rx(third.clone());
        // A frame held in epoch 2, and a transmit chain the device has not taken yet.
        egress.set_mode(GateMode::Held);
        egress.set_epoch(2);
        let held = frame(b"held in epoch 2");
        let queued = frame(b"queued before the save");
        mem.write_slice(&held, GuestAddress(TX_BUF)).unwrap();
        mem.write_slice(&queued, GuestAddress(TX_BUF + 0x1000))
            .unwrap();
        txq.add_desc_chains(&[desc(TX_BUF, held.len() as u32, 0)], 0)
            .unwrap();
        net.lock().unwrap().process(false, true, false);
        assert_eq!(egress.held_frames(), 1);
        txq.add_desc_chains(&[desc(TX_BUF + 0x1000, queued.len() as u32, 0)], 1)
            .unwrap();

        let before = register_dump(&mut transport);
        let json = serde_json::to_string(&transport.save()).unwrap();
        let state: MmioState = serde_json::from_str(&json).unwrap();
        let VirtioDeviceState::Net(saved) = &state.device else {
            panic!("not a network device: {:?}", state.device);
        };
        assert_eq!(saved.tap_name, src.name);
        assert_eq!(saved.acked_features, features);
        assert_eq!(
            &saved.rx_waiting.as_ref().expect("a waiting frame")[VNET_HDR_LEN..],
            &second[VNET_HDR_LEN..]
        );
        assert_eq!(saved.rx_backlog, vec![third.clone()]);
        assert_eq!(saved.egress.held.len(), 1);
        assert_eq!(saved.egress.held[0].epoch, 2);
        let queues = state.active_queues.as_ref().expect("queues saved");
        assert_eq!(
            (queues[RX_QUEUE].next_avail, queues[RX_QUEUE].next_used),
            (1, 1)
        );
        assert_eq!(
            (queues[TX_QUEUE].next_avail, queues[TX_QUEUE].next_used),
            (1, 1)
        );
        drop(transport);
        drop(net);
        drop(egress);

        // Restored on the destination's TAP, on the same guest memory.
        let args = NetRestoreArgs {
            tap_name: Some(dst.name.clone()),
        };
        let net = Arc::new(Mutex::new(Net::restore(args, saved).unwrap()));
        assert_eq!(net.lock().unwrap().tap_name(), dst.name);
        assert_eq!(net.lock().unwrap().acked_features(), features);
        let interrupt = new_interrupt();
        let mut restored = MmioTransport::restore(
            MmioRestoreArgs {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                device: net.clone(),
            },
            &state,
        )
        .unwrap();
        assert_eq!(register_dump(&mut restored), before);
        let mut expected = state.clone();
        if let VirtioDeviceState::Net(net) = &mut expected.device {
            net.tap_name = dst.name.clone();
        }
        assert_eq!(restored.save(), expected);
        let egress = net.lock().unwrap().egress();

        // The activation event: the waiting frames go in as buffers come, the queued transmit
        // chain is taken, held in epoch 2 behind the frame already held.
        assert_eq!(net.lock().unwrap().activate_evt.read().unwrap(), 1);
        rxq.add_desc_chains(
            &[
                desc(RX_BUF + 0x1000, 2048, VRING_DESC_F_WRITE),
                desc(RX_BUF + 0x2000, 2048, VRING_DESC_F_WRITE),
            ],
            1,
        )
        .unwrap();
        net.lock().unwrap().process(true, true, false);
        assert_eq!(rxq.used().idx().load(), 3);
        for (i, (expected, at)) in [(&second, RX_BUF + 0x1000), (&third, RX_BUF + 0x2000)]
            .into_iter()
            .enumerate()
        {
            let elem = rxq.used().ring().ref_at(1 + i).unwrap().load();
            assert_eq!(elem.id(), 1 + i as u32);
            let mut got = vec![0u8; elem.len() as usize];
            mem.read_slice(&mut got, GuestAddress(at)).unwrap();
            assert_eq!(&got[VNET_HDR_LEN..], &expected[VNET_HDR_LEN..]);
        }
        assert_eq!(txq.used().idx().load(), 2);
        assert_eq!(egress.held_epochs(), vec![2]);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);

        // Epoch 2 committed: both frames leave through the destination's TAP, in order.
        dst.wait_link_up();
        assert_eq!(egress.release_through(2), 2);
        let head = &held[VNET_HDR_LEN..VNET_HDR_LEN + 14];
        assert!(dst.recv_matching(head).ends_with(b"held in epoch 2"));
        assert!(dst.recv_matching(head).ends_with(b"queued before the save"));
        assert!(src
            .try_recv_matching(head, Duration::from_millis(50))
            .is_none());
    }

    #[test]
    fn announce_asks_a_driver_with_the_feature_through_a_config_change() {
        use virtio_bindings::virtio_net::{
            VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_OK, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
        };

        use crate::devices::virtio::mmio::testing::{bring_up, read_reg};
        use crate::devices::virtio::mmio::{regs, MmioRestoreArgs, MmioState, MmioTransport};
        use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;

        let Some(ns) = NetNs::enter() else { return };
        let peer = TapPeer::persistent(&ns, "nann");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let net = Net::new(&peer.name, Some(MAC)).unwrap();
        let ctrl_evt = net.queue_events()[CTRL_QUEUE].try_clone().unwrap();
        let net = Arc::new(Mutex::new(net));
        let mut event_loop = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        event_loop.add_subscriber(net.clone());
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        let ctrlq = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
        let features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
        let mut transport = MmioTransport::new(mem.clone(), net.clone(), interrupt.clone());
        // With CTRL_VQ the driver must set up the control queue.
        bring_up(&mut transport, features, &[&rxq, &txq]);
        assert!(!net.lock().unwrap().is_activated());
        bring_up(&mut transport, features, &[&rxq, &txq, &ctrlq]);
        assert!(net.lock().unwrap().is_activated());
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        interrupt.ack(u32::MAX);
        let _ = interrupt.irqfd().read();
        let status = |t: &mut MmioTransport| read_reg(t, regs::CONFIG + 4) >> 16;
        assert_eq!(status(&mut transport), VIRTIO_NET_S_LINK_UP);
        let generation = read_reg(&mut transport, regs::CONFIG_GENERATION);

        // The RARP, and a configuration change with VIRTIO_NET_S_ANNOUNCE.
        peer.wait_link_up();
        transport.announce();
        assert!(peer.recv_matching(&[0xff; 6]).len() >= 42);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        assert_ne!(
            read_reg(&mut transport, regs::CONFIG_GENERATION),
            generation
        );
        assert_eq!(
            status(&mut transport),
            VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
        );

        // Saved with its control queue and the pending announce; restored as it was.
        let state: MmioState = transport.save();
        assert_eq!(state.active_queues.as_ref().unwrap().len(), 3);
        let VirtioDeviceState::Net(saved) = &state.device else {
            panic!("not a network device");
        };
        assert!(saved.announce_pending);
        let other = TapPeer::persistent(&ns, "nann2");
        let args = NetRestoreArgs {
            tap_name: Some(other.name.clone()),
        };
        let restored_net = Arc::new(Mutex::new(Net::restore(args, saved).unwrap()));
        let mut restored = MmioTransport::restore(
            MmioRestoreArgs {
                mem: mem.clone(),
                interrupt: Arc::new(VirtioInterrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                )),
                device: restored_net.clone(),
            },
            &state,
        )
        .unwrap();
        assert_eq!(restored.save().active_queues, state.active_queues);
        assert_eq!(
            status(&mut restored),
            VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
        );
        drop((restored, restored_net));

        // The driver's ANNOUNCE_ACK on the control queue: OK, the bit cleared.
        mem.write_slice(&[3u8, 0], GuestAddress(TX_BUF)).unwrap();
        mem.write_slice(&[0xffu8], GuestAddress(TX_BUF + 0x10))
            .unwrap();
        ctrlq
            .add_desc_chains(
                &[
                    RawDescriptor::from(SplitDescriptor::new(
                        TX_BUF,
                        2,
                        VRING_DESC_F_NEXT as u16,
                        1,
                    )),
                    desc(TX_BUF + 0x10, 1, VRING_DESC_F_WRITE),
                ],
                0,
            )
            .unwrap();
        ctrl_evt.write(1).unwrap();
        // The kick, and maybe the TAP (the host may send on the link it brought up).
        assert!(event_loop.run_with_timeout(100).unwrap() >= 1);
        assert_eq!(ctrlq.used().idx().load(), 1);
        let mut ack = [0u8];
        mem.read_slice(&mut ack, GuestAddress(TX_BUF + 0x10))
            .unwrap();
        assert_eq!(u32::from(ack[0]), VIRTIO_NET_OK);
        assert_eq!(status(&mut transport), VIRTIO_NET_S_LINK_UP);
        assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);

        // A driver without the feature (and so without the control queue): only the RARP.
        bring_up(&mut transport, 1 << VIRTIO_F_VERSION_1, &[&rxq, &txq]);
        assert!(net.lock().unwrap().is_activated());
        interrupt.ack(u32::MAX);
        peer.drain();
        transport.announce();
        assert!(peer.recv_matching(&[0xff; 6]).len() >= 42);
        assert_eq!(
            interrupt.status(),
            0,
            "a configuration change without the feature"
        );
        assert_eq!(status(&mut transport), VIRTIO_NET_S_LINK_UP);
        assert_eq!(transport.save().active_queues.unwrap().len(), 2);
    }

    #[test]
    fn activation_needs_two_queues() {
        if !enter_netns() {
            return;
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut net = Net::new("vmr-q", None).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let err = net
            .activate(mem.clone(), vec![vq.create_queue().unwrap()], interrupt)
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
        assert!(!net.is_activated());
        assert_ne!(net.avail_features() & 1 << VIRTIO_NET_F_MRG_RXBUF, 0);
    }

    #[test]
    fn replication_holds_output_mirrors_input_and_injects_in_order() {
        use std::time::Duration;

        use crate::devices::replication::{MirrorError, ReplicationMode};

        let Some(ns) = NetNs::enter() else { return };
        let peer = TapPeer::persistent(&ns, "repl");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut net = Net::new(&peer.name, Some(MAC)).unwrap();
        let Some(DevicePort::Net(port)) = net.set_replication(ReplicationMode::On {
            epoch: 1,
            inbound_capacity: 2,
        }) else {
            panic!("no network port");
        };
        assert_eq!(port.tap_name(), peer.name);
        let tx_evt = net.queue_events()[TX_QUEUE].try_clone().unwrap();
        let net = Arc::new(Mutex::new(net));
        let mut event_loop = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        event_loop.add_subscriber(net.clone());
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        {
            let mut net = net.lock().unwrap();
            net.set_acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
            let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
            net.activate(mem.clone(), queues, interrupt.clone())
                .unwrap();
        }
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        peer.wait_link_up();
        let empty = frame(b"");
        let head = &empty[VNET_HDR_LEN..VNET_HDR_LEN + 14];
        let nothing_out = || {
            peer.try_recv_matching(head, Duration::from_millis(50))
                .is_none()
        };
        let send = |i: u16, payload: &[u8], tx_evt: &EventFd, event_loop: &mut EventManager<_>| {
            let out = frame(payload);
            let at = TX_BUF + 0x1000 * u64::from(i);
            mem.write_slice(&out, GuestAddress(at)).unwrap();
            txq.add_desc_chains(&[desc(at, out.len() as u32, 0)], i)
                .unwrap();
            tx_evt.write(1).unwrap();
            // The queue kick, and the waiting event when it is the epoch's first frame.
            event_loop.run_with_timeout(100).unwrap();
        };

        // Epoch 1: held, and the engine hears that output waits.
        send(0, b"epoch 1", &tx_evt, &mut event_loop);
        assert_eq!(txq.used().idx().load(), 1);
        assert_eq!(port.held_frames(), 1);
        assert_eq!(port.waiting_event().read().unwrap(), 1);
        assert!(nothing_out());
        // Epoch 2.
        port.egress().set_epoch(2);
        send(1, b"epoch 2", &tx_evt, &mut event_loop);
        send(2, b"epoch 2 again", &tx_evt, &mut event_loop);
        assert_eq!(port.held_frames(), 3);
        assert!(nothing_out());
        assert_eq!(port.release_through(1), 1);
        assert!(peer.recv_matching(head).ends_with(b"epoch 1"));
        assert!(nothing_out());
        port.egress().set_epoch(3);
        send(3, b"epoch 3", &tx_evt, &mut event_loop);
        assert_eq!(port.discard_after(2), 1);
        assert_eq!(port.release_through(3), 2);
        assert!(peer.recv_matching(head).ends_with(b"epoch 2"));
        assert!(peer.recv_matching(head).ends_with(b"epoch 2 again"));
        assert!(nothing_out(), "a discarded frame left");

        // Injected frames (a standby replaying its log) reach the RX queue in order, through
        // the event loop, and are mirrored with the epoch of their delivery; a third overruns
        // the mirror of two, which says so.
        let replay: Vec<Vec<u8>> = (0..3u8).map(|i| frame(&[b'r', i])).collect();
        for i in 0..3u16 {
            rxq.add_desc_chains(
                &[desc(
                    RX_BUF + 0x1000 * u64::from(i),
                    2048,
                    VRING_DESC_F_WRITE,
                )],
                i,
            )
            .unwrap();
        }
        assert_eq!(port.inject(replay.clone()).unwrap(), 3);
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(rxq.used().idx().load(), 3);
        for (i, expected) in replay.iter().enumerate() {
            let elem = rxq.used().ring().ref_at(i).unwrap().load();
            assert_eq!(elem.id(), i as u32);
            let mut got = vec![0u8; elem.len() as usize];
            mem.read_slice(&mut got, GuestAddress(RX_BUF + 0x1000 * i as u64))
                .unwrap();
            assert_eq!(&got[VNET_HDR_LEN..], &expected[VNET_HDR_LEN..]);
        }
        assert_eq!(
            port.try_recv_inbound(),
            Err(MirrorError::Overrun {
                lost: 1,
                first_epoch: 3
            })
        );
        let mirrored = port.drain_inbound().unwrap();
        assert_eq!(mirrored.len(), 2);
        for (got, expected) in mirrored.iter().zip(&replay) {
            assert_eq!(got.epoch, 3);
            assert_eq!(got.ethernet(), &expected[VNET_HDR_LEN..]);
        }

        // Epochs 2 and 3 each signalled their first held frame.
        assert_eq!(port.waiting_event().read().unwrap(), 2);

        // Off: output goes straight out, nothing is held, signalled or mirrored.
        let Some(DevicePort::Net(off)) = net.lock().unwrap().set_replication(ReplicationMode::Off)
        else {
            panic!("no network port");
        };
        send(4, b"unprotected", &tx_evt, &mut event_loop);
        assert!(peer.recv_matching(head).ends_with(b"unprotected"));
        assert_eq!(off.held_frames(), 0);
        assert!(off.waiting_event().read().is_err());
        assert_eq!(off.try_recv_inbound(), Err(MirrorError::Closed));
        assert_eq!(port.try_recv_inbound(), Err(MirrorError::Closed));

        // Frames injected but not yet taken by the event loop are part of the saved state,
        // behind those the device holds.
        net.lock().unwrap().inject_rx(frame(b"waiting"));
        off.inject([frame(b"queued")]).unwrap();
        let saved = net.lock().unwrap().save();
        assert_eq!(
            saved.rx_waiting,
            Some(frame(b"waiting")),
            "no receive buffer"
        );
        assert_eq!(saved.rx_backlog, vec![frame(b"queued")]);
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(net.lock().unwrap().save().rx_backlog, saved.rx_backlog);
    }
}
