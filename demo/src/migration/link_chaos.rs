//! The chaos events on the link between two hosts (`link-*`,
//! [`crate::chaos`]): the link taken down, packets dropped, connections
//! reset; and what the demo saw of the target agent's connection to its
//! source meanwhile (its status's `source_up` and `source_reconnects`).

use std::time::{Duration, Instant};

use pageserver_proto::v1::MigrationStatus;

use super::chaos_run::Fired;
use super::{Migration, MigrationError};
use crate::netns::{NftTable, TwoHosts};
use crate::status_watch::{StatusError, StatusWatch};

/// Longest hold of `link-reset`'s rules when the target does not reconnect.
const RESET_HOLD: Duration = Duration::from_secs(3);

/// What the status polls during a fault showed.
#[derive(Debug, Default)]
struct Seen {
    /// When a poll first showed `source_up` false, after the fault began.
    source_down_after: Option<Duration>,
    reconnects_before: u64,
    reconnects_after: u64,
}

impl Seen {
    fn starting(watch: &StatusWatch) -> Self {
        let reconnects = reconnects(&watch.current().latest);
        Self { reconnects_before: reconnects, reconnects_after: reconnects, ..Seen::default() }
    }

    /// Watches every poll for `lasting`.
    async fn watch_for(mut self, watch: &StatusWatch, lasting: Duration) -> Self {
        let started = Instant::now();
        watch
            .each_status_for(lasting, |status| {
                if !status.source_up && self.source_down_after.is_none() {
                    self.source_down_after = Some(started.elapsed());
                }
                self.reconnects_after = status.source_reconnects;
            })
            .await;
        self
    }

    fn reconnects(&self) -> String {
        format!("source reconnects {} → {}", self.reconnects_before, self.reconnects_after)
    }
}

fn reconnects(status: &Option<MigrationStatus>) -> u64 {
    status.as_ref().map_or(0, |status| status.source_reconnects)
}

impl Migration<'_> {
    fn two_hosts(&self) -> Result<&TwoHosts, MigrationError> {
        self.network.ok_or(MigrationError::NotStarted("link between the two hosts"))
    }

    /// `link-down:MS`: the target's end of the link goes down for `down`,
    /// then up.
    pub(super) async fn link_down(&self, watch: &StatusWatch, down: Duration) -> Result<Fired, MigrationError> {
        let network = self.two_hosts()?;
        let seen = Seen::starting(watch);
        network.set_link_up(false).map_err(MigrationError::Network)?;
        let seen = seen.watch_for(watch, down).await;
        network.set_link_up(true).map_err(MigrationError::Network)?;
        let source = match seen.source_down_after {
            Some(after) => format!("the target reported its source down {} ms into the outage", after.as_millis()),
            None => "no status poll during the outage showed the source down".to_owned(),
        };
        Ok(Fired {
            outcome: format!(
                "{} down in {} for {} ms, then up; {source}; {}",
                network.target.veth,
                network.target.namespace,
                down.as_millis(),
                seen.reconnects()
            ),
            source_down_seen: Some(seen.source_down_after.is_some()),
        })
    }

    /// `link-loss:PCT:MS`: `percent`% of the TCP packets crossing the link
    /// dropped, each way, for `lasting`.
    pub(super) async fn link_loss(
        &self,
        watch: &StatusWatch,
        percent: u8,
        lasting: Duration,
    ) -> Result<String, MigrationError> {
        let network = self.two_hosts()?;
        let seen = Seen::starting(watch);
        let table = NftTable::drop_packets(&network.source, percent).map_err(MigrationError::Network)?;
        let seen = seen.watch_for(watch, lasting).await;
        table.remove().map_err(MigrationError::Network)?;
        Ok(format!(
            "{percent}% of the TCP packets on the link dropped each way for {} ms (nftables in {}); {}",
            lasting.as_millis(),
            network.source.namespace,
            seen.reconnects()
        ))
    }

    /// `link-reset`: every established connection of the source agent's
    /// port reset, until the target has reconnected (or [`RESET_HOLD`]).
    pub(super) async fn link_reset(&self, watch: &StatusWatch) -> Result<String, MigrationError> {
        let network = self.two_hosts()?;
        let addr = self.source_addrs.as_ref().ok_or(MigrationError::NotStarted("source agent"))?;
        let port = addr.grpc.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok());
        let port = port.ok_or_else(|| MigrationError::AgentAddress(addr.grpc.clone()))?;
        let before = reconnects(&watch.current().latest);
        let started = Instant::now();
        let table = NftTable::reset_connections(&network.source, port).map_err(MigrationError::Network)?;
        let reconnected = |s: &crate::status_watch::PollState| reconnects(&s.latest) > before;
        let after = match watch.wait_until("the target to reconnect", RESET_HOLD, reconnected).await {
            Ok(state) => reconnects(&state.latest),
            Err(StatusError::Timeout { .. }) => reconnects(&watch.current().latest),
            Err(error) => return Err(error.into()),
        };
        let held = started.elapsed();
        table.remove().map_err(MigrationError::Network)?;
        Ok(format!(
            "established connections of port {port} reset (nftables in {}) for {} ms; source reconnects {before} → \
             {after}",
            network.source.namespace,
            held.as_millis()
        ))
    }
}
