//! The physical floor: two plain processes moving bytes over TCP on the
//! same path as the agents. (To be filled in.)
#![forbid(unsafe_code)]

use crate::{BenchOptions, BenchReport};

/// The hidden first argument that makes the bench binary the floor's peer.
pub const PEER_ARG: &str = "--floor-peer";

/// The peer process's main.
pub fn peer_main() -> anyhow::Result<()> {
    Ok(())
}

/// Measures the floor rows.
pub fn measure(_opts: &BenchOptions, _report: &mut BenchReport) -> anyhow::Result<()> {
    Ok(())
}
