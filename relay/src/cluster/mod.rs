//! Several gateways as one: services and TLS session ticket keys shared through etcd.
//!
//! Layout under `[cluster] prefix` (default `/relay`):
//!
//! ```text
//! <prefix>/services/<name>   a service, JSON with the fields of a [[service]] table
//! <prefix>/tickets           the ticket keys, sealed with the key-encryption key (`sealed`)
//! <prefix>/members/<name>    each gateway's state, bound to its lease (`Member`)
//! <prefix>/leader            the election of the gateway that rotates the ticket keys
//! ```
//!
//! The supervisor runs one [`etcd::run`] task. It connects, reads what is there, watches for
//! changes from the revision it has, keeps this gateway's lease and member key, and campaigns
//! for leadership; what it learns goes to the supervisor's loop as [`Update`]s, which applies
//! services through the same checked changes as `relay service add|remove` (one bad entry is
//! refused with its key, the rest applies). The loop asks it to write through [`Command`]s.
//! While etcd is unreachable nothing changes: every gateway serves what it last applied
//! ("fail static"), and [`cache`] keeps that state on disk for a gateway that starts then.

pub mod cache;
pub mod etcd;
pub mod sealed;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{config::Service, tickets::TicketKey};

/// What the cluster task tells the supervisor.
#[derive(Debug)]
pub enum Update {
    /// Connected to etcd (true) or lost it (false).
    Connected(bool),
    /// Services read at `revision`: all of them (`full`: the ones not listed are gone) or the
    /// ones that changed.
    Services {
        revision: i64,
        full: bool,
        entries: Vec<Entry>,
    },
    /// The cluster's ticket keys, newest first, and as sealed in etcd (for the cache).
    Tickets {
        keys: Vec<TicketKey>,
        sealed: Vec<u8>,
        /// When they were drawn (seconds since the epoch).
        rotated_at: u64,
    },
    /// This gateway became the one that rotates the ticket keys, or stopped being it.
    Leader(bool),
}

/// One service key in etcd.
#[derive(Debug)]
pub struct Entry {
    /// The etcd key, for logs.
    pub key: String,
    /// The service name (the key's last segment).
    pub name: String,
    pub revision: i64,
    /// `None`: deleted. `Err`: a value that is not a service, with why.
    pub value: Option<Result<Service, String>>,
}

/// What the supervisor asks of the cluster task.
pub enum Command {
    /// This gateway's state, for its member key.
    Member(Member),
    /// Write a service (checked by the supervisor first); answers the revision.
    Put {
        service: Box<Service>,
        reply: oneshot::Sender<anyhow::Result<i64>>,
    },
    /// Delete a service; answers the revision.
    Delete {
        name: String,
        reply: oneshot::Sender<anyhow::Result<i64>>,
    },
    /// Draw new ticket keys now (from any member: a compare-and-swap on the current ones).
    Rotate {
        reply: oneshot::Sender<anyhow::Result<i64>>,
    },
    /// The members and the leader, for `relay status --cluster`.
    Status {
        reply: oneshot::Sender<anyhow::Result<(Vec<Member>, Option<String>)>>,
    },
    /// Give the lease back (member key and leadership go at once) and end.
    Stop { done: oneshot::Sender<()> },
}

/// A gateway as its member key shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub version: String,
    /// The newest etcd revision of the service set this gateway applied.
    pub revision: i64,
    /// Digest of the cluster services it applied, each with its key's revision: members that
    /// show the same digest serve the same cluster service set.
    pub digest: String,
    /// Services it serves (file and cluster).
    pub services: usize,
    /// `serving`, or why not (`worker starting`).
    pub health: String,
    pub leader: bool,
}

/// The answer to `relay status --cluster`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub connected: bool,
    pub revision: i64,
    pub leader: Option<String>,
    pub members: Vec<Member>,
    /// Every member applied the same service set (the same digest).
    pub agree: bool,
    /// Why the members could not be listed (etcd unreachable).
    pub error: Option<String>,
}

/// The digest members compare: the cluster services applied, by name and key revision.
pub fn digest<'a>(applied: impl Iterator<Item = (&'a String, &'a i64)>) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (name, revision) in applied {
        ctx.update(format!("{name}@{revision}\n").as_bytes());
    }
    ctx.finish().as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn services_prefix(prefix: &str) -> String {
    format!("{prefix}/services/")
}

pub fn tickets_key(prefix: &str) -> String {
    format!("{prefix}/tickets")
}

pub fn members_prefix(prefix: &str) -> String {
    format!("{prefix}/members/")
}

pub fn election(prefix: &str) -> String {
    format!("{prefix}/leader")
}

/// Largest inline PEM accepted in a service entry (a certificate chain or a key).
const MAX_INLINE_PEM: usize = 256 << 10;

