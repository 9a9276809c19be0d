//! The egress gate: every frame the guest sends passes through it on its way to the TAP.
//!
//! - [`GateMode::PassThrough`] (the default): frames go to the TAP at once.
//! - [`GateMode::Held`]: frames are tagged with the current epoch and kept;
//!   [`EgressGate::release_through`] lets out, in order, those of every epoch up to a given one
//!   (that epoch's state is safe on the standbys), [`EgressGate::discard_after`] drops those of
//!   later epochs (their state was lost). This is output commit: no client ever sees the effect
//!   of a state that could still be lost.
//!
//! **When full.** The gate holds at most `limit` bytes (frames with their virtio-net header).
//! A frame that does not fit is refused with [`Admission::Full`] and stays with the caller: the
//! device leaves it in the guest's transmit queue and stops transmitting, as a NIC whose queue is
//! full does; the guest stack queues, then pushes back on its sockets. Nothing is lost. When a
//! release or a discard makes room, [`Egress`] signals its room event and the device starts
//! again. Only a frame larger than the whole limit is dropped ([`Admission::Dropped`]): it could
//! never fit.
//!
//! Order is kept across modes: while anything is held, new frames queue behind it even in
//! pass-through mode, until released.
//!
//! **Egress waiting.** The first frame held in each epoch signals [`Egress::waiting_event`]:
//! whoever drives epochs polls it to end the epoch early, so a reply does not wait for a whole
//! period. [`Egress::set_epoch`] re-arms it.
//!
//! **Save and restore.** [`Egress::save`] captures the mode, the epoch, the limit, the counters
//! and every held frame with its epoch tag; [`Egress::restore`] puts them back in front of
//! another TAP. A restored primary thus still owes the wire exactly the frames of the epochs not
//! yet committed, and a standby that takes over can release or discard them per epoch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::tap::Tap;

/// Epoch number. Epochs are expected to increase.
pub type Epoch = u64;

/// Default bound on the bytes held: 64 MiB.
pub const DEFAULT_HELD_LIMIT: usize = 64 << 20;

/// What the gate does with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum GateMode {
    /// Frames go out at once.
    #[default]
    PassThrough,
    /// Frames wait for their epoch to be released.
    Held,
}

/// What became of a frame given to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it now (nothing was kept).
    Send,
    /// Kept, tagged with the current epoch, until released or discarded.
    Held,
    /// Not taken: the gate is full. The caller keeps the frame and tries again after room is
    /// made.
    Full,
    /// Dropped: larger than the gate's whole limit.
    Dropped,
}

/// An outbound frame the gate holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldFrame {
    /// The epoch that produced it: it may leave once that epoch is committed.
    pub epoch: Epoch,
    /// The frame with its virtio-net header.
    pub bytes: Vec<u8>,
}

/// The gate's bookkeeping: mode, epoch and held frames, with a bound on the bytes held.
#[derive(Debug)]
pub struct EgressGate {
    mode: GateMode,
    epoch: Epoch,
    held: VecDeque<HeldFrame>,
    held_bytes: usize,
    limit: usize,
    dropped: u64,
}

impl Default for EgressGate {
    fn default() -> Self {
        Self::new(GateMode::PassThrough, DEFAULT_HELD_LIMIT)
    }
}

impl EgressGate {
    /// A gate in `mode` holding at most `limit` bytes, at epoch 0.
    pub fn new(mode: GateMode, limit: usize) -> Self {
        Self {
            mode,
            epoch: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            limit,
            dropped: 0,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> GateMode {
        self.mode
    }

    /// Switches mode. Frames already held stay held until released or discarded.
    pub fn set_mode(&mut self, mode: GateMode) {
        self.mode = mode;
    }

    /// The epoch new frames are tagged with.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Starts epoch `epoch`: frames admitted from now on belong to it.
    pub fn set_epoch(&mut self, epoch: Epoch) {
        self.epoch = epoch;
    }

    /// The bound on held bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Changes the bound; frames already held stay even if they exceed it.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Decides about one outbound frame: sent at once in pass-through mode with nothing held;
    /// otherwise held (a copy is kept) if it fits, refused if not. See the module docs.
    pub fn admit(&mut self, frame: &[u8]) -> Admission {
        if self.mode == GateMode::PassThrough && self.held.is_empty() {
            return Admission::Send;
        }
        if frame.len() > self.limit {
            self.dropped += 1;
            return Admission::Dropped;
        }
        if self.held_bytes + frame.len() > self.limit {
            return Admission::Full;
        }
        self.held_bytes += frame.len();
        self.held.push_back(HeldFrame {
            epoch: self.epoch,
            bytes: frame.to_vec(),
        });
        Admission::Held
    }

    /// Removes and returns, oldest first, the held frames of every epoch up to `epoch`. Frames
    /// of a later epoch stop the release: nothing overtakes them.
    pub fn release_through(&mut self, epoch: Epoch) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|f| f.epoch <= epoch) {
            let frame = self.held.pop_front().expect("front exists");
            self.held_bytes -= frame.bytes.len();
            out.push(frame.bytes);
        }
        out
    }

