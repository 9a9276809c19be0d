//! `cargo xtask report`: the benchmarks' latest JSON as `docs/benchmarks.md`, one section per
//! benchmark (a table and strip plots in `docs/img/`).
//!
//! A benchmark is one module here that turns its JSON into a [`Section`] and one entry in
//! [`BENCHMARKS`]; an entry without a renderer, or whose JSON is absent, is listed as not yet
//! measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;
use serde_json::Value;

use crate::bench::Meta;
use plot::Plot;

mod boot;
mod epoch;
mod failover;
mod migrate;
pub mod plot;
mod protect;
mod snapshot;

#[derive(Args, Clone)]
pub struct ReportArgs {
    /// Where the benchmarks wrote their JSON [default: target/bench]; a benchmark missing
    /// there is taken from the samples in docs/results/.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Where to write benchmarks.md and img/ [default: docs].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One benchmark of the report.
struct Benchmark {
    /// Its JSON is `NAME.json`, its pictures `img/NAME*.svg`.
    name: &'static str,
    title: &'static str,
    /// What is measured and how, for the section's first paragraph.
    about: &'static str,
    /// Its JSON as a section; `None` until the benchmark exists.
    render: Option<Render>,
}

/// Turns a benchmark's JSON into its section.
type Render = fn(&Value) -> Result<Section, String>;

const BENCHMARKS: &[Benchmark] = &[
    boot::BENCHMARK,
    migrate::BENCHMARK,
    snapshot::BENCHMARK,
    epoch::BENCHMARK,
    protect::BENCHMARK,
    failover::BENCHMARK,
];

/// What a benchmark's JSON shows.
pub struct Section {
    /// The setup in one line (guest size, workload, ...).
    pub setup: String,
    /// What vmr is compared with, in the table's header: `QEMU`, or the naive way.
    pub against: &'static str,
    pub rows: Vec<Row>,
    /// Markdown after the table (more tables, what failed); may be empty.
    pub notes: String,
    pub plots: Vec<Plot>,
}

/// One line of a table: a median, vmr against its comparison.
pub struct Row {
    pub what: String,
    pub vmr: f64,
    pub qemu: f64,
    /// Successful runs of each.
    pub runs: (usize, usize),
}

/// Median, p90, min and max of a sample, as `crate::stats::Summary` writes them.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Summary {
    pub runs: usize,
    pub median: f64,
    #[allow(dead_code)]
    pub p90: f64,
    #[allow(dead_code)]
    pub min: f64,
    #[allow(dead_code)]
    pub max: f64,
}

/// The report's file, relative to its output directory.
pub const MARKDOWN: &str = "benchmarks.md";

pub fn run(args: ReportArgs) -> Result<(), String> {
    let root = crate::repo_root();
    let results = args.results.unwrap_or_else(|| root.join("target/bench"));
    let out = args.out.unwrap_or_else(|| root.join("docs"));
    let mut command = vec!["cargo xtask".to_string()];
    command.extend(
        std::env::args()
            .skip(1)
            .map(|a| crate::bench::shell_quote(&a)),
    );
    let samples = root.join("docs/results");
    let md = render(&[&results, &samples], &out, &command.join(" "))?;
    println!("report: {}", shown(&md));
    Ok(())
}

