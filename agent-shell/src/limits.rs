//! The limits every agent puts on whoever connects to it, as command-line
//! flags ([`GrpcLimits`], flattened into both agents' flags).
//!
//! An agent serves one migration; anything else that reaches its ports
//! must not be able to slow it down or take it down. Each limit bounds one
//! resource a client could otherwise take without end:
//!
//! | flag | bounds | when reached |
//! |---|---|---|
//! | `--grpc-max-connections` | descriptors and per-connection buffers | a new connection is accepted and closed at once ([`crate::connections`]) |
//! | `--grpc-idle-timeout` | connections nobody uses | a connection with no RPC under way that received nothing for this long is closed |
//! | `--grpc-max-streams-per-connection` | RPCs one connection opens (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`) | the client waits (HTTP/2 flow, not an error) |
//! | `--grpc-max-rpcs` | RPCs under way across all connections, streams until their last message | the RPC is refused at once with `RESOURCE_EXHAUSTED` ([`crate::rpc_limit`]) |
//! | `--grpc-unary-timeout` | how long a call may take to answer | `CANCELLED` ("Timeout expired", tonic's mapping) |
//! | `--metrics-max-connections` | `/metrics` connections at once | accepted and closed at once |
//!
//! Message sizes are bounded by the protocol (`MAX_MESSAGE_BYTES`), and
//! what one `GetPages` stream may hold by the source agent's own flags.
//! Every refusal is a log line (rate-limited) and a metric
//! ([`crate::limit_metrics`]).
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::duration::parse_duration;

/// The defaults, each with its reason.
pub mod defaults {
    /// A migration needs a handful of connections (the target agent opens
    /// one per traffic class, an orchestrator and probes a few more); far
    /// below the descriptor limit, so that the agent never runs out.
    pub const MAX_CONNECTIONS: usize = 256;
    /// Long enough for an orchestrator polling every few seconds to keep
    /// its connection; short enough that a pile of idle ones clears soon.
    pub const IDLE_TIMEOUT: &str = "60s";
    /// The target agent opens at most a few streams per connection.
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
    /// The target agent has fewer than ten RPCs under way at once; the rest
    /// is room for operators and probes.
    pub const MAX_RPCS: usize = 64;
    /// The slowest unary answer is a dirty bitmap of a large VM (a scan of
    /// its page tables: well under a second per TiB).
    pub const UNARY_TIMEOUT: &str = "60s";
    /// Prometheus scrapes over one connection at a time.
    pub const METRICS_MAX_CONNECTIONS: usize = 16;
}

/// The limits on an agent's gRPC and `/metrics` listeners (see the module
/// docs for what each bounds).
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcLimits {
    /// gRPC connections open at once; one more is accepted and closed at
    /// once (counted in pageserver_grpc_connections_refused_total).
    #[arg(long, env = "PAGESERVER_GRPC_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS,
          value_parser = parse_count)]
    pub grpc_max_connections: usize,
    /// A gRPC connection with no RPC under way that has received nothing
    /// for this long is closed (e.g. 60s). A quiet stream is an RPC under
    /// way: it is never cut for being quiet.
    #[arg(long, env = "PAGESERVER_GRPC_IDLE_TIMEOUT", default_value = defaults::IDLE_TIMEOUT,
          value_parser = parse_positive_duration)]
    pub grpc_idle_timeout: Duration,
    /// RPCs one gRPC connection may have open at once (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); more wait in the client.
    #[arg(long, env = "PAGESERVER_GRPC_MAX_STREAMS_PER_CONNECTION",
          default_value_t = defaults::MAX_STREAMS_PER_CONNECTION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_streams_per_connection: u32,
    /// RPCs under way at once across all connections (a stream counts until
    /// its last message); one more is refused at once with
    /// RESOURCE_EXHAUSTED (counted in pageserver_grpc_rpcs_shed_total).
    #[arg(long, env = "PAGESERVER_GRPC_MAX_RPCS", default_value_t = defaults::MAX_RPCS,
          value_parser = parse_count)]
    pub grpc_max_rpcs: usize,
    /// How long a call may take to answer (for a streaming RPC: to its
    /// first message); then it fails with CANCELLED (e.g. 60s).
    #[arg(long, env = "PAGESERVER_GRPC_UNARY_TIMEOUT", default_value = defaults::UNARY_TIMEOUT,
          value_parser = parse_positive_duration)]
    pub grpc_unary_timeout: Duration,
    /// /metrics connections open at once; one more is accepted and closed
    /// at once (counted in pageserver_metrics_connections_refused_total).
    #[arg(long, env = "PAGESERVER_METRICS_MAX_CONNECTIONS", default_value_t = defaults::METRICS_MAX_CONNECTIONS,
          value_parser = parse_count)]
    pub metrics_max_connections: usize,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        let duration = |text| parse_duration(text).unwrap_or(Duration::from_secs(60));
        Self {
            grpc_max_connections: defaults::MAX_CONNECTIONS,
            grpc_idle_timeout: duration(defaults::IDLE_TIMEOUT),
            grpc_max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            grpc_max_rpcs: defaults::MAX_RPCS,
            grpc_unary_timeout: duration(defaults::UNARY_TIMEOUT),
            metrics_max_connections: defaults::METRICS_MAX_CONNECTIONS,
        }
    }
}

/// A count of at least one (zero would refuse everything).
pub fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(count) => Ok(count),
        Err(error) => Err(format!("{text:?} is not a count: {error}")),
    }
}

/// A duration that is not zero (a zero timeout would close everything).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{text:?}: must be more than zero")),
        duration => Ok(duration),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: GrpcLimits,
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let parsed = Cli::try_parse_from(["agent"]).expect("defaults").limits;
        let default = GrpcLimits::default();
        assert_eq!(parsed.grpc_max_connections, default.grpc_max_connections);
        assert_eq!(parsed.grpc_idle_timeout, Duration::from_secs(60));
        assert_eq!(parsed.grpc_max_streams_per_connection, 32);
        assert_eq!(parsed.grpc_max_rpcs, default.grpc_max_rpcs);
        assert_eq!(parsed.grpc_unary_timeout, default.grpc_unary_timeout);
        assert_eq!(parsed.metrics_max_connections, 16);
    }

    #[test]
    fn flags_are_read_and_zero_is_refused() {
        let parsed = Cli::try_parse_from(["agent", "--grpc-max-connections=3", "--grpc-idle-timeout=250ms"])
            .expect("flags")
            .limits;
        assert_eq!(parsed.grpc_max_connections, 3);
        assert_eq!(parsed.grpc_idle_timeout, Duration::from_millis(250));
        for bad in ["--grpc-max-connections=0", "--grpc-idle-timeout=0s", "--grpc-max-rpcs=0"] {
            assert!(Cli::try_parse_from(["agent", bad]).is_err(), "{bad} accepted");
        }
    }
}
