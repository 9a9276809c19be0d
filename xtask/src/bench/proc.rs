//! Measuring a running monitor process: its output markers, its memory and its CPU time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout};
use std::time::{Duration, Instant};

/// Reads `stdout` line by line on a thread until a line contains `marker`; returns the time
/// since `start`. Fails after `timeout` (even if the monitor prints nothing) or at end of output.
pub fn wait_for_marker(
    stdout: ChildStdout,
    marker: &'static str,
    start: Instant,
    timeout: Duration,
) -> Result<Duration, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let result = loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break Err(format!("the console ended before {marker:?}")),
                Ok(_) if String::from_utf8_lossy(&line).contains(marker) => {
                    break Ok(start.elapsed())
                }
                Ok(_) => {}
                Err(e) => break Err(format!("reading the console: {e}")),
            }
        };
        let _ = tx.send(result);
        // Keep draining so that the monitor never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| Err(format!("no {marker:?} within {timeout:?}")))
}

/// Resident memory of process `pid` beyond its guest RAM, in KiB: the sum of `Rss` over all
/// mappings, less the `Rss` of the largest mapping (guest RAM, in vmr and in QEMU alike).
pub fn rss_beyond_guest_kib(pid: u32) -> Result<u64, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("reading smaps of {pid}: {e}"))?;
    let mut total = 0u64;
    let mut largest = (0u64, 0u64); // (size, rss) of the largest mapping
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kib)) => current_size = kib.parse().unwrap_or(0),
            (Some("Rss:"), Some(kib)) => {
                let rss: u64 = kib.parse().unwrap_or(0);
                total += rss;
                if current_size > largest.0 {
                    largest = (current_size, rss);
                }
            }
            _ => {}
        }
    }
    Ok(total - largest.1)
}

/// Kills and reaps `child`, waiting at most 10 s (a process stuck in the kernel is left
/// behind with a warning rather than holding the benchmark).
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "warning: process {} did not end within 10 s of SIGKILL",
        child.id()
    );
}

/// Clock ticks per second of `/proc`'s CPU times (`sysconf(_SC_CLK_TCK)`).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU time (user and system) of every thread of process `pid`, in seconds, by thread name
/// (threads of one name summed). A process that is gone has none.
pub fn thread_cpu_secs(pid: u32) -> BTreeMap<String, f64> {
    let mut threads = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    let hz = clock_ticks();
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ppid ...`: the name may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime), counted from the state (field 3).
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        *threads.entry(name).or_insert(0.0) += ticks as f64 / hz;
    }
    threads
}

/// The whole system's CPU time so far, in seconds: (busy, all), all CPUs summed.
pub fn system_cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let hz = clock_ticks();
    ((all - idle) as f64 / hz, all as f64 / hz)
}
