//! Strip plots as SVG: every run a dot, the median a bar, vmr and QEMU side by side.

use std::path::Path;

use plotters::prelude::*;

/// A picture: panels side by side, each its own scale.
pub struct Plot {
    /// File name under `img/`, e.g. `boot.svg`.
    pub file: String,
    /// What it shows, for the alt text and the caption.
    pub caption: String,
    pub panels: Vec<Panel>,
}

/// One chart: groups of runs along x, one value axis.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub groups: Vec<Group>,
}

/// The runs of one monitor in one setting.
pub struct Group {
    /// Under its column, e.g. `vmr` or `QEMU`.
    pub label: String,
    pub monitor: Monitor,
    pub samples: Vec<f64>,
}

/// Whose runs a group holds: vmr's (blue) or its comparison's (orange: QEMU, or the naive way).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    Vmr,
    Qemu,
}

impl Monitor {
    fn color(self) -> RGBColor {
        match self {
            Monitor::Vmr => RGBColor(31, 119, 180),
            Monitor::Qemu => RGBColor(230, 115, 0),
        }
    }
}

const PANEL_W: u32 = 400;
const PANEL_H: u32 = 340;

/// Draws `plot` into `dir/plot.file`.
pub fn draw(plot: &Plot, dir: &Path) -> Result<(), String> {
    let path = dir.join(&plot.file);
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let n = plot.panels.len().max(1);
    let root = SVGBackend::new(&path, (PANEL_W * n as u32, PANEL_H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let areas = root.split_evenly((1, n));
    for (panel, area) in plot.panels.iter().zip(&areas) {
        draw_panel(panel, area).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(panel: &Panel, area: &Area) -> Result<(), Box<dyn std::error::Error>> {
    let n = panel.groups.len().max(1);
    let top = panel
        .groups
        .iter()
        .flat_map(|g| g.samples.iter().copied())
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let labels: Vec<&str> = panel.groups.iter().map(|g| g.label.as_str()).collect();

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map_or_else(String::new, |l| l.to_string())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if top >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .y_desc(panel.y_label.as_str())
        .label_style(("sans-serif", 16))
        .draw()?;

    for (i, group) in panel.groups.iter().enumerate() {
        let color = group.monitor.color();
        let k = group.samples.len();
        let x = |j: usize| {
            if k > 1 {
                i as f64 - 0.15 + 0.3 * j as f64 / (k - 1) as f64
            } else {
                i as f64
            }
        };
        chart.draw_series(
            group
                .samples
                .iter()
                .enumerate()
                .map(|(j, &v)| Circle::new((x(j), v), 4, color.mix(0.75).filled())),
        )?;
        if let Some(m) = median(&group.samples) {
            let x0 = i as f64 - 0.25;
            let x1 = i as f64 + 0.25;
            chart.draw_series(LineSeries::new([(x0, m), (x1, m)], color.stroke_width(2)))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{m:.1}"),
                (x1 + 0.02, m),
                ("sans-serif", 15).into_font().color(&color),
            )))?;
        }
    }
    Ok(())
}

fn median(samples: &[f64]) -> Option<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}
