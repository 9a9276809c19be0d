//! The standby: what it commits, how it stages epochs, the loop that serves a primary, and the
//! takeover that makes it the primary.

pub mod committed;
pub mod host;
pub mod staging;
pub mod takeover;

use std::io::{Read, Write};
use std::sync::{Mutex, PoisonError};

use crate::pairing::Link;
use crate::wire::{FrameError, Message};
use committed::{CommittedDisk, CommittedMemory};
use staging::{Received, Staging, StagingError};

/// Why serving a primary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The link failed (the open epoch was discarded).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The primary sent what staging refuses (the open epoch was discarded; the primary was
    /// told why).
    #[error("{0}")]
    Staging(#[from] StagingError),
    /// The primary gave up, and why.
    #[error("the primary gave up: {0}")]
    Refused(String),
    /// The primary handed the VM over at this epoch (a planned switch-over).
    #[error("the primary handed the VM over at epoch {0}")]
    Handover(u64),
}

/// Access to a staging area for [`serve_on`]: exclusive (`&mut`) or shared with readers of
/// the committed state (`&Mutex`, locked for each message: a reader sees whole commits only).
pub trait StagingAccess<M: CommittedMemory, D: CommittedDisk> {
    /// Runs `f` on the staging area.
    fn with<R>(&mut self, f: impl FnOnce(&mut Staging<M, D>) -> R) -> R;
}

impl<M: CommittedMemory, D: CommittedDisk> StagingAccess<M, D> for &mut Staging<M, D> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Staging<M, D>) -> R) -> R {
        f(self)
    }
}

