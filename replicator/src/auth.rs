//! Peer authentication: a shared key file and a challenge/response handshake both ways.
//!
//! ```text
//! primary                                          standby
//!   Challenge { nonce_p }                      ──▶
//!                                              ◀──  Proof { nonce_s, HMAC(key, "standby" | nonce_p | nonce_s) }
//!   checks the standby's proof
//!   Proof { HMAC(key, "primary" | nonce_p | nonce_s) } ──▶
//!                                                   checks the primary's proof
//! ```
//!
//! Both nonces are 32 bytes from the OS's random source; the connection nonce that every frame
//! MAC then covers is `nonce_p | nonce_s`, so no frame of one connection is accepted in another.
//! The proofs carry different labels, so one cannot be reflected as the other. A side whose
//! peer fails its proof sends `Refused` with a one-line reason and gives up; the other side
//! gets [`AuthError::RefusedByPeer`] with that reason. Handshake messages are
//! `"VMRA" | kind (1 byte) | body length (u16 LE, ≤ 1 KiB) | body`.

use std::io::{self, Read, Write};
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::wire::{Direction, FrameAuth, CONNECTION_NONCE_LEN};

/// The shortest key accepted.
pub const MIN_KEY_LEN: usize = 32;
/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
const AUTH_MAGIC: [u8; 4] = *b"VMRA";
/// Largest body of a handshake message.
const MAX_BODY: usize = 1024;
const KIND_CHALLENGE: u8 = 1;
const KIND_STANDBY_PROOF: u8 = 2;
const KIND_PRIMARY_PROOF: u8 = 3;
const KIND_REFUSED: u8 = 4;
const LABEL_STANDBY: &[u8] = b"vmr replication 1: standby proof";
const LABEL_PRIMARY: &[u8] = b"vmr replication 1: primary proof";

/// Why a key cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read the key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Too short to be a key.
    #[error("the key file {path} holds {len} bytes, at least {MIN_KEY_LEN} are needed")]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// Why the handshake failed. One variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The stream failed.
    #[error("handshake I/O error: {0}")]
    Io(#[source] io::Error),
    /// The peer closed the stream during the handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// Not a vmr replication peer.
    #[error("the peer is not a vmr replication peer (bad handshake magic)")]
    BadMagic,
    /// A handshake message other than the one expected.
    #[error("unexpected handshake message {found} (expected {expected})")]
    Unexpected {
        /// The kind expected.
        expected: u8,
        /// The kind found.
        found: u8,
    },
    /// A handshake message of the wrong size.
    #[error("malformed handshake message {kind} ({len} bytes)")]
    Malformed {
        /// Its kind.
        kind: u8,
        /// Its body length.
        len: usize,
    },
    /// The peer's proof is wrong: it does not hold the shared key.
    #[error("the peer does not hold the replication key (its proof is wrong)")]
    PeerLacksKey,
    /// The peer refused us.
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    /// No random numbers.
    #[error("cannot get random bytes for the handshake: {0}")]
    Random(String),
}

/// The key both peers of a replication link hold.
#[derive(Clone)]
pub struct ReplicationKey(Vec<u8>);

impl std::fmt::Debug for ReplicationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplicationKey({} bytes)", self.0.len())
    }
}

impl ReplicationKey {
    /// A key of these bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: "(given)".into(),
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    /// The key in `path` (`--key-file`): its bytes as they are, at least [`MIN_KEY_LEN`].
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: shown,
                len: bytes.len(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %shown, "the replication key file is readable by others");
                }
            }
        }
        Ok(Self(bytes))
    }

    /// A fresh random key of `len` bytes (for `vmr` to write a key file, and for tests).
    pub fn generate(len: usize) -> Result<Self, AuthError> {
        let mut bytes = vec![0u8; len.max(MIN_KEY_LEN)];
        getrandom::fill(&mut bytes).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    fn proof(&self, label: &[u8], nonce: &[u8; CONNECTION_NONCE_LEN]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(nonce);
        mac
    }
}

/// An authenticated connection: what authenticates its frames each way.
#[derive(Debug, Clone)]
pub struct Session {
    /// `nonce_p | nonce_s`.
    pub nonce: [u8; CONNECTION_NONCE_LEN],
    /// Frames we send.
    pub send: FrameAuth,
    /// Frames we receive.
    pub recv: FrameAuth,
}

