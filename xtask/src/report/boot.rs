//! `boot.json` (`cargo xtask bench boot`).

use serde::Deserialize;
use serde_json::Value;

use super::plot::{Group, Monitor, Panel, Plot};
use super::{parse, Benchmark, Row, Section, Summary};

pub const BENCHMARK: Benchmark = Benchmark {
    name: "boot",
    title: "Boot time",
    about: "From starting the monitor process to the guest's init printing its first line on \
            the console (`VMR-INIT-READY`), vmr against QEMU's `microvm` machine; and the \
            monitor's resident memory beyond the guest's RAM.",
    render: Some(render),
};

#[derive(Deserialize)]
struct Boot {
    vcpus: u8,
    mem_mib: u64,
    cmdline: String,
    vmr: MonitorResult,
    qemu: MonitorResult,
}

#[derive(Deserialize)]
struct MonitorResult {
    failed_runs: usize,
    boot_ms: Summary,
    rss_beyond_guest_mib: Summary,
    samples_ms: Vec<f64>,
}

fn render(json: &Value) -> Result<Section, String> {
    let b: Boot = parse(json)?;
    let runs = (b.vmr.boot_ms.runs, b.qemu.boot_ms.runs);
    Ok(Section {
        against: "QEMU",
        notes: String::new(),
        setup: format!(
            "{} vCPUs, {} MiB, kernel arguments `{}`{}",
            b.vcpus,
            b.mem_mib,
            b.cmdline,
            super::failed_runs(&[("", b.vmr.failed_runs, b.qemu.failed_runs)])
        ),
        rows: vec![
            Row {
                what: "boot to init, ms".into(),
                vmr: b.vmr.boot_ms.median,
                qemu: b.qemu.boot_ms.median,
                runs,
            },
            Row {
                what: "RSS beyond guest RAM, MiB".into(),
                vmr: b.vmr.rss_beyond_guest_mib.median,
                qemu: b.qemu.rss_beyond_guest_mib.median,
                runs,
            },
        ],
        plots: vec![Plot {
            file: "boot.svg".into(),
            caption: "Boot time per run, vmr against QEMU".into(),
            panels: vec![Panel {
                title: "boot to init".into(),
                y_label: "ms".into(),
                groups: vec![
                    Group {
                        label: "vmr".into(),
                        monitor: Monitor::Vmr,
                        samples: b.vmr.samples_ms,
                    },
                    Group {
                        label: "QEMU".into(),
                        monitor: Monitor::Qemu,
                        samples: b.qemu.samples_ms,
                    },
                ],
            }],
        }],
    })
}
