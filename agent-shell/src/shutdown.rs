//! When an agent stops: SIGTERM (its supervisor) or SIGINT (a terminal).
#![forbid(unsafe_code)]

use tokio::signal::unix::{SignalKind, signal};

/// Completes at the first SIGTERM or SIGINT. Needs a tokio runtime with
/// signals enabled.
pub async fn shutdown_signal() {
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
