//! A small blocking client of the API, for `vmr ctl`: one HTTP/1.1 request per connection
//! over the Unix socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    ErrorBody, FailoverParams, MigrateParams, MigrationInfo, ProtectParams, ReplicationStatus,
    ResourceGraph, SnapshotInfo, SnapshotParams, SnapshotType, VmInfo, MIGRATE_TIMEOUT,
    PROTECT_TIMEOUT, REQUEST_TIMEOUT,
};

/// How much longer than the server the client waits, so the server's 504 arrives first.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(15);
/// The largest response the client reads.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// Errors of an API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be connected to.
    #[error("cannot connect to the API socket {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("API socket {socket}: {what} failed: {source}")]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The response is not HTTP as we speak it.
    #[error("API socket {socket}: malformed response: {message}")]
    Malformed {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The server answered with an error status.
    #[error("the monitor answered {status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's `error` message (or the raw body if it had none).
        message: String,
    },
    /// A successful response's body is not what the API documents.
    #[error("API socket {socket}: unexpected body for {what}: {source}")]
    Decode {
        /// The socket path.
        socket: PathBuf,
        /// The request.
        what: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// A response as read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client of the API socket at one path.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client of the API socket at `socket`; nothing is connected until a call.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vm`.
    pub fn get_vm(&self) -> Result<VmInfo, ClientError> {
        self.json("GET", "/vm", None::<&()>, REQUEST_TIMEOUT)
    }

    /// `GET /vm/resources`.
    pub fn get_resources(&self) -> Result<ResourceGraph, ClientError> {
        self.json("GET", "/vm/resources", None::<&()>, REQUEST_TIMEOUT)
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.expect_ok("PUT", "/vm/pause", None::<&()>, REQUEST_TIMEOUT)
            .map(drop)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.expect_ok("PUT", "/vm/resume", None::<&()>, REQUEST_TIMEOUT)
            .map(drop)
    }

    /// `PUT /snapshot/create`.
    pub fn snapshot(
        &self,
        snapshot_path: &Path,
        snapshot_type: SnapshotType,
    ) -> Result<SnapshotInfo, ClientError> {
        let params = SnapshotParams {
            snapshot_path: snapshot_path.to_path_buf(),
            snapshot_type,
        };
        self.json("PUT", "/snapshot/create", Some(&params), REQUEST_TIMEOUT)
    }

    /// `PUT /migrate`.
    pub fn migrate(&self, params: &MigrateParams) -> Result<MigrationInfo, ClientError> {
        self.json("PUT", "/migrate", Some(params), MIGRATE_TIMEOUT)
    }

    /// `GET /replication`.
    pub fn replication(&self) -> Result<ReplicationStatus, ClientError> {
        self.json("GET", "/replication", None::<&()>, REQUEST_TIMEOUT)
    }

    /// `PUT /replication/protect`: returns once the standby protects the VM.
    pub fn protect(&self, params: &ProtectParams) -> Result<ReplicationStatus, ClientError> {
        self.json("PUT", "/replication/protect", Some(params), PROTECT_TIMEOUT)
    }

    /// `PUT /replication/failover`: returns once the VM runs at this standby.
    pub fn failover(&self, params: &FailoverParams) -> Result<ReplicationStatus, ClientError> {
        self.json(
            "PUT",
            "/replication/failover",
            Some(params),
            PROTECT_TIMEOUT,
        )
    }

    /// `GET /metrics`, in the Prometheus text format.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let response = self.expect_ok("GET", "/metrics", None::<&()>, REQUEST_TIMEOUT)?;
        String::from_utf8(response.body).map_err(|e| ClientError::Malformed {
            socket: self.socket.clone(),
            message: format!("the metrics are not UTF-8: {e}"),
        })
    }

    /// Sends one request with an optional raw body and returns the response, whatever its
    /// status. `timeout` bounds each read and write.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let io_err = |what| {
            let socket = self.socket.clone();
            move |source| ClientError::Io {
                socket,
                what,
                source,
            }
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("setting the read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("setting the write timeout"))?;

        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json, text/plain\r\n");
        if let Some(body) = body {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        stream
            .write_all(&bytes)
            .map_err(io_err("sending the request"))?;

        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut raw)
            .map_err(io_err("reading the response"))?;
        parse_response(&raw).map_err(|message| ClientError::Malformed {
            socket: self.socket.clone(),
            message,
        })
    }

    /// Sends `body` as JSON; the response if its status is 2xx, else [`ClientError::Api`].
    fn expect_ok<B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("API bodies serialize to JSON"));
        let response = self.call(method, path, body.as_deref(), timeout + TIMEOUT_MARGIN)?;
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        let message = match serde_json::from_slice::<ErrorBody>(&response.body) {
            Ok(body) => body.error,
            Err(_) => String::from_utf8_lossy(&response.body).trim().to_string(),
        };
        Err(ClientError::Api {
            status: response.status,
            message,
        })
    }

    /// Like [`expect_ok`](Self::expect_ok), decoding the JSON body.
    fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let response = self.expect_ok(method, path, body, timeout)?;
        serde_json::from_slice(&response.body).map_err(|source| ClientError::Decode {
            socket: self.socket.clone(),
            what: format!("{method} {path}"),
            source,
        })
    }
}

/// Parses a whole HTTP/1.1 response (the server closed the connection after it).
fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, status) = (parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = status
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let body = if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("bad Content-Length {length:?}"))?;
        rest.get(..length)
            .ok_or_else(|| format!("body of {} bytes, {length} announced", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { body, ..response })
}

/// Decodes a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("truncated chunk size")?;
        let size_field = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_field:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        rest = rest
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or("chunk not followed by CRLF")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_response() {
        let raw = b"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"a\":\"b\"}  extra";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 409);
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        assert_eq!(response.body, b"{\"a\":\"b\"}  ");
    }

    #[test]
    fn parses_chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap().body, b"abcdefg");
    }

    #[test]
    fn rejects_malformed_responses() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0 hello\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn connect_error_names_the_socket() {
        let client = ApiClient::new("/nonexistent/vmr-api.sock");
        let err = client.get_vm().unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot connect to the API socket /nonexistent/vmr-api.sock: No such file or directory (os error 2)"
        );
    }
}