    /// Drops the held frames of every epoch after `epoch`; returns how many were dropped.
    pub fn discard_after(&mut self, epoch: Epoch) -> usize {
        let before = self.held.len();
        self.held.retain(|f| f.epoch <= epoch);
        self.held_bytes = self.held.iter().map(|f| f.bytes.len()).sum();
        before - self.held.len()
    }

    /// Frames held now.
    pub fn held_frames(&self) -> usize {
        self.held.len()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Epochs that have frames held, oldest first (each once).
    pub fn held_epochs(&self) -> Vec<Epoch> {
        let mut epochs: Vec<Epoch> = Vec::new();
        for f in &self.held {
            if epochs.last() != Some(&f.epoch) {
                epochs.push(f.epoch);
            }
        }
        epochs
    }

    /// Frames dropped for being larger than the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Counters of what left through the gate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStats {
    /// Frames written to the TAP (at once or when released).
    pub sent_frames: u64,
    /// Bytes written to the TAP, virtio-net headers excluded.
    pub sent_bytes: u64,
    /// Frames the TAP refused (interface down, malformed offload header...).
    pub tap_errors: u64,
    /// Frames released after being held.
    pub released_frames: u64,
    /// Held frames discarded.
    pub discarded_frames: u64,
    /// Times a frame was refused because the gate was full.
    pub full: u64,
    /// Frames dropped for being larger than the limit.
    pub dropped: u64,
}

/// The saved state of an [`Egress`] gate: everything but the TAP and the room event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressState {
    /// The mode.
    pub mode: GateMode,
    /// The epoch new frames are tagged with.
    pub epoch: Epoch,
    /// The bound on held bytes.
    pub limit: usize,
    /// The held frames, oldest first, with their epochs.
    pub held: Vec<HeldFrame>,
    /// The counters (`dropped` included).
    pub stats: EgressStats,
}

#[derive(Debug)]
struct State {
    gate: EgressGate,
    /// The device found the gate full and waits for room.
    waiting: bool,
    /// A frame was held in the current epoch and the waiting event signalled.
    held_signalled: bool,
    stats: EgressStats,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    tap: Arc<Tap>,
    room: EventFd,
    held: EventFd,
}

/// The egress gate in front of a TAP, shared between the device (which feeds it) and whoever
/// drives epochs (which releases or discards). Cheap to clone; every method may be called from
/// any thread. Frames are written to the TAP under the gate's lock, so they leave in order.
#[derive(Debug, Clone)]
pub struct Egress {
    shared: Arc<Shared>,
}