impl Session {
    fn new(key: &ReplicationKey, nonce: [u8; CONNECTION_NONCE_LEN], we: Direction) -> Self {
        let they = match we {
            Direction::ToStandby => Direction::ToPrimary,
            Direction::ToPrimary => Direction::ToStandby,
        };
        Self {
            nonce,
            send: FrameAuth::new(&key.0, &nonce, we),
            recv: FrameAuth::new(&key.0, &nonce, they),
        }
    }
}

fn io_err(e: io::Error) -> AuthError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        AuthError::Closed
    } else {
        AuthError::Io(e)
    }
}

fn write_msg<W: Write>(out: &mut W, kind: u8, body: &[&[u8]]) -> Result<(), AuthError> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let mut msg = Vec::with_capacity(7 + len);
    msg.extend_from_slice(&AUTH_MAGIC);
    msg.push(kind);
    msg.extend_from_slice(&(len.min(MAX_BODY) as u16).to_le_bytes());
    for b in body {
        msg.extend_from_slice(b);
    }
    msg.truncate(7 + MAX_BODY);
    out.write_all(&msg).map_err(AuthError::Io)?;
    out.flush().map_err(AuthError::Io)
}

/// Reads a handshake message of `kind` whose body is `N` bytes; a `Refused` becomes
/// [`AuthError::RefusedByPeer`].
fn read_msg<R: Read, const N: usize>(input: &mut R, kind: u8) -> Result<[u8; N], AuthError> {
    let mut head = [0u8; 7];
    input.read_exact(&mut head).map_err(io_err)?;
    if head[..4] != AUTH_MAGIC {
        return Err(AuthError::BadMagic);
    }
    let len = usize::from(u16::from_le_bytes([head[5], head[6]]));
    if len > MAX_BODY {
        return Err(AuthError::Malformed { kind: head[4], len });
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).map_err(io_err)?;
    match head[4] {
        KIND_REFUSED => Err(AuthError::RefusedByPeer(
            String::from_utf8_lossy(&body)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        )),
        k if k != kind => Err(AuthError::Unexpected {
            expected: kind,
            found: k,
        }),
        k => body
            .try_into()
            .map_err(|_| AuthError::Malformed { kind: k, len }),
    }
}

