//! Privileges from a directory: `allow` rules `group:<DN>` and `attr:<name>=<value>` decided by
//! an LDAP server (OpenLDAP, Active Directory, FreeIPA) for the authenticated identity.
//!
//! After a client's certificate is verified (every connection, resumed ones too: see
//! `tls::verify`), a service whose static rules (`dns:`, `uri:`, `cn:`) did not let it in asks
//! the [`Directory`]: the identity is mapped to exactly one entry through the configured search
//! filter (its values escaped per RFC 4515, so a certificate name cannot change the filter),
//! then the entry's groups are found — the groups that list it as `member` or `uniqueMember`,
//! and the groups that list those, to `nested_depth` — and its attributes read. These facts are
//! cached per identity (`cache_ttl`, `negative_ttl` for identities without an entry); each
//! service's rules are decided from them.
//!
//! Failure: a lookup is bounded by `timeout` (and by the handshake timeout around it). When the
//! directory does not answer, a cached decision is honoured up to `stale_for` past its TTL;
//! after that the client is refused (fail closed). Connections (`connections` of them) are
//! opened when needed and again after a failure, with backoff; several lookups share one.
//!
//! The worker may not resolve names (it reads no file): the supervisor resolves the URL's host
//! when it checks the configuration and hands over the addresses; the URL's host is still the
//! name the server's certificate must carry.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, StdStream, ldap_escape};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::access::{Authorised, Identity};

/// Longest a connection that failed waits before it is tried again.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Identities whose facts are kept at most; the oldest go first.
const CACHE_ENTRIES: usize = 10_000;

/// What the worker needs to reach the directory: the checked `[directory]` section with the
/// bytes of its files and the addresses of its host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub url: String,
    pub starttls: bool,
    /// The URL's host resolved by the supervisor.
    pub addrs: Vec<SocketAddr>,
    /// PEM of the CA that signs the directory's certificate (ldaps or StartTLS).
    pub ca: Option<Vec<u8>>,
    pub bind: Bind,
    pub base: String,
    pub filter: String,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_for: Duration,
    pub nested_depth: usize,
    pub connections: usize,
}

/// How the relay authenticates to the directory.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub enum Bind {
    Anonymous,
    Simple {
        dn: String,
        password: String,
    },
    /// SASL EXTERNAL: the relay's client certificate (PEM chain and key) names it.
    External {
        cert: Vec<u8>,
        key: Vec<u8>,
    },
}

impl std::fmt::Debug for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::Anonymous => f.write_str("Anonymous"),
            Bind::Simple { dn, .. } => write!(f, "Simple({dn})"),
            Bind::External { .. } => f.write_str("External"),
        }
    }
}

/// A rule the directory decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Member of this group (DN compared case-insensitively, spaces after commas ignored).
    Group(String),
    /// Has this attribute with this value (value compared case-insensitively).
    Attr(String, String),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Group(dn) => write!(f, "group:{dn}"),
            Rule::Attr(name, value) => write!(f, "attr:{name}={value}"),
        }
    }
}

/// The directory's answer for one connection.
#[derive(Debug)]
pub enum Verdict {
    Allowed(Authorised),
    /// The directory answered: no rule matches (or no single entry for the identity).
    Denied(String),
    /// The directory did not answer and nothing cached may stand in: refused (fail closed).
    Unavailable(String),
}

/// What the directory says of one identity.
#[derive(Clone, Debug)]
enum Facts {
    Found {
        dn: String,
        /// Normalised DNs of every group it belongs to, directly or nested.
        groups: HashSet<String>,
        /// Attribute names lowercased.
        attrs: HashMap<String, Vec<String>>,
    },
    /// No entry, or several (an ambiguous mapping admits nobody).
    Missing(String),
}

struct Cached {
    facts: Facts,
    at: Instant,
}

/// Counters for `/metrics` and `relay status`.
#[derive(Default)]
pub struct Counters {
    pub lookups: AtomicU64,
    pub cache_hits: AtomicU64,
    pub failures: AtomicU64,
    pub stale: AtomicU64,
}

