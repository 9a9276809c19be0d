//! Reaching the lab and the images from xtask.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::repo_root;

/// Whether this process already runs where stock Linux guests boot: inside the lab, or on a
/// host with VT-x/AMD-V (no PVM).
pub fn can_boot_linux_here() -> bool {
    std::env::var_os("VMR_IN_LAB").is_some() || !Path::new("/sys/module/kvm_pvm").exists()
}

/// Builds (or finds in the cache) the images: `VMR_KERNEL`, `VMR_INITRAMFS`, ...
pub fn images() -> Result<HashMap<String, String>, String> {
    let out = Command::new(repo_root().join("images/build"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run images/build: {e}"))?;
    if !out.status.success() {
        return Err("images/build failed".into());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Builds the release `vmr` binary; returns its path.
pub fn build_vmr() -> Result<std::path::PathBuf, String> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "-p", "vmr", "--bin", "vmr"])
        .current_dir(repo_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build of vmr failed".into());
    }
    // A copy of this run's own: a build made meanwhile (a soak lasts an hour) must not change
    // the binary under the runs still to come.
    let dir = repo_root().join("target/lab-bin");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Copies of runs that ended are removed.
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("vmr-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let copy = dir.join(format!("vmr-{}", std::process::id()));
    std::fs::copy(repo_root().join("target/release/vmr"), &copy)
        .map_err(|e| format!("cannot copy vmr to {}: {e}", copy.display()))?;
    Ok(copy)
}

/// How long a benchmark may keep the lab, after which the lab is killed (a frozen lab, rare
/// under emulation, would otherwise hold the benchmark for ever).
const LAB_TIMEOUT_SECS: u32 = 3600;

/// Runs this xtask again with `args` inside the lab, with `rwdir` writable there.
pub fn rerun_in_lab(
    args: &[String],
    rwdir: &Path,
    env: &HashMap<String, String>,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new(repo_root().join("images/lab"))
        .arg("--rwdir")
        .arg(rwdir)
        .arg("--timeout")
        .arg(LAB_TIMEOUT_SECS.to_string())
        .arg("--")
        .arg(exe)
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run images/lab: {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(124) => Err(format!(
            "the lab did not finish within {LAB_TIMEOUT_SECS} s: killed"
        )),
        _ => Err(format!("the benchmark failed inside the lab ({status})")),
    }
}

/// Runs `cargo xtask bench WHICH --inside ARGS... --out=OUT` inside the lab, with the images and
/// a release `vmr` built here.
pub fn rerun_bench_in_lab(which: &str, args: Vec<String>, out: &Path) -> Result<(), String> {
    let mut env = images()?;
    env.insert("VMR_BIN".into(), build_vmr()?.display().to_string());
    let mut rerun = vec![
        "bench".to_string(),
        which.to_string(),
        "--inside".to_string(),
    ];
    rerun.extend(args);
    rerun.push(format!("--out={}", out.display()));
    rerun_in_lab(&rerun, out, &env)
}
