//! The files a service's TLS configuration is made of: certificates, keys, CAs and CRLs.
//!
//! They are read from disk once per change, by the supervisor (which may read them), into
//! [`Files`]; the same bytes travel to the worker (which may not read anything), and both parse
//! them from there. A file is read at most [`MAX_FILE`] bytes. Errors name the config key they
//! belong to ([`TlsError::field`], and the `inbound.sni` entry), so callers can point at the
//! line; warnings are about what the files say (a key every user may read, a stale CRL).
//! The system's CA store, which an outbound side without `ca` trusts, is read the same way and
//! stands in [`Files`] under [`SYSTEM_ROOTS`].

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
};

use crate::config::{CrlExpired, Level, Service};

/// Largest certificate, key, CA or CRL file read: far above any real PEM bundle, and a bound
/// on what a mistaken path (a log file, `/dev/zero`) can make the relay read.
pub const MAX_FILE: u64 = 16 << 20;

/// Where the system's CA certificates (PEM) stand in [`Files`]: not a path on disk.
pub const SYSTEM_ROOTS: &str = "<the system's CA store>";

/// The bytes of every file of a set of services, by path.
pub type Files = HashMap<PathBuf, Vec<u8>>;

/// A problem with a service's TLS material, and the config key it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    field: &'static str,
    /// Set when the error is about entry N of `inbound.sni`.
    sni: Option<usize>,
    message: String,
}

impl TlsError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            sni: None,
            message: message.into(),
        }
    }

    pub(super) fn in_sni(mut self, n: usize) -> Self {
        self.sni = Some(n);
        self
    }

    /// The config key the error is about, inside the service (`inbound.cert`, `outbound.ca`),
    /// or inside its `inbound.sni` entry ([`TlsError::sni`]: `cert`, `key`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Which `inbound.sni` entry the error is about, if any.
    pub fn sni(&self) -> Option<usize> {
        self.sni
    }
}

/// Where an ACME service's key and certificate chain (one PEM) stand in [`Files`]: not a path
/// on disk (the worker never learns where `[acme] storage` is). Absent until one is issued.
pub fn acme_file(service: &str) -> PathBuf {
    PathBuf::from(format!("<acme certificate of {service}>"))
}

/// Every file a service's TLS configuration reads from disk, with its key (not an ACME
/// certificate: see [`acme_file`]).
pub fn files_of(s: &Service) -> Vec<(&'static str, Option<usize>, &Path)> {
    let acme = s.inbound.is_acme();
    let mut files: Vec<(&'static str, Option<usize>, &Path)> = [
        ("inbound.cert", if acme { &None } else { &s.inbound.cert }),
        ("inbound.key", &s.inbound.key),
        ("inbound.client_ca", &s.inbound.client_ca),
        ("inbound.crl", &s.inbound.crl),
        ("outbound.ca", &s.outbound.ca),
        ("outbound.cert", &s.outbound.cert),
        ("outbound.key", &s.outbound.key),
    ]
    .into_iter()
    .filter_map(|(k, p)| Some((k, None, p.as_deref()?)))
    .collect();
    for (n, e) in s.inbound.sni.iter().enumerate() {
        files.extend([
            ("cert", Some(n), e.cert.as_path()),
            ("key", Some(n), e.key.as_path()),
        ]);
    }
    files
}

/// Reads every file of `s` not in `files` yet. The error names the key of the file that could
/// not be read (`inbound.cert`, or `cert` of `inbound.sni[N]`).
pub fn read_into(files: &mut Files, s: &Service) -> Result<(), TlsError> {
    for (field, sni, path) in files_of(s) {
        if files.contains_key(path) {
            continue;
        }
        let bytes = read(path).map_err(|e| {
            let error = TlsError::new(field, format!("{}: cannot read: {e}", path.display()));
            match sni {
                Some(n) => error.in_sni(n),
                None => error,
            }
        })?;
        files.insert(path.to_path_buf(), bytes);
    }
    let system = Path::new(SYSTEM_ROOTS);
    if s.outbound.level != Level::Plain && s.outbound.ca.is_none() && !files.contains_key(system) {
        files.insert(system.to_path_buf(), system_roots()?);
    }
    Ok(())
}

/// The system's CA certificates as PEM: where OpenSSL would look (`SSL_CERT_FILE`,
/// `SSL_CERT_DIR`, the distribution's bundle), as any TLS client on this host would trust.
fn system_roots() -> Result<Vec<u8>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(TlsError::new(
            "outbound.ca",
            format!(
                "not set, and the system has no CA certificates{why}: set `ca` to the backend's CA"
            ),
        ));
    }
    let pems: Vec<pem::Pem> = found
        .certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref()))
        .collect();
    Ok(pem::encode_many(&pems).into_bytes())
}

