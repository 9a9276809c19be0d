//! Benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod boot;
pub mod epoch;
pub mod failover;
pub mod guest;
pub mod migrate;
pub mod proc;
pub mod protect;
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

/// Writes `report` (a struct) as pretty JSON to `out/name`, its fields after a `"meta"`
/// object ([`Meta`]); returns the path.
pub fn write_json(out: &Path, name: &str, report: &impl Serialize) -> Result<PathBuf, String> {
    #[derive(Serialize)]
    struct WithMeta<'a, T: Serialize> {
        meta: Meta,
        #[serde(flatten)]
        report: &'a T,
    }
    let path = out.join(name);
    let doc = WithMeta {
        meta: Meta::now(),
        report,
    };
    let json = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Runs `cargo xtask bench WHICH ARGS...` inside the lab, telling it (through the
/// environment, which the lab passes in) where and how it was started, for its [`Meta`].
pub fn rerun_in_lab(which: &str, args: Vec<String>, out: &Path) -> Result<(), String> {
    let started = Started::here();
    let json = serde_json::to_string(&started).map_err(|e| e.to_string())?;
    // Single-threaded here: nothing else reads the environment while it changes.
    std::env::set_var(STARTED_ENV, json);
    crate::lab::rerun_bench_in_lab(which, args, out)
}

/// Where a benchmark's JSON came from and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// When the results were written (UTC, RFC 3339).
    pub date: String,
    /// The command line as typed (the process started outside the lab).
    pub command: String,
    /// `git rev-parse --short HEAD` of the tree, with `-dirty` if it had changes.
    pub git_commit: String,
    /// The machine the command was started on.
    pub host: Host,
    /// The lab the numbers were measured in.
    pub lab: Lab,
}

/// A machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub hostname: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub nproc: usize,
}

/// Where the benchmark ran: `mode` is `VMR_LAB_MODE` (`vng`: an emulated host under QEMU
/// TCG; `direct`: this host, which has VT-x/AMD-V) or `none` (not through `images/lab`);
/// `cpus` the lab's CPUs and `cpu_model` the CPU the guests saw there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub mode: String,
    pub cpus: usize,
    pub cpu_model: String,
}

/// What the process outside the lab knows and the one inside does not.
#[derive(Serialize, Deserialize)]
struct Started {
    command: String,
    git_commit: String,
    host: Host,
}

/// The environment variable that carries [`Started`] into the lab.
const STARTED_ENV: &str = "VMR_BENCH_STARTED";

impl Started {
    fn here() -> Started {
        Started {
            command: command_line(),
            git_commit: git_commit(),
            host: Host::here(),
        }
    }
}

impl Meta {
    /// The meta of results written now, by this process.
    pub fn now() -> Meta {
        let started = std::env::var(STARTED_ENV)
            .ok()
            .and_then(|s| serde_json::from_str::<Started>(&s).ok())
            .unwrap_or_else(Started::here);
        let here = Host::here();
        let mode = std::env::var("VMR_LAB_MODE").unwrap_or_else(|_| "none".into());
        Meta {
            date: rfc3339_utc(SystemTime::now()),
            command: started.command,
            git_commit: started.git_commit,
            host: started.host,
            lab: Lab {
                mode,
                cpus: here.nproc,
                cpu_model: here.cpu_model,
            },
        }
    }
}

impl Host {
    fn here() -> Host {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim() == "model name")
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        Host {
            hostname,
            cpu_model,
            nproc,
        }
    }
}

/// This process's command line, as `cargo xtask ...` when it runs as the alias does, with
/// the `VMR_LAB_CPUS` it saw.
fn command_line() -> String {
    let mut args = std::env::args();
    let exe = args.next().unwrap_or_default();
    let mut words: Vec<String> = Vec::new();
    if let Ok(cpus) = std::env::var("VMR_LAB_CPUS") {
        words.push(format!("VMR_LAB_CPUS={cpus}"));
    }
    let exe_is_ours = Path::new(&exe).file_name().is_some_and(|n| n == "xtask");
    words.push(if exe_is_ours {
        "cargo xtask".into()
    } else {
        exe
    });
    words.extend(args.map(|a| shell_quote(&a)));
    words.join(" ")
}

pub(crate) fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=./:,@+%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::repo_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{commit}-dirty"),
        _ => commit,
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_in_rfc3339() {
        let at = |s| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn json_has_meta_and_the_report() {
        let dir = std::env::temp_dir().join(format!("xtask-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        #[derive(Serialize)]
        struct Report {
            zeta: u8,
            ratio: f64,
        }
        let report = Report {
            zeta: 1,
            ratio: 1.5,
        };
        let path = write_json(&dir, "t.json", &report).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["ratio"], 1.5);
        let at = |key: &str| text.find(&format!("\"{key}\"")).unwrap();
        assert!(
            at("meta") < at("zeta") && at("zeta") < at("ratio"),
            "in order: {text}"
        );
        assert!(doc["meta"]["date"].as_str().unwrap().ends_with('Z'));
        assert!(doc["meta"]["host"]["nproc"].as_u64().unwrap() >= 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
