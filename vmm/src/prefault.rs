//! Bringing this process's own code into memory ahead of a switch-over.
//!
//! The code that saves a VM at the source of a migration and the code that restores it at the
//! destination runs for the first time while the guest is stopped. Each first touch of one of
//! its pages is a page fault, and where the binary is not in the page cache (a cold host, or a
//! network file system) a read from disk, with the guest waiting. Populating every
//! file-backed mapping of the process beforehand moves that work out of the pause.

use std::time::Instant;

/// One mapping of a file, from `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMapping {
    start: usize,
    end: usize,
}

/// The readable mappings of the files this process runs code from (its binary and libraries,
/// each mapped with execute permission somewhere) listed in `maps`, the text of
/// `/proc/self/maps`. Guest memory, however it is mapped, is never executable here.
fn code_file_mappings(maps: &str) -> Vec<FileMapping> {
    let entries: Vec<(FileMapping, &str, &str)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // offset, device, inode, then the path: a file has an absolute one.
            let path = fields.nth(3)?;
            let (start, end) = range.split_once('-')?;
            let mapping = FileMapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
            };
            (path.starts_with('/') && mapping.end > mapping.start).then_some((mapping, perms, path))
        })
        .collect();
    let code_files: Vec<&str> = entries
        .iter()
        .filter(|(_, perms, _)| perms.contains('x'))
        .map(|(_, _, path)| *path)
        .collect();
    entries
        .into_iter()
        .filter(|(_, perms, path)| perms.starts_with('r') && code_files.contains(path))
        .map(|(mapping, _, _)| mapping)
        .collect()
}

/// Populates the page tables of every readable file-backed mapping of this process (its
/// binary and libraries), reading what is not in the page cache. Best effort: a kernel without
/// `MADV_POPULATE_READ` (before 5.14) gets `MADV_WILLNEED`, which at least reads the files in.
pub fn own_code() {
    let t0 = Instant::now();
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => maps,
        Err(e) => {
            tracing::debug!("cannot read /proc/self/maps: {e}");
            return;
        }
    };
    let mappings = code_file_mappings(&maps);
    let mut bytes = 0;
    for m in &mappings {
        let len = m.end - m.start;
        // SAFETY: `start..end` is a mapping of this process as the kernel listed it; these
        // advices only fault pages in (populate) or start reading them (willneed), neither
        // changes the memory's contents or its mapping. A mapping gone meanwhile fails with
        // an error, which is ignored.
        let populated = unsafe {
            libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_POPULATE_READ) == 0
                || libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_WILLNEED) == 0
        };
        if populated {
            bytes += len;
        }
    }
    tracing::debug!(
        mappings = mappings.len(),
        mib = bytes >> 20,
        us = t0.elapsed().as_micros() as u64,
        "own code prefaulted"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_readable_mappings_of_code_files_are_taken() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 00:1f 123 /usr/bin/vmr
55d0a0100000-55d0a0500000 r-xp 00100000 00:1f 123 /usr/bin/vmr
55d0a1000000-55d0a1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
7f0010000000-7f0020000000 rw-p 00000000 00:01 789 /memfd:guest (deleted)
7f0020000000-7f0030000000 rw-p 00000000 00:1f 790 /var/lib/vmr/snap/memory
7f0030000000-7f0030001000 ---p 00000000 00:1f 456 /usr/lib/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            code_file_mappings(maps),
            vec![
                FileMapping {
                    start: 0x55d0a0000000,
                    end: 0x55d0a0100000
                },
                FileMapping {
                    start: 0x55d0a0100000,
                    end: 0x55d0a0500000
                },
            ]
        );
    }

    /// Size and resident size, in kB, of the mapping starting at `start`, from `smaps`.
    fn size_and_rss(smaps: &str, start: usize) -> (u64, u64) {
        let head = format!("{start:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head)).skip(1);
        let mut field = |name: &str| -> u64 {
            let line = lines.find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        (field("Size:"), field("Rss:"))
    }

    #[test]
    fn afterwards_every_page_of_this_process_code_is_mapped() {
        own_code();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mappings = code_file_mappings(&maps);
        assert!(
            !mappings.is_empty(),
            "a test binary runs code from its own file"
        );
        for m in mappings {
            let (size, rss) = size_and_rss(&smaps, m.start);
            assert_eq!(rss, size, "{m:x?}: only {rss} of {size} kB mapped");
        }
    }
}
