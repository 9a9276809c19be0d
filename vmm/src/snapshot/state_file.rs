//! The snapshot's state file: a fixed header (magic, format version, payload length, CRC32 of
//! the payload, CRC32 of the header) followed by the postcard encoding of the state.
//!
//! The version is `major.minor` ([`crate::version`]): a file of the same major and any minor
//! is read. Files written before the version had two parts held `1` as a LE u32 at offset 8,
//! which reads as 1.0.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VMRSNAP\0"
//!      8     2  format major version (LE u16)
//!     10     2  format minor version (LE u16)
//!     12     4  flags (LE u32, 0)
//!     16     8  payload length (LE u64)
//!     24     4  CRC32 of the payload (LE u32)
//!     28     4  CRC32 of bytes 0..28 (LE u32)
//!     32     -  payload
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::version::FormatVersion;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"VMRSNAP\0";
/// The format this build writes; it reads every minor version of its major.
///
/// 1.1: the devices' state ends with additions (`DevicesState`), the first of them whether a
/// virtio-net device waits for its driver's announce acknowledgement.
pub const FORMAT_VERSION: FormatVersion = FormatVersion::new(1, 1);
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest payload we accept (the state of a VM is a few hundred KiB).
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file ends inside the header or the payload.
    #[error("{path} is truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its header announces (or the header's).
        expected: u64,
    },
    /// Not a vmr state file.
    #[error("{0} is not a vmr snapshot state file (bad magic)")]
    BadMagic(PathBuf),
    /// The header itself is corrupt.
    #[error("{0}: the header is corrupt (checksum mismatch)")]
    HeaderChecksum(PathBuf),
    /// Written in a format of another major version, which this build does not read.
    #[error(
        "{path}: snapshot format version {found}, this vmr reads version {}.x (it writes \
         {FORMAT_VERSION})",
        FORMAT_VERSION.major
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: FormatVersion,
    },
    /// The payload is larger than any state.
    #[error("{path}: payload of {len} bytes is implausibly large")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The announced length.
        len: u64,
    },
    /// The payload does not match its checksum.
    #[error("{path}: the state is corrupt (checksum {found:#010x}, expected {expected:#010x})")]
    PayloadChecksum {
        /// The file.
        path: PathBuf,
        /// The computed CRC32.
        found: u32,
        /// The stored CRC32.
        expected: u32,
    },
    /// The state cannot be encoded.
    #[error("cannot encode the state: {0}")]
    Encode(postcard::Error),
    /// The payload checks out but does not decode as a state.
    #[error("{path}: the state does not decode: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: postcard::Error,
    },
}

fn header(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.major.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_VERSION.minor.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Writes `state` to `path` (created or truncated) and syncs it.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<u64, StateFileError> {
    let payload = postcard::to_stdvec(state).map_err(StateFileError::Encode)?;
    let write_err = |source| StateFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::create(path).map_err(|source| StateFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    file.write_all(&header(&payload)).map_err(write_err)?;
    file.write_all(&payload).map_err(write_err)?;
    file.sync_data().map_err(write_err)?;
    Ok((HEADER_LEN + payload.len()) as u64)
}

/// Reads and checks the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let p = || path.to_path_buf();
    let mut file = File::open(path).map_err(|source| StateFileError::Open { path: p(), source })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| StateFileError::Read { path: p(), source })?;
    decode(path, &bytes)
}

/// Checks and decodes the bytes of a state file (`path` names it in errors).
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateFileError> {
    let p = || path.to_path_buf();
    if bytes.len() < HEADER_LEN {
        if !MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
            return Err(StateFileError::BadMagic(p()));
        }
        return Err(StateFileError::Truncated {
            path: p(),
            len: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let h = &bytes[..HEADER_LEN];
    if h[0..8] != MAGIC {
        return Err(StateFileError::BadMagic(p()));
    }
    if crc32fast::hash(&h[..28]) != le32(&h[28..32]) {
        return Err(StateFileError::HeaderChecksum(p()));
    }
    let version = FormatVersion::new(
        u16::from_le_bytes([h[8], h[9]]),
        u16::from_le_bytes([h[10], h[11]]),
    );
    if !FORMAT_VERSION.reads(version) {
        return Err(StateFileError::Version {
            path: p(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(StateFileError::TooLarge { path: p(), len });
    }
    let payload = &bytes[HEADER_LEN..];
    if (payload.len() as u64) < len {
        return Err(StateFileError::Truncated {
            path: p(),
            len: bytes.len() as u64,
            expected: HEADER_LEN as u64 + len,
        });
    }
    let payload = &payload[..len as usize];
    let found = crc32fast::hash(payload);
    let expected = le32(&h[24..28]);
    if found != expected {
        return Err(StateFileError::PayloadChecksum {
            path: p(),
            found,
            expected,
        });
    }
    postcard::from_bytes(payload).map_err(|source| StateFileError::Decode { path: p(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Demo {
        name: String,
        values: Vec<u64>,
    }

    fn demo() -> Demo {
        Demo {
            name: "vm".into(),
            values: (0..100).collect(),
        }
    }

    fn encoded() -> Vec<u8> {
        let payload = postcard::to_stdvec(&demo()).unwrap();
        let mut bytes = header(&payload).to_vec();
        bytes.extend_from_slice(&payload);
        bytes
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write(&path, &demo()).unwrap();
        assert_eq!(read::<Demo>(&path).unwrap(), demo());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encoded();
        for len in 0..bytes.len() {
            let err = decode::<Demo>(Path::new("s"), &bytes[..len]).unwrap_err();
            assert!(
                matches!(err, StateFileError::Truncated { .. }),
                "length {len}: {err}"
            );
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let bytes = encoded();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode::<Demo>(Path::new("s"), &b).is_err(),
                "flipping bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn other_versions_and_files_are_named() {
        let mut b = encoded();
        b[8] = 2;
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        let err = decode::<Demo>(Path::new("s"), &b).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        let err =
            decode::<Demo>(Path::new("s"), b"#!/bin/sh\necho not a snapshot\n......").unwrap_err();
        assert!(matches!(err, StateFileError::BadMagic(_)), "{err}");
    }

    /// `encoded()` with the version field (bytes 8..12: major, minor as LE u16s) set.
    fn with_version(major: u16, minor: u16) -> Vec<u8> {
        let mut b = encoded();
        b[8..10].copy_from_slice(&major.to_le_bytes());
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn a_file_of_the_same_major_and_another_minor_version_is_read() {
        let major = u16::from_le_bytes([encoded()[8], encoded()[9]]);
        let minor = u16::from_le_bytes([encoded()[10], encoded()[11]]);
        for other in [minor + 1, minor + 9] {
            let read = decode::<Demo>(Path::new("s"), &with_version(major, other));
            assert!(read.is_ok(), "version {major}.{other} refused: {read:?}");
            assert_eq!(read.unwrap(), demo());
        }
        let err = decode::<Demo>(Path::new("s"), &with_version(major - 1, 3)).unwrap_err();
        let reason = err.to_string();
        assert!(
            reason.contains(&format!("{}.3", major - 1))
                && reason.contains(&format!("{major}.{minor}"))
                && !reason.contains('\n'),
            "{reason}"
        );
    }
}
