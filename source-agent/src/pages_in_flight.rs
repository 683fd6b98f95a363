//! What the `GetPages` streams may hold: page replies read but not yet taken
//! by their client, bounded in bytes per stream and across all streams.
//!
//! Before, a stream queued up to 64 replies of up to 2 MiB each, and a
//! client that sent requests without reading the replies grew the agent by
//! 154 MB per stream (1.5 GB for ten; 9.3 GB for 200 clients). Now:
//!
//! - a stream reserves `--get-pages-stream-bytes` of
//!   `--get-pages-total-bytes` when it opens, and holds it until its reply
//!   stream is gone; when the total is taken, one more stream is refused at
//!   once with RESOURCE_EXHAUSTED (counted in
//!   `pageserver_grpc_rpcs_shed_total{reason="pages_in_flight"}`). Reserved
//!   rather than taken reply by reply, so that no stream ever waits for
//!   another's client;
//! - inside its reservation, a stream reads a request's pages only once
//!   there is room for its reply ([`StreamBudget::room_for`]): a client that
//!   does not take its replies stops being served, and the agent does not
//!   grow;
//! - a client that has not taken a reply for `--get-pages-stall-timeout`
//!   while its stream has no room left has its connection cut
//!   ([`ConnectionState::cut`](pageserver_agent_shell::ConnectionState::cut)):
//!   HTTP/2 buffers what a peer has not read, and only closing its
//!   connection frees that. A target agent takes every reply as it comes; a
//!   stream that waits for requests (for faults) is never cut.
//!
//! So the replies queued are at most `--get-pages-total-bytes`, whatever
//! the clients do; what HTTP/2 buffers on top is bounded by the gRPC limits
//! (`--grpc-max-rpcs` streams, each up to hyper's send buffer and one
//! encoded reply).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use pageserver_agent_shell::limit_metrics::{ShedBecause, rpc_shed};
use pageserver_agent_shell::{parse_bytes, parse_duration};
use pageserver_proto::MAX_REQUEST_BYTES;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The budgets count KiB (a semaphore counts in u32).
const UNIT: u64 = 1 << 10;
/// The least a reply is charged: an error reply is small, but a client
/// that asks for nothing but errors must not queue millions of them.
const LEAST_CHARGE: u64 = 4 << 10;

/// The flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PagesInFlightLimits {
    /// Bytes of page replies one GetPages stream may hold before its client
    /// takes them (at least one request's worth, 2MiB; e.g. 16MiB). A
    /// client that does not read stops being served.
    #[arg(long, env = "PAGESERVER_GET_PAGES_STREAM_BYTES", default_value = "16MiB",
          value_parser = parse_stream_bytes)]
    pub get_pages_stream_bytes: u64,
    /// Bytes of page replies all GetPages streams together may hold; each
    /// stream reserves its --get-pages-stream-bytes when it opens, and one
    /// more is refused with RESOURCE_EXHAUSTED (e.g. 256MiB: 16 streams).
    #[arg(long, env = "PAGESERVER_GET_PAGES_TOTAL_BYTES", default_value = "256MiB", value_parser = parse_total_bytes)]
    pub get_pages_total_bytes: u64,
    /// A GetPages client that has taken no reply for this long while its
    /// stream is full has its connection cut (e.g. 30s).
    #[arg(long, env = "PAGESERVER_GET_PAGES_STALL_TIMEOUT", default_value = "30s",
          value_parser = pageserver_agent_shell::limits::parse_positive_duration)]
    pub get_pages_stall_timeout: Duration,
}

impl Default for PagesInFlightLimits {
    fn default() -> Self {
        Self {
            get_pages_stream_bytes: 16 << 20,
            get_pages_total_bytes: 256 << 20,
            get_pages_stall_timeout: parse_duration("30s").unwrap_or(Duration::from_secs(30)),
        }
    }
}

fn parse_stream_bytes(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes < MAX_REQUEST_BYTES {
        return Err(format!("{text:?}: less than one request's reply ({MAX_REQUEST_BYTES} bytes)"));
    }
    checked_units(text, bytes)
}

fn parse_total_bytes(text: &str) -> Result<u64, String> {
    checked_units(text, parse_bytes(text)?)
}

fn checked_units(text: &str, bytes: u64) -> Result<u64, String> {
    match u32::try_from(bytes / UNIT) {
        Ok(_) => Ok(bytes),
        Err(_) => Err(format!("{text:?}: at most 4095GiB")),
    }
}

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

/// The budget of all `GetPages` streams of an agent.
#[derive(Debug, Clone)]
pub struct PagesInFlight {
    total: Arc<Semaphore>,
    limits: PagesInFlightLimits,
}

impl PagesInFlight {
    pub fn new(limits: &PagesInFlightLimits) -> Self {
        let total = Arc::new(Semaphore::new(units(limits.get_pages_total_bytes) as usize));
        Self { total, limits: limits.clone() }
    }

