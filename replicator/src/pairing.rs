//! Pairing a primary with a standby: the authentication handshake, then `Hello` answered by
//! `HelloAck` or `Refuse`. The result is a [`Link`]: authenticated frames both ways.

use std::io::{Read, Write};

use crate::auth::{self, AuthError, ReplicationKey};
use crate::compat::{Hello, HelloAck, Incompatibility, StandbyProfile, PROTOCOL};
use crate::wire::{FrameError, FrameReader, FrameWriter, Message};

/// Why pairing failed. One variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The peers did not authenticate each other.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The stream of frames failed.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The standby cannot hold the VM (its reason).
    #[error("the standby refused the VM: {0}")]
    Refused(String),
    /// We cannot pair with the peer.
    #[error("{0}")]
    Incompatible(#[from] Incompatibility),
    /// A primary of an older term than the standby's last commit (a deposed primary).
    #[error(
        "the primary's term {term} is older than the standby's committed term {committed_term}"
    )]
    StaleTerm {
        /// The primary's term.
        term: u64,
        /// The term of the standby's last commit.
        committed_term: u64,
    },
    /// The standby declined the VM for a reason of its own (it holds another VM, it cannot
    /// make the memory...).
    #[error("{0}")]
    Declined(String),
    /// A message other than the one the pairing expects.
    #[error("unexpected {found} while pairing (expected {expected})")]
    Unexpected {
        /// The message expected.
        expected: &'static str,
        /// The one found.
        found: &'static str,
    },
}

/// An authenticated link between a primary and a standby.
pub struct Link<R: Read, W: Write> {
    /// Frames from the peer.
    pub reader: FrameReader<R>,
    /// Frames to the peer.
    pub writer: FrameWriter<W>,
}

/// The primary's side: authenticates, sends `hello`, and returns the link and the standby's
/// answer. `zstd_level` compresses what the primary sends.
pub fn connect<R: Read, W: Write>(
    mut input: R,
    mut output: W,
    key: &ReplicationKey,
    hello: &Hello,
    zstd_level: Option<i32>,
) -> Result<(Link<R, W>, HelloAck), PairError> {
    let session = auth::authenticate_primary(&mut input, &mut output, key)?;
    let mut link = Link {
        reader: FrameReader::new(input, session.recv),
        writer: FrameWriter::new(output, session.send, zstd_level),
    };
    link.writer.send_now(&Message::Hello(hello.clone()))?;
    match link.reader.recv()? {
        Message::HelloAck(ack) => {
            if ack.protocol.major != PROTOCOL.major {
                let err = Incompatibility::Protocol {
                    primary: PROTOCOL,
                    standby: ack.protocol,
                };
                let _ = link.writer.send_now(&Message::Refuse {
                    reason: err.to_string(),
                });
                return Err(err.into());
            }
            tracing::info!(
                protocol = %ack.protocol,
                committed_epoch = ack.committed_epoch,
                "paired with a standby"
            );
            Ok((link, ack))
        }
        Message::Refuse { reason } => {
            // The caller reports it (one line, with the standby's name).
            tracing::debug!("the standby refused the VM: {reason}");
            Err(PairError::Refused(reason))
        }
        other => Err(PairError::Unexpected {
            expected: "HelloAck",
            found: other.name(),
        }),
    }
}

/// The standby's side: authenticates, checks the primary's `Hello` against `profile`, and
/// answers `HelloAck` (with the last committed epoch and its term) or `Refuse`. A primary of
/// a term older than `committed`'s (epoch, term) is refused: it was deposed.
pub fn accept<R: Read, W: Write>(
    input: R,
    output: W,
    key: &ReplicationKey,
    profile: &StandbyProfile,
    committed: (u64, u64),
    zstd_level: Option<i32>,
) -> Result<(Link<R, W>, Hello), PairError> {
    accept_with(input, output, key, committed, zstd_level, |_| {
        Ok(profile.clone())
    })
    .map(|(link, hello, _)| (link, hello))
}

