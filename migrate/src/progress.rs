//! Progress lines on stdout, stamped with the time since the start, as both
//! orchestrations print them.

use std::time::Instant;

/// The clock of one migration and whether to print at all.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    quiet: bool,
}

impl Progress {
    /// Starts the clock; `quiet` prints nothing (errors go to stderr anyway).
    pub fn start(quiet: bool) -> Self {
        Self { started: Instant::now(), quiet }
    }

    /// Seconds since the start.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Prints `[  12.34s] message`.
    pub fn say(&self, message: impl AsRef<str>) {
        if !self.quiet {
            println!("[{:7.2}s] {}", self.seconds(), message.as_ref());
        }
    }
}
