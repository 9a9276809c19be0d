//! Live migration: the wire protocol (shared with replication), the sending side (iterative
//! pre-copy from the dirty log, then stop-and-copy) and the receiving side (`vmr receive`).

pub mod destination;
pub mod source;
pub mod wire;

use std::fmt::Write as _;

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

/// Moves every thread of this process to `SCHED_IDLE`: from here on it runs only on CPU time
/// nothing else wants.
pub(crate) fn yield_cpu() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let param = libc::sched_param { sched_priority: 0 };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
    {
        // SAFETY: changes the scheduling policy of one of this process's threads; `param` is a
        // valid sched_param for SCHED_IDLE (priority 0).
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
            tracing::debug!(tid, "cannot move a thread to SCHED_IDLE");
        }
    }
}
