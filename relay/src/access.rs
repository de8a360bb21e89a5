//! Identity-based access for `mtls` inbound (SPEC §1: access is decided by the authenticated
//! identity, declared in the config rather than programmed into applications).
//!
//! A client's [`Identity`] comes from its verified certificate: URI SANs (SPIFFE IDs), DNS SANs
//! and the subject CN. `allow` rules name who may pass:
//!
//! - `dns:api.example.org` — a DNS SAN, case-insensitive; `dns:*.example.org` matches one label.
//! - `uri:spiffe://example.org/ns/*/sa/web` — a URI SAN; `*` in the path matches within one
//!   path segment (never across `/`).
//! - `cn:ops-console` — the subject common name, exactly.
//! - `group:cn=ops,ou=groups,dc=example,dc=org` — the identity's directory entry is a member
//!   of the group (nested groups too); `attr:employeeType=staff` — the entry has the value.
//!   Both are decided by the `[directory]` (see `directory`), after the static rules.
//!
//! With `allow` set, a client matching no rule is denied. The decision is the last step of
//! the service's client policy (`tls::verify`), taken on every connection, resumed ones too;
//! the name that matched is what the relay logs and hands the backend (PROXY v2).

use std::{fmt, str::FromStr};

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _};

/// The names a verified client certificate carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub cn: Option<String>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
}

impl Identity {
    /// Reads the names of a DER certificate; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned);
        let mut id = Identity {
            cn,
            ..Identity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns.push((*d).to_owned()),
                    GeneralName::URI(u) => id.uris.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        Some(id)
    }

    /// The names an IKE identity (RFC 7296 ID payload, as charon reports it) stands for. charon
    /// has checked that the peer's certificate carries it, as its subject DN or as a SAN: a DN
    /// gives its CN, a DNS name itself; an address or e-mail name gives nothing to match.
    pub fn from_ike(id: &str) -> Identity {
        let id = id.trim();
        if id.contains('=') {
            let mut cns = id
                .split([',', '/'])
                .filter_map(|part| part.trim().split_once('='))
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("CN"))
                .map(|(_, v)| v.trim().to_string());
            // charon prints attribute values unescaped: a value holding ", CN=" would read as
            // a second CN. More than one gives no name rather than a guess.
            let cn = match (cns.next(), cns.next()) {
                (Some(cn), None) if !id.contains(['"', '\\']) => Some(cn),
                _ => None,
            };
            return Identity {
                cn,
                ..Identity::default()
            };
        }
        if id.contains('@') || id.parse::<std::net::IpAddr>().is_ok() {
            return Identity::default();
        }
        Identity {
            dns: vec![id.to_string()],
            ..Identity::default()
        }
    }

    /// The one name that stands for the client in logs and PROXY headers: its first URI SAN
    /// (a SPIFFE ID is the most specific), else its first DNS SAN, else its CN.
    pub fn principal(&self) -> String {
        if let Some(u) = self.uris.first() {
            format!("uri:{u}")
        } else if let Some(d) = self.dns.first() {
            format!("dns:{d}")
        } else if let Some(cn) = &self.cn {
            format!("cn:{cn}")
        } else {
            "(no name)".into()
        }
    }
}

/// One `allow` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Dns(String),
    Uri(String),
    Cn(String),
    /// Decided by the directory.
    Directory(crate::directory::Rule),
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let (kind, value) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: expected dns:NAME, uri:URI, cn:NAME, group:DN or attr:NAME=VALUE")
        })?;
        if value.is_empty() {
            return Err(format!("{s:?}: the name after {kind}: is empty"));
        }
        match kind {
            "dns" => {
                let rest = value.strip_prefix("*.").unwrap_or(value);
                if rest.contains('*') {
                    return Err(format!(
                        "{s:?}: a DNS rule may only start with `*.` (one label)"
                    ));
                }
                Ok(Rule::Dns(value.to_ascii_lowercase()))
            }
            "uri" => {
                // The wildcard belongs to the path: scheme and authority are always exact.
                let (_, after_scheme) = value.split_once("://").ok_or_else(|| {
                    format!("{s:?}: not a URI (expected scheme://authority/path)")
                })?;
                let authority = after_scheme.split('/').next().unwrap_or_default();
                if authority.is_empty() {
                    return Err(format!("{s:?}: the URI has no authority (trust domain)"));
                }
                if value[..value.len() - after_scheme.len() + authority.len()].contains('*') {
                    return Err(format!(
                        "{s:?}: `*` is allowed in the URI path only, not in its scheme or authority"
                    ));
                }
                Ok(Rule::Uri(value.to_owned()))
            }
            "cn" => Ok(Rule::Cn(value.to_owned())),
            "group" => {
                if !value.split(',').all(|rdn| rdn.contains('=')) {
                    return Err(format!(
                        "{s:?}: not a DN (expected e.g. group:cn=ops,ou=groups,dc=example,dc=org)"
                    ));
                }
                Ok(Rule::Directory(crate::directory::Rule::Group(
                    value.to_owned(),
                )))
            }
            "attr" => {
                let (name, v) = value
                    .split_once('=')
                    .filter(|(n, v)| !n.is_empty() && !v.is_empty())
                    .ok_or_else(|| format!("{s:?}: expected attr:NAME=VALUE"))?;
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return Err(format!("{s:?}: {name:?} is not an attribute name"));
                }
                Ok(Rule::Directory(crate::directory::Rule::Attr(
                    name.to_owned(),
                    v.to_owned(),
                )))
            }
            other => Err(format!(
                "{s:?}: unknown kind {other:?}; use dns:, uri:, cn:, group: or attr:"
            )),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Dns(v) => write!(f, "dns:{v}"),
            Rule::Uri(v) => write!(f, "uri:{v}"),
            Rule::Cn(v) => write!(f, "cn:{v}"),
            Rule::Directory(r) => r.fmt(f),
        }
    }
}

