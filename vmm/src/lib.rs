//! vmr's minimal KVM virtual machine monitor: boots a Linux microVM (bzImage or ELF vmlinux)
//! with a serial console, an i8042 for reset, and virtio-mmio block and network devices.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod epoch;
pub mod health;
pub mod hostcheck;
pub mod loader;
pub mod microvm;
pub mod migration;
pub mod persist;
pub mod prefault;
pub mod snapshot;
pub mod version;
pub mod vstate;
