//! A minimal QMP (QEMU Machine Protocol) client: the greeting,
//! `qmp_capabilities`, commands, and asynchronous events; over a Unix
//! socket, or over TCP with mutual TLS ([`QmpAddress::Tls`]: QEMU's
//! `tls-creds-x509` with `verify-peer=on`, for an orchestrator on another
//! host than the VM).
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use pageserver_tls::ClientTls;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

/// Where a QEMU's QMP listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddress {
    /// `-qmp unix:PATH,server=on,wait=off` (given as `PATH` or `unix:PATH`).
    Unix(PathBuf),
    /// `tls:HOST:PORT`: a `-chardev socket,host=…,port=…,tls-creds=…` with
    /// `verify-peer=on`; the orchestrator's certificate is the client's,
    /// and QEMU's must be valid for HOST.
    Tls { host: String, port: u16 },
}

impl std::str::FromStr for QmpAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(address) = text.strip_prefix("tls:") {
            let (host, port) = address.rsplit_once(':').ok_or(format!("{text}: expected tls:HOST:PORT"))?;
            let port = port.parse().map_err(|_| format!("{text}: expected tls:HOST:PORT"))?;
            if host.is_empty() {
                return Err(format!("{text}: expected tls:HOST:PORT"));
            }
            return Ok(QmpAddress::Tls { host: host.trim_matches(['[', ']']).to_owned(), port });
        }
        let path = text.strip_prefix("unix:").unwrap_or(text);
        if path.is_empty() {
            return Err("expected a socket path, unix:PATH or tls:HOST:PORT".to_owned());
        }
        Ok(QmpAddress::Unix(path.into()))
    }
}

impl fmt::Display for QmpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpAddress::Unix(path) => write!(f, "{}", path.display()),
            QmpAddress::Tls { host, port } => write!(f, "tls:{host}:{port}"),
        }
    }
}

impl From<PathBuf> for QmpAddress {
    fn from(path: PathBuf) -> Self {
        QmpAddress::Unix(path)
    }
}

type Reader = Pin<Box<dyn AsyncRead + Send>>;
type Writer = Pin<Box<dyn AsyncWrite + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP at {address}: {source}")]
    Connect {
        address: QmpAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP at {address} over TLS needs the orchestrator's certificate (--tls-cert, --tls-key, --tls-ca)")]
    NoTls { address: QmpAddress },
    #[error("the TLS handshake with QMP at {address}: {source}")]
    Handshake {
        address: QmpAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection (QEMU exited?)")]
    Closed,
    #[error("QMP command {command} failed: {error}")]
    Command { command: String, error: Value },
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

pub struct Qmp {
    lines: Lines<BufReader<Reader>>,
    writer: Writer,
    /// Events read while waiting for command replies.
    events: Vec<Value>,
    /// Over TLS: every command is followed by a record of its own holding a
    /// newline (see [`Qmp::execute`]).
    nudge: bool,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp").field("events", &self.events.len()).finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU creates the socket),
    /// reads the greeting and enters command mode. `tls` is the client
    /// identity for a [`QmpAddress::Tls`].
    pub async fn connect(address: &QmpAddress, tls: Option<&ClientTls>, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let (read, writer): (Reader, Writer) = loop {
            let connected = match address {
                QmpAddress::Unix(path) => UnixStream::connect(path).await.map(|stream| {
                    let (read, write) = stream.into_split();
                    (Box::pin(read) as Reader, Box::pin(write) as Writer)
                }),
                QmpAddress::Tls { host, port } => match TcpStream::connect((host.as_str(), *port)).await {
                    Ok(tcp) => break Self::secure(address, tls, host, tcp).await?,
                    Err(error) => Err(error),
                },
            };
            match connected {
                Ok(halves) => break halves,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect { address: address.clone(), source });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let nudge = matches!(address, QmpAddress::Tls { .. });
        let mut qmp = Self { lines: BufReader::new(read).lines(), writer, events: Vec::new(), nudge };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command { command: "greeting".into(), error: greeting });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// The TLS handshake on `tcp`, as `tls`, with a QEMU valid for `host`.
    async fn secure(
        address: &QmpAddress,
        tls: Option<&ClientTls>,
        host: &str,
        tcp: TcpStream,
    ) -> Result<(Reader, Writer), QmpError> {
        let tls = tls.ok_or_else(|| QmpError::NoTls { address: address.clone() })?;
        let handshake = |source| QmpError::Handshake { address: address.clone(), source };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|error| handshake(std::io::Error::new(std::io::ErrorKind::InvalidInput, error)))?;
        let stream = tls.connect(tcp, name).await.map_err(handshake)?;

        let (read, write) = tokio::io::split(stream);
        Ok((Box::pin(read), Box::pin(write)))
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        let line = self.lines.next_line().await?.ok_or(QmpError::Closed)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut line = serde_json::to_vec(&json!({ "execute": command, "arguments": arguments }))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        // A TLS stream holds what is written until flushed.
        self.writer.flush().await?;
        if self.nudge {
            // QEMU 7.2 (Debian 12) reads a TLS chardev one record late: a
            // command that arrives alone is parsed only once another record
            // arrives. A record of whitespace, which QMP's parser skips,
            // gets the command read now (seen in migrate/tests/qmp_tls.rs).
            self.writer.write_all(b"\n").await?;
            self.writer.flush().await?;
        }
        loop {
            let msg = self.read().await?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = msg.get("error") {
                return Err(QmpError::Command { command: command.into(), error: error.clone() });
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// `query-migrate`'s status ("active", "pre-switchover", "completed", ...).
    pub async fn migration_status(&mut self) -> Result<String, QmpError> {
        let info = self.execute("query-migrate", json!({})).await?;
        Ok(info.get("status").and_then(Value::as_str).unwrap_or("none").to_owned())
    }

    /// `query-status`'s run state ("running", "paused", "inmigrate", ...).
    pub async fn run_state(&mut self) -> Result<String, QmpError> {
        let info = self.execute("query-status", json!({})).await?;
        Ok(info.get("status").and_then(Value::as_str).unwrap_or("unknown").to_owned())
    }

    /// Polls `query-migrate` until its status is `want`; fails early on
    /// "failed" or "cancelled".
    pub async fn wait_migration_status(&mut self, want: &str, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.migration_status().await?;
            if status == want {
                return Ok(());
            }
            if status == "failed" || status == "cancelled" {
                let info = self.execute("query-migrate", json!({})).await?;
                return Err(QmpError::Command { command: format!("migration (waiting for {want})"), error: info });
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(format!("migration status {want} (now {status})")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sets migration capabilities, e.g. `[("x-ignore-shared", true)]`.
    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps.iter().map(|(c, on)| json!({ "capability": c, "state": on })).collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps })).await.map(drop)
    }
}
