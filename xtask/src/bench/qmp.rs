//! A minimal QMP client: QEMU's JSON control protocol on a Unix socket, one command at a time
//! (asynchronous events are skipped).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The `-qmp` argument that has QEMU serve QMP on `socket`.
pub fn qmp_arg(socket: &Path) -> String {
    format!("unix:{},server=on,wait=off", socket.display())
}

impl Qmp {
    /// Connects to `socket` (retrying until QEMU has created it, at most `timeout`) and leaves
    /// capabilities negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP socket {}: {e}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let mut answer = self.read()?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(v) = answer.get_mut("return") {
                return Ok(v.take());
            }
            return Err(format!("QMP {command}: {}", answer["error"]["desc"]));
        }
    }

    /// Polls `query-migrate` until the migration completed; returns its last answer.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed") | Some("cancelled") => {
                    return Err(format!("QEMU migration {}: {info}", info["status"]))
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "QEMU migration not done within {timeout:?}: {info}"
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Polls `query-status` until the VM's run state is `state`.
    pub fn wait_status(&mut self, state: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.execute("query-status", json!({}))?;
            if status["status"] == state {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("QEMU not {state} within {timeout:?}: {status}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
