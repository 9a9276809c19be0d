//! What a VM needs of a standby, what a standby holds, and whether the two fit.
//!
//! The primary describes its VM in [`Hello`]; the standby describes itself in a
//! [`StandbyProfile`] and answers with [`HelloAck`] or refuses with the one-line reason of an
//! [`Incompatibility`].

use serde::{Deserialize, Serialize};

/// The protocol version: a standby refuses another major version and accepts any minor one
/// (a minor version only adds what older peers may ignore), so that hosts can be upgraded one
/// by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incompatible changes.
    pub major: u16,
    /// Compatible additions.
    pub minor: u16,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The protocol this build speaks. 1.1: `Protected { through }`. 1.2: `Join` (a standby
/// joining a protected VM); the machine's state ends with the devices' additions
/// (`vmm::devices::DevicesState`): virtio-net's pending announce. 1.3: `DiskSync` (the copy
/// of a disk to a joining standby).
pub const PROTOCOL: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };

/// Largest TSC frequency difference a pair may have when the host cannot scale the TSC
/// (DESIGN.md §5), in parts per million.
pub const MAX_TSC_PPM: u64 = 250;

/// A device of the VM, as the pairing compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// Its kind ("net", "block", "serial", ...).
    pub kind: String,
    /// Its id in the VM's configuration.
    pub id: String,
}

impl std::fmt::Display for DeviceDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.id)
    }
}

/// The primary's first message: the VM to protect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The primary's protocol version.
    pub protocol: ProtocolVersion,
    /// The protected VM.
    pub vm_id: String,
    /// The primary's term (fencing token of the failover work).
    pub term: u64,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The VM's TSC frequency.
    pub tsc_khz: u32,
    /// CPU features the guest may use (names), which the standby's host must offer.
    pub cpu_features: Vec<String>,
    /// The VM's devices, in order.
    pub devices: Vec<DeviceDesc>,
    /// Sizes of the VM's disks in bytes, in order.
    pub disk_sizes: Vec<u64>,
}

/// What a standby holds: the VM it was set up for and its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyProfile {
    /// Guest RAM the standby holds, in bytes.
    pub mem_bytes: u64,
    /// vCPUs the standby's VM has.
    pub vcpus: u8,
    /// The standby host's TSC frequency.
    pub tsc_khz: u32,
    /// Whether the standby's host can scale the guest's TSC (then frequencies may differ).
    pub tsc_scaling: bool,
    /// CPU features the standby's host offers.
    pub cpu_features: Vec<String>,
    /// The standby VM's devices, in order.
    pub devices: Vec<DeviceDesc>,
    /// Sizes of the standby's disk images, in order.
    pub disk_sizes: Vec<u64>,
}

/// The standby's answer to a [`Hello`] it can hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The standby's protocol version.
    pub protocol: ProtocolVersion,
    /// The last epoch the standby committed (0: none).
    pub committed_epoch: u64,
    /// The term of that epoch.
    pub committed_term: u64,
    /// What the standby holds.
    pub profile: StandbyProfile,
}

/// Why a standby cannot hold a VM. Its `Display` is the one-line reason both ends log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatibility {
    /// Another major protocol version.
    #[error(
        "protocol {primary} is incompatible with the standby's {standby} (major versions differ)"
    )]
    Protocol {
        /// The primary's.
        primary: ProtocolVersion,
        /// The standby's.
        standby: ProtocolVersion,
    },
    /// Another memory size.
    #[error("the VM has {primary} bytes of memory, the standby holds {standby}")]
    MemorySize {
        /// The VM's.
        primary: u64,
        /// The standby's.
        standby: u64,
    },
    /// Another vCPU count.
    #[error("the VM has {primary} vCPUs, the standby {standby}")]
    Vcpus {
        /// The VM's.
        primary: u8,
        /// The standby's.
        standby: u8,
    },
    /// TSC frequencies too far apart for a host that cannot scale the TSC.
    #[error("TSC frequencies differ by {ppm} ppm (VM {primary} kHz, standby {standby} kHz; at most {MAX_TSC_PPM} ppm without TSC scaling)")]
    TscKhz {
        /// The VM's.
        primary: u32,
        /// The standby's.
        standby: u32,
        /// The difference in parts per million of the VM's.
        ppm: u64,
    },
    /// CPU features the VM uses that the standby's host lacks.
    #[error("the standby's CPU lacks features the VM uses: {}", .missing.join(", "))]
    CpuFeatures {
        /// Those features.
        missing: Vec<String>,
    },
    /// Other devices.
    #[error("device lists differ: VM [{}], standby [{}]", list(.primary), list(.standby))]
    Devices {
        /// The VM's.
        primary: Vec<DeviceDesc>,
        /// The standby's.
        standby: Vec<DeviceDesc>,
    },
    /// Another number of disks.
    #[error("the VM has {primary} disks, the standby {standby}")]
    DiskCount {
        /// The VM's.
        primary: usize,
        /// The standby's.
        standby: usize,
    },
    /// A disk of another size.
    #[error("disk {index} is {primary} bytes on the VM, {standby} on the standby")]
    DiskSize {
        /// Which disk.
        index: usize,
        /// The VM's.
        primary: u64,
        /// The standby's.
        standby: u64,
    },
}

