//! [`Reloading`]: a rustls configuration rebuilt from its [`TlsFiles`]
//! when they change, and [`watch`], the task that notices the change (a
//! poll of the files) or is told (SIGHUP).
//!
//! Readers take the configuration in use for each new handshake
//! ([`Reloading::current`]); a connection keeps the one it was made with.
//! So a rotation never cuts a connection: the migration's streams go on,
//! and only the next connection presents (and checks against) the new
//! files.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::error::TlsError;
use crate::files::{FilesStamp, LoadedTls, TlsFiles};

/// How often [`watch`] looks at the files. cert-manager renews well
/// before expiry (a third of the lifetime by default): seconds of delay
/// cost nothing, and a poll works on every filesystem, Secret volumes'
/// symlink swaps included, where inotify on the path would not.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Builds one side's rustls configuration from what its files hold.
pub type Build<C> = fn(&TlsFiles, &LoadedTls) -> Result<C, TlsError>;

/// A configuration and the files it was built from.
#[derive(Debug)]
pub struct Reloading<C> {
    /// Which side this is, for the log and the metric: "server" or "client".
    side: &'static str,
    files: TlsFiles,
    build: Build<C>,
    current: RwLock<Arc<C>>,
    /// What the files were when `current` was built, or when a reload last
    /// failed (so that a bad file is reported once, not at every poll).
    stamp: Mutex<FilesStamp>,
}

impl<C> Reloading<C> {
    /// Reads the files and builds the first configuration: an error here is
    /// a start-up error.
    pub fn load(side: &'static str, files: TlsFiles, build: Build<C>) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = build(&files, &files.load()?)?;
        Ok(Self { side, files, build, current: RwLock::new(Arc::new(config)), stamp: Mutex::new(stamp) })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<C> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Rebuilds from the files if they changed since last read (or always,
    /// with `force`). `Ok(true)` if the configuration was replaced; on an
    /// error the one in use stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamp = self.files.stamp();
        {
            let mut last = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && *last == stamp {
                return Ok(false);
            }
            *last = stamp;
        }
        let config = (self.build)(&self.files, &self.files.load()?)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(true)
    }
}

/// Anything [`watch`] can reload: a [`Reloading`] of either side.
pub trait Reload: Send + Sync {
    fn side(&self) -> &'static str;
    fn reload(&self, force: bool) -> Result<bool, TlsError>;
}

impl<C: Send + Sync> Reload for Reloading<C> {
    fn side(&self) -> &'static str {
        self.side
    }
    fn reload(&self, force: bool) -> Result<bool, TlsError> {
        Reloading::reload(self, force)
    }
}

/// Reloads `configs` whenever their files change (looked at every
/// `poll`) and on SIGHUP, for as long as the returned task runs. With no
/// configs (an agent without TLS) SIGHUP is still caught, and only logged:
/// an operator's `kill -HUP` never stops an agent. Each
/// reload is logged and counted in `pageserver_tls_reloads_total{side,
/// result}`; a failed one keeps the certificates in use. The SIGHUP handler
/// is installed before this returns, so a SIGHUP sent after it is never the
/// default action (which would kill the agent).
pub fn watch(configs: Vec<Arc<dyn Reload>>, poll: Duration) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = ticks.tick() => false,
                signalled = hangup.recv() => {
                    if signalled.is_none() {
                        return;
                    }
                    if configs.is_empty() {
                        tracing::info!("SIGHUP: no TLS certificates to reload (plaintext)");
                    } else {
                        tracing::info!("SIGHUP: reloading the TLS certificates");
                    }
                    true
                }
            };
            for config in &configs {
                reload_one(config.as_ref(), force);
            }
        }
    }))
}

fn reload_one(config: &dyn Reload, force: bool) {
    let side = config.side();
    match config.reload(force) {
        Ok(false) => {}
        Ok(true) => {
            tracing::info!(side, "TLS certificates reloaded: new connections use them");
            metrics::counter!("pageserver_tls_reloads_total", "side" => side, "result" => "ok").increment(1);
        }
        Err(error) => {
            let error: &(dyn std::error::Error + 'static) = &error;
            tracing::error!(side, error, "reloading the TLS certificates failed: the ones in use stay");
            metrics::counter!("pageserver_tls_reloads_total", "side" => side, "result" => "failed").increment(1);
        }
    }
}
