//! `migrate.json` (`cargo xtask bench migrate`).

use serde::Deserialize;
use serde_json::Value;

use super::plot::{Group, Monitor, Panel, Plot};
use super::{parse, Benchmark, Row, Section, Summary};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "migrate",
    title: "Live migration",
    about: "Live migration of the same guest on one host, idle and while it dirties memory at a \
            steady rate, vmr (`vmr receive` + `PUT /migrate`) against QEMU (`-incoming` + QMP \
            `migrate`). Downtime is what the guest sees: the longest gap between its \
            heartbeats less one tick, measured outside both monitors; total is from asking \
            for the migration to its end.",
    render: Some(render),
};

#[derive(Deserialize)]
struct Migrate {
    vcpus: u8,
    mem_mib: u64,
    working_set_mib: u64,
    max_downtime_ms: u64,
    tick_ms: u64,
    workloads: Vec<Workload>,
}

#[derive(Deserialize)]
struct Workload {
    workload: String,
    dirty_rate_mib_s: u64,
    vmr: MonitorResult,
    qemu: MonitorResult,
}

#[derive(Deserialize)]
struct MonitorResult {
    failed_runs: usize,
    downtime_ms: Summary,
    total_ms: Summary,
    samples_downtime_ms: Vec<f64>,
}

impl Workload {
    /// `idle`, or `under load (16 MiB/s)`.
    fn name(&self) -> String {
        if self.dirty_rate_mib_s == 0 {
            self.workload.clone()
        } else {
            format!("under load ({} MiB/s)", self.dirty_rate_mib_s)
        }
    }
}

fn render(json: &Value) -> Result<Section, String> {
    let m: Migrate = parse(json)?;
    // Downtime first, the loaded workload's (the headline) before the idle one's.
    let mut rows = Vec::new();
    for (what, downtime) in [("downtime", true), ("total time", false)] {
        for w in m.workloads.iter().rev() {
            let (v, q) = if downtime {
                (&w.vmr.downtime_ms, &w.qemu.downtime_ms)
            } else {
                (&w.vmr.total_ms, &w.qemu.total_ms)
            };
            rows.push(Row {
                what: format!("{what} {}, ms", w.name()),
                vmr: v.median,
                qemu: q.median,
                runs: (v.runs, q.runs),
            });
        }
    }
    let failed: Vec<_> = m
        .workloads
        .iter()
        .map(|w| (w.workload.as_str(), w.vmr.failed_runs, w.qemu.failed_runs))
        .collect();
    let failed = super::failed_runs(&failed);
    let panels = m
        .workloads
        .into_iter()
        .map(|w| Panel {
            title: format!("downtime, {}", w.name()),
            y_label: "ms".into(),
            groups: vec![
                Group {
                    label: "vmr".into(),
                    monitor: Monitor::Vmr,
                    samples: w.vmr.samples_downtime_ms,
                },
                Group {
                    label: "QEMU".into(),
                    monitor: Monitor::Qemu,
                    samples: w.qemu.samples_downtime_ms,
                },
            ],
        })
        .collect();
    Ok(Section {
        against: "QEMU",
        setup: format!(
            "{} vCPUs, {} MiB guest, workload touching {} MiB, both asked for at most {} ms of \
             downtime, heartbeat every {} ms{}",
            m.vcpus, m.mem_mib, m.working_set_mib, m.max_downtime_ms, m.tick_ms, failed
        ),
        rows,
        notes: String::new(),
        plots: vec![Plot {
            file: "migrate.svg".into(),
            caption: "Migration downtime per run, idle and under load, vmr against QEMU".into(),
            panels,
        }],
    })
}