impl Rule {
    /// The name of `id` this rule accepts, with its kind (`dns:…`, `uri:…`, `cn:…`).
    fn matching(&self, id: &Identity) -> Option<String> {
        match self {
            Rule::Dns(pattern) => id
                .dns
                .iter()
                .find(|d| dns_matches(pattern, d))
                .map(|d| format!("dns:{d}")),
            Rule::Uri(pattern) => id
                .uris
                .iter()
                .find(|u| uri_matches(pattern, u))
                .map(|u| format!("uri:{u}")),
            Rule::Cn(cn) => (id.cn.as_deref() == Some(cn)).then(|| format!("cn:{cn}")),
            // Not decided from the certificate alone.
            Rule::Directory(_) => None,
        }
    }
}

/// A DNS name against a lowercase pattern (`*.` covers exactly one label); case-insensitive.
pub(crate) fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => name == pattern,
    }
}

/// A name for `inbound.sni`: a DNS name, or `*.` and a DNS name.
pub fn valid_sni_pattern(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.contains('*')
        && rest.contains('.')
        && matches!(
            rustls::pki_types::ServerName::try_from(rest),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        )
}

/// `*` matches any run of characters other than `/`: the URI and the pattern must have the
/// same number of `/`-separated segments, each matched on its own.
fn uri_matches(pattern: &str, uri: &str) -> bool {
    pattern.split('/').count() == uri.split('/').count()
        && pattern
            .split('/')
            .zip(uri.split('/'))
            .all(|(p, u)| glob(p.as_bytes(), u.as_bytes()))
}

