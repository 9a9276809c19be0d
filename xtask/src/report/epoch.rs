//! `epoch.json` (`cargo xtask bench epoch`).

use serde::Deserialize;
use serde_json::Value;

use super::plot::{Group, Monitor, Panel, Plot};
use super::{parse, Benchmark, Row, Section};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "epoch",
    title: "Replication epochs",
    about: "The pause of each epoch against the size of the memory dirtied in it: a tiny guest \
            on the host's own KVM rewriting records in random pages, checkpointed by vmr \
            (pages dirty so far write-protected before the pause, the rest copied after the \
            resume, before the guest's next write to each) against the naive way (every dirty \
            page copied inside the pause), in the same run.",
    render: Some(render),
};

#[derive(Deserialize)]
struct Epoch {
    mem_mib: u64,
    guest_data: String,
    pauses: Vec<PauseRow>,
    sustained_rate_hz: f64,
    bytes_ratio: f64,
}

#[derive(Deserialize)]
struct PauseRow {
    dirty_mib: u64,
    way: String,
    epochs: usize,
    pause_us: Pct,
    /// Absent in files written before the epochs were kept: p50 and p99 stand in.
    #[serde(default)]
    samples_pause_us: Vec<f64>,
}

#[derive(Deserialize)]
struct Pct {
    p50: f64,
    p99: f64,
}

fn render(json: &Value) -> Result<Section, String> {
    let e: Epoch = parse(json)?;
    let find = |mib: u64, way: &str| {
        e.pauses
            .iter()
            .find(|r| r.dirty_mib == mib && r.way == way)
            .ok_or_else(|| format!("no {way} row at {mib} MiB"))
    };
    let mut sizes: Vec<u64> = e.pauses.iter().map(|r| r.dirty_mib).collect();
    sizes.dedup();
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    for &mib in &sizes {
        let (vmr, naive) = (find(mib, "Vmr")?, find(mib, "Naive")?);
        for (name, vmr_us, naive_us) in [
            ("p50", vmr.pause_us.p50, naive.pause_us.p50),
            ("p99", vmr.pause_us.p99, naive.pause_us.p99),
        ] {
            rows.push(Row {
                what: format!("pause {name} at {mib} MiB dirty, µs"),
                vmr: vmr_us,
                qemu: naive_us,
                runs: (vmr.epochs, naive.epochs),
            });
        }
        let samples = |r: &PauseRow| {
            if r.samples_pause_us.is_empty() {
                vec![r.pause_us.p50 / 1000.0, r.pause_us.p99 / 1000.0]
            } else {
                r.samples_pause_us.iter().map(|us| us / 1000.0).collect()
            }
        };
        panels.push(Panel {
            title: format!("{mib} MiB dirty per epoch"),
            y_label: "pause, ms".into(),
            groups: vec![
                Group {
                    label: "vmr".into(),
                    monitor: Monitor::Vmr,
                    samples: samples(vmr),
                },
                Group {
                    label: "naive".into(),
                    monitor: Monitor::Qemu,
                    samples: samples(naive),
                },
            ],
        });
    }
    Ok(Section {
        setup: format!(
            "{} MiB guest, {}; sustained epoch rate {:.0} Hz; bytes sent / dirty \
             bytes {:.3} (zero pages elided, zstd level 1)",
            e.mem_mib, e.guest_data, e.sustained_rate_hz, e.bytes_ratio
        ),
        against: "naive",
        rows,
        notes: String::new(),
        plots: vec![Plot {
            file: "epoch.svg".into(),
            caption: "Epoch pause per epoch at each dirty size, vmr against copying in the pause"
                .into(),
            panels,
        }],
    })
}