/// The directory's state as `relay status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub url: String,
    /// The last lookup reached the directory.
    pub reachable: bool,
    pub last_error: Option<String>,
    pub cached: usize,
    pub lookups: u64,
    pub cache_hits: u64,
    pub failures: u64,
    pub stale: u64,
}

/// One connection slot of the pool. Its lock is held only to look at it or to (re)connect:
/// lookups use a clone of the handle, and ldap3 runs several operations on one connection.
#[derive(Default)]
struct Slot {
    /// The connection, and its number (to forget exactly the one that failed).
    ldap: Option<(u64, Ldap)>,
    /// After a failure: not before then.
    retry_at: Option<Instant>,
    backoff: Duration,
}

pub struct Directory {
    settings: Settings,
    tls: Option<Arc<rustls::ClientConfig>>,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next: AtomicUsize,
    /// Numbers the connections opened.
    opened: AtomicU64,
    cache: Mutex<HashMap<String, Cached>>,
    pub counters: Counters,
    last_error: Mutex<Option<String>>,
}

impl Directory {
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Directory>> {
        let tls = if settings.url.starts_with("ldaps://") || settings.starttls {
            Some(tls_config(&settings)?)
        } else {
            None
        };
        let slots = (0..settings.connections.max(1))
            .map(|_| tokio::sync::Mutex::new(Slot::default()))
            .collect();
        Ok(Arc::new(Directory {
            settings,
            tls,
            slots,
            next: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Decides `rules` for `id`: from the cache while fresh, else from the directory; when it
    /// does not answer by `not_after` (or within `timeout`), from a stale cache entry up to
    /// `stale_for`, else refused.
    pub async fn decide(&self, id: &Identity, rules: &[Rule], not_after: Instant) -> Verdict {
        let key = cache_key(id);
        let now = Instant::now();
        let cached = self.cached(&key, now);
        if let Some((facts, fresh)) = &cached
            && *fresh
        {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return verdict(facts, rules);
        }
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let deadline = not_after.min(now + self.settings.timeout);
        let looked_up = self.lookup(id, deadline.into()).await;
        match looked_up {
            Ok(facts) => {
                if let Some(e) = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    info!("directory reachable again (it was: {e})");
                }
                let v = verdict(&facts, rules);
                self.remember(key, facts, now);
                v
            }
            Err(e) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                let was_reachable = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(e.clone())
                    .is_none();
                // Once per outage at warning level: every connection meanwhile would repeat it.
                if was_reachable {
                    warn!(
                        "directory unreachable ({e}): cached decisions hold for stale_for, \
                           then clients are refused"
                    );
                }
                match cached {
                    Some((facts, _)) => {
                        self.counters.stale.fetch_add(1, Ordering::Relaxed);
                        debug!(identity = %id.principal(), "directory unreachable ({e}): \
                               deciding from the cached entry (within stale_for)");
                        verdict(&facts, rules)
                    }
                    None => Verdict::Unavailable(format!(
                        "directory unreachable and nothing cached within stale_for: {e}"
                    )),
                }
            }
        }
    }

    /// The cached facts for `key` if still usable: fresh (within their TTL), or stale (within
    /// `stale_for` after it) — `(facts, fresh)`.
    fn cached(&self, key: &str, now: Instant) -> Option<(Facts, bool)> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let c = cache.get(key)?;
        let ttl = match c.facts {
            Facts::Found { .. } => self.settings.cache_ttl,
            Facts::Missing(_) => self.settings.negative_ttl,
        };
        let age = now.saturating_duration_since(c.at);
        if age <= ttl {
            Some((c.facts.clone(), true))
        } else if age <= ttl + self.settings.stale_for {
            Some((c.facts.clone(), false))
        } else {
            None
        }
    }

    fn remember(&self, key: String, facts: Facts, now: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&key) {
            let limit = self.settings.cache_ttl + self.settings.stale_for;
            cache.retain(|_, c| now.saturating_duration_since(c.at) <= limit);
            if cache.len() >= CACHE_ENTRIES
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, Cached { facts, at: now });
    }

