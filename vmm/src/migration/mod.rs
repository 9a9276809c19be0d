//! Live migration: the wire protocol (shared with replication), the sending side (iterative
//! pre-copy from the dirty log, then stop-and-copy) and the receiving side (`vmr receive`).

pub mod destination;
pub mod source;
pub mod wire;

use std::fmt::Write as _;
use std::sync::mpsc;
use std::time::Duration;

use crate::vstate::memory::{PageMap, PAGE_SIZE};

/// Environment variable naming a file prefix: when set, each side of a migration writes the
/// CRC32 of every guest page, as it stands at the switch-over, to `<prefix>.<side>`, one
/// `page crc` line each; the two files must be identical (a diagnostic for missed pages).
pub const DIGEST_ENV: &str = "VMR_MIGRATION_DIGEST";

/// Writes the page digest of `map` for `side` if [`DIGEST_ENV`] asks for it.
pub(crate) fn write_page_digest(map: &PageMap<'_>, side: &str) {
    let Some(prefix) = std::env::var_os(DIGEST_ENV) else {
        return;
    };
    let mut path = std::path::PathBuf::from(prefix).into_os_string();
    path.push(format!(".{side}"));
    let mut out = String::with_capacity(map.pages() as usize * 16);
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in 0..map.pages() {
        if let Some(slice) = map.page(page) {
            slice.copy_to(&mut buf[..]);
            let _ = writeln!(out, "{page:x} {:08x}", crc32fast::hash(&buf));
        }
    }
    if let Err(e) = std::fs::write(&path, out) {
        tracing::warn!("cannot write the page digest to {path:?}: {e}");
    }
}

/// Keeps the source of a migration out of the way of the moved guest, which may share this
/// host's CPUs: once the destination acknowledged, every thread of the process runs at
/// `SCHED_IDLE` (only on CPU time nothing else wants) for a grace period, then goes back to
/// normal, so that a busy guest does not starve the answer to the API and the exit. The thread
/// that ends the grace is made ahead, out of the pause.
pub(crate) struct CpuYield {
    /// Tells the thread made in [`CpuYield::prepare`] how long to wait before it ends the
    /// yield; `None` if it could not be made (then nothing yields).
    restore: Option<mpsc::Sender<Duration>>,
}

impl CpuYield {
    /// Makes the thread that will end the yield, while this one still runs at the normal
    /// policy (threads inherit their maker's).
    pub(crate) fn prepare() -> Self {
        let (tx, rx) = mpsc::channel::<Duration>();
        let spawned = std::thread::Builder::new()
            .name("cpu-yield".into())
            .spawn(move || {
                // Disconnected without a word: the migration did not get that far.
                if let Ok(grace) = rx.recv() {
                    std::thread::sleep(grace);
                    set_policy(process_threads(), libc::SCHED_OTHER);
                }
            });
        Self {
            restore: spawned.is_ok().then_some(tx),
        }
    }

    /// The guest moved: every thread gives way for `grace`, then goes back to normal.
    pub(crate) fn moved(&mut self, grace: Duration) {
        if let Some(restore) = self.restore.take() {
            // This thread first, in one call: the Ack woke it, and it would otherwise keep
            // the CPU from the destination for as long as the rest takes (traced: 3.6 ms).
            set_policy([0], libc::SCHED_IDLE);
            // A thread that makes itself SCHED_IDLE keeps the CPU until the next tick (its
            // priority does not change): give it up now.
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
            set_policy(process_threads(), libc::SCHED_IDLE);
            if restore.send(grace).is_err() {
                set_policy(process_threads(), libc::SCHED_OTHER);
            }
        }
    }
}

/// The thread ids of this process.
fn process_threads() -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Sets the scheduling policy of the threads `tids` (0: the calling thread).
fn set_policy(tids: impl IntoIterator<Item = libc::pid_t>, policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    for tid in tids {
        // SAFETY: changes the scheduling policy of one of this process's threads; `param` is a
        // valid sched_param for SCHED_IDLE and SCHED_OTHER (priority 0).
        if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
            tracing::debug!(tid, policy, "cannot change a thread's scheduling policy");
        }
    }
}

/// Puts the calling thread, whose work is done, at idle priority for what it has left (its
/// exit): it then runs only when nothing else wants the CPU.
pub(crate) fn give_way_for_good() {
    set_policy([0], libc::SCHED_IDLE);
}

/// The nice value of the threads that copy guest memory while the guest runs (the source's
/// pre-copy, the destination's receiver until `Commit`): where they share CPUs with the guest,
/// it gets more of them than an equal share. Measured in the lab (one CPU shared by a 2-vCPU
/// guest under load and both ends): see the README's migration benchmark.
pub const PRECOPY_NICE: libc::c_int = 4;

/// Has the calling thread give way to the guest: nice [`PRECOPY_NICE`]. Threads only get nicer
/// without privilege, so only threads that do nothing else afterwards call this.
pub(crate) fn yield_to_guest() {
    // SAFETY: sets the nice value of the calling thread (on Linux, PRIO_PROCESS with `who` 0 is
    // the calling thread alone: nice is per thread); no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PRECOPY_NICE) } != 0 {
        tracing::debug!(
            "cannot lower the migration thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
