//! The guest's MAC address.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A MAC address, written `06:00:ac:10:00:02`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 06:00:ac:10:00:02")]
pub struct ParseMacError(pub String);

impl MacAddr {
    /// A random unicast, locally administered address (first byte `x2`, `x6`, `xa` or `xe`).
    pub fn random() -> MacAddr {
        let mut bytes = [0u8; 6];
        // SAFETY: `bytes` is valid for writes of its length; getrandom writes at most that.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if got != bytes.len() as isize {
            // No getrandom (very old kernel): the std hasher's random keys will do for a MAC.
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            bytes.copy_from_slice(&h.finish().to_le_bytes()[..6]);
        }
        bytes[0] = (bytes[0] & !0x01) | 0x02;
        MacAddr(bytes)
    }

    /// The six bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether this is a unicast address (a NIC's own address must be).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// Whether the locally administered bit is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(bytes: [u8; 6]) -> Self {
        MacAddr(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseMacError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac, MacAddr([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00",
            "06:00:ac:10:00:02:03",
            "6:0:ac:10:0:2",
            "zz:00:00:00:00:00",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(ParseMacError(bad.to_string())));
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random();
        let b = MacAddr::random();
        assert!(a.is_unicast() && a.is_local());
        assert!(b.is_unicast() && b.is_local());
        assert_ne!(a, b);
        assert!(!MacAddr([1, 0, 0x5e, 0, 0, 1]).is_unicast());
    }
}