/// Writes `out/benchmarks.md` and `out/img/*.svg` from each benchmark's JSON, taken from the
/// first of `dirs` that has it; `command` is what regenerates it. Returns the markdown's path.
pub fn render(dirs: &[&Path], out: &Path, command: &str) -> Result<PathBuf, String> {
    let img = out.join("img");
    std::fs::create_dir_all(&img).map_err(|e| format!("{}: {e}", img.display()))?;
    let mut summary = String::new();
    let mut body = String::new();
    for bench in BENCHMARKS {
        let file = format!("{}.json", bench.name);
        let found = dirs.iter().map(|d| d.join(&file)).find(|p| p.is_file());
        let (Some(render), Some(path)) = (bench.render, &found) else {
            let status = match found {
                None => format!("Not yet measured (no `{file}`)."),
                Some(path) => format!(
                    "Measured (`{}`), not yet shown here: its module in xtask/src/report/ is \
                     missing.",
                    shown(&path)
                ),
            };
            let _ = writeln!(summary, "- {}: not yet measured", bench.title);
            let _ = write!(
                body,
                "\n## {}\n\n{}\n\n{status}\n",
                bench.title, bench.about
            );
            continue;
        };
        let (meta, json) = load(path)?;
        let section = render(&json).map_err(|e| format!("{}: {e}", path.display()))?;
        for plot in &section.plots {
            plot::draw(plot, &img)?;
        }
        if let Some(head) = section.rows.first() {
            let _ = writeln!(
                summary,
                "- {}: {} — vmr {}, {against} {} (vmr/{against} {})",
                bench.title,
                head.what,
                num(head.vmr),
                num(head.qemu),
                ratio(head),
                against = section.against
            );
        }
        body.push_str(&markdown_section(bench, &section, meta.as_ref(), path));
    }
    let md = format!(
        "# Benchmarks\n\n\
         <!-- Generated by `{command}`: do not edit; change xtask/src/report/ and regenerate. -->\n\
         *Generated by `{command}` from the benchmarks' JSON (`cargo xtask bench ...` writes it \
         to `target/bench/`; checked-in samples are in `docs/results/`). Do not edit by hand.*\n\n\
         Each benchmark runs vmr and QEMU alternately in the same lab run, on the same guest \
         kernel, initramfs, memory and vCPUs. The tables show medians; a ratio below 1 means vmr \
         is faster or smaller. The plots show every run (dots) and the median (bar). Where the host \
         column says `lab: vng`, the numbers come from the emulated lab (a KVM host emulated by \
         QEMU TCG, guests nested in it, see [lab.md](lab.md)): times are far longer than on \
         hardware and only the ratios compare; a failed run is one whose guest did not get \
         to its end (the emulated lab now and then stalls a nested guest, see lab.md).\n\n\
         {summary}{body}"
    );
    let path = out.join(MARKDOWN);
    std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A benchmark's JSON and its meta (absent in files written before it had one).
fn load(path: &Path) -> Result<(Option<Meta>, Value), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    if !json.is_object() {
        return Err(format!("{}: not a JSON object", path.display()));
    }
    let meta = match json.get("meta") {
        None => None,
        Some(m) => Some(
            Meta::deserialize(m).map_err(|e| format!("{}: bad \"meta\": {e}", path.display()))?,
        ),
    };
    Ok((meta, json))
}

fn markdown_section(bench: &Benchmark, s: &Section, meta: Option<&Meta>, path: &Path) -> String {
    let (date, host, command) = meta.map_or_else(
        || ("?".to_string(), "?".to_string(), "?".to_string()),
        |m| {
            let host = format!(
                "{} ({}, {} CPUs); lab: {}, {} CPU{}",
                m.host.hostname,
                m.host.cpu_model,
                m.host.nproc,
                m.lab.mode,
                m.lab.cpus,
                if m.lab.cpus == 1 { "" } else { "s" }
            );
            let command = format!("`{}` at {}", m.command, m.git_commit);
            (m.date.clone(), host, command)
        },
    );
    let mut md = format!(
        "\n## {}\n\n{}\n\nSetup: {}. From `{}`.\n\n\
         | what | vmr | {against} | vmr/{against} | runs (vmr, {against}) | date | host | command |\n\
         |---|---:|---:|---:|---:|---|---|---|\n",
        bench.title,
        bench.about,
        s.setup,
        shown(path),
        against = s.against
    );
    for r in &s.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {}, {} | {} | {} | {} |",
            cell(&r.what),
            num(r.vmr),
            num(r.qemu),
            ratio(r),
            r.runs.0,
            r.runs.1,
            cell(&date),
            cell(&host),
            cell(&command)
        );
    }
    md.push_str(&s.notes);
    for p in &s.plots {
        let _ = write!(md, "\n![{}](img/{})\n", p.caption, p.file);
    }
    md
}

