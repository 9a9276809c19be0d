//! Measuring a running monitor process: its output markers and its memory.

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
