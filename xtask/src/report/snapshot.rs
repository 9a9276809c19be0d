//! `snapshot.json` (`cargo xtask bench snapshot`).

use serde::Deserialize;
use serde_json::Value;

use super::plot::{Group, Monitor, Panel, Plot};
use super::{parse, Benchmark, Row, Section, Summary};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "snapshot",
    title: "Snapshot and restore",
    about: "Saving a running guest (dirtying memory) to files and bringing it back, vmr \
            (`PUT /snapshot/create`, `vmr restore --from`) against QEMU (`stop` + `migrate` to \
            a file, `-incoming` from it + `cont`, as `virsh save`/`restore` do). Create: from \
            asking to the files being complete; restore: from starting the restoring process \
            to the guest's first heartbeat.",
    render: Some(render),
};

#[derive(Deserialize)]
struct Snapshot {
    vcpus: u8,
    mem_mib: u64,
    working_set_mib: u64,
    vmr: MonitorResult,
    qemu: MonitorResult,
}

#[derive(Deserialize)]
struct MonitorResult {
    failed_runs: usize,
    create_ms: Summary,
    restore_to_running_ms: Summary,
    snapshot_mib: Summary,
    /// Absent in files written before the runs were kept: the median stands in.
    #[serde(default)]
    samples_create_ms: Vec<f64>,
    #[serde(default)]
    samples_restore_to_running_ms: Vec<f64>,
}

fn or_median(samples: Vec<f64>, s: &Summary) -> Vec<f64> {
    if samples.is_empty() {
        vec![s.median]
    } else {
        samples
    }
}

fn render(json: &Value) -> Result<Section, String> {
    let s: Snapshot = parse(json)?;
    let runs = (s.vmr.create_ms.runs, s.qemu.create_ms.runs);
    let rows = vec![
        Row {
            what: "restore to running, ms".into(),
            vmr: s.vmr.restore_to_running_ms.median,
            qemu: s.qemu.restore_to_running_ms.median,
            runs,
        },
        Row {
            what: "create, ms".into(),
            vmr: s.vmr.create_ms.median,
            qemu: s.qemu.create_ms.median,
            runs,
        },
        Row {
            what: "snapshot on disk, MiB".into(),
            vmr: s.vmr.snapshot_mib.median,
            qemu: s.qemu.snapshot_mib.median,
            runs,
        },
    ];
    let panel = |title: &str, vmr: Vec<f64>, qemu: Vec<f64>| Panel {
        title: title.into(),
        y_label: "ms".into(),
        groups: vec![
            Group {
                label: "vmr".into(),
                monitor: Monitor::Vmr,
                samples: vmr,
            },
            Group {
                label: "QEMU".into(),
                monitor: Monitor::Qemu,
                samples: qemu,
            },
        ],
    };
    let panels = vec![
        panel(
            "create",
            or_median(s.vmr.samples_create_ms, &s.vmr.create_ms),
            or_median(s.qemu.samples_create_ms, &s.qemu.create_ms),
        ),
        panel(
            "restore to running",
            or_median(
                s.vmr.samples_restore_to_running_ms,
                &s.vmr.restore_to_running_ms,
            ),
            or_median(
                s.qemu.samples_restore_to_running_ms,
                &s.qemu.restore_to_running_ms,
            ),
        ),
    ];
    Ok(Section {
        against: "QEMU",
        setup: format!(
            "{} vCPUs, {} MiB guest, workload touching {} MiB, files in a memory-backed \
             directory{}",
            s.vcpus,
            s.mem_mib,
            s.working_set_mib,
            super::failed_runs(&[("", s.vmr.failed_runs, s.qemu.failed_runs)])
        ),
        rows,
        notes: String::new(),
        plots: vec![Plot {
            file: "snapshot.svg".into(),
            caption: "Snapshot create and restore per run, vmr against QEMU".into(),
            panels,
        }],
    })
}
