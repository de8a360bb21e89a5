//! `[cluster]`: the keys a gateway needs to be one of several sharing services and ticket
//! keys through etcd (see `crate::cluster`), and what is checked of them.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Seg;

/// `[cluster]`: this gateway as one of several that share their services and TLS session ticket
/// keys through etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// etcd client endpoints: `https://host:2379` (`http://` only with `insecure = true`).
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd; several clusters can share one etcd.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// This gateway's name among the members (unique in the cluster).
    pub name: String,
    /// CA that signs the etcd servers' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key presented to etcd.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Allows `http://` endpoints: the ticket keys stay sealed, but service definitions and
    /// membership travel in clear.
    #[serde(default)]
    pub insecure: bool,
    /// The key-encryption key (32 random bytes, raw or as 64 hex digits) every gateway has: the
    /// ticket keys are stored in etcd sealed with it, never in clear.
    pub key_encryption_key: PathBuf,
    /// Files a service from the cluster may name (certificates, keys, CAs, CRLs) are under
    /// this directory: whoever writes to etcd cannot make a gateway use another of its files
    /// (another service's key). PEM given inline in the entry needs no file.
    #[serde(default = "default_cluster_material")]
    pub material: PathBuf,
    /// The last cluster state this gateway applied, written atomically: a gateway that starts
    /// while etcd is down serves it.
    #[serde(default = "default_cluster_cache")]
    pub cache: PathBuf,
    /// Time-to-live of this gateway's lease: its member key and its leadership end this long
    /// after it stops answering.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
}

fn default_cluster_prefix() -> String {
    "/relay".into()
}

fn default_cluster_material() -> PathBuf {
    PathBuf::from("/etc/relay/cluster")
}

fn default_cluster_cache() -> PathBuf {
    PathBuf::from("/var/lib/relay/cluster.json")
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

pub(super) fn validate(c: &Cluster) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index, Key};
    let at = |k: &'static str| vec![Key("cluster"), Key(k)];
    if c.etcd.is_empty() {
        return Err((at("etcd"), "name at least one etcd endpoint".into()));
    }
    for (i, e) in c.etcd.iter().enumerate() {
        let clear = e.starts_with("http://");
        if !(clear || e.starts_with("https://")) {
            return Err((
                vec![Key("cluster"), Key("etcd"), Index(i)],
                format!(
                    "{e:?}: an endpoint is https://host:port (or http:// with insecure = true)"
                ),
            ));
        }
        if clear && !c.insecure {
            return Err((
                vec![Key("cluster"), Key("etcd"), Index(i)],
                format!(
                    "{e:?} is not encrypted: service definitions would travel in clear; use \
                     https:// with `ca`, or set insecure = true"
                ),
            ));
        }
    }
    if c.etcd.iter().any(|e| e.starts_with("https://")) && c.ca.is_none() {
        return Err((
            at("ca"),
            "required with https:// endpoints: the CA of the etcd servers".into(),
        ));
    }
    if c.cert.is_some() != c.key.is_some() {
        let k = if c.cert.is_some() { "key" } else { "cert" };
        return Err((at(k), "`cert` and `key` go together".into()));
    }
    if !c.prefix.starts_with('/') || c.prefix.ends_with('/') || c.prefix.len() < 2 {
        return Err((
            at("prefix"),
            format!(
                "{:?}: starts with '/', does not end with one (e.g. \"/relay\")",
                c.prefix
            ),
        ));
    }
    let valid_name = !c.name.is_empty()
        && c.name.len() <= 64
        && c.name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if !valid_name {
        return Err((
            at("name"),
            format!("{:?}: use 1-64 of A-Z a-z 0-9 - _ .", c.name),
        ));
    }
    if c.lease_ttl < Duration::from_secs(2) {
        return Err((at("lease_ttl"), "must be at least 2s".into()));
    }
    Ok(())
}