    pub fn status(&self) -> Status {
        let c = &self.counters;
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Status {
            url: self.settings.url.clone(),
            reachable: last_error.is_none(),
            last_error,
            cached: self.cache.lock().map(|c| c.len()).unwrap_or(0),
            lookups: c.lookups.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
        }
    }

    /// The entry of `id`, its groups and attributes, by `deadline`.
    async fn lookup(&self, id: &Identity, deadline: tokio::time::Instant) -> Result<Facts, String> {
        let (n, number, mut ldap) = self.connection(deadline).await?;
        let searched = tokio::time::timeout_at(deadline, self.search(&mut ldap, id)).await;
        let e = match searched {
            Ok(Ok(facts)) => return Ok(facts),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {:?}", self.settings.timeout),
        };
        // The connection may be broken (or silent): the next lookup opens a new one.
        let mut slot = self.slots[n].lock().await;
        if slot.ldap.as_ref().is_some_and(|(k, _)| *k == number) {
            slot.ldap = None;
        }
        Err(e)
    }

    /// A connection to search with: a connected slot if there is one (starting from the next
    /// in turn), else one not waiting out a backoff, connected now.
    async fn connection(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, u64, Ldap), String> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let order: Vec<usize> = (0..self.slots.len())
            .map(|i| (first + i) % self.slots.len())
            .collect();
        for &n in &order {
            if let Ok(slot) = self.slots[n].try_lock()
                && let Some((number, ldap)) = &slot.ldap
            {
                return Ok((n, *number, ldap.clone()));
            }
        }
        let mut waiting = None;
        for &n in &order {
            let Ok(mut slot) = tokio::time::timeout_at(deadline, self.slots[n].lock()).await else {
                return Err(format!("no connection within {:?}", self.settings.timeout));
            };
            if let Some((number, ldap)) = &slot.ldap {
                return Ok((n, *number, ldap.clone()));
            }
            if let Some(at) = slot.retry_at
                && Instant::now() < at
            {
                waiting = Some(at - Instant::now());
                continue;
            }
            let failed = match tokio::time::timeout_at(deadline, self.connect()).await {
                Ok(Ok(ldap)) => {
                    let number = self.opened.fetch_add(1, Ordering::Relaxed);
                    slot.ldap = Some((number, ldap.clone()));
                    slot.retry_at = None;
                    slot.backoff = Duration::ZERO;
                    return Ok((n, number, ldap));
                }
                Ok(Err(e)) => e,
                Err(_) => format!("connect: no answer within {:?}", self.settings.timeout),
            };
            slot.backoff = (slot.backoff * 2).clamp(Duration::from_millis(200), BACKOFF_MAX);
            slot.retry_at = Some(Instant::now() + slot.backoff);
            return Err(failed);
        }
        Err(format!(
            "reconnecting after a failure (next try in {:?})",
            waiting.unwrap_or_default()
        ))
    }

    async fn connect(&self) -> Result<Ldap, String> {
        let s = &self.settings;
        let mut last = String::from("no address for the directory's host");
        for addr in &s.addrs {
            let stream =
                match tokio::time::timeout(s.timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        last = format!("connect to {addr}: {e}");
                        continue;
                    }
                    Err(_) => {
                        last = format!("connect to {addr}: no answer within {:?}", s.timeout);
                        continue;
                    }
                };
            // A connection that goes silent (a firewall forgetting it) is found out.
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let std = stream.into_std().map_err(|e| e.to_string())?;
            let mut settings = LdapConnSettings::new()
                .set_conn_timeout(s.timeout)
                .set_starttls(s.starttls)
                .set_std_stream(StdStream::Tcp(std));
            if let Some(tls) = &self.tls {
                settings = settings.set_config(Arc::clone(tls));
            }
            let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &s.url)
                .await
                .map_err(|e| format!("{}: {e}", s.url))?;
            ldap3::drive!(conn);
            let bound = match &s.bind {
                Bind::Anonymous => Ok(None),
                Bind::Simple { dn, password } => ldap
                    .with_timeout(s.timeout)
                    .simple_bind(dn, password)
                    .await
                    .and_then(|r| r.success())
                    .map(|_| Some("simple")),
                Bind::External { .. } => ldap
                    .with_timeout(s.timeout)
                    .sasl_external_bind()
                    .await
                    .and_then(|r| r.success())
                    .map(|_| Some("SASL EXTERNAL")),
            };
            match bound {
                Ok(how) => {
                    info!(url = %s.url, %addr, bind = how.unwrap_or("anonymous"), "directory connected");
                    return Ok(ldap);
                }
                Err(e) => return Err(format!("bind to {}: {e}", s.url)),
            }
        }
        Err(last)
    }

    async fn search(&self, ldap: &mut Ldap, id: &Identity) -> Result<Facts, String> {
        let s = &self.settings;
        let filter = render_filter(&s.filter, id);
        let entries = self.find(ldap, &filter, "*").await?;
        if entries.len() != 1 {
            return Ok(Facts::Missing(if entries.is_empty() {
                format!("no entry matches {filter}")
            } else {
                format!(
                    "{} entries match {filter}: ambiguous, nobody is admitted",
                    entries.len()
                )
            }));
        }
        let Some(entry) = entries.into_iter().next() else {
            return Ok(Facts::Missing(format!("no entry matches {filter}")));
        };
        let groups = self.groups_of(ldap, &entry.dn).await?;
        let attrs = entry
            .attrs
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        Ok(Facts::Found {
            dn: entry.dn,
            groups,
            attrs,
        })
    }

    /// The entries `filter` finds under `base` (subtree), with the attributes `attrs` asks.
    async fn find(
        &self,
        ldap: &mut Ldap,
        filter: &str,
        attrs: &str,
    ) -> Result<Vec<SearchEntry>, String> {
        let s = &self.settings;
        let (found, _) = ldap
            .with_timeout(s.timeout)
            .search(&s.base, Scope::Subtree, filter, vec![attrs])
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("search {filter}: {e}"))?;
        // ldap3 panics on an entry it cannot decode: a bad answer refuses this lookup only.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            found.into_iter().map(SearchEntry::construct).collect()
        }))
        .map_err(|_| "the directory sent an entry that cannot be read".to_string())
    }

    /// The groups that list `dn` as `member` or `uniqueMember`, and the groups listing those,
    /// up to `nested_depth` levels; a cycle ends where it closes.
    async fn groups_of(&self, ldap: &mut Ldap, dn: &str) -> Result<HashSet<String>, String> {
        let s = &self.settings;
        let mut groups = HashSet::new();
        let mut frontier = vec![dn.to_string()];
        for _ in 0..s.nested_depth.max(1) {
            if frontier.is_empty() {
                break;
            }
            let terms: String = frontier
                .iter()
                .map(|d| {
                    let d = ldap_escape(d.as_str());
                    format!("(member={d})(uniqueMember={d})")
                })
                .collect();
            let filter = format!("(|{terms})");
            // "1.1": no attributes, the DNs are enough.
            let found = self.find(ldap, &filter, "1.1").await?;
            frontier = Vec::new();
            for g in found {
                if groups.insert(normalise_dn(&g.dn)) {
                    frontier.push(g.dn);
                }
            }
        }
        Ok(groups)
    }
}

