//! A throwaway PKI: one CA for servers, one for clients, and a stranger CA whose client
//! certificate must be rejected. Server certificates cover `localhost`, loopback and the
//! documentation addresses used by the namespace tests.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, RevokedCertParams, SanType, SerialNumber, SignatureAlgorithm,
};

/// Key algorithm of a generated certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
    Ed25519,
}

impl KeyKind {
    fn alg(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ecdsa",
            KeyKind::Rsa2048 => "rsa",
            KeyKind::Ed25519 => "ed25519",
        }
    }
}

/// PEM file paths of one certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the tests need, as files in one directory.
pub struct Pki {
    pub dir: PathBuf,
    /// CA of server certificates (what clients and the relay's outbound side trust).
    pub ca: PathBuf,
    /// CA of client certificates (what an mtls inbound side trusts).
    pub client_ca: PathBuf,
    /// Server certificates by key kind, for `localhost` and the test addresses.
    pub servers: Vec<(KeyKind, CertFiles)>,
    /// A client certificate signed by `client_ca` (CN and DNS SAN `client.test`).
    pub client: CertFiles,
    /// A client certificate from a CA nobody trusts.
    pub stranger: CertFiles,
    server_issuer: Issuer<'static, KeyPair>,
    client_issuer: Issuer<'static, KeyPair>,
}

/// The names a client certificate carries.
#[derive(Clone, Debug, Default)]
pub struct Names<'a> {
    pub cn: Option<&'a str>,
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
}

impl Pki {
    /// Generates the whole PKI into `dir` (created if missing).
    pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
        fs::create_dir_all(dir)?;
        let (ca_pem, ca_issuer) = new_ca("relay test server CA")?;
        let (client_ca_pem, client_issuer) = new_ca("relay test client CA")?;
        let (_, stranger_issuer) = new_ca("stranger CA")?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            fs::write(&p, pem)?;
            Ok(p)
        };
        let ca_path = write("ca.pem", ca_pem)?;
        let client_ca_path = write("client-ca.pem", client_ca_pem)?;
        let mut servers = Vec::new();
        for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048, KeyKind::Ed25519] {
            let key = KeyPair::generate_for(kind.alg())?;
            let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            for ip in [
                "127.0.0.1",
                "::1",
                "198.51.100.10",
                "2001:db8:b::10",
                "203.0.113.10",
            ] {
                params
                    .subject_alt_names
                    .push(SanType::IpAddress(ip.parse()?));
            }
            let cert = params.signed_by(&key, &ca_issuer)?;
            let files = CertFiles {
                cert: write(&format!("server-{}.pem", kind.label()), cert.pem())?,
                key: write(&format!("server-{}.key", kind.label()), key.serialize_pem())?,
            };
            servers.push((kind, files));
        }
        let client = leaf(&client_issuer, "client.test")?;
        let client = CertFiles {
            cert: write("client.pem", client.0)?,
            key: write("client.key", client.1)?,
        };
        let stranger = leaf(&stranger_issuer, "stranger.test")?;
        let stranger = CertFiles {
            cert: write("stranger.pem", stranger.0)?,
            key: write("stranger.key", stranger.1)?,
        };
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca: ca_path,
            client_ca: client_ca_path,
            servers,
            client,
            stranger,
            server_issuer: ca_issuer,
            client_issuer,
        })
    }

    /// A client certificate signed by `client_ca` with exactly these names and serial number,
    /// written as `<stem>.pem` / `<stem>.key`.
    pub fn client_with(&self, stem: &str, names: &Names, serial: u64) -> anyhow::Result<CertFiles> {
        self.client_until(stem, names, serial, None)
    }

    /// [`Pki::client_with`], valid only until `not_after` (when given).
    pub fn client_until(
        &self,
        stem: &str,
        names: &Names,
        serial: u64,
        not_after: Option<std::time::SystemTime>,
    ) -> anyhow::Result<CertFiles> {
        let (pem, key) = signed_client(&self.client_issuer, names, serial, not_after)?;
        self.write_pair(stem, pem, key)
    }

    /// An intermediate CA under `client_ca` with this serial number, for client chains.
    pub fn client_intermediate(&self, name: &str, serial: u64) -> anyhow::Result<Intermediate> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.client_issuer)?;
        Ok(Intermediate {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            dir: self.dir.clone(),
        })
    }

    /// A server certificate signed by the server CA for these DNS names.
    pub fn server_for(&self, stem: &str, names: &[&str]) -> anyhow::Result<CertFiles> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.server_issuer)?;
        self.write_pair(stem, cert.pem(), key.serialize_pem())
    }

    /// A CRL from the client CA revoking these serial numbers, written as `<stem>.pem`.
    pub fn client_crl(&self, stem: &str, revoked: &[u64]) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{stem}.pem"));
        fs::write(&path, self.client_crl_pem(revoked, Fresh::Yes)?)?;
        Ok(path)
    }

    /// The PEM of a CRL from the client CA revoking these serial numbers.
    pub fn client_crl_pem(&self, revoked: &[u64], fresh: Fresh) -> anyhow::Result<String> {
        crl_pem(&self.client_issuer, revoked, fresh)
    }

    fn write_pair(&self, stem: &str, cert: String, key: String) -> anyhow::Result<CertFiles> {
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        fs::write(&files.cert, cert)?;
        fs::write(&files.key, key)?;
        Ok(files)
    }

    /// The ECDSA server certificate, the default one.
    pub fn server(&self) -> &CertFiles {
        self.server_of(KeyKind::EcdsaP256)
    }

    pub fn server_of(&self, kind: KeyKind) -> &CertFiles {
        &self.servers.iter().find(|(k, _)| *k == kind).unwrap().1
    }
}

