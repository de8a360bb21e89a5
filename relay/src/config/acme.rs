//! `[acme]`: the ACME server (RFC 8555) that issues the certificates of services with
//! `inbound.cert = "acme"` (see `crate::acme`), and what is checked of it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Seg;

/// The value of `inbound.cert` that asks for a certificate from `[acme]`.
pub const ACME: &str = "acme";

/// `[acme]`: where certificates come from, and where they are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The ACME directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contact URLs for the account (`mailto:ops@example.org`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// The account's credentials (key and URL, JSON), created on first use; default
    /// `<storage>/account.json`.
    pub account_key: Option<PathBuf>,
    /// CA of the ACME server's own certificate; default: the system's CA store.
    pub ca: Option<PathBuf>,
    /// Where issued certificates and their keys are kept (mode 0600), one file per service.
    #[serde(default = "default_storage")]
    pub storage: PathBuf,
    /// How the ACME server validates the names.
    #[serde(default)]
    pub challenge: Challenge,
}

/// `[acme] challenge`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Challenge {
    /// On the service's own TLS front port (RFC 8737).
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// `GET /.well-known/acme-challenge/<token>` on port 80, answered by a plain service with
    /// `answer_http01 = true`.
    #[serde(rename = "http-01")]
    Http01,
}

fn default_storage() -> PathBuf {
    PathBuf::from("/var/lib/relay/acme")
}

impl Acme {
    pub fn account_path(&self) -> PathBuf {
        self.account_key
            .clone()
            .unwrap_or_else(|| self.storage.join("account.json"))
    }

    /// Where service `name`'s key and certificate chain are kept: one PEM file, so that they
    /// are replaced together.
    pub fn stored(&self, name: &str) -> PathBuf {
        self.storage.join(format!("{name}.pem"))
    }
}

pub(super) fn validate(a: &Acme) -> Result<(), (Vec<Seg>, String)> {
    use Seg::{Index, Key};
    let at = |k: &'static str| vec![Key("acme"), Key(k)];
    if !a.directory.starts_with("https://") {
        return Err((
            at("directory"),
            format!(
                "{:?}: an ACME directory is an https:// URL (RFC 8555 6.1)",
                a.directory
            ),
        ));
    }
    for (n, c) in a.contact.iter().enumerate() {
        if !c.starts_with("mailto:") {
            return Err((
                vec![Key("acme"), Key("contact"), Index(n)],
                format!("{c:?}: use mailto:address"),
            ));
        }
    }
    Ok(())
}

/// A DNS name a certificate can be issued for: letters, digits, `-`, dots between labels,
/// `*.` only in front.
pub(super) fn valid_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}