/// `*` matches any run of bytes. The greedy matcher that backtracks only to the last star:
/// at most pattern × text steps, however many stars (a client chooses its URI SAN).
fn glob(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if p.get(pi) == Some(&b'*') {
            last_star = Some((pi, ti));
            pi += 1;
        } else if p.get(pi) == Some(&t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = last_star {
            // Let the last star swallow one more byte and retry from there.
            last_star = Some((sp, st + 1));
            pi = sp + 1;
            ti = st + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// The `allow` rules of one service.
#[derive(Clone, Debug, Default)]
pub struct Allow {
    rules: Vec<Rule>,
}

/// A verified client whose identity matches no `allow` rule.
#[derive(Debug, thiserror::Error)]
#[error("client identity {identity} matches no allow rule")]
pub struct Denied {
    pub identity: String,
}

impl Allow {
    /// Parses every rule; the error names the index of the first bad one.
    pub fn parse(rules: &[String]) -> Result<Allow, (usize, String)> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| r.parse().map_err(|e| (i, e)))
            .collect::<Result<_, _>>()?;
        Ok(Allow { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules the directory decides (`group:`, `attr:`).
    pub fn directory_rules(&self) -> Vec<crate::directory::Rule> {
        self.rules
            .iter()
            .filter_map(|r| match r {
                Rule::Directory(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// The first rule that lets `id` pass, with the name it accepted; or the denial.
    pub fn decide(&self, id: &Identity) -> Result<Authorised, Denied> {
        self.rules
            .iter()
            .find_map(|r| {
                r.matching(id).map(|name| Authorised {
                    name,
                    rule: r.to_string(),
                })
            })
            .ok_or_else(|| Denied {
                identity: id.principal(),
            })
    }
}

/// What an `allow` decision let in: the client's name that matched, with its kind (`uri:…`,
/// `dns:…`, `cn:…`), and the rule that matched it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorised {
    pub name: String,
    pub rule: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: Option<&str>, dns: &[&str], uris: &[&str]) -> Identity {
        Identity {
            cn: cn.map(str::to_owned),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn allow(rules: &[&str]) -> Allow {
        Allow::parse(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn uri_wildcards_stay_inside_one_segment() {
        let a = allow(&["uri:spiffe://example.org/ns/*/sa/web"]);
        let web = id(None, &[], &["spiffe://example.org/ns/prod/sa/web"]);
        // The name that matched, not the rule, is what was authorised.
        assert_eq!(
            a.decide(&web).unwrap(),
            Authorised {
                name: "uri:spiffe://example.org/ns/prod/sa/web".into(),
                rule: "uri:spiffe://example.org/ns/*/sa/web".into(),
            }
        );
        for other in [
            "spiffe://example.org/ns/a/b/sa/web",
            "spiffe://example.org/ns/prod/sa/db",
            "spiffe://evil.org/ns/prod/sa/web",
            "spiffe://example.org/ns/prod/sa/web/extra",
        ] {
            let e = a.decide(&id(None, &[], &[other])).unwrap_err();
            assert_eq!(e.identity, format!("uri:{other}"));
        }
        // Found by the allow_rules fuzz target: a star before multi-byte characters.
        let utf8 = allow(&["uri:spiffe://example.org/*é"]);
        assert!(
            utf8.decide(&id(None, &[], &["spiffe://example.org/ééé"]))
                .is_ok()
        );
        assert!(
            utf8.decide(&id(None, &[], &["spiffe://example.org/€"]))
                .is_err()
        );
        // Many stars against a long segment: a backtracking matcher would not finish this
        // (the allow_rules fuzz target found such inputs); this one takes pattern × text steps.
        let stars = format!("uri:spiffe://example.org/{}b", "*a".repeat(40));
        let long = format!("spiffe://example.org/{}", "a".repeat(5000));
        assert!(allow(&[&stars]).decide(&id(None, &[], &[&long])).is_err());
        let prefix = allow(&["uri:spiffe://example.org/web-*"]);
        assert!(
            prefix
                .decide(&id(None, &[], &["spiffe://example.org/web-1"]))
                .is_ok()
        );
        assert!(
            prefix
                .decide(&id(None, &[], &["spiffe://example.org/web-1/x"]))
                .is_err()
        );
    }

    #[test]
    fn dns_and_cn_rules() {
        let a = allow(&["dns:API.example.org", "dns:*.svc.example.org", "cn:ops"]);
        assert_eq!(
            a.decide(&id(Some("ops"), &["a.other.org", "api.EXAMPLE.org"], &[]))
                .unwrap()
                .name,
            "dns:api.EXAMPLE.org",
            "the DNS name that matched, not the first one nor the CN"
        );
        assert!(a.decide(&id(None, &["x.svc.example.org"], &[])).is_ok());
        assert!(a.decide(&id(None, &["svc.example.org"], &[])).is_err());
        assert!(a.decide(&id(None, &["a.b.svc.example.org"], &[])).is_err());
        assert!(a.decide(&id(Some("ops"), &[], &[])).is_ok());
        assert!(a.decide(&id(Some("OPS"), &[], &[])).is_err());
        assert_eq!(
            a.decide(&id(Some("x"), &["other.org"], &[]))
                .unwrap_err()
                .identity,
            "dns:other.org"
        );
    }

    #[test]
    fn directory_rules_are_left_to_the_directory() {
        let a = Allow::parse(&[
            "cn:ops".into(),
            "group:cn=staff,ou=groups,dc=example,dc=org".into(),
            "attr:employeeType=staff".into(),
        ])
        .unwrap();
        assert_eq!(a.directory_rules().len(), 2);
        assert!(
            a.decide(&id(Some("ops"), &[], &[])).is_ok(),
            "static rules still decide"
        );
        assert!(
            a.decide(&id(Some("alice"), &[], &[])).is_err(),
            "a directory rule never matches from the certificate alone"
        );
    }

    #[test]
    fn bad_rules_are_refused_with_their_index() {
        for (rule, needle) in [
            ("api.example.org", "expected dns:NAME"),
            ("ip:192.0.2.1", "unknown kind"),
            ("dns:", "empty"),
            ("dns:a.*.org", "only start with"),
            ("uri:spiffe://*.org/web", "path only"),
            ("uri:web", "not a URI"),
            ("group:ops", "not a DN"),
            ("attr:employeeType", "attr:NAME=VALUE"),
            ("attr:bad name=x", "not an attribute name"),
        ] {
            let (i, e) = Allow::parse(&["cn:ok".into(), rule.into()]).unwrap_err();
            assert_eq!(i, 1);
            assert!(e.contains(needle), "{rule}: {e}");
        }
    }
}
