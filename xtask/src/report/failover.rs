//! `failover.json` (`cargo xtask bench failover`).

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;

use super::{parse, Benchmark, Row, Section};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "failover",
    title: "Failover",
    about: "What a client of a protected redis sees when the primary's host is lost, over N \
            failovers in one lab boot (`tests/lab/failover_redis.sh`): a primary and a standby \
            on two TAPs of one bridge, etcd as the coordinator, a client SETting increasing \
            values on one TCP connection. Each time the primary's monitor is frozen (SIGSTOP: \
            silent, its connections not reset) or killed, the standby detects it, claims the \
            VM in etcd, runs it and announces it, and a new standby protects it again. The \
            comparison in the same run is what a user without vmr gets: the same redis \
            unprotected, killed, and restored from its latest snapshot on the other TAP. The \
            table compares the client's gap (last answer before the loss to the first after).",
    render: Some(render),
};

#[derive(Deserialize)]
struct Failover {
    /// The tiny guest's failovers on the build host's own KVM, when measured.
    #[serde(default)]
    direct: Option<Direct>,
    mode: String,
    detect_ms_option: u64,
    failovers: Vec<Kill>,
    detect_ms: Percentiles,
    resume_ms: Percentiles,
    client_gap_ms: Percentiles,
    lost_acked: u64,
    restarts: Vec<Restart>,
    restart_client_gap_ms: Option<Percentiles>,
    restart_lost_acked: u64,
}

#[derive(Deserialize)]
struct Direct {
    detect_ms_option: u64,
    failovers: Vec<Kill>,
    detect_ms: Percentiles,
    resume_ms: Percentiles,
}

#[derive(Deserialize)]
struct Kill {
    kill: u32,
    detect_ms: f64,
    resume_ms: f64,
    client_gap_ms: f64,
}

#[derive(Deserialize)]
struct Restart {
    round: u32,
    client_gap_ms: f64,
    lost_acked: u64,
}

#[derive(Deserialize, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

/// One table row per figure: p50, p99 and max with `digits` decimals.
fn percentile_rows(notes: &mut String, rows: &[(&str, Percentiles)], digits: usize) {
    for (what, p) in rows {
        let _ = writeln!(
            notes,
            "| {what} | {:.digits$} | {:.digits$} | {:.digits$} |",
            p.p50, p.p99, p.max
        );
    }
}

fn render(json: &Value) -> Result<Section, String> {
    let f: Failover = parse(json)?;
    let mut rows = Vec::new();
    if let Some(r) = f.restart_client_gap_ms {
        rows.push(Row {
            what: "client gap, ms (p50)".into(),
            vmr: f.client_gap_ms.p50,
            qemu: r.p50,
            runs: (f.failovers.len(), f.restarts.len()),
        });
        rows.push(Row {
            what: "client gap, ms (p99)".into(),
            vmr: f.client_gap_ms.p99,
            qemu: r.p99,
            runs: (f.failovers.len(), f.restarts.len()),
        });
    }
    let mut notes = format!(
        "\nPrimary lost by {} (standbys' `--detect-ms {}`), {} failovers; acknowledged SETs lost: \
         vmr {}, restart from a snapshot {} over {} restarts.\n\n\
         | ms | p50 | p99 | max |\n|---|---:|---:|---:|\n",
        if f.mode == "freeze" {
            "SIGSTOP (silent)"
        } else {
            "SIGKILL"
        },
        f.detect_ms_option,
        f.failovers.len(),
        f.lost_acked,
        f.restart_lost_acked,
        f.restarts.len()
    );
    percentile_rows(
        &mut notes,
        &[
            ("detection", f.detect_ms),
            ("detection to the VM running", f.resume_ms),
            ("client gap", f.client_gap_ms),
        ],
        0,
    );
    if let Some(d) = &f.direct {
        let _ = write!(
            notes,
            "\nOn the build host's own KVM (the tiny epoch-writer guest, no network, {} freezes, \
             `--detect-ms {}`):\n\n| ms | p50 | p99 | max |\n|---|---:|---:|---:|\n",
            d.failovers.len(),
            d.detect_ms_option
        );
        percentile_rows(
            &mut notes,
            &[
                ("detection", d.detect_ms),
                ("detection to the VM running", d.resume_ms),
            ],
            1,
        );
    }
    notes.push_str("\nEvery failover in the lab:\n\n| kill | detection | to running | client gap |\n|---:|---:|---:|---:|\n");
    for k in &f.failovers {
        let _ = writeln!(
            notes,
            "| {} | {:.0} | {:.0} | {:.0} |",
            k.kill, k.detect_ms, k.resume_ms, k.client_gap_ms
        );
    }
    if !f.restarts.is_empty() {
        notes.push_str(
            "\nEvery restart from a snapshot:\n\n| round | client gap, ms | acknowledged SETs lost |\n|---:|---:|---:|\n",
        );
        for r in &f.restarts {
            let _ = writeln!(
                notes,
                "| {} | {:.0} | {} |",
                r.round, r.client_gap_ms, r.lost_acked
            );
        }
    }
    Ok(Section {
        setup: format!(
            "redis, 2 vCPUs, 128 MiB, one SET at a time on one connection; {} failovers",
            f.failovers.len()
        ),
        against: "restart from snapshot",
        rows,
        notes,
        plots: Vec::new(),
    })
}
