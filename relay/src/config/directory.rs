//! `[directory]`: the LDAP server that decides `group:` and `attr:` rules (see
//! `crate::directory`), and what is checked of it.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Seg;

/// `[directory]`: the LDAP server that decides `group:` and `attr:` rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// `ldaps://host:636`, or `ldap://host:389` with `starttls = true` (or `insecure = true`).
    pub url: String,
    #[serde(default)]
    pub starttls: bool,
    /// Allows `ldap://` without StartTLS: identities and group lists in clear.
    #[serde(default)]
    pub insecure: bool,
    /// CA of the directory's certificate.
    pub ca: Option<PathBuf>,
    /// Simple bind: this DN, with the password in `bind_password_file`.
    pub bind_dn: Option<String>,
    pub bind_password_file: Option<PathBuf>,
    /// SASL EXTERNAL bind with this client certificate and key (instead of `bind_dn`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where entries and groups are searched (subtree).
    pub base: String,
    /// How an identity finds its entry: `{uri}`, `{dns}`, `{cn}` stand for the certificate's
    /// first URI SAN, first DNS SAN and CN, escaped per RFC 4515.
    #[serde(default = "default_directory_filter")]
    pub filter: String,
    /// Each lookup (connect, bind, searches) takes at most this long.
    #[serde(default = "default_directory_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no entry for this identity" is remembered.
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// With the directory unreachable, cached decisions hold this long past their TTL; then
    /// clients are refused.
    #[serde(default = "default_stale_for", with = "humantime_serde")]
    pub stale_for: Duration,
    /// Levels of nested groups followed.
    #[serde(default = "default_nested_depth")]
    pub nested_depth: usize,
    /// Connections to the directory, opened when needed.
    #[serde(default = "default_directory_connections")]
    pub connections: usize,
}

/// People only: a group entry shares `cn` with nothing a CA should issue, but must never be
/// taken for a client (a CN "ops" would otherwise be the group ops, member of its parents).
fn default_directory_filter() -> String {
    "(&(objectClass=person)(|(labeledURI={uri})(cn={cn})))".into()
}

fn default_directory_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_negative_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_stale_for() -> Duration {
    Duration::from_secs(300)
}

fn default_nested_depth() -> usize {
    4
}

fn default_directory_connections() -> usize {
    2
}

pub(super) fn validate(d: &Directory) -> Result<(), (Vec<Seg>, String)> {
    use Seg::Key;
    let at = |k: &'static str| vec![Key("directory"), Key(k)];
    let tls = if d.url.starts_with("ldaps://") {
        if d.starttls {
            return Err((
                at("starttls"),
                "ldaps:// is TLS already; remove starttls".into(),
            ));
        }
        true
    } else if d.url.starts_with("ldap://") {
        if !d.starttls && !d.insecure {
            return Err((
                at("url"),
                format!(
                    "{:?} without StartTLS sends identities and group lists in clear: use \
                     ldaps://, or starttls = true, or insecure = true",
                    d.url
                ),
            ));
        }
        d.starttls
    } else {
        return Err((
            at("url"),
            format!("{:?}: use ldaps://host[:port] or ldap://host[:port]", d.url),
        ));
    };
    if tls && d.ca.is_none() {
        return Err((
            at("ca"),
            "required with TLS: the CA of the directory's certificate".into(),
        ));
    }
    if d.bind_dn.is_some() != d.bind_password_file.is_some() {
        let k = if d.bind_dn.is_some() {
            "bind_password_file"
        } else {
            "bind_dn"
        };
        return Err((
            at(k),
            "`bind_dn` and `bind_password_file` go together".into(),
        ));
    }
    if d.cert.is_some() != d.key.is_some() {
        let k = if d.cert.is_some() { "key" } else { "cert" };
        return Err((at(k), "`cert` and `key` go together".into()));
    }
    if d.cert.is_some() && d.bind_dn.is_some() {
        return Err((
            at("cert"),
            "choose one bind: bind_dn (simple) or cert (SASL EXTERNAL)".into(),
        ));
    }
    if d.cert.is_some() && !tls {
        return Err((
            at("cert"),
            "SASL EXTERNAL needs TLS (ldaps:// or starttls)".into(),
        ));
    }
    if !["{uri}", "{dns}", "{cn}"]
        .iter()
        .any(|p| d.filter.contains(p))
    {
        return Err((
            at("filter"),
            "must use {uri}, {dns} or {cn}: the identity to look up".into(),
        ));
    }
    let probe = d
        .filter
        .replace("{uri}", "x")
        .replace("{dns}", "x")
        .replace("{cn}", "x");
    if ldap3::parse_filter(&probe).is_err() {
        return Err((
            at("filter"),
            format!("{:?} is not an LDAP filter", d.filter),
        ));
    }
    for (k, v) in [("timeout", d.timeout), ("cache_ttl", d.cache_ttl)] {
        if v.is_zero() {
            return Err((at(k), "must be greater than 0".into()));
        }
    }
    if !(1..=16).contains(&d.nested_depth) {
        return Err((at("nested_depth"), "must be 1-16".into()));
    }
    if !(1..=64).contains(&d.connections) {
        return Err((at("connections"), "must be 1-64".into()));
    }
    Ok(())
}
