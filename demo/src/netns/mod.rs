//! Two hosts on one machine (`pageserver-demo --two-hosts`): the source
//! side and the target side of a migration each in a network namespace of
//! its own, joined by a veth pair; the link's rate limit; sockets the demo
//! opens inside a namespace; and packet faults on the link (nftables).
//!
//! Everything is set up with the system's tools, as an operator would:
//! iproute2's `ip` and `tc`, and `nft` (`scripts/setup` installs them).
//! Children are started inside a namespace with `ip netns exec`; the demo
//! itself stays in the root namespace and reaches the agents through sockets
//! created inside theirs ([`connect`]).
//!
//! Names and addresses: the namespaces are `psdemo-PID-N-source` and
//! `psdemo-PID-N-target` (PID: the demo's process, N: its migration count),
//! the veth ends `psdemo-src` and `psdemo-tgt`, created straight inside
//! their namespaces (nothing ever appears in the root namespace's links).
//! The link is a /30 in 10.200.0.0/13 derived from PID and N
//! ([`link_addresses`]): each pair is alone in its namespaces, so nothing
//! can clash with the host's networks, and concurrent demos get different
//! addresses in their logs. Namespaces whose PID no longer runs are
//! leftovers of a demo that was killed: they are removed before new ones
//! are made.
#![forbid(unsafe_code)]

mod connect;
mod nft;
mod pair;
mod tool;

pub use connect::{channel_in, connect_blocking_in, connect_in};
pub use nft::NftTable;
pub use pair::{NAMESPACE_PREFIX, Side, TwoHosts, link_addresses};
pub use tool::ToolError;

/// Why the two hosts could not be set up, changed or reached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("entering network namespace {namespace}: {source}")]
    Enter {
        namespace: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} in network namespace {namespace}: {source}")]
    Connect {
        namespace: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a gRPC channel to {addr} in network namespace {namespace}: {source}")]
    Channel {
        namespace: String,
        addr: std::net::SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
}