/// Whether a CRL is still before its nextUpdate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    Yes,
    /// Its nextUpdate was in 2025.
    Expired,
}

fn crl_pem(
    issuer: &Issuer<'static, KeyPair>,
    revoked: &[u64],
    fresh: Fresh,
) -> anyhow::Result<String> {
    let next_update = match fresh {
        Fresh::Yes => rcgen::date_time_ymd(2099, 1, 1),
        Fresh::Expired => rcgen::date_time_ymd(2025, 2, 1),
    };
    let params = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2025, 1, 1),
        next_update,
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&serial| RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: rcgen::date_time_ymd(2025, 1, 2),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

/// An intermediate client CA: the certificates it signs are written with it as their chain.
pub struct Intermediate {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Intermediate {
    /// A client certificate it signs, written as `<stem>.pem` (the certificate, then this
    /// intermediate) and `<stem>.key`.
    pub fn client(&self, stem: &str, names: &Names, serial: u64) -> anyhow::Result<CertFiles> {
        let (pem, key) = signed_client(&self.issuer, names, serial, None)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        fs::write(&files.cert, pem + &self.pem)?;
        fs::write(&files.key, key)?;
        Ok(files)
    }

    /// The PEM of a CRL from this intermediate revoking these serial numbers.
    pub fn crl_pem(&self, revoked: &[u64]) -> anyhow::Result<String> {
        crl_pem(&self.issuer, revoked, Fresh::Yes)
    }
}

/// A client certificate (PEM cert, PEM key) with exactly these names, signed by `issuer`.
fn signed_client(
    issuer: &Issuer<'static, KeyPair>,
    names: &Names,
    serial: u64,
    not_after: Option<std::time::SystemTime>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        CertificateParams::new(names.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = names.cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    for uri in names.uris {
        params
            .subject_alt_names
            .push(SanType::URI(uri.to_string().try_into()?));
    }
    params.serial_number = Some(SerialNumber::from(serial));
    if let Some(t) = not_after {
        params.not_after = t.into();
        params.not_before =
            (std::time::SystemTime::now() - std::time::Duration::from_secs(60)).into();
    }
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn new_ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A client certificate (PEM cert, PEM key) for `name`, signed by `issuer`.
fn leaf(issuer: &Issuer<'static, KeyPair>, name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}
