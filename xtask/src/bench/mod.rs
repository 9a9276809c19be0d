//! Benchmarks.

use std::path::{Path, PathBuf};

use serde::Serialize;

pub mod boot;
pub mod guest;
pub mod migrate;
pub mod proc;
pub mod qmp;
pub mod snapshot;

/// The results directory: `out`, else `target/bench`; created.
pub fn out_dir(out: Option<&Path>) -> Result<PathBuf, String> {
    let out = out.map_or_else(
        || crate::repo_root().join("target/bench"),
        Path::to_path_buf,
    );
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// Writes `report` as pretty JSON to `out/name`; returns the path.
pub fn write_json(out: &Path, name: &str, report: &impl Serialize) -> Result<PathBuf, String> {
    let path = out.join(name);
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}
