//! The install gate: once a migration has failed, nothing more is made
//! visible to the guest.
//!
//! Every install (a fetched page, a local resolution, a bulk chunk) passes
//! the gate while it writes and maps; [`InstallGate::close`] shuts it and
//! then waits for the installs already inside to leave, so that when it
//! returns (and only then is the phase `failed` published) no install can
//! start or still be running.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The gate; see the module docs.
#[derive(Debug, Default)]
pub struct InstallGate {
    closed: AtomicBool,
    /// Installs inside the gate now.
    inside: AtomicU64,
}

/// The gate is closed: the migration failed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the migration has failed: nothing more is installed")]
pub struct GateClosed;

/// One install inside the gate; leaving is dropping it.
#[derive(Debug)]
pub struct Pass<'a>(&'a InstallGate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InstallGate {
    /// Enters the gate, unless it is closed.
    pub fn enter(&self) -> Result<Pass<'_>, GateClosed> {
        // Count ourselves in before looking, so that `close` either sees us
        // or we see it closed (both SeqCst: no third order).
        self.inside.fetch_add(1, Ordering::SeqCst);
        let pass = Pass(self);
        if self.closed.load(Ordering::SeqCst) {
            return Err(GateClosed);
        }
        Ok(pass)
    }

    /// Closes the gate and waits for the installs inside to finish (each is
    /// a few system calls; a bulk chunk at most a few milliseconds).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.inside.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_gate_lets_nothing_in_and_close_waits_for_those_inside() {
        let gate = std::sync::Arc::new(InstallGate::default());
        let pass = gate.enter().expect("open");
        let closer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.close())
        };
        while !gate.is_closed() {
            std::thread::yield_now();
        }
        assert!(gate.enter().is_err(), "closed: no new install");
        assert!(!closer.is_finished() || gate.inside.load(Ordering::SeqCst) == 0);
        drop(pass);
        closer.join().expect("close returns once the install inside left");
        assert_eq!(gate.inside.load(Ordering::SeqCst), 0);
    }
}
