//! `[ipsec]` and `[[server]]`: the strongSwan charon the relay drives for `level = "ipsec"`
//! (see `crate::ipsec`), and the servers the data path lets only IPsec reach.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Seg;

/// `[ipsec]`: how the relay reaches charon, and how it keeps an `ipsec` backend's traffic from
/// ever leaving in clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipsec {
    /// charon's VICI socket (strongswan.conf `charon.plugins.vici.socket`).
    #[serde(default = "default_vici")]
    pub vici: PathBuf,
    /// The firewall mark charon's IKE packets carry (strongswan.conf
    /// `charon.plugins.socket-default.fwmark`): they go to the backend in clear, everything
    /// else to an `ipsec` backend only through an SA.
    #[serde(default = "default_ike_mark")]
    pub ike_mark: u32,
    /// The routing table (and rule priority) of the fail-closed routes: `prohibit` for each
    /// `ipsec` backend, consulted after charon's table 220, so that without an SA a connection
    /// to the backend is refused instead of sent in clear.
    #[serde(default = "default_table")]
    pub table: u32,
    /// How long bringing an SA up may take before it counts as failed.
    #[serde(default = "default_initiate_timeout", with = "humantime_serde")]
    pub initiate_timeout: Duration,
}

fn default_vici() -> PathBuf {
    PathBuf::from("/var/run/charon.vici")
}

fn default_ike_mark() -> u32 {
    0x42
}

fn default_table() -> u32 {
    // Right after charon's own table 220, before the main table.
    221
}

fn default_initiate_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[[server]]`: a server address with a policy of its own at the data path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub address: IpAddr,
    pub require: Require,
}

/// `[[server]] require`: what alone may reach the server from the client side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Require {
    /// ESP, IKE (UDP 500 and 4500) and the ICMP that path MTU discovery needs.
    Esp,
}

pub(super) fn validate(i: &Ipsec) -> Result<(), (Vec<Seg>, String)> {
    use Seg::Key;
    // Its rules take priorities `table` to `table + 2`: after charon's 220, before the main
    // table's 32766; it uses tables `table` and `table + 1`.
    if !(221..=32000).contains(&i.table) || matches!(i.table, 252..=255) {
        return Err((
            vec![Key("ipsec"), Key("table")],
            "must be 221-32000 and not 252-255: its rules sit between charon's (220) and the \
             main table's (32766), and 253-255 are reserved tables"
                .into(),
        ));
    }
    if i.ike_mark == 0 {
        return Err((
            vec![Key("ipsec"), Key("ike_mark")],
            "must be the non-zero mark charon's socket-default plugin sets".into(),
        ));
    }
    if i.initiate_timeout.is_zero() {
        return Err((
            vec![Key("ipsec"), Key("initiate_timeout")],
            "must be greater than 0".into(),
        ));
    }
    Ok(())
}