    /// A new stream's budget and its reservation of the total (to be held
    /// for as long as the stream's replies are), or RESOURCE_EXHAUSTED
    /// (counted) when the total is taken.
    pub fn open_stream(&self) -> Result<(StreamBudget, Reservation), Status> {
        let limits = &self.limits;
        match self.total.clone().try_acquire_many_owned(units(limits.get_pages_stream_bytes)) {
            Ok(reserved) => Ok((
                StreamBudget {
                    replies: Arc::new(Semaphore::new(units(limits.get_pages_stream_bytes) as usize)),
                    stream_units: units(limits.get_pages_stream_bytes),
                    stall_timeout: limits.get_pages_stall_timeout,
                },
                Reservation { _permit: reserved },
            )),
            Err(_) => {
                rpc_shed(ShedBecause::PagesInFlight);
                tracing::debug!("refusing a GetPages stream: --get-pages-total-bytes are reserved");
                Err(Status::resource_exhausted(format!(
                    "the GetPages streams open hold {} bytes of replies, this agent's limit \
                     (--get-pages-total-bytes): try again later",
                    limits.get_pages_total_bytes
                )))
            }
        }
    }
}

/// One stream's share of the total, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
}

/// What one stream may queue, inside its [`Reservation`].
#[derive(Debug)]
pub struct StreamBudget {
    replies: Arc<Semaphore>,
    stream_units: u32,
    stall_timeout: Duration,
}

/// The client took no reply for the stall timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client has taken no reply for {0:?} and its stream is full")]
pub struct Stalled(pub Duration);

impl StreamBudget {
    /// Room for a reply of about `bytes` (at least [`LEAST_CHARGE`], at most
    /// the whole stream budget), held until the client takes the reply; or
    /// [`Stalled`].
    pub async fn room_for(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Stalled> {
        let charge = units(bytes.max(LEAST_CHARGE)).min(self.stream_units);
        let room = self.replies.clone().acquire_many_owned(charge);
        match tokio::time::timeout(self.stall_timeout, room).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a closed one serves no more.
            Ok(Err(_)) | Err(_) => Err(Stalled(self.stall_timeout)),
        }
    }

    /// What the replies still queued hold.
    pub fn queued_bytes(&self) -> u64 {
        u64::from(self.stream_units).saturating_sub(self.replies.available_permits() as u64) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(stream: u64, total: u64, stall_ms: u64) -> PagesInFlightLimits {
        PagesInFlightLimits {
            get_pages_stream_bytes: stream,
            get_pages_total_bytes: total,
            get_pages_stall_timeout: Duration::from_millis(stall_ms),
        }
    }

    #[test]
    fn streams_over_the_total_are_refused_until_one_is_gone() {
        let budget = PagesInFlight::new(&limits(4 << 20, 8 << 20, 1000));
        let first = budget.open_stream().expect("first");
        let second = budget.open_stream().expect("second");
        let refused = budget.open_stream().expect_err("third");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--get-pages-total-bytes"), "{}", refused.message());
        drop(first);
        let (third, reservation) = budget.open_stream().expect("after the first is gone");
        drop(third);
        assert!(budget.open_stream().is_err(), "the reservation goes with the replies, not the budget");
        drop((second, reservation));
        assert!(budget.open_stream().is_ok());
    }

    #[tokio::test]
    async fn a_stream_holds_its_budget_and_stalls_when_nothing_is_taken() {
        let (stream, _reservation) = PagesInFlight::new(&limits(4 << 20, 8 << 20, 100)).open_stream().expect("stream");
        let a = stream.room_for(2 << 20).await.expect("room for the first reply");
        let b = stream.room_for(2 << 20).await.expect("room for the second");
        assert_eq!(stream.queued_bytes(), 4 << 20);
        // Nothing taken: the third waits the stall timeout, then fails.
        assert_eq!(stream.room_for(1).await.expect_err("stalled"), Stalled(Duration::from_millis(100)));
        // A reply taken: room again, a small one charged the least.
        drop(a);
        let small = stream.room_for(1).await.expect("room");
        assert_eq!(stream.queued_bytes(), (2 << 20) + LEAST_CHARGE);
        // An oversized request is charged the whole stream, never more.
        drop((b, small));
        let whole = stream.room_for(u64::MAX).await.expect("room");
        assert_eq!(stream.queued_bytes(), 4 << 20);
        drop(whole);
    }

    #[test]
    fn a_stream_budget_holds_at_least_one_reply() {
        assert!(parse_stream_bytes("1MiB").is_err());
        assert_eq!(parse_stream_bytes("2MiB"), Ok(2 << 20));
        assert!(parse_total_bytes("5000GiB").is_err());
    }
}
