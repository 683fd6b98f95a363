//! What a background call to the source does after an error: wait and try
//! again, or give up and fail the migration.
//!
//! | the error | retried | until |
//! |---|---|---|
//! | the source cannot be reached, the stream broke, another source answers, the source refused the call as a whole with RESOURCE_EXHAUSTED (at its limits) | after [`RECONNECT`] backoff, on a new connection | the source has been unreachable for the link's `unreachable_timeout` |
//! | the source says its VM is not paused | every [`NOT_PAUSED_RETRY`] | the link's `pause_timeout` |
//! | a refusal or a malformed reply | [`TRANSFER_RETRY`] | its attempts run out |
//! | the source VM ran again after switchover, the layout changed | never | |
//!
//! Demand fetches ([`crate::demand`]) follow the same rules with their own
//! loop (they keep waiting vCPUs' claims across reconnects).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use guest_memory::GuestLayout;
use pageserver_backoff::{Backoff, BackoffPolicy};

use crate::demand::{NOT_PAUSED_RETRY, RECONNECT};
use crate::source::{Client, SourceError, SourceLink};

/// Retrying a request the source refused or botched: eight times over about
/// ten seconds.
pub const TRANSFER_RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_secs(2),
    max_attempts: Some(8),
    jitter: true,
};

/// Why a background call to the source gave up.
#[derive(Debug, thiserror::Error)]
pub enum GiveUp {
    #[error("{what}: the source refused or botched it {attempts} times")]
    Refused {
        what: &'static str,
        attempts: u32,
        #[source]
        last: SourceError,
    },
    #[error("{what}: the source has been unreachable for {waited:?}")]
    Unreachable {
        what: &'static str,
        waited: Duration,
        #[source]
        last: SourceError,
    },
    #[error("{what}: switchover was declared, but the source VM has not been paused for {waited:?}")]
    NotPaused {
        what: &'static str,
        waited: Duration,
        #[source]
        last: SourceError,
    },
    #[error("{what}")]
    Fatal {
        what: &'static str,
        #[source]
        source: SourceError,
    },
}

/// The retry state of one background call (or stream of calls).
#[derive(Debug)]
pub struct Retrier {
    what: &'static str,
    refusals: Backoff,
    reconnects: Backoff,
    not_paused_since: Option<Instant>,
}

impl Retrier {
    pub fn new(what: &'static str) -> Self {
        Self { what, refusals: TRANSFER_RETRY.start(), reconnects: RECONNECT.start(), not_paused_since: None }
    }

    /// The call succeeded: the source is up, and later errors start over.
    pub fn succeeded(&mut self, link: &SourceLink) {
        link.stats.set_source_up(true);
        self.reconnects.reset();
        self.not_paused_since = None;
    }

    /// After `error`: gives up, or waits, reconnects if the connection is
    /// the problem, and returns for the caller to try again.
    pub async fn after(
        &mut self,
        link: &SourceLink,
        layout: &GuestLayout,
        client: &mut Client,
        error: SourceError,
    ) -> Result<(), GiveUp> {
        let what = self.what;
        let answered = error.source_answered();
        let waiting_for_pause = self.not_paused_since.is_some() && error.is_not_paused();
        link.stats.set_source_up(answered);
        let delay = if error.is_fatal() {
            return Err(GiveUp::Fatal { what, source: error });
        } else if !answered {
            let waited = link.stats.source_outage().unwrap_or_default();
            if waited > link.unreachable_timeout {
                return Err(GiveUp::Unreachable { what, waited, last: error });
            }
            self.reconnects.next_delay().unwrap_or(RECONNECT.max)
        } else if error.is_not_paused() {
            let waited = self.not_paused_since.get_or_insert_with(Instant::now).elapsed();
            if waited > link.pause_timeout {
                return Err(GiveUp::NotPaused { what, waited, last: error });
            }
            NOT_PAUSED_RETRY
        } else {
            match self.refusals.next_delay() {
                Ok(delay) => delay,
                Err(_) => return Err(GiveUp::Refused { what, attempts: self.refusals.failures(), last: error }),
            }
        };
        if !waiting_for_pause {
            tracing::warn!("{what}: {error}; trying again in {delay:?}");
        }
        tokio::time::sleep(delay).await;
        if !answered {
            link.stats.source_reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // A failure here comes back as the next call's error.
            if let Ok(new_client) = link.connect(layout).await {
                *client = new_client;
            }
        }
        Ok(())
    }
}
