//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket: the
//! greeting, `qmp_capabilities`, commands, and asynchronous events.
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP at {path}: {source}")]
    Connect {
        path: String,
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

#[derive(Debug)]
pub struct Qmp {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    /// Events read while waiting for command replies.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU creates the socket),
    /// reads the greeting and enters command mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect { path: path.display().to_string(), source });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Self { lines: BufReader::new(read).lines(), writer, events: Vec::new() };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command { command: "greeting".into(), error: greeting });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
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