/// Tells the peer why we give up (best effort: the connection is failing anyway).
fn refuse<W: Write>(out: &mut W, reason: &str) {
    if let Err(e) = write_msg(out, KIND_REFUSED, &[reason.as_bytes()]) {
        tracing::debug!("cannot send the handshake refusal: {e}");
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

fn join(p: &[u8; NONCE_LEN], s: &[u8; NONCE_LEN]) -> [u8; CONNECTION_NONCE_LEN] {
    let mut n = [0u8; CONNECTION_NONCE_LEN];
    n[..NONCE_LEN].copy_from_slice(p);
    n[NONCE_LEN..].copy_from_slice(s);
    n
}

/// The primary's side of the handshake.
pub fn authenticate_primary<R: Read, W: Write>(
    input: &mut R,
    output: &mut W,
    key: &ReplicationKey,
) -> Result<Session, AuthError> {
    let nonce_p = nonce()?;
    write_msg(output, KIND_CHALLENGE, &[&nonce_p])?;
    let body: [u8; NONCE_LEN + 32] = read_msg(input, KIND_STANDBY_PROOF)?;
    let nonce_s: [u8; NONCE_LEN] = body[..NONCE_LEN].try_into().expect("32 bytes");
    let nonce = join(&nonce_p, &nonce_s);
    if key
        .proof(LABEL_STANDBY, &nonce)
        .verify_slice(&body[NONCE_LEN..])
        .is_err()
    {
        refuse(
            output,
            "the primary refused this standby: its proof of the replication key is wrong (key files differ)",
        );
        tracing::debug!("refused a standby that does not hold the replication key");
        return Err(AuthError::PeerLacksKey);
    }
    let proof = key.proof(LABEL_PRIMARY, &nonce).finalize().into_bytes();
    write_msg(output, KIND_PRIMARY_PROOF, &[&proof])?;
    Ok(Session::new(key, nonce, Direction::ToStandby))
}

/// The standby's side of the handshake.
pub fn authenticate_standby<R: Read, W: Write>(
    input: &mut R,
    output: &mut W,
    key: &ReplicationKey,
) -> Result<Session, AuthError> {
    let nonce_p: [u8; NONCE_LEN] = read_msg(input, KIND_CHALLENGE)?;
    let nonce_s = nonce()?;
    let nonce = join(&nonce_p, &nonce_s);
    let proof = key.proof(LABEL_STANDBY, &nonce).finalize().into_bytes();
    write_msg(output, KIND_STANDBY_PROOF, &[&nonce_s, &proof])?;
    let theirs: [u8; 32] = read_msg(input, KIND_PRIMARY_PROOF)?;
    if key
        .proof(LABEL_PRIMARY, &nonce)
        .verify_slice(&theirs)
        .is_err()
    {
        refuse(
            output,
            "the standby refused this primary: its proof of the replication key is wrong (key files differ)",
        );
        tracing::debug!("refused a primary that does not hold the replication key");
        return Err(AuthError::PeerLacksKey);
    }
    Ok(Session::new(key, nonce, Direction::ToPrimary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn key(b: u8) -> ReplicationKey {
        ReplicationKey::new(vec![b; 32]).unwrap()
    }

    fn pair(
        kp: ReplicationKey,
        ks: ReplicationKey,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let (a, b) = UnixStream::pair().unwrap();
        let standby = std::thread::spawn(move || authenticate_standby(&mut &b, &mut &b, &ks));
        let primary = authenticate_primary(&mut &a, &mut &a, &kp);
        drop(a);
        (primary, standby.join().unwrap())
    }

    #[test]
    fn peers_with_the_key_agree_on_a_session() {
        let (p, s) = pair(key(1), key(1));
        let (p, s) = (p.unwrap(), s.unwrap());
        assert_eq!(p.nonce, s.nonce);
        let (p2, _) = pair(key(1), key(1));
        assert_ne!(p.nonce, p2.unwrap().nonce, "fresh nonces per connection");
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_ends() {
        let (p, s) = pair(key(1), key(2));
        let p = p.unwrap_err();
        let s = s.unwrap_err();
        assert!(matches!(p, AuthError::PeerLacksKey), "{p}");
        assert!(matches!(s, AuthError::RefusedByPeer(_)), "{s}");
        assert!(s.to_string().contains("key files differ"), "{s}");
        assert!(!s.to_string().contains('\n'));
    }

    #[test]
    fn a_primary_replaying_a_proof_is_refused() {
        // A primary without the key answers with garbage (here: the standby's own proof
        // reflected back).
        let (a, b) = UnixStream::pair().unwrap();
        let ks = key(3);
        let standby = std::thread::spawn(move || authenticate_standby(&mut &b, &mut &b, &ks));
        let mut a_ref = &a;
        write_msg(&mut a_ref, KIND_CHALLENGE, &[&[0u8; 32]]).unwrap();
        let body: [u8; 64] = read_msg(&mut a_ref, KIND_STANDBY_PROOF).unwrap();
        write_msg(&mut a_ref, KIND_PRIMARY_PROOF, &[&body[32..]]).unwrap();
        let err = standby.join().unwrap().unwrap_err();
        assert!(matches!(err, AuthError::PeerLacksKey), "{err}");
        let refused = read_msg::<_, 32>(&mut a_ref, KIND_PRIMARY_PROOF).unwrap_err();
        assert!(matches!(refused, AuthError::RefusedByPeer(_)), "{refused}");
    }

    #[test]
    fn not_a_peer_and_short_keys_are_refused() {
        let mut junk: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let err = authenticate_standby(&mut junk, &mut Vec::new(), &key(1)).unwrap_err();
        assert!(matches!(err, AuthError::BadMagic), "{err}");
        let mut empty: &[u8] = b"";
        let err = authenticate_standby(&mut empty, &mut Vec::new(), &key(1)).unwrap_err();
        assert!(matches!(err, AuthError::Closed), "{err}");
        assert!(matches!(
            ReplicationKey::new(vec![1; 31]),
            Err(KeyError::TooShort { len: 31, .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, [5u8; 40]).unwrap();
        assert_eq!(ReplicationKey::from_file(&path).unwrap().0.len(), 40);
        std::fs::write(&path, b"short").unwrap();
        assert!(ReplicationKey::from_file(&path).is_err());
        assert!(ReplicationKey::from_file(&dir.path().join("none")).is_err());
        assert_eq!(ReplicationKey::generate(0).unwrap().0.len(), MIN_KEY_LEN);
    }
}
