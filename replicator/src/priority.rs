//! Thread priorities of replication: bulk copies done beside the epochs (a joining standby's
//! copy of memory) run after the guest's vCPUs and the epoch loop where they share CPUs.
//!
//! The epoch loop itself keeps the default priority: at nice -5 in the emulated lab (one CPU)
//! it took 50-70 epochs a second instead of 15-20, the booting guest slowed down, and its
//! standby still saw it silent for over 600 ms.

/// The nice value of bulk copies done beside the epochs (a joining standby's copy of memory).
pub const BULK_NICE: libc::c_int = 4;

/// Sets the calling thread's nice value to `nice`; says so at debug level if it cannot (a
/// negative value needs privilege: without it the thread keeps its priority).
pub fn set_nice(nice: libc::c_int) {
    // SAFETY: sets the nice value of the calling thread (on Linux, PRIO_PROCESS with `who` 0 is
    // the calling thread alone: nice is per thread); no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!(
            nice,
            "cannot set the thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
