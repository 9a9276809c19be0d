//! Live migration: the wire protocol (shared with replication), the sending side (iterative
//! pre-copy from the dirty log, then stop-and-copy) and the receiving side (`vmr receive`).

pub mod destination;
pub mod source;
pub mod wire;

use std::fmt::Write as _;
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

/// Moves every thread of this process to `SCHED_IDLE` for `grace`, then back to the normal
/// policy: meanwhile it runs only on CPU time nothing else wants (a guest that just moved to
/// a destination on the same host starts first), and afterwards it is not starved by a busy
/// one (its API answer and its exit stay prompt).
pub(crate) fn yield_cpu_for(grace: Duration) {
    // The thread that ends the yield is made before it: threads inherit their maker's policy.
    let restore = std::thread::Builder::new()
        .name("cpu-yield".into())
        .spawn(move || {
            std::thread::sleep(grace);
            set_policy(libc::SCHED_OTHER);
        });
    if restore.is_ok() {
        set_policy(libc::SCHED_IDLE);
    }
}

/// Sets the scheduling policy of every thread of this process.
fn set_policy(policy: libc::c_int) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let param = libc::sched_param { sched_priority: 0 };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
    {
        // SAFETY: changes the scheduling policy of one of this process's threads; `param` is a
        // valid sched_param for SCHED_IDLE and SCHED_OTHER (priority 0).
        if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
            tracing::debug!(tid, policy, "cannot change a thread's scheduling policy");
        }
    }
}
