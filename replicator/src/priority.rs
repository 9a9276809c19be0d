//! Thread priorities of replication: the threads that keep the link alive (the primary's epoch
//! loop, the standby's reader of epochs) run before the guest's vCPUs where they share CPUs, so
//! that a busy guest does not make its primary look silent; a joining standby's copy of memory
//! runs after them.

/// The nice value of the threads the heartbeat depends on. In the emulated lab (one CPU for
/// the guest's vCPUs, the primary, its standbys and the clients), a guest booting kept the
/// primary's epoch loop off the CPU for over 600 ms now and then: its standbys took it for
/// lost.
pub const LINK_NICE: libc::c_int = -5;

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
