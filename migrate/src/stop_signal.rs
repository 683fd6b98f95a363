//! SIGINT (a terminal) and SIGTERM (a supervisor, `kill`) end a run the
//! same way: the migration stops at the step it was in, as if that step had
//! failed (`pageserver-migrate` then settles the VM; the demo also stops its
//! children and removes its work directory).
#![forbid(unsafe_code)]

use tokio::signal::unix::{SignalKind, signal};

/// Completes at the first SIGINT or SIGTERM, with its name. Needs a tokio
/// runtime with signals enabled; watching starts at the call.
pub fn stop_signal() -> impl Future<Output = String> + Send + 'static {
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                _ = terminate.recv() => "SIGTERM".to_owned(),
                _ = interrupt.recv() => "SIGINT".to_owned(),
            },
            (Err(error), _) | (_, Err(error)) => {
                eprintln!("cannot watch SIGTERM and SIGINT ({error}); only SIGKILL stops this run");
                std::future::pending().await
            }
        }
    }
}