/// As [`accept`], for a standby sized from the VM it is asked to hold: `profile_for` sees the
/// primary's `Hello` (after authentication, before any check) and gives what this standby can
/// hold for it, or a one-line reason to decline it (sent to the primary in `Refuse`). The
/// profile is then checked against the `Hello` as [`accept`] does.
pub fn accept_with<R: Read, W: Write>(
    mut input: R,
    mut output: W,
    key: &ReplicationKey,
    committed: (u64, u64),
    zstd_level: Option<i32>,
    profile_for: impl FnOnce(&Hello) -> Result<StandbyProfile, String>,
) -> Result<(Link<R, W>, Hello, StandbyProfile), PairError> {
    let session = auth::authenticate_standby(&mut input, &mut output, key)?;
    let mut link = Link {
        reader: FrameReader::new(input, session.recv),
        writer: FrameWriter::new(output, session.send, zstd_level),
    };
    let hello = match link.reader.recv()? {
        Message::Hello(hello) => hello,
        other => {
            return Err(PairError::Unexpected {
                expected: "Hello",
                found: other.name(),
            })
        }
    };
    let refuse = |link: &mut Link<R, W>,
                  err: PairError|
     -> Result<(Link<R, W>, Hello, StandbyProfile), PairError> {
        tracing::debug!(vm = %hello.vm_id, "refused to stand by: {err}");
        link.writer.send_now(&Message::Refuse {
            reason: err.to_string(),
        })?;
        Err(err)
    };
    if hello.term < committed.1 {
        let err = PairError::StaleTerm {
            term: hello.term,
            committed_term: committed.1,
        };
        return refuse(&mut link, err);
    }
    let profile = match profile_for(&hello) {
        Ok(profile) => profile,
        Err(reason) => return refuse(&mut link, PairError::Declined(reason)),
    };
    if let Err(err) = profile.check(&hello, PROTOCOL) {
        return refuse(&mut link, err.into());
    }
    link.writer.send_now(&Message::HelloAck(HelloAck {
        protocol: PROTOCOL,
        committed_epoch: committed.0,
        committed_term: committed.1,
        profile: profile.clone(),
    }))?;
    tracing::info!(vm = %hello.vm_id, term = hello.term, protocol = %hello.protocol, "standing by");
    Ok((link, hello, profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::tests::{hello, profile};
    use crate::compat::ProtocolVersion;
    use std::os::unix::net::UnixStream;

    type Ends = (
        Result<(Link<UnixStream, UnixStream>, HelloAck), PairError>,
        Result<(Link<UnixStream, UnixStream>, Hello), PairError>,
    );

    fn pair(hello: Hello, profile: StandbyProfile, kp: u8, ks: u8) -> Ends {
        pair_at(hello, profile, kp, ks, 1)
    }

    fn pair_at(hello: Hello, profile: StandbyProfile, kp: u8, ks: u8, term: u64) -> Ends {
        let (a, b) = UnixStream::pair().unwrap();
        let standby = std::thread::spawn(move || {
            let key = ReplicationKey::new(vec![ks; 32]).unwrap();
            accept(b.try_clone().unwrap(), b, &key, &profile, (3, term), None)
        });
        let key = ReplicationKey::new(vec![kp; 32]).unwrap();
        let primary = connect(a.try_clone().unwrap(), a, &key, &hello, Some(1));
        (primary, standby.join().unwrap())
    }

    #[test]
    fn a_fitting_standby_pairs_and_frames_flow_both_ways() {
        let (p, s) = pair(hello(), profile(), 1, 1);
        let (mut p, ack) = p.unwrap();
        let (mut s, h) = s.unwrap();
        assert_eq!(h, hello());
        assert_eq!((ack.committed_epoch, ack.committed_term), (3, 1));
        p.writer
            .send_now(&Message::EpochBegin { epoch: 4, term: 2 })
            .unwrap();
        assert_eq!(
            s.reader.recv().unwrap(),
            Message::EpochBegin { epoch: 4, term: 2 }
        );
        s.writer.send_now(&Message::Ack { epoch: 4 }).unwrap();
        assert_eq!(p.reader.recv().unwrap(), Message::Ack { epoch: 4 });
    }

    #[test]
    fn a_standby_that_cannot_hold_the_vm_is_refused_on_both_ends() {
        let mut small = profile();
        small.mem_bytes /= 2;
        let (p, s) = pair(hello(), small, 1, 1);
        let (p, s) = (p.err().unwrap(), s.err().unwrap());
        assert!(matches!(p, PairError::Refused(_)), "{p}");
        assert!(
            matches!(
                s,
                PairError::Incompatible(Incompatibility::MemorySize { .. })
            ),
            "{s}"
        );
        assert!(p.to_string().contains(&s.to_string()), "{p} / {s}");
        assert!(!p.to_string().contains('\n'));
    }

    #[test]
    fn a_major_version_apart_is_refused_and_a_minor_ahead_accepted() {
        let mut h = hello();
        h.protocol = ProtocolVersion {
            major: PROTOCOL.major + 1,
            minor: 0,
        };
        let (p, s) = pair(h, profile(), 1, 1);
        assert!(matches!(p.err().unwrap(), PairError::Refused(r) if r.contains("major")));
        assert!(matches!(
            s.err().unwrap(),
            PairError::Incompatible(Incompatibility::Protocol { .. })
        ));
        let mut h = hello();
        h.protocol.minor += 1;
        let (p, s) = pair(h, profile(), 1, 1);
        p.unwrap();
        s.unwrap();
    }

    #[test]
    fn a_deposed_primary_is_refused() {
        // hello() is of term 2.
        let (p, s) = pair_at(hello(), profile(), 1, 1, 3);
        let (p, s) = (p.err().unwrap(), s.err().unwrap());
        assert!(matches!(p, PairError::Refused(r) if r.contains("older")));
        assert!(
            matches!(
                s,
                PairError::StaleTerm {
                    term: 2,
                    committed_term: 3
                }
            ),
            "{s}"
        );
        let (p, s) = pair_at(hello(), profile(), 1, 1, 2);
        p.unwrap();
        s.unwrap();
    }

    #[test]
    fn a_peer_without_the_key_is_refused_on_both_ends() {
        let (p, s) = pair(hello(), profile(), 1, 2);
        let (p, s) = (p.err().unwrap(), s.err().unwrap());
        assert!(matches!(p, PairError::Auth(AuthError::PeerLacksKey)), "{p}");
        assert!(
            matches!(s, PairError::Auth(AuthError::RefusedByPeer(_))),
            "{s}"
        );
    }
}