/// `; failed runs: vmr 1, QEMU 0` (per setting, when named), or nothing when no run failed.
fn failed_runs(counts: &[(&str, usize, usize)]) -> String {
    if counts.iter().all(|&(_, v, q)| v + q == 0) {
        return String::new();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(setting, v, q)| match setting {
            &"" => format!("vmr {v}, QEMU {q}"),
            _ => format!("{setting}: vmr {v}, QEMU {q}"),
        })
        .collect();
    format!("; failed runs: {}", parts.join("; "))
}

fn num(v: f64) -> String {
    format!("{v:.1}")
}

fn ratio(r: &Row) -> String {
    if r.qemu > 0.0 {
        format!("{:.2}", r.vmr / r.qemu)
    } else {
        "–".into()
    }
}

/// `s` inside a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `path` relative to the repository when inside it.
fn shown(path: &Path) -> String {
    let root = crate::repo_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Deserializes a benchmark's JSON, naming the field that does not fit.
pub fn parse<T: for<'de> Deserialize<'de>>(json: &Value) -> Result<T, String> {
    T::deserialize(json).map_err(|e| format!("unexpected content: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The contents of the `<text>` elements of `svg`.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>'))
            .filter_map(|(_, rest)| rest.split_once("</text>"))
            .map(|(text, _)| text.trim().to_string())
            .collect()
    }

    #[test]
    fn renders_the_samples() {
        let out = temp_dir("report");
        let samples = crate::repo_root().join("docs/results");
        let md_path = render(&[&samples], &out, "cargo xtask report").unwrap();
        let md = std::fs::read_to_string(md_path).unwrap();
        assert!(md.contains("Generated by `cargo xtask report`"));
        for bench in BENCHMARKS.iter().filter(|b| b.render.is_some()) {
            assert!(
                md.contains(&format!("## {}", bench.title)),
                "{}",
                bench.name
            );
        }
        assert_eq!(
            md.matches("| what | vmr | QEMU | vmr/QEMU | runs").count(),
            3,
            "one table per measured benchmark"
        );
        assert_eq!(
            md.matches("| what | vmr | naive | vmr/naive | runs")
                .count(),
            1,
            "the epoch table compares with the naive way"
        );
        assert!(
            md.contains("| client gap, ms (p50) |"),
            "the failover table compares the client's gap with a restart from a snapshot"
        );
        for (file, labels) in [
            ("boot.svg", &["vmr", "QEMU", "boot"][..]),
            ("migrate.svg", &["vmr", "QEMU", "idle", "under load"][..]),
            ("snapshot.svg", &["vmr", "QEMU", "create", "restore"][..]),
            ("epoch.svg", &["vmr", "naive", "1 MiB", "100 MiB"][..]),
        ] {
            assert!(md.contains(&format!("(img/{file})")), "{file} linked");
            let svg = std::fs::read_to_string(out.join("img").join(file)).unwrap();
            assert!(svg.trim_start().starts_with("<svg"), "{file} is SVG");
            assert!(svg.trim_end().ends_with("</svg>"), "{file} is whole");
            let texts = svg_texts(&svg);
            for label in labels {
                assert!(
                    texts.iter().any(|t| t.contains(label)),
                    "{file} shows {label} (texts: {texts:?})"
                );
            }
        }
        std::fs::remove_dir_all(out).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_named_in_one_line() {
        let results = temp_dir("corrupt");
        let out = results.join("out");
        std::fs::write(results.join("boot.json"), "{\"meta\": {\"date\": ").unwrap();
        let err = render(&[&results], &out, "x").unwrap_err();
        assert!(
            err.contains(&results.join("boot.json").display().to_string()),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");

        std::fs::write(results.join("boot.json"), "{\"vcpus\": 2}").unwrap();
        let err = render(&[&results], &out, "x").unwrap_err();
        assert!(err.contains("boot.json"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        std::fs::remove_dir_all(results).unwrap();
    }
}