impl<M: CommittedMemory, D: CommittedDisk> StagingAccess<M, D> for &Mutex<Staging<M, D>> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Staging<M, D>) -> R) -> R {
        f(&mut self.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Receives epochs from a paired primary into `staging`, acknowledging each commit and
/// answering heartbeats, until the link fails or the primary sends what staging refuses. An
/// inbound log that is full is logged and the frame dropped; everything else ends the link,
/// its reason sent to the primary in `Refuse` where the link still works.
pub fn serve<R: Read, W: Write, M: CommittedMemory, D: CommittedDisk>(
    link: &mut Link<R, W>,
    staging: &mut Staging<M, D>,
) -> ServeError {
    serve_on(link, staging)
}

/// [`serve`] on any [`StagingAccess`].
pub fn serve_on<R: Read, W: Write, M: CommittedMemory, D: CommittedDisk>(
    link: &mut Link<R, W>,
    mut staging: impl StagingAccess<M, D>,
) -> ServeError {
    loop {
        let msg = match link.reader.recv() {
            Ok(Message::Refuse { reason }) => {
                staging.with(|s| s.abort_open("the primary gave up"));
                return ServeError::Refused(reason);
            }
            Ok(msg) => msg,
            Err(e) => {
                staging.with(|s| s.abort_open(&e.to_string()));
                return e.into();
            }
        };
        let reply = match staging.with(|s| {
            s.receive(msg)
                .map(|r| (r, s.committed_term(), s.committed_epoch()))
        }) {
            Ok((Received::Committed { epoch, .. }, _, _)) => Message::Ack { epoch },
            Ok((Received::Heartbeat { .. }, term, epoch)) => Message::Heartbeat { term, epoch },
            Ok((Received::Handover { epoch }, _, _)) => return ServeError::Handover(epoch),
            Ok(_) => continue,
            Err(e @ StagingError::InboundLogFull { .. }) => {
                tracing::warn!("{e}");
                continue;
            }
            Err(e) => {
                let _ = link.writer.send_now(&Message::Refuse {
                    reason: e.to_string(),
                });
                return e.into();
            }
        };
        if let Err(e) = link.writer.send_now(&reply) {
            return e.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::EpochWriter;
    use crate::pairing;
    use crate::wire::tests::{split, KEY, NONCE};
    use crate::wire::{Direction, FrameAuth, FrameReader, FrameWriter, HEADER_LEN};
    use staging::tests::{contents, e_state, fingerprint, staging, HeapStaging};

    fn primary() -> FrameWriter<Vec<u8>> {
        FrameWriter::new(
            Vec::new(),
            FrameAuth::new(KEY, &NONCE, Direction::ToStandby),
            Some(1),
        )
    }

    /// Epoch `n` of term 1 on `w`: a few pages, state, a disk write.
    fn send_epoch(w: &mut FrameWriter<Vec<u8>>, n: u64) {
        let mut e = EpochWriter::begin(w, n, 1).unwrap();
        for p in 0..5 {
            e.page(p * 7 + n, &contents((n * 10 + p) as u8)).unwrap();
        }
        e.page(40, &[0; vmm::vstate::memory::PAGE_SIZE]).unwrap();
        e.state(e_state(n)).unwrap();
        e.disk_write(0, n * 512, vec![n as u8; 512]).unwrap();
        e.end().unwrap();
    }

    /// Serves `bytes` into a standby that has committed epoch 1 from the same connection;
    /// the error, the acks sent, and whether the committed state is the one of epoch 1.
    fn serve_bytes(bytes: &[u8], s: &mut HeapStaging) -> (ServeError, Vec<Message>) {
        let mut link = Link {
            reader: FrameReader::new(bytes, FrameAuth::new(KEY, &NONCE, Direction::ToStandby)),
            writer: FrameWriter::new(
                Vec::new(),
                FrameAuth::new(KEY, &NONCE, Direction::ToPrimary),
                None,
            ),
        };
        let err = serve(&mut link, s);
        let out = link.writer.into_inner().unwrap();
        let mut r = FrameReader::new(&out[..], FrameAuth::new(KEY, &NONCE, Direction::ToPrimary));
        let mut replies = Vec::new();
        while let Ok(m) = r.recv() {
            replies.push(m);
        }
        (err, replies)
    }

    /// Epochs 1 and 2 on one connection, split in frames; the frames of epoch 1 come first
    /// (`first` of them).
    fn two_epochs() -> (Vec<Vec<u8>>, usize) {
        let mut w = primary();
        send_epoch(&mut w, 1);
        let first = split(&w.into_inner().unwrap()).len();
        let mut w = primary();
        send_epoch(&mut w, 1);
        send_epoch(&mut w, 2);
        (split(&w.into_inner().unwrap()), first)
    }

    /// Epoch 1 whole, then the frames of epoch 2 edited by `edit`: the error, with the state
    /// committed checked to be epoch 1's.
    fn faulty(edit: impl FnOnce(&mut Vec<Vec<u8>>, usize)) -> ServeError {
        let (mut frames, first) = two_epochs();
        let mut clean = staging();
        let (_, acks) = serve_bytes(&frames[..first].concat(), &mut clean);
        assert_eq!(acks, vec![Message::Ack { epoch: 1 }]);
        let after_one = fingerprint(&clean);
        edit(&mut frames, first);
        let mut s = staging();
        let (err, acks) = serve_bytes(&frames.concat(), &mut s);
        assert_eq!(fingerprint(&s), after_one, "committed state touched: {err}");
        assert_eq!(s.open_epoch(), None);
        assert!(
            !acks.contains(&Message::Ack { epoch: 2 }),
            "epoch 2 acknowledged: {err}"
        );
        err
    }

    #[test]
    fn epochs_are_committed_and_acknowledged() {
        let (frames, _) = two_epochs();
        let mut s = staging();
        let (err, acks) = serve_bytes(&frames.concat(), &mut s);
        assert!(
            matches!(err, ServeError::Frame(FrameError::Closed)),
            "{err}"
        );
        assert_eq!(
            acks,
            vec![Message::Ack { epoch: 1 }, Message::Ack { epoch: 2 }]
        );
        assert_eq!(s.committed_epoch(), 2);
        assert_eq!(s.committed_state(), &e_state(2)[..]);
    }

    #[test]
    fn a_truncated_stream_is_refused() {
        let err = faulty(|f, first| {
            let last = f.len() - 1;
            f.truncate(last);
            let _ = first;
        });
        assert!(
            matches!(err, ServeError::Frame(FrameError::Closed)),
            "{err}"
        );
        let err = faulty(|f, _| {
            let last = f.len() - 1;
            let cut = f[last].len() - 3;
            f[last].truncate(cut);
        });
        assert!(
            matches!(err, ServeError::Frame(FrameError::Truncated)),
            "{err}"
        );
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let err = faulty(|f, first| f[first + 1][HEADER_LEN + 5] ^= 0x40);
        assert!(
            matches!(err, ServeError::Frame(FrameError::BadMac { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_replayed_frame_is_refused() {
        let err = faulty(|f, first| {
            let again = f[first + 1].clone();
            f.insert(first + 2, again);
        });
        assert!(
            matches!(err, ServeError::Frame(FrameError::Replayed { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_frame_without_the_right_mac_is_refused() {
        let err = faulty(|f, first| {
            // The same frame, authenticated under another key.
            let mut w = FrameWriter::new(
                Vec::new(),
                FrameAuth::new(&[9; 32], &NONCE, Direction::ToStandby),
                None,
            );
            for _ in 0..=first + 1 {
                w.send(&Message::State(b"forged".to_vec())).unwrap();
            }
            let forged = split(&w.into_inner().unwrap()).pop().unwrap();
            f[first + 1] = forged;
        });
        assert!(
            matches!(err, ServeError::Frame(FrameError::BadMac { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_replayed_or_out_of_order_epoch_is_refused_and_the_primary_told() {
        let mut w = primary();
        send_epoch(&mut w, 1);
        send_epoch(&mut w, 1);
        let mut s = staging();
        let (err, replies) = serve_bytes(&w.into_inner().unwrap(), &mut s);
        assert!(
            matches!(
                err,
                ServeError::Staging(StagingError::AlreadyCommitted { epoch: 1, .. })
            ),
            "{err}"
        );
        assert!(matches!(&replies[1], Message::Refuse { reason } if reason.contains("already")));
        let mut w = primary();
        send_epoch(&mut w, 1);
        send_epoch(&mut w, 3);
        let mut s = staging();
        let (err, _) = serve_bytes(&w.into_inner().unwrap(), &mut s);
        assert!(
            matches!(
                err,
                ServeError::Staging(StagingError::OutOfOrder {
                    epoch: 3,
                    expected: 2
                })
            ),
            "{err}"
        );
        assert_eq!(s.committed_epoch(), 1);
    }

    #[test]
    fn a_paired_primary_replicates_over_a_socket() {
        use crate::auth::ReplicationKey;
        use crate::compat::tests::{hello, profile};
        use std::os::unix::net::UnixStream;

        let (a, b) = UnixStream::pair().unwrap();
        let key = ReplicationKey::new(vec![3; 32]).unwrap();
        let k = key.clone();
        let standby = std::thread::spawn(move || {
            let mut s = staging();
            let (mut link, _) = pairing::accept(
                &b,
                &b,
                &k,
                &profile(),
                (s.committed_epoch(), s.committed_term()),
                None,
            )
            .unwrap();
            let err = serve(&mut link, &mut s);
            (err, s.committed_epoch())
        });
        let (mut link, ack) = pairing::connect(&a, &a, &key, &hello(), Some(1)).unwrap();
        assert_eq!(ack.committed_epoch, 0);
        for n in 1..=3 {
            let mut e = EpochWriter::begin(&mut link.writer, n, 2).unwrap();
            e.page(n, &contents(n as u8)).unwrap();
            e.state(e_state(n)).unwrap();
            e.end().unwrap();
            assert_eq!(link.reader.recv().unwrap(), Message::Ack { epoch: n });
        }
        link.writer
            .send_now(&Message::Heartbeat { term: 2, epoch: 3 })
            .unwrap();
        assert_eq!(
            link.reader.recv().unwrap(),
            Message::Heartbeat { term: 2, epoch: 3 }
        );
        drop(link);
        drop(a);
        let (err, committed) = standby.join().unwrap();
        assert!(
            matches!(err, ServeError::Frame(FrameError::Closed)),
            "{err}"
        );
        assert_eq!(committed, 3);
    }
}