impl Egress {
    /// A pass-through gate in front of `tap`.
    pub fn new(tap: Arc<Tap>) -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    gate: EgressGate::default(),
                    waiting: false,
                    held_signalled: false,
                    stats: EgressStats::default(),
                }),
                tap,
                room: EventFd::new(libc::EFD_NONBLOCK)?,
                held: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current mode.
    pub fn mode(&self) -> GateMode {
        self.lock().gate.mode()
    }

    /// Switches mode; frames already held stay held until released or discarded.
    pub fn set_mode(&self, mode: GateMode) {
        self.lock().gate.set_mode(mode);
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.lock().gate.epoch()
    }

    /// Starts epoch `epoch`: frames sent from now on belong to it (and inbound frames mirrored
    /// from now on are tagged with it).
    /// Re-arms [`Egress::waiting_event`] for the new epoch.
    pub fn set_epoch(&self, epoch: Epoch) {
        let mut state = self.lock();
        state.gate.set_epoch(epoch);
        state.held_signalled = false;
    }

    /// Changes the bound on held bytes.
    pub fn set_limit(&self, limit: usize) {
        let mut state = self.lock();
        state.gate.set_limit(limit);
        self.wake(&mut state);
    }

    /// Writes to the TAP, in order, the held frames of every epoch up to `epoch`; returns how
    /// many were released.
    pub fn release_through(&self, epoch: Epoch) -> usize {
        let mut state = self.lock();
        let frames = state.gate.release_through(epoch);
        state.stats.released_frames += frames.len() as u64;
        for frame in &frames {
            self.write(&mut state, frame);
        }
        if !frames.is_empty() {
            self.wake(&mut state);
        }
        frames.len()
    }

    /// Drops the held frames of every epoch after `epoch`; returns how many were dropped.
    pub fn discard_after(&self, epoch: Epoch) -> usize {
        let mut state = self.lock();
        let n = state.gate.discard_after(epoch);
        state.stats.discarded_frames += n as u64;
        if n > 0 {
            self.wake(&mut state);
        }
        n
    }

    /// Frames held now.
    pub fn held_frames(&self) -> usize {
        self.lock().gate.held_frames()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.lock().gate.held_bytes()
    }

    /// Epochs that have frames held, oldest first.
    pub fn held_epochs(&self) -> Vec<Epoch> {
        self.lock().gate.held_epochs()
    }

    /// Counters.
    pub fn stats(&self) -> EgressStats {
        let state = self.lock();
        EgressStats {
            dropped: state.gate.dropped(),
            ..state.stats
        }
    }

    /// Captures the gate: mode, epoch, limit, counters and held frames.
    pub fn save(&self) -> EgressState {
        let state = self.lock();
        EgressState {
            mode: state.gate.mode,
            epoch: state.gate.epoch,
            limit: state.gate.limit,
            held: state.gate.held.iter().cloned().collect(),
            stats: EgressStats {
                dropped: state.gate.dropped,
                ..state.stats
            },
        }
    }

    /// Replaces the gate's mode, epoch, limit, counters and held frames with `saved`. The held
    /// frames stay held, in order, until released or discarded; nothing is written to the TAP.
    pub fn restore(&self, saved: &EgressState) {
        let mut state = self.lock();
        let mut gate = EgressGate::new(saved.mode, saved.limit);
        gate.epoch = saved.epoch;
        gate.held = saved.held.iter().cloned().collect();
        gate.held_bytes = gate.held.iter().map(|f| f.bytes.len()).sum();
        gate.dropped = saved.stats.dropped;
        state.gate = gate;
        state.stats = saved.stats;
        // The device retries its transmit queue when it is activated: nobody waits for room.
        state.waiting = false;
        state.held_signalled = false;
    }

    /// Signalled (readable) when the gate was found full and room has been made since: the
    /// device registers it with its event loop and transmits again.
    pub fn room_event(&self) -> &EventFd {
        &self.shared.room
    }

    /// Signalled (readable) when the first frame of the current epoch is held: output waits
    /// for the epoch to be committed, so the epoch may be ended early. Signalled at most once
    /// per epoch ([`Egress::set_epoch`] re-arms it); never in pass-through mode with nothing
    /// held. The reader drains it.
    pub fn waiting_event(&self) -> &EventFd {
        &self.shared.held
    }

    /// Passes one outbound frame (with its virtio-net header) through the gate: written to the
    /// TAP at once, held, or refused (see [`Admission`]).
    pub fn send(&self, frame: &[u8]) -> Admission {
        let mut state = self.lock();
        let admission = state.gate.admit(frame);
        match admission {
            Admission::Send => self.write(&mut state, frame),
            Admission::Full => {
                state.stats.full += 1;
                state.waiting = true;
            }
            Admission::Held => {
                if !state.held_signalled {
                    state.held_signalled = true;
                    if let Err(err) = self.shared.held.write(1) {
                        tracing::error!(%err, "egress gate: cannot signal held frames");
                    }
                }
            }
            Admission::Dropped => {}
        }
        admission
    }

    fn write(&self, state: &mut State, frame: &[u8]) {
        match self.shared.tap.write_frame(frame) {
            Ok(_) => {
                state.stats.sent_frames += 1;
                state.stats.sent_bytes +=
                    frame.len().saturating_sub(crate::header::VNET_HDR_LEN) as u64;
            }
            Err(err) => {
                state.stats.tap_errors += 1;
                tracing::debug!(tap = self.shared.tap.name(), %err, "TX frame refused by the TAP");
            }
        }
    }

    fn wake(&self, state: &mut State) {
        if state.waiting {
            state.waiting = false;
            if let Err(err) = self.shared.room.write(1) {
                tracing::error!(%err, "egress gate: cannot signal room");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_sends_at_once() {
        let mut gate = EgressGate::default();
        assert_eq!(gate.mode(), GateMode::PassThrough);
        assert_eq!(gate.admit(b"frame"), Admission::Send);
        assert_eq!(gate.held_frames(), 0);
    }

    #[test]
    fn held_frames_wait_for_their_epoch() {
        let mut gate = EgressGate::new(GateMode::Held, 1 << 20);
        gate.set_epoch(1);
        assert_eq!(gate.admit(b"a1"), Admission::Held);
        assert_eq!(gate.admit(b"b1"), Admission::Held);
        gate.set_epoch(2);
        assert_eq!(gate.admit(b"c2"), Admission::Held);
        gate.set_epoch(3);
        assert_eq!(gate.admit(b"d3"), Admission::Held);
        assert_eq!(gate.held_epochs(), vec![1, 2, 3]);
        assert!(gate.release_through(0).is_empty());
        assert_eq!(
            gate.release_through(1),
            vec![b"a1".to_vec(), b"b1".to_vec()]
        );
        assert_eq!(gate.held_bytes(), 4);
        assert_eq!(gate.discard_after(2), 1);
        assert_eq!(gate.held_bytes(), 2);
        assert_eq!(gate.release_through(5), vec![b"c2".to_vec()]);
        assert_eq!(gate.held_frames(), 0);
        assert_eq!(gate.held_bytes(), 0);
    }

    #[test]
    fn discarding_everything_after_an_epoch_keeps_the_rest_in_order() {
        let mut gate = EgressGate::new(GateMode::Held, 1 << 20);
        for epoch in 1..=4u64 {
            gate.set_epoch(epoch);
            gate.admit(&[epoch as u8; 3]);
            gate.admit(&[epoch as u8 + 10; 3]);
        }
        assert_eq!(gate.discard_after(2), 4);
        assert_eq!(gate.held_epochs(), vec![1, 2]);
        assert_eq!(gate.discard_after(2), 0);
        let out = gate.release_through(Epoch::MAX);
        assert_eq!(out, vec![vec![1; 3], vec![11; 3], vec![2; 3], vec![12; 3]]);
    }

    #[test]
    fn a_full_gate_refuses_without_losing_and_drops_only_the_impossible() {
        let mut gate = EgressGate::new(GateMode::Held, 10);
        assert_eq!(gate.admit(&[0; 6]), Admission::Held);
        assert_eq!(gate.admit(&[0; 6]), Admission::Full);
        assert_eq!(gate.held_frames(), 1);
        assert_eq!(gate.admit(&[0; 4]), Admission::Held);
        assert_eq!(gate.admit(&[0; 11]), Admission::Dropped);
        assert_eq!(gate.dropped(), 1);
        assert_eq!(gate.release_through(0).len(), 2);
        assert_eq!(gate.admit(&[0; 6]), Admission::Held);
    }

    #[test]
    fn save_and_restore_keep_held_frames_with_their_epochs() {
        use crate::testutil::{ether_frame, with_header, NetNs, TapPeer};

        let Some(ns) = NetNs::enter() else { return };
        let (src_tap, src_peer) = TapPeer::new(&ns, "gsrc");
        let src = Egress::new(Arc::new(src_tap)).unwrap();
        let frame = |payload: &[u8]| with_header(&ether_frame([0xff; 6], payload));
        src.set_mode(GateMode::Held);
        src.set_limit(200);
        src.set_epoch(4);
        assert_eq!(src.send(&frame(b"four")), Admission::Held);
        src.set_epoch(5);
        assert_eq!(src.send(&frame(b"five")), Admission::Held);
        assert_eq!(src.send(&[0; 201]), Admission::Dropped);
        let saved = src.save();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: EgressState = serde_json::from_str(&json).unwrap();
        assert_eq!(saved, src.save());
        assert_eq!(
            saved.held.iter().map(|f| f.epoch).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(saved.stats.dropped, 1);

        // Restored in front of another TAP: the frames wait there, per epoch.
        let (dst_tap, dst_peer) = TapPeer::new(&ns, "gdst");
        let dst = Egress::new(Arc::new(dst_tap)).unwrap();
        dst.restore(&saved);
        assert_eq!(dst.save(), saved);
        assert_eq!(dst.mode(), GateMode::Held);
        assert_eq!(dst.epoch(), 5);
        assert_eq!(dst.held_bytes(), 2 * frame(b"four").len());
        assert_eq!(dst.stats().dropped, 1);
        // The gate is still bounded by the saved limit.
        assert_eq!(dst.send(&[0; 150]), Admission::Full);
        let head = ether_frame([0xff; 6], b"");
        assert_eq!(dst.release_through(4), 1);
        assert!(dst_peer.recv_matching(&head).ends_with(b"four"));
        assert_eq!(dst.discard_after(4), 1);
        assert_eq!(dst.held_frames(), 0);
        assert_eq!(dst.room_event().read().unwrap(), 1);
        // Nothing ever left through the source's TAP.
        assert!(src_peer
            .try_recv_matching(&head, std::time::Duration::from_millis(50))
            .is_none());
    }

    #[test]
    fn back_to_pass_through_keeps_order() {
        let mut gate = EgressGate::new(GateMode::Held, 1 << 20);
        gate.admit(b"old");
        gate.set_mode(GateMode::PassThrough);
        // An older frame is still held: a new one must not overtake it.
        assert_eq!(gate.admit(b"new"), Admission::Held);
        assert_eq!(
            gate.release_through(0),
            vec![b"old".to_vec(), b"new".to_vec()]
        );
        assert_eq!(gate.admit(b"next"), Admission::Send);
    }

    #[test]
    fn the_first_held_frame_of_each_epoch_signals_waiting_output() {
        use crate::testutil::{ether_frame, with_header, NetNs, TapPeer};

        let Some(ns) = NetNs::enter() else { return };
        let (tap, peer) = TapPeer::new(&ns, "gwait");
        let egress = Egress::new(Arc::new(tap)).unwrap();
        let frame = |payload: &[u8]| with_header(&ether_frame([0xff; 6], payload));
        let head = ether_frame([0xff; 6], b"");
        // Pass-through: straight out, nothing signalled.
        assert_eq!(egress.send(&frame(b"open")), Admission::Send);
        assert!(peer.recv_matching(&head).ends_with(b"open"));
        assert!(egress.waiting_event().read().is_err());

        egress.set_mode(GateMode::Held);
        egress.set_epoch(1);
        assert_eq!(egress.send(&frame(b"one")), Admission::Held);
        assert_eq!(egress.send(&frame(b"one again")), Admission::Held);
        assert_eq!(egress.waiting_event().read().unwrap(), 1);
        assert!(egress.waiting_event().read().is_err(), "once per epoch");
        egress.set_epoch(2);
        assert!(egress.waiting_event().read().is_err(), "nothing held in 2");
        assert_eq!(egress.send(&frame(b"two")), Admission::Held);
        assert_eq!(egress.waiting_event().read().unwrap(), 1);
        // Nothing left before its epoch was released; then in order.
        assert!(peer
            .try_recv_matching(&head, std::time::Duration::from_millis(50))
            .is_none());
        assert_eq!(egress.release_through(1), 2);
        assert!(peer.recv_matching(&head).ends_with(b"one"));
        assert!(peer.recv_matching(&head).ends_with(b"one again"));
        assert_eq!(egress.discard_after(1), 1);
        assert_eq!(egress.stats().discarded_frames, 1);
        assert!(peer
            .try_recv_matching(&head, std::time::Duration::from_millis(50))
            .is_none());
    }
}
