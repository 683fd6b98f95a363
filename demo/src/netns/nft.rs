//! Packet faults on the link, with nftables: a table of the demo's own in
//! one host's namespace, on that host's end of the link, removed when the
//! fault ends (and when dropped, so that no error leaves it behind).

use super::tool::{run, run_with_input};
use super::{NetError, Side};

/// The demo's table (family `inet`: IPv4 and IPv6).
const TABLE: &str = "psdemo_chaos";

/// An installed table; removed when dropped.
#[derive(Debug)]
pub struct NftTable {
    namespace: String,
    installed: bool,
}

impl NftTable {
    /// Drops `percent`% of the TCP packets crossing `side`'s end of the
    /// link, in each direction.
    pub fn drop_packets(side: &Side, percent: u8) -> Result<Self, NetError> {
        let rule = format!("meta l4proto tcp numgen random mod 100 < {percent} drop");
        Self::install(side, &ruleset(&side.veth, &rule, &rule))
    }

    /// Resets (TCP RST) the established connections of `port` on `side`, as
    /// soon as a packet of one crosses `side`'s end of the link: every
    /// connection that carries traffic while the table is in place.
    pub fn reset_connections(side: &Side, port: u16) -> Result<Self, NetError> {
        let incoming = format!("tcp dport {port} ct state established reject with tcp reset");
        let outgoing = format!("tcp sport {port} ct state established reject with tcp reset");
        Self::install(side, &ruleset(&side.veth, &incoming, &outgoing))
    }

    fn install(side: &Side, ruleset: &str) -> Result<Self, NetError> {
        run_with_input("ip", &["netns", "exec", &side.namespace, "nft", "-f", "-"], Some(ruleset))?;
        Ok(Self { namespace: side.namespace.clone(), installed: true })
    }

    /// Removes the table: the link is whole again.
    pub fn remove(mut self) -> Result<(), NetError> {
        self.delete()
    }

    fn delete(&mut self) -> Result<(), NetError> {
        if std::mem::take(&mut self.installed) {
            run("ip", &["netns", "exec", &self.namespace, "nft", "delete", "table", "inet", TABLE])?;
        }
        Ok(())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("pageserver-demo: removing the nftables table {TABLE} in {}: {e}", self.namespace);
        }
    }
}

/// The table: `incoming` for packets arriving on `veth`, `outgoing` for
/// those leaving through it.
fn ruleset(veth: &str, incoming: &str, outgoing: &str) -> String {
    format!(
        "table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{veth}\" {incoming}\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\toifname \"{veth}\" {outgoing}\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_filters_both_directions_of_the_link_only() {
        let text = ruleset("psdemo-src", "tcp dport 5 drop", "tcp sport 5 drop");
        assert!(
            text.contains("hook input priority filter; policy accept;\n\t\tiifname \"psdemo-src\" tcp dport 5 drop")
        );
        assert!(
            text.contains("hook output priority filter; policy accept;\n\t\toifname \"psdemo-src\" tcp sport 5 drop")
        );
        assert!(text.starts_with("table inet psdemo_chaos {"));
    }
}
