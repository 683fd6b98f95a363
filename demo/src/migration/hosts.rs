//! Where each side of a migration runs: both on this machine's own network
//! (the default, everything on 127.0.0.1), or each in a network namespace
//! of its own joined by a veth link (`two_hosts`, [`crate::netns`]). The
//! orchestration starts, reaches and scrapes every process through its
//! side's [`Host`], whichever it is.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;

use tonic::transport::Channel;

use super::{Migration, MigrationError};
use crate::netns::{self, Side};
use crate::process::{ChildProcess, ProcessError};
use crate::report::NetworkReport;
use crate::tls::DemoTls;

/// What an agent listens on for what only its own side reaches (the target
/// agent's gRPC, both agents' metrics): loopback, inside the namespace if
/// there is one.
pub(super) const LOOPBACK: &str = "127.0.0.1:0";

/// One side's host.
#[derive(Debug, Clone)]
pub(super) enum Host {
    /// This machine's network namespace.
    Local,
    /// A namespace of its own, at one end of the link.
    Namespace(Side),
}

impl Host {
    /// What an agent listens on for the other side (the source agent's
    /// gRPC): its address on the link, or loopback on one host.
    pub(super) fn on_link(&self) -> String {
        match self {
            Host::Local => LOOPBACK.to_owned(),
            Host::Namespace(side) => format!("{}:0", side.addr),
        }
    }

    /// Starts `program` on this host.
    pub(super) fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[impl AsRef<OsStr>],
        work: &Path,
    ) -> Result<ChildProcess, ProcessError> {
        match self {
            Host::Local => ChildProcess::spawn(name, program, args, work),
            Host::Namespace(side) => ChildProcess::spawn(name, Path::new("ip"), &side.exec_args(program, args), work),
        }
    }

    /// A gRPC channel to `addr` on this host, as the orchestrator over TLS
    /// with `tls`, else in the clear.
    pub(super) async fn channel(&self, addr: &str, tls: Option<&DemoTls>) -> Result<Channel, MigrationError> {
        match self {
            Host::Local => crate::tls::channel(tls, addr)
                .await
                .map_err(|source| MigrationError::Connect { addr: addr.to_owned(), source }),
            Host::Namespace(side) => {
                let addr = socket_addr(addr)?;
                let tls = tls.map(|tls| tls.orchestrator.clone());
                netns::channel_in(side, addr, tls).await.map_err(MigrationError::Network)
            }
        }
    }

    /// The `/metrics` text an agent serves at `addr` on this host.
    pub(super) async fn scrape(&self, agent: &'static str, addr: &str) -> Result<String, MigrationError> {
        let scraped = match self {
            Host::Local => pageserver_metrics::scrape(addr).await,
            Host::Namespace(side) => {
                let stream = netns::connect_in(side, socket_addr(addr)?).await.map_err(MigrationError::Network)?;
                pageserver_metrics::scrape_over(stream, addr).await
            }
        };
        scraped.map_err(|source| MigrationError::Scrape { agent, source })
    }

    /// ` in network namespace NAME`, or nothing, for progress lines.
    pub(super) fn in_namespace(&self) -> String {
        match self {
            Host::Local => String::new(),
            Host::Namespace(side) => format!(" in network namespace {}", side.namespace),
        }
    }
}

/// An address from an agent's `listening` line.
fn socket_addr(addr: &str) -> Result<SocketAddr, MigrationError> {
    addr.parse().map_err(|_| MigrationError::AgentAddress(addr.to_owned()))
}

impl Migration<'_> {
    /// The two hosts, if any, into the report and the progress lines.
    pub(super) fn describe_network(&mut self) -> Result<(), MigrationError> {
        let Some(network) = self.network else { return Ok(()) };
        let (source_qdisc, target_qdisc) = network.qdiscs().map_err(MigrationError::Network)?;
        let report = NetworkReport {
            source_namespace: network.source.namespace.clone(),
            target_namespace: network.target.namespace.clone(),
            source_addr: network.source.addr.to_string(),
            target_addr: network.target.addr.to_string(),
            link_rate_gbit: self.opts.link_rate_gbit,
            source_qdisc,
            target_qdisc,
        };
        self.progress.say(format!(
            "two hosts: source in {} ({}), target in {} ({}), joined by a veth link{}",
            report.source_namespace,
            report.source_addr,
            report.target_namespace,
            report.target_addr,
            report.link_rate_gbit.map(|rate| format!(" limited to {rate} Gbit/s each way")).unwrap_or_default()
        ));
        self.report.network = Some(report);
        Ok(())
    }
}
