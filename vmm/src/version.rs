//! Versions of the formats vmr writes and reads (the wire protocol, the snapshot state file):
//! `major.minor`. A reader accepts the same major and any minor: a minor version only adds
//! what an older reader may ignore (fields at the end of a payload, flag bits it leaves
//! clear, message kinds it is not sent); anything else takes a new major, which readers of
//! another major refuse, naming both versions.

use serde::{Deserialize, Serialize};

/// A format's `major.minor` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FormatVersion {
    /// Changes whenever an older reader would misread the format.
    pub major: u16,
    /// Changes for additions an older reader of the same major may ignore.
    pub minor: u16,
}

impl FormatVersion {
    /// Version `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }

    /// Whether a reader of this version understands `found` (same major).
    pub fn reads(self, found: FormatVersion) -> bool {
        self.major == found.major
    }
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_major_version_must_match() {
        let v = FormatVersion::new(3, 1);
        assert!(v.reads(FormatVersion::new(3, 0)));
        assert!(v.reads(FormatVersion::new(3, 9)));
        assert!(!v.reads(FormatVersion::new(2, 1)));
        assert!(!v.reads(FormatVersion::new(4, 0)));
        assert_eq!(v.to_string(), "3.1");
    }
}