/// A service value from etcd: JSON of a `[[service]]` table, its name equal to its key's. TLS
/// material is named by absolute paths under `material` (present on every gateway), or given
/// inline as PEM (`"cert": "-----BEGIN CERTIFICATE-----\n..."`), which is written under
/// `pem_dir` (0600, named by its digest) and used from there.
pub fn parse_service(
    name: &str,
    value: &[u8],
    material: &Path,
    pem_dir: &Path,
) -> Result<Service, String> {
    let de = &mut serde_json::Deserializer::from_slice(value);
    let mut service: Service = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path == "?" {
            format!("not a service: {}", e.into_inner())
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })?;
    if service.name != name {
        return Err(format!(
            "name: {:?} differs from the key's name {name:?}",
            service.name
        ));
    }
    for (key, path) in files_of(&mut service) {
        let text = path.to_string_lossy();
        if text.trim_start().starts_with("-----BEGIN ") {
            if text.len() > MAX_INLINE_PEM {
                return Err(format!("{key}: inline PEM over {MAX_INLINE_PEM} bytes"));
            }
            *path = write_pem(pem_dir, text.as_bytes()).map_err(|e| format!("{key}: {e:#}"))?;
        }
    }
    check_paths(&service, material, pem_dir)?;
    Ok(service)
}

/// Every file a service from the cluster names must be under `material` (or be inline PEM,
/// written under `pem_dir` by [`parse_service`]): absolute, without `..`.
pub fn check_paths(service: &Service, material: &Path, pem_dir: &Path) -> Result<(), String> {
    let mut service = service.clone();
    for (key, path) in files_of(&mut service) {
        let inline = path.parent() == Some(pem_dir);
        let plain = path.is_absolute()
            && !path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if !plain || !(path.starts_with(material) || inline) {
            return Err(format!(
                "{key}: {} is not under [cluster] material ({}): a service from the cluster \
                 names files there, by absolute path, or gives the PEM inline",
                path.display(),
                material.display()
            ));
        }
    }
    Ok(())
}

/// The file fields of a service, by key.
fn files_of(s: &mut Service) -> Vec<(&'static str, &mut PathBuf)> {
    let mut files: Vec<(&str, &mut PathBuf)> = Vec::new();
    for (k, p) in [
        ("inbound.cert", &mut s.inbound.cert),
        ("inbound.key", &mut s.inbound.key),
        ("inbound.client_ca", &mut s.inbound.client_ca),
        ("inbound.crl", &mut s.inbound.crl),
        ("outbound.ca", &mut s.outbound.ca),
        ("outbound.cert", &mut s.outbound.cert),
        ("outbound.key", &mut s.outbound.key),
    ] {
        if let Some(p) = p {
            files.push((k, p));
        }
    }
    for e in &mut s.inbound.sni {
        files.push(("inbound.sni.cert", &mut e.cert));
        files.push(("inbound.sni.key", &mut e.key));
    }
    files
}

/// Writes inline PEM once, under its digest: the same text is the same file on every gateway.
fn write_pem(dir: &Path, pem: &[u8]) -> anyhow::Result<PathBuf> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pem);
    let name: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("{name}.pem"));
    if !path.exists() {
        crate::sys::write_private(&path, pem)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = r#"{"name":"shop","server":"203.0.113.10","port":443,
        "backend_port":8080,"listen":"127.0.0.1:8443",
        "inbound":{"level":"tls","cert":"/etc/relay/shop.pem","key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
        "outbound":{"level":"plain"}}"#;

    #[test]
    fn services_parse_with_paths_and_inline_pem() {
        let dir = tempfile::tempdir().unwrap();
        let s = parse_service(
            "shop",
            SERVICE.as_bytes(),
            Path::new("/etc/relay"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(s.port, 443);
        assert_eq!(
            s.inbound.cert.as_deref(),
            Some(Path::new("/etc/relay/shop.pem"))
        );
        let key = s.inbound.key.unwrap();
        assert!(key.starts_with(dir.path()));
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let err = |name: &str, v: &str| {
            parse_service(name, v.as_bytes(), Path::new("/etc/relay"), dir.path()).unwrap_err()
        };
        assert!(err("shop", "not json").contains("not a service"));
        assert!(err("other", SERVICE).contains("differs from the key's name"));
        let relative = SERVICE.replace("/etc/relay/shop.pem", "shop.pem");
        assert!(err("shop", &relative).contains("inbound.cert"));
        for elsewhere in ["/etc/ssl/private/other.key", "/etc/relay/../shadow"] {
            let v = SERVICE.replace("/etc/relay/shop.pem", elsewhere);
            assert!(
                err("shop", &v).contains("not under [cluster] material"),
                "{elsewhere}"
            );
        }
        let big = SERVICE.replace("AAAA", &"A".repeat(300 << 10));
        assert!(err("shop", &big).contains("inline PEM over"));
        let bad_port = SERVICE.replace("443", "\"x\"");
        assert!(
            err("shop", &bad_port).contains("port"),
            "{}",
            err("shop", &bad_port)
        );
    }
}
