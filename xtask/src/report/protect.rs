//! `protect.json` (`cargo xtask bench protect`).

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;

use super::plot::{Group, Monitor, Panel, Plot};
use super::{cell, parse, Benchmark, Row, Section};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "protect",
    title: "Protection",
    about: "What protection costs a networked guest: the same redis guest driven by \
            `redis-benchmark` (SET and GET) from the host side of its TAP, unprotected and \
            protected by one `vmr standby` on the same host (every reply held until the \
            standby acknowledged its epoch), in one lab run; QEMU unprotected and QEMU COLO \
            (`x-colo`, `colo-compare`, `filter-mirror`, `filter-redirector`) in the same run \
            for comparison. Throughput is over both tests, p50 and p99 the mean of the two \
            tests'. The table compares vmr protected (the vmr column) with vmr unprotected.",
    render: Some(render),
};

#[derive(Deserialize)]
struct Protect {
    vcpus: u8,
    mem_mib: u64,
    requests: u64,
    clients: u32,
    tests: String,
    redis_benchmark: String,
    epoch_ms: Option<u64>,
    colo_checkpoint_ms: Option<u64>,
    configs: Vec<Config>,
    tput_ratio: Option<f64>,
    p50_added_ms: Option<f64>,
    p99_added_ms: Option<f64>,
    colo_tput_ratio: Option<f64>,
}

#[derive(Deserialize)]
struct Config {
    name: String,
    label: String,
    rps: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    tests: Vec<Test>,
    /// Requests per test, when fewer than the run's (a configuration too slow for them).
    #[serde(default)]
    requests: Option<u64>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Test {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Config {
    fn test(&self, name: &str) -> Option<&Test> {
        self.tests.iter().find(|t| t.test == name)
    }

    /// The same monitor unprotected.
    fn baseline<'a>(&self, all: &'a [Config]) -> Option<&'a Config> {
        let name = if self.name.starts_with("vmr") {
            "vmr"
        } else {
            "qemu"
        };
        all.iter().find(|c| c.name == name && c.rps.is_some())
    }
}

/// `v` as the bench's final line prints it.
fn na(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}"))
}

/// One figure of a configuration.
type Figure = fn(&Config) -> Option<f64>;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

fn render(json: &Value) -> Result<Section, String> {
    let p: Protect = parse(json)?;
    let find = |name: &str| p.configs.iter().find(|c| c.name == name && c.rps.is_some());
    // vmr protected against vmr unprotected; no rows when either was not measured (the
    // table below says what failed).
    let mut rows = Vec::new();
    if let (Some(vmr), Some(prot)) = (find("vmr"), find("vmr-protected")) {
        let figures: [(&str, Figure); 5] = [
            ("requests/s, SET and GET", |c| c.rps),
            ("SET requests/s", |c| c.test("SET").map(|t| t.rps)),
            ("GET requests/s", |c| c.test("GET").map(|t| t.rps)),
            ("p50 latency, ms", |c| c.p50_ms),
            ("p99 latency, ms", |c| c.p99_ms),
        ];
        for (what, f) in figures {
            if let (Some(v), Some(q)) = (f(prot), f(vmr)) {
                rows.push(Row {
                    what: what.to_string(),
                    vmr: v,
                    qemu: q,
                    runs: (1, 1),
                });
            }
        }
    }

    let mut notes = String::from(
        "\nEvery configuration of the run (ratio and added latency against the same monitor \
         unprotected):\n\n\
         | configuration | -n | requests/s | SET | GET | p50 ms | p99 ms | throughput ratio | p50 added, ms | p99 added, ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in &p.configs {
        let base = c.baseline(&p.configs);
        let ratio = base.and_then(|b| Some(c.rps? / b.rps?));
        let added = |f: fn(&Config) -> Option<f64>| base.and_then(|b| Some(f(c)? - f(b)?));
        let _ = writeln!(
            notes,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            if c.error.is_some() {
                format!("{} (failed, below)", cell(&c.label))
            } else {
                cell(&c.label)
            },
            c.requests
                .map_or_else(|| "–".to_string(), |n| n.to_string()),
            opt(c.rps, 0),
            opt(c.test("SET").map(|t| t.rps), 0),
            opt(c.test("GET").map(|t| t.rps), 0),
            opt(c.p50_ms, 3),
            opt(c.p99_ms, 3),
            opt(ratio, 3),
            opt(added(|c| c.p50_ms), 3),
            opt(added(|c| c.p99_ms), 3)
        );
    }
    for c in &p.configs {
        if let Some(e) = &c.error {
            let _ = writeln!(notes, "\n{} failed:\n\n```text\n{}\n```", c.label, e.trim());
        }
    }
    let _ = writeln!(
        notes,
        "\nFinal line: `protect: tput_ratio={} p50_added_ms={} p99_added_ms={} \
         colo_tput_ratio={}` (COLO's ratio is against QEMU unprotected).",
        na(p.tput_ratio),
        na(p.p50_added_ms),
        na(p.p99_added_ms),
        na(p.colo_tput_ratio)
    );

    let measured: Vec<&Config> = p.configs.iter().filter(|c| c.rps.is_some()).collect();
    let panel = |title: &str, y: &str, f: fn(&Test) -> f64| Panel {
        title: title.into(),
        y_label: y.into(),
        groups: measured
            .iter()
            .map(|c| Group {
                label: c.label.clone(),
                monitor: if c.name.starts_with("vmr") {
                    Monitor::Vmr
                } else {
                    Monitor::Qemu
                },
                samples: c.tests.iter().map(f).collect(),
            })
            .collect(),
    };
    Ok(Section {
        setup: format!(
            "{} vCPUs, {} MiB redis guest; `redis-benchmark -n {} -c {} -t {} --csv` ({}); \
             vmr epoch period {}; COLO checkpoint period {}",
            p.vcpus,
            p.mem_mib,
            p.requests,
            p.clients,
            p.tests,
            p.redis_benchmark,
            p.epoch_ms
                .map_or_else(|| "vmr's default".to_string(), |ms| format!("{ms} ms")),
            p.colo_checkpoint_ms
                .map_or_else(|| "QEMU's default".to_string(), |ms| format!("{ms} ms")),
        ),
        against: "unprotected",
        rows,
        notes,
        plots: vec![Plot {
            file: "protect.svg".into(),
            caption: "redis-benchmark per configuration (dots: the SET and the GET test)".into(),
            panels: vec![
                panel("throughput", "requests/s", |t| t.rps),
                panel("p50 latency", "ms", |t| t.p50_ms),
                panel("p99 latency", "ms", |t| t.p99_ms),
            ],
        }],
    })
}
