//! The metrics of the limits ([`crate::limits`]), the same on both agents:
//! every refusal counted, the connections open at a glance.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pageserver_grpc_connections_open` | gauge | |
//! | `pageserver_grpc_connections_refused_total` | counter | (over `--grpc-max-connections`: accepted and closed at once) |
//! | `pageserver_grpc_connections_closed_total` | counter | `reason` (`idle`: no RPC and nothing received for `--grpc-idle-timeout`; `cut`: cut by the agent, e.g. a `GetPages` client that stopped reading) |
//! | `pageserver_grpc_rpcs_in_flight` | gauge | (RPCs under way, streams until their last message) |
//! | `pageserver_grpc_rpcs_shed_total` | counter | `reason` (`max_rpcs`: over `--grpc-max-rpcs`; `pages_in_flight`: the source's `GetPages` memory is taken) |
//! | `pageserver_metrics_connections_refused_total` | counter | (over `--metrics-max-connections`) |
//!
//! They are recorded with the `metrics` macros into whatever recorder the
//! agent installed (a no-op before); [`register`] describes them and
//! creates every series at 0, so that they are there before the first
//! refusal.
#![forbid(unsafe_code)]

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const CONNECTIONS_OPEN: &str = "pageserver_grpc_connections_open";
pub const CONNECTIONS_REFUSED: &str = "pageserver_grpc_connections_refused_total";
pub const CONNECTIONS_CLOSED: &str = "pageserver_grpc_connections_closed_total";
pub const RPCS_IN_FLIGHT: &str = "pageserver_grpc_rpcs_in_flight";
pub const RPCS_SHED: &str = "pageserver_grpc_rpcs_shed_total";
pub const METRICS_CONNECTIONS_REFUSED: &str = pageserver_metrics::http::CONNECTIONS_REFUSED;

/// Why a connection was closed by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBecause {
    /// No RPC under way and nothing received for the idle timeout.
    Idle,
    /// Cut by the agent (a client that does not read its replies).
    Cut,
}

impl ClosedBecause {
    pub const ALL: [ClosedBecause; 2] = [ClosedBecause::Idle, ClosedBecause::Cut];

    pub fn name(self) -> &'static str {
        match self {
            ClosedBecause::Idle => "idle",
            ClosedBecause::Cut => "cut",
        }
    }
}

/// Why an RPC was refused with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedBecause {
    /// `--grpc-max-rpcs` RPCs are under way.
    MaxRpcs,
    /// The source agent's pages in flight are all taken.
    PagesInFlight,
}

impl ShedBecause {
    pub const ALL: [ShedBecause; 2] = [ShedBecause::MaxRpcs, ShedBecause::PagesInFlight];

    pub fn name(self) -> &'static str {
        match self {
            ShedBecause::MaxRpcs => "max_rpcs",
            ShedBecause::PagesInFlight => "pages_in_flight",
        }
    }
}

/// Describes every metric above and creates its series at 0, on the
/// current recorder (from an agent's metrics registration).
pub fn register() {
    describe_gauge!(CONNECTIONS_OPEN, "gRPC connections open.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "gRPC connections accepted and closed at once: --grpc-max-connections were open."
    );
    describe_counter!(CONNECTIONS_CLOSED, "gRPC connections the agent closed, by reason.");
    describe_gauge!(RPCS_IN_FLIGHT, "RPCs under way (a stream until its last message).");
    describe_counter!(RPCS_SHED, "RPCs refused at once with RESOURCE_EXHAUSTED, by reason.");
    describe_counter!(
        METRICS_CONNECTIONS_REFUSED,
        "/metrics connections accepted and closed at once: --metrics-max-connections were open."
    );
    gauge!(CONNECTIONS_OPEN).set(0.0);
    gauge!(RPCS_IN_FLIGHT).set(0.0);
    counter!(CONNECTIONS_REFUSED).absolute(0);
    counter!(METRICS_CONNECTIONS_REFUSED).absolute(0);
    for reason in ClosedBecause::ALL {
        counter!(CONNECTIONS_CLOSED, "reason" => reason.name()).absolute(0);
    }
    for reason in ShedBecause::ALL {
        counter!(RPCS_SHED, "reason" => reason.name()).absolute(0);
    }
}

pub(crate) fn connection_opened() {
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

pub(crate) fn connection_closed() {
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

pub(crate) fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

pub(crate) fn connection_closed_because(reason: ClosedBecause) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.name()).increment(1);
}

pub(crate) fn rpc_started() {
    gauge!(RPCS_IN_FLIGHT).increment(1.0);
}

pub(crate) fn rpc_ended() {
    gauge!(RPCS_IN_FLIGHT).decrement(1.0);
}

/// Counts one RPC refused with RESOURCE_EXHAUSTED.
pub fn rpc_shed(reason: ShedBecause) {
    counter!(RPCS_SHED, "reason" => reason.name()).increment(1);
}