fn list(devices: &[DeviceDesc]) -> String {
    devices
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Difference of `a` from `reference` in parts per million (rounded up).
fn ppm(a: u32, reference: u32) -> u64 {
    let diff = u64::from(a.abs_diff(reference)) * 1_000_000;
    diff.div_ceil(u64::from(reference).max(1))
}

impl StandbyProfile {
    /// Whether this standby can hold the VM of `hello` (speaking `standby_protocol`); the
    /// first misfit found otherwise.
    pub fn check(
        &self,
        hello: &Hello,
        standby_protocol: ProtocolVersion,
    ) -> Result<(), Incompatibility> {
        if hello.protocol.major != standby_protocol.major {
            return Err(Incompatibility::Protocol {
                primary: hello.protocol,
                standby: standby_protocol,
            });
        }
        if hello.mem_bytes != self.mem_bytes {
            return Err(Incompatibility::MemorySize {
                primary: hello.mem_bytes,
                standby: self.mem_bytes,
            });
        }
        if hello.vcpus != self.vcpus {
            return Err(Incompatibility::Vcpus {
                primary: hello.vcpus,
                standby: self.vcpus,
            });
        }
        let ppm = ppm(self.tsc_khz, hello.tsc_khz);
        if !self.tsc_scaling && ppm > MAX_TSC_PPM {
            return Err(Incompatibility::TscKhz {
                primary: hello.tsc_khz,
                standby: self.tsc_khz,
                ppm,
            });
        }
        let missing: Vec<String> = hello
            .cpu_features
            .iter()
            .filter(|f| !self.cpu_features.contains(f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Incompatibility::CpuFeatures { missing });
        }
        if hello.devices != self.devices {
            return Err(Incompatibility::Devices {
                primary: hello.devices.clone(),
                standby: self.devices.clone(),
            });
        }
        if hello.disk_sizes.len() != self.disk_sizes.len() {
            return Err(Incompatibility::DiskCount {
                primary: hello.disk_sizes.len(),
                standby: self.disk_sizes.len(),
            });
        }
        for (index, (&primary, &standby)) in
            hello.disk_sizes.iter().zip(&self.disk_sizes).enumerate()
        {
            if primary != standby {
                return Err(Incompatibility::DiskSize {
                    index,
                    primary,
                    standby,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL,
            vm_id: "vm-1".into(),
            term: 2,
            mem_bytes: 64 << 20,
            vcpus: 2,
            tsc_khz: 2_000_000,
            cpu_features: vec!["sse4.2".into(), "avx2".into()],
            devices: vec![
                DeviceDesc {
                    kind: "net".into(),
                    id: "net0".into(),
                },
                DeviceDesc {
                    kind: "block".into(),
                    id: "root".into(),
                },
            ],
            disk_sizes: vec![1 << 20],
        }
    }

    pub(crate) fn profile() -> StandbyProfile {
        let h = hello();
        StandbyProfile {
            mem_bytes: h.mem_bytes,
            vcpus: h.vcpus,
            tsc_khz: h.tsc_khz,
            tsc_scaling: false,
            cpu_features: vec!["avx2".into(), "sse4.2".into(), "avx512f".into()],
            devices: h.devices,
            disk_sizes: h.disk_sizes,
        }
    }

    fn refusal(edit: impl FnOnce(&mut Hello, &mut StandbyProfile)) -> Incompatibility {
        let (mut h, mut p) = (hello(), profile());
        edit(&mut h, &mut p);
        let err = p.check(&h, PROTOCOL).unwrap_err();
        assert!(!err.to_string().contains('\n'), "one line: {err}");
        err
    }

    #[test]
    fn a_fitting_standby_is_accepted_and_a_minor_version_ahead_too() {
        profile().check(&hello(), PROTOCOL).unwrap();
        let ahead = ProtocolVersion {
            major: PROTOCOL.major,
            minor: PROTOCOL.minor + 1,
        };
        profile().check(&hello(), ahead).unwrap();
        // 250 ppm of 2 GHz is 500 kHz.
        let mut p = profile();
        p.tsc_khz += 500;
        p.check(&hello(), PROTOCOL).unwrap();
        p.tsc_khz = 1_000_000;
        p.tsc_scaling = true;
        p.check(&hello(), PROTOCOL).unwrap();
    }

    #[test]
    fn each_misfit_is_refused_with_its_reason() {
        let err = refusal(|h, _| h.protocol.major += 1);
        assert!(matches!(err, Incompatibility::Protocol { .. }), "{err}");
        assert!(err.to_string().contains("major"), "{err}");
        let err = refusal(|_, p| p.mem_bytes /= 2);
        assert!(matches!(err, Incompatibility::MemorySize { .. }), "{err}");
        let err = refusal(|_, p| p.vcpus = 1);
        assert_eq!(
            err,
            Incompatibility::Vcpus {
                primary: 2,
                standby: 1
            }
        );
        let err = refusal(|_, p| p.tsc_khz += 501);
        assert!(
            matches!(err, Incompatibility::TscKhz { ppm: 251, .. }),
            "{err}"
        );
        let err = refusal(|_, p| p.tsc_khz -= 600);
        assert!(matches!(err, Incompatibility::TscKhz { .. }), "{err}");
        let err = refusal(|_, p| p.cpu_features.retain(|f| f != "avx2"));
        assert_eq!(
            err.to_string(),
            "the standby's CPU lacks features the VM uses: avx2"
        );
        let err = refusal(|_, p| {
            p.devices.pop();
        });
        assert_eq!(
            err.to_string(),
            "device lists differ: VM [net:net0, block:root], standby [net:net0]"
        );
        let err = refusal(|_, p| p.disk_sizes.push(5));
        assert!(matches!(err, Incompatibility::DiskCount { .. }), "{err}");
        let err = refusal(|_, p| p.disk_sizes[0] += 512);
        assert!(
            matches!(err, Incompatibility::DiskSize { index: 0, .. }),
            "{err}"
        );
    }
}
