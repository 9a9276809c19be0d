//! Links vmm's tiny guests (`vmm/tests/guests/NAME.S`) into ELF kernels at 2 MiB. Shared by
//! vmm's tests (`#[path = "common/tiny_elf.rs"] mod tiny_elf;`) and replicator's, which include
//! this file by path (`#[path = "../../vmm/tests/common/tiny_elf.rs"]`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Links `vmm/tests/guests/NAME.S` into an ELF executable at 2 MiB, built in the directory
/// `dir` (created if missing); the ELF's path.
pub fn tiny_elf(name: &str, dir: &Path) -> PathBuf {
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, Ordering::SeqCst);
    // `CARGO_MANIFEST_DIR` is vmm's or replicator's: both sit beside vmm.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../vmm/tests/guests/{name}.S"));
    std::fs::create_dir_all(dir).unwrap();
    let obj = dir.join(format!("{name}-{n}.o"));
    let elf = dir.join(format!("{name}-{n}.elf"));
    let ok = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("binutils (as) must be installed")
        .success()
        && Command::new("ld")
            .args(["-m", "elf_x86_64", "-e", "_start", "-Ttext=0x200000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .expect("binutils (ld) must be installed")
            .success();
    assert!(ok, "cannot build {name}");
    elf
}
