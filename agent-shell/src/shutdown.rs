//! When an agent stops: SIGTERM (its supervisor) or SIGINT (a terminal).
#![forbid(unsafe_code)]

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Completes at the first SIGTERM or SIGINT after the call. The signals are
/// watched from the call on, not from the first poll: an agent calls it
/// before it says it is listening, so that a SIGTERM sent as soon as it is
/// never kills it outright (the default action) instead of stopping it.
/// Needs a tokio runtime with signals enabled.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            },
            (Err(error), Ok(mut interrupt)) => {
                tracing::error!(%error, "cannot watch SIGTERM; only SIGINT stops the agent");
                interrupt.recv().await;
                tracing::info!("SIGINT: shutting down");
            }
            (Ok(mut terminate), Err(error)) => {
                tracing::error!(%error, "cannot watch SIGINT; only SIGTERM stops the agent");
                terminate.recv().await;
                tracing::info!("SIGTERM: shutting down");
            }
            (Err(error), Err(_)) => {
                tracing::error!(%error, "cannot watch SIGTERM or SIGINT; only SIGKILL stops the agent");
                std::future::pending::<()>().await;
            }
        }
    }
}