/// The rustls client configuration toward the directory: its CA, and the client certificate
/// for SASL EXTERNAL.
pub fn tls_config(s: &Settings) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &s.ca {
        for cert in CertificateDer::pem_slice_iter(ca) {
            roots.add(cert?)?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &s.bind {
        Bind::External { cert, key } => {
            let chain = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The search filter for `id`: `{uri}`, `{dns}`, `{cn}` replaced by the identity's first URI
/// SAN, first DNS SAN and CN, each escaped per RFC 4515. A name the identity lacks becomes a
/// value no entry has (an escaped NUL), so its term matches nothing.
pub fn render_filter(template: &str, id: &Identity) -> String {
    let value = |v: Option<&String>| match v {
        Some(v) => ldap_escape(v.as_str()).into_owned(),
        None => "\\00".to_string(),
    };
    // One pass over the template: a value is never searched for placeholders itself (a URI
    // SAN containing `{cn}` stays that text).
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if tail.starts_with("{uri}") {
            (Some(value(id.uris.first())), 5)
        } else if tail.starts_with("{dns}") {
            (Some(value(id.dns.first())), 5)
        } else if tail.starts_with("{cn}") {
            (Some(value(id.cn.as_ref())), 4)
        } else {
            (None, 1)
        };
        match name {
            Some(v) => out.push_str(&v),
            None => out.push('{'),
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// A DN as compared: lowercase, no spaces around `,` and `=`.
pub fn normalise_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| {
            rdn.split('=')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("=")
                .to_lowercase()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn cache_key(id: &Identity) -> String {
    format!("{:?}|{:?}|{:?}", id.uris, id.dns, id.cn)
}

/// The first rule the facts satisfy.
fn verdict(facts: &Facts, rules: &[Rule]) -> Verdict {
    let (dn, groups, attrs) = match facts {
        Facts::Missing(why) => return Verdict::Denied(why.clone()),
        Facts::Found { dn, groups, attrs } => (dn, groups, attrs),
    };
    for rule in rules {
        let matched = match rule {
            Rule::Group(g) => groups.contains(&normalise_dn(g)),
            Rule::Attr(name, value) => attrs
                .get(&name.to_ascii_lowercase())
                .is_some_and(|vs| vs.iter().any(|v| v.eq_ignore_ascii_case(value))),
        };
        if matched {
            return Verdict::Allowed(Authorised {
                name: format!("ldap:{dn}"),
                rule: rule.to_string(),
            });
        }
    }
    Verdict::Denied(format!("directory entry {dn} matches no allow rule"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_are_escaped_so_a_name_cannot_change_the_filter() {
        let id = Identity {
            cn: Some("*)(cn=*".into()),
            dns: vec![],
            uris: vec!["spiffe://example.org/a\\b".into()],
        };
        let f = render_filter("(|(seeAlso={uri})(cn={cn})(dNSName={dns}))", &id);
        assert_eq!(
            f,
            "(|(seeAlso=spiffe://example.org/a\\5cb)(cn=\\2a\\29\\28cn=\\2a)(dNSName=\\00))"
        );
        assert!(ldap3::parse_filter(&f).is_ok(), "still one valid filter");
    }

    #[test]
    fn a_placeholder_inside_a_name_is_not_substituted() {
        let id = Identity {
            cn: Some("admin".into()),
            dns: vec![],
            uris: vec!["spiffe://x/{cn}".into()],
        };
        assert_eq!(
            render_filter("(|(labeledURI={uri})(cn={cn}))", &id),
            "(|(labeledURI=spiffe://x/{cn})(cn=admin))"
        );
    }

    #[test]
    fn rules_are_decided_from_the_facts() {
        let facts = Facts::Found {
            dn: "uid=alice,ou=people,dc=example,dc=org".into(),
            groups: ["cn=ops,ou=groups,dc=example,dc=org".to_string()].into(),
            attrs: [("employeetype".to_string(), vec!["Staff".to_string()])].into(),
        };
        let allowed = |rules: &[Rule]| matches!(verdict(&facts, rules), Verdict::Allowed(_));
        assert!(allowed(&[Rule::Group(
            "CN=Ops, OU=groups,dc=example,dc=org".into()
        )]));
        assert!(!allowed(&[Rule::Group(
            "cn=dev,ou=groups,dc=example,dc=org".into()
        )]));
        assert!(allowed(&[Rule::Attr(
            "employeeType".into(),
            "staff".into()
        )]));
        assert!(!allowed(&[Rule::Attr(
            "employeeType".into(),
            "contractor".into()
        )]));
        assert!(!allowed(&[]));
        assert!(matches!(
            verdict(
                &Facts::Missing("none".into()),
                &[Rule::Group("cn=ops".into())]
            ),
            Verdict::Denied(_)
        ));
    }
}
