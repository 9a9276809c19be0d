//! The egress gate: every outbound frame passes through it. In pass-through mode frames go to
//! the wire at once; held, they are tagged with the epoch that produced them and released only
//! when that epoch is committed (output commit: no client sees a state that could be lost).

use std::collections::VecDeque;

/// Epoch number.
pub type Epoch = u64;

/// Default bound on the bytes held back.
pub const DEFAULT_HELD_LIMIT: usize = 64 << 20;

/// What the gate does with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Frames go out at once.
    PassThrough,
    /// Frames wait for their epoch to be released.
    Held,
}

/// What became of a frame given to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it now.
    Send,
    /// Held until its epoch is released.
    Held,
    /// Dropped: the held bytes are at their limit. The guest's TCP retransmits, as it would
    /// after a loss on the wire.
    Dropped,
}

/// Frames held per epoch, with a bound on the bytes held.
#[derive(Debug)]
pub struct EgressGate {
    mode: GateMode,
    epoch: Epoch,
    held: VecDeque<(Epoch, Vec<u8>)>,
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
    /// A gate in `mode` holding at most `limit` bytes.
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

    /// Switches mode; frames already held stay held until released or discarded.
    pub fn set_mode(&mut self, mode: GateMode) {
        self.mode = mode;
    }

    /// The epoch new frames are tagged with.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Starts epoch `epoch`: frames from now on belong to it.
    pub fn set_epoch(&mut self, epoch: Epoch) {
        self.epoch = epoch;
    }

    /// Decides about one outbound frame: in pass-through mode (with nothing held) it is sent;
    /// otherwise it is held, tagged with the current epoch, unless the gate is full.
    pub fn admit(&mut self, frame: &[u8]) -> Admission {
        if self.mode == GateMode::PassThrough && self.held.is_empty() {
            return Admission::Send;
        }
        if self.held_bytes + frame.len() > self.limit {
            self.dropped += 1;
            return Admission::Dropped;
        }
        self.held_bytes += frame.len();
        self.held.push_back((self.epoch, frame.to_vec()));
        Admission::Held
    }

    /// Removes and returns, in order, the held frames of every epoch up to `epoch`.
    pub fn release_through(&mut self, epoch: Epoch) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, frame) = self.held.pop_front().expect("front exists");
            self.held_bytes -= frame.len();
            out.push(frame);
        }
        out
    }

    /// Drops the held frames of every epoch after `epoch` (their state was lost); returns how
    /// many were dropped.
    pub fn discard_after(&mut self, epoch: Epoch) -> usize {
        let before = self.held.len();
        self.held.retain(|(e, _)| *e <= epoch);
        self.held_bytes = self.held.iter().map(|(_, f)| f.len()).sum();
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

    /// Frames dropped because the gate was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_sends_at_once() {
        let mut gate = EgressGate::default();
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
        assert!(gate.release_through(0).is_empty());
        assert_eq!(
            gate.release_through(1),
            vec![b"a1".to_vec(), b"b1".to_vec()]
        );
        assert_eq!(gate.held_bytes(), 4);
        assert_eq!(gate.discard_after(2), 1);
        assert_eq!(gate.release_through(5), vec![b"c2".to_vec()]);
        assert_eq!(gate.held_frames(), 0);
        assert_eq!(gate.held_bytes(), 0);
    }

    #[test]
    fn a_full_gate_drops_and_counts() {
        let mut gate = EgressGate::new(GateMode::Held, 10);
        assert_eq!(gate.admit(&[0; 6]), Admission::Held);
        assert_eq!(gate.admit(&[0; 6]), Admission::Dropped);
        assert_eq!(gate.dropped(), 1);
        assert_eq!(gate.admit(&[0; 4]), Admission::Held);
    }

    #[test]
    fn back_to_pass_through_keeps_order() {
        let mut gate = EgressGate::new(GateMode::Held, 1 << 20);
        gate.admit(b"old");
        gate.set_mode(GateMode::PassThrough);
        // Older frames are still held: a new one must not overtake them.
        assert_eq!(gate.admit(b"new"), Admission::Held);
        assert_eq!(gate.release_through(0).len(), 2);
        assert_eq!(gate.admit(b"next"), Admission::Send);
    }
}