/// Reads `path`, refusing more than [`MAX_FILE`] bytes.
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB: not a PEM file",
            MAX_FILE >> 20
        )));
    }
    Ok(bytes)
}

/// The bytes of `path`, read earlier.
fn bytes<'f>(files: &'f Files, field: &'static str, path: &Path) -> Result<&'f [u8], TlsError> {
    files
        .get(path)
        .map(Vec::as_slice)
        .ok_or_else(|| TlsError::new(field, format!("{}: not read", path.display())))
}

pub(super) fn certs(
    files: &Files,
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    every::<CertificateDer<'static>>(files, field, path, "CERTIFICATE")
}

pub(super) fn key(
    files: &Files,
    field: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = bytes(files, field, path)?;
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e, pem))))
}

pub(super) fn roots(
    files: &Files,
    field: &'static str,
    path: &Path,
) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(files, field, path)? {
        store
            .add(cert)
            .map_err(|e| TlsError::new(field, format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

/// The CRLs of a PEM file; at least one.
pub(super) fn crls(
    files: &Files,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    every::<CertificateRevocationListDer<'static>>(files, "inbound.crl", path, "X509 CRL")
}

/// Every `label` section of a PEM file; at least one.
fn every<T: PemObject>(
    files: &Files,
    field: &'static str,
    path: &Path,
    label: &str,
) -> Result<Vec<T>, TlsError> {
    let pem = bytes(files, field, path)?;
    let items = T::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(field, format!("{}: {}", path.display(), pem_error(e, pem))))?;
    if items.is_empty() {
        return Err(TlsError::new(
            field,
            format!("{}: no {label} in PEM file", path.display()),
        ));
    }
    Ok(items)
}

/// What is wrong with `pem`, and on which line when a section is cut short: a file written
/// halfway, or truncated, ends in a section without its END line.
fn pem_error(e: rustls::pki_types::pem::Error, pem: &[u8]) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read: {e}"),
        Error::NoItemsFound => "no matching PEM section (expected a certificate or a private \
                                key in PEM format)"
            .into(),
        Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(&end_marker).into_owned();
            let begun = pem
                .split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, l)| l.starts_with(b"-----BEGIN "))
                .map(|(n, _)| n + 1)
                .last()
                .unwrap_or(1);
            format!(
                "line {begun}: the {label} section begun here has no END line (a file \
                 written halfway, or truncated?)"
            )
        }
        other => format!("invalid PEM: {other:?}"),
    }
}

pub(super) fn required<'a>(
    field: &'static str,
    p: &'a Option<PathBuf>,
) -> Result<&'a Path, TlsError> {
    p.as_deref()
        .ok_or_else(|| TlsError::new(field, "required for this level"))
}

/// Warnings about what the files of `s` say: a private key that every user of this machine may
/// read (a leaked key lets anyone impersonate the service; owner- and group-only keys pass, a
/// group such as `ssl-cert` being a common way to share them), and a CRL past its nextUpdate.
pub fn warnings(s: &Service, files: &Files) -> Vec<String> {
    let mut out = key_warnings(s);
    if let Some(crl) = s.inbound.crl.as_deref()
        && let Some(pem) = files.get(crl)
    {
        out.extend(crl_warnings(s, pem));
    }
    out
}

fn key_warnings(s: &Service) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut keys = vec![("inbound.key", s.inbound.key.as_deref())];
    keys.push(("outbound.key", s.outbound.key.as_deref()));
    keys.extend(
        s.inbound
            .sni
            .iter()
            .map(|e| ("inbound.sni.key", Some(e.key.as_path()))),
    );
    keys.into_iter()
        .filter_map(|(key, path)| {
            let path = path?;
            let mode = std::fs::metadata(path).ok()?.permissions().mode();
            (mode & 0o004 != 0).then(|| {
                format!(
                    "service {}: {key} {} is readable by every user (mode {:o}); chmod o-r it",
                    s.name,
                    path.display(),
                    mode & 0o777
                )
            })
        })
        .collect()
}

/// A warning for every CRL in `pem` (the bytes of `inbound.crl`) past its nextUpdate: with
/// `crl_expired = "reject"` its clients are refused until it is renewed.
fn crl_warnings(s: &Service, pem: &[u8]) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let policy = match s.inbound.crl_expired.unwrap_or_default() {
        CrlExpired::Reject => "its clients are refused until it is renewed",
        CrlExpired::Accept => "accepted anyway (crl_expired = \"accept\")",
    };
    CertificateRevocationListDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .filter_map(|der| {
            use x509_parser::prelude::FromDer as _;
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).ok()?;
            let next = crl.next_update()?;
            (next.timestamp() < now).then(|| {
                format!(
                    "service {}: the CRL of {} in {} was due for renewal at {next}: {policy}",
                    s.name,
                    crl.issuer(),
                    s.inbound.crl.as_deref().unwrap_or(Path::new("?")).display(),
                )
            })
        })
        .collect()
}
