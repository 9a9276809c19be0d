//! Benchmarks.

pub mod boot;
pub mod proc;
