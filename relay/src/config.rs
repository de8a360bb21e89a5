//! The configuration file (SPEC §5): TOML parsed with serde into typed structs, then validated.
//!
//! Every error names the file, the line and the key (`relay.toml:14: service[0].inbound.cert:
//! ...`), because an operator fixing a config at 3 a.m. should not have to guess. Serde errors
//! get their key path from `serde_path_to_error` and their line from toml's span; semantic errors
//! found after deserialization locate their key in a span-preserving `toml_edit` document.
//!
//! Relative file paths (certificates, keys, CAs) are relative to the config file's directory.
//!
//! This module knows the schema and what can be checked without reading another file: what
//! the certificates, keys and CRLs say is checked when a change is compiled (`service`), and
//! its errors are located in the file through the same [`Source`].

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::access;

mod acme;
mod cluster;
mod directory;
mod ipsec;

pub use acme::{ACME, Acme, Challenge as AcmeChallenge};
pub use cluster::Cluster;
pub use directory::Directory;
pub use ipsec::{Ipsec, Require, Server};

/// Security level of one side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Plain,
    Tls,
    Mtls,
    /// IPsec ESP between the gateway and the peer, keyed by strongSwan's charon (`[ipsec]`);
    /// the bytes themselves travel in clear over the protected path.
    Ipsec,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Plain => "plain",
            Level::Tls => "tls",
            Level::Mtls => "mtls",
            Level::Ipsec => "ipsec",
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub relay: RelaySection,
    pub datapath: Option<Datapath>,
    /// Several gateways sharing services and ticket keys through etcd (`cluster`).
    pub cluster: Option<Cluster>,
    /// An LDAP directory deciding `group:` and `attr:` allow rules (`directory`).
    pub directory: Option<Directory>,
    /// An ACME server issuing the certificates of services with `cert = "acme"` (`acme`).
    pub acme: Option<Acme>,
    /// The strongSwan charon that keys `level = "ipsec"` (`ipsec`).
    pub ipsec: Option<Ipsec>,
    /// Server addresses with a data path policy of their own (`require = "esp"`).
    #[serde(default, rename = "server")]
    pub servers: Vec<Server>,
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    pub control_socket: PathBuf,
    /// Prometheus endpoint; absent means no metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Time allowed for the inbound and outbound TLS handshakes, each.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed to connect to the backend.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A relayed connection with no byte moving in either direction for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM/SIGINT, established connections get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections open at once over all services; more are closed right after accept.
    pub max_connections: usize,
    /// Largest data buffer a connection holds per direction while bytes are in flight (bytes;
    /// buffers start at 4 KiB and grow toward this for bulk flows).
    pub max_buffer: usize,
    /// The worker runs as this user once it holds its sockets (when started as root).
    pub user: Option<String>,
    /// How often the supervisor draws a new TLS session ticket key; tickets stay valid for two
    /// periods, across worker restarts.
    #[serde(with = "humantime_serde")]
    pub ticket_rotation: Duration,
    /// plain ↔ plain connections are copied inside the kernel (a SOCKHASH verdict program)
    /// where the relay can load it; `false` (the default) copies them with `splice(2)`, which
    /// moves bulk traffic faster on the machines measured (README, "plain ↔ plain inside the
    /// kernel").
    pub kernel_copy: bool,
    /// The worker's threads; absent: one per CPU the relay may run on.
    pub threads: Option<usize>,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            control_socket: PathBuf::from("/run/relay/control.sock"),
            metrics: None,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 10_000,
            max_buffer: 64 << 10,
            user: None,
            ticket_rotation: Duration::from_secs(3600),
            kernel_copy: false,
            threads: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datapath {
    /// Client-facing interfaces: XDP drop and TC steering are attached to each.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// bpffs directory for the pinned maps and links.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Routing table holding the `local` routes that deliver steered packets to the relay.
    #[serde(default = "default_route_table")]
    pub route_table: u32,
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            pin_path: default_pin_path(),
            route_table: default_route_table(),
        }
    }
}

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/relay")
}

fn default_route_table() -> u32 {
    // 0x5e1a: "sela(y)", unlikely to collide with an operator's own table numbers.
    24090
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub server: IpAddr,
    pub port: u16,
    pub backend_port: u16,
    /// Where the relay connects; defaults to (server, backend_port).
    pub backend: Option<SocketAddr>,
    /// Explicit mode: the relay listens here instead of being steered to by the data path.
    pub listen: Option<SocketAddr>,
    /// Connections open at once for this service; absent means only the total limit applies.
    pub max_connections: Option<usize>,
    pub inbound: Inbound,
    pub outbound: Outbound,
}

impl Service {
    pub fn backend_addr(&self) -> SocketAddr {
        self.backend
            .unwrap_or(SocketAddr::new(self.server, self.backend_port))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    pub level: Level,
    /// A PEM file, or `"acme"`: a certificate from `[acme]` for `names`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `cert = "acme"`: the DNS names the certificate is issued for. (Always serialized: the
    /// handoff's format is not self-describing.)
    #[serde(default)]
    pub names: Vec<String>,
    /// A plain port (80) that answers ACME http-01 validation requests while an order waits
    /// for them, and relays everything else.
    #[serde(default)]
    pub answer_http01: bool,
    pub client_ca: Option<PathBuf>,
    /// mtls: only clients whose verified identity matches one of these pass (see `access`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// mtls: certificate revocation lists (PEM) for client certificates and their CAs;
    /// watched: a new file takes effect without a reload.
    pub crl: Option<PathBuf>,
    /// A CRL past its nextUpdate: refuse clients (`reject`, the default) or use it anyway.
    pub crl_expired: Option<CrlExpired>,
    /// What to do with a client that speaks plaintext to this TLS front port; default `reject`.
    pub plaintext: Option<Plaintext>,
    /// Further certificates chosen by the SNI of the ClientHello (`cert`/`key` stay the default).
    #[serde(default)]
    pub sni: Vec<SniEntry>,
    /// A ClientHello naming a server no `sni` entry matches: `default` certificate or `reject`.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    #[serde(default = "yes")]
    pub resumption: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    /// Serve it with `cert`/`key`, like a client without SNI.
    #[default]
    Default,
    /// Close it (counted as `unknown_sni`), unless `cert` itself names it; clients without SNI
    /// still get `cert`/`key`.
    Reject,
}

/// What a CRL past its nextUpdate means for the clients it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlExpired {
    /// Fail closed: a revocation list nobody renewed may miss revocations; clients are refused
    /// until a fresh one is installed.
    #[default]
    Reject,
    /// Use the stale list.
    Accept,
}

impl Inbound {
    /// `cert = "acme"`: the certificate comes from `[acme]`.
    pub fn is_acme(&self) -> bool {
        self.cert.as_deref() == Some(Path::new(ACME))
    }

    pub fn plaintext(&self) -> Plaintext {
        self.plaintext.unwrap_or_default()
    }
}

/// Policy for plaintext recognised on a TLS front port (the first byte is not a TLS record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plaintext {
    /// Close the connection (counted as `plaintext_rejected`).
    #[default]
    Reject,
    /// Relay it at plain level to the backend.
    Relay,
    /// Answer an HTTP request with `301` to the same URL over https, then close.
    Redirect,
}

/// A certificate for one server name, and optionally its own backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniEntry {
    /// `api.example.org`, or `*.example.org` for any one label in front of it.
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where connections for this name go; defaults to the service's backend.
    pub backend: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    pub level: Level,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `level = "ipsec"`: the IKE identity the backend must prove with a certificate from
    /// `ca` (a DN such as `"CN=db.example"`, a DNS name, or an address).
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    #[serde(default = "yes")]
    pub resumption: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

fn yes() -> bool {
    true
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// A problem in a configuration that came from no file (a service added at run time).
    #[error("{key}: {message}")]
    Unlocated { key: String, message: String },
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

/// A config file's text, kept to locate errors found later in it (when its files are compiled).
#[derive(Clone, Debug)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(file: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Ok(Source {
            file: file.to_path_buf(),
            text,
        })
    }

    /// Parses and checks the text; relative paths are anchored at the file's directory.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.file, &self.text)
    }

    /// `message` about the key at `path`, on the line where the file has that key.
    pub fn at(&self, path: &[Seg], message: String) -> ConfigError {
        Locator {
            file: &self.file,
            text: &self.text,
        }
        .at(path, message)
    }
}

/// `message` about the key at `path`: on its line in `source` if there is one.
pub fn locate(source: Option<&Source>, path: &[Seg], message: String) -> ConfigError {
    match source {
        Some(s) => s.at(path, message),
        None => ConfigError::Unlocated {
            key: render(path),
            message,
        },
    }
}

impl Config {
    /// Reads, parses and checks a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        Source::read(file)?.parse()
    }

    /// Parses and checks config text; `file` names it in errors and anchors relative paths.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let located = Locator { file, text };
        let mut config: Config = located.deserialize()?;
        let base = file.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .map_err(|(path, message)| located.at(&path, message))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(p) = p
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        };
        if let Some(d) = &mut self.directory {
            fix(&mut d.ca);
            fix(&mut d.bind_password_file);
            fix(&mut d.cert);
            fix(&mut d.key);
        }
        if let Some(c) = &mut self.cluster {
            fix(&mut c.ca);
            fix(&mut c.cert);
            fix(&mut c.key);
            for p in [&mut c.key_encryption_key, &mut c.cache, &mut c.material] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if let Some(a) = &mut self.acme {
            fix(&mut a.account_key);
            fix(&mut a.ca);
            if a.storage.is_relative() {
                a.storage = base.join(&a.storage);
            }
        }
        for s in &mut self.services {
            if !s.inbound.is_acme() {
                fix(&mut s.inbound.cert);
            }
            fix(&mut s.inbound.key);
            fix(&mut s.inbound.client_ca);
            fix(&mut s.inbound.crl);
            for e in &mut s.inbound.sni {
                for p in [&mut e.cert, &mut e.key] {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
            fix(&mut s.outbound.ca);
            fix(&mut s.outbound.cert);
            fix(&mut s.outbound.key);
        }
    }

    /// Re-validates a config changed at run time (a service added over the control socket):
    /// the same checks as a file gets, reported by key path.
    pub fn check(&self) -> Result<(), String> {
        self.validate()
            .map_err(|(path, message)| format!("{}: {message}", render(&path)))
    }

    /// Semantic checks serde cannot express. Returns the key path of the first problem.
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let r = &self.relay;
        for (key, d) in [
            ("handshake_timeout", r.handshake_timeout),
            ("connect_timeout", r.connect_timeout),
            ("idle_timeout", r.idle_timeout),
            ("ticket_rotation", r.ticket_rotation),
        ] {
            if d.is_zero() {
                return Err((
                    vec![Key("relay"), Key(key)],
                    "must be greater than 0".into(),
                ));
            }
        }
        if r.threads == Some(0) {
            return Err((
                vec![Key("relay"), Key("threads")],
                "must be at least 1".into(),
            ));
        }
        if r.max_connections == 0 {
            return Err((
                vec![Key("relay"), Key("max_connections")],
                "must be at least 1".into(),
            ));
        }
        if !(4096..=131_072).contains(&r.max_buffer) {
            return Err((
                vec![Key("relay"), Key("max_buffer")],
                "must be between 4096 and 131072 bytes".into(),
            ));
        }
        if let Some(user) = &r.user
            && crate::sys::user_ids(user).is_none()
        {
            return Err((
                vec![Key("relay"), Key("user")],
                format!("no user named {user:?}"),
            ));
        }
        if let Some(dp) = &self.datapath {
            if dp.interfaces.is_empty() {
                return Err((
                    vec![Key("datapath"), Key("interfaces")],
                    "name at least one client-facing interface".into(),
                ));
            }
            if !dp.pin_path.starts_with("/sys/fs/bpf/") {
                return Err((
                    vec![Key("datapath"), Key("pin_path")],
                    "must be a directory under /sys/fs/bpf/".into(),
                ));
            }
            if matches!(dp.route_table, 0 | 253..=255) {
                return Err((
                    vec![Key("datapath"), Key("route_table")],
                    "0, 253, 254 and 255 are reserved routing tables".into(),
                ));
            }
            for (i, name) in dp.interfaces.iter().enumerate() {
                if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                    return Err((
                        vec![Key("datapath"), Key("interfaces"), Index(i)],
                        format!("{name:?} is not a valid interface name"),
                    ));
                }
            }
        }
        if let Some(c) = &self.cluster {
            cluster::validate(c)?;
        }
        if let Some(d) = &self.directory {
            directory::validate(d)?;
        }
        if let Some(i) = &self.ipsec {
            ipsec::validate(i)?;
        }
        self.validate_servers()?;
        if let Some(a) = &self.acme {
            acme::validate(a)?;
            if a.challenge == acme::Challenge::Http01
                && !self.services.iter().any(|s| s.inbound.answer_http01)
            {
                return Err((
                    vec![Key("acme"), Key("challenge")],
                    "\"http-01\" needs a plain service on port 80 with answer_http01 = true \
                     (the port the ACME server connects to)"
                        .into(),
                ));
            }
        }
        let mut acme_names: std::collections::HashMap<String, &str> = Default::default();
        for (i, s) in self.services.iter().enumerate() {
            for (n, name) in s.inbound.names.iter().enumerate() {
                let lower = name.to_ascii_lowercase();
                if let Some(other) = acme_names.insert(lower, &s.name) {
                    return Err((
                        vec![
                            Key("service"),
                            Index(i),
                            Key("inbound"),
                            Key("names"),
                            Index(n),
                        ],
                        format!(
                            "{name:?} is also a name of service {other:?}: one ACME certificate \
                             per name (list the names of both on one service)"
                        ),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut fronts = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = |k: &'static str| vec![Key("service"), Index(i), Key(k)];
            let valid_name = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid_name {
                return Err((
                    at("name"),
                    format!("{:?}: use 1-64 of A-Z a-z 0-9 - _ .", s.name),
                ));
            }
            if !names.insert(&s.name) {
                return Err((at("name"), format!("duplicate service name {:?}", s.name)));
            }
            if s.port == 0 {
                return Err((at("port"), "must be 1-65535".into()));
            }
            if s.backend_port == 0 {
                return Err((at("backend_port"), "must be 1-65535".into()));
            }
            if s.port == s.backend_port {
                return Err((
                    at("backend_port"),
                    "must differ from port: the data path steers the front port and drops \
                     the backend port"
                        .into(),
                ));
            }
            if !fronts.insert((s.server, s.port)) {
                return Err((
                    at("port"),
                    format!(
                        "another service already uses {}",
                        SocketAddr::new(s.server, s.port)
                    ),
                ));
            }
            match s.listen {
                Some(l) if !listens.insert(l) => {
                    return Err((
                        at("listen"),
                        format!("another service already listens on {l}"),
                    ));
                }
                Some(_) => {}
                None if self.datapath.is_none() => {
                    return Err((
                        at("listen"),
                        "missing: without a [datapath] section every service needs a `listen` \
                         address (explicit mode)"
                            .into(),
                    ));
                }
                None => {}
            }
            if s.max_connections == Some(0) {
                return Err((at("max_connections"), "must be at least 1".into()));
            }
            self.validate_inbound(i, &s.inbound)?;
            self.validate_outbound(i, s)?;
        }
        Ok(())
    }

    /// `outbound.level = "ipsec"`: a charon to key it, the gateway's certificate, the backend's
    /// CA and identity, and one backend the SA can cover.
    fn validate_ipsec_outbound(&self, i: usize, s: &Service) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let at = |k: &'static str| vec![Key("service"), Index(i), Key("outbound"), Key(k)];
        let out = &s.outbound;
        if self.ipsec.is_none() {
            return Err((
                at("level"),
                "\"ipsec\" needs an [ipsec] section (the strongSwan charon that keys the SA)"
                    .into(),
            ));
        }
        ipsec_files(
            at,
            [
                ("cert", &out.cert, "the gateway's IKE certificate"),
                ("key", &out.key, "the key of `cert`"),
                (
                    "ca",
                    &out.ca,
                    "the CA that signs the backend's IKE certificate",
                ),
            ],
        )?;
        match out.identity.as_deref() {
            None => {
                return Err((
                    at("identity"),
                    "required with level = \"ipsec\": the IKE identity the backend must prove \
                     (e.g. \"CN=db.example\" or a DNS name in its certificate)"
                        .into(),
                ));
            }
            Some(id) if id.trim().is_empty() || id.contains(['"', '\n', '\0']) => {
                return Err((at("identity"), format!("{id:?} is not an IKE identity")));
            }
            Some(_) => {}
        }
        if out.server_name.is_some() {
            return Err((
                at("server_name"),
                "has no effect with level = \"ipsec\"; the backend proves `identity`".into(),
            ));
        }
        let ip = s.backend_addr().ip();
        if let Some(other) = self.services.iter().find(|o| {
            o.outbound.level != Level::Ipsec
                && (o.backend_addr().ip() == ip
                    || o.inbound
                        .sni
                        .iter()
                        .any(|e| e.backend.is_some_and(|b| b.ip() == ip)))
        }) {
            return Err((
                at("level"),
                format!(
                    "service {:?} reaches {ip} in clear, and the gateway lets nothing reach an \
                     ipsec backend but through its SA: give it level = \"ipsec\" too",
                    other.name
                ),
            ));
        }
        if let Some(n) = s.inbound.sni.iter().position(|e| e.backend.is_some()) {
            return Err((
                vec![
                    Key("service"),
                    Index(i),
                    Key("inbound"),
                    Key("sni"),
                    Index(n),
                    Key("backend"),
                ],
                "not with outbound.level = \"ipsec\": the SA protects the service's backend only"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `inbound.level = "ipsec"`: a charon to key it, the gateway's certificate and key, the
    /// clients' CA; `allow` rules match the identity a client proved in IKE.
    fn validate_ipsec_inbound(&self, i: usize, inb: &Inbound) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let at = |k: &'static str| vec![Key("service"), Index(i), Key("inbound"), Key(k)];
        if self.ipsec.is_none() {
            return Err((
                at("level"),
                "\"ipsec\" needs an [ipsec] section (the strongSwan charon that keys the SAs)"
                    .into(),
            ));
        }
        if self.services[i]
            .listen
            .is_none_or(|l| l.ip().is_unspecified())
        {
            return Err((
                vec![Key("service"), Index(i), Key("listen")],
                "required with inbound.level = \"ipsec\", on one gateway address (not 0.0.0.0 \
                 or [::]): clients' ESP ends there, and their SAs cover that address alone"
                    .into(),
            ));
        }
        if inb.is_acme() {
            return Err((
                at("cert"),
                "\"acme\" is for TLS; the gateway's IKE certificate is a file".into(),
            ));
        }
        ipsec_files(
            at,
            [
                ("cert", &inb.cert, "the gateway's IKE certificate"),
                ("key", &inb.key, "the key of `cert`"),
                (
                    "client_ca",
                    &inb.client_ca,
                    "the CA that signs the clients' IKE certificates",
                ),
            ],
        )?;
        let tls_only = [
            ("crl", inb.crl.is_some()),
            ("crl_expired", inb.crl_expired.is_some()),
            ("plaintext", inb.plaintext.is_some()),
            ("sni", !inb.sni.is_empty()),
            ("answer_http01", inb.answer_http01),
        ];
        if let Some((k, _)) = tls_only.iter().find(|(_, set)| *set) {
            return Err((
                at(k),
                "has no effect with level = \"ipsec\" (a TLS setting); remove it".into(),
            ));
        }
        match access::Allow::parse(&inb.allow) {
            Err((n, message)) => {
                let mut path = at("allow");
                path.push(Index(n));
                Err((path, message))
            }
            Ok(allow) if !allow.directory_rules().is_empty() => Err((
                at("allow"),
                "with level = \"ipsec\", rules match the IKE identity: use dns: or cn:".into(),
            )),
            Ok(_) => Ok(()),
        }
    }

    /// `[[server]]`: distinct addresses, a data path to enforce them, and none a service's
    /// front (the relay cannot terminate what only ESP may reach).
    fn validate_servers(&self) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let mut seen = HashSet::new();
        for (n, srv) in self.servers.iter().enumerate() {
            let at = vec![Key("server"), Index(n), Key("address")];
            if self.datapath.is_none() {
                return Err((
                    vec![Key("server"), Index(n), Key("require")],
                    "needs a [datapath] section: the XDP program enforces it".into(),
                ));
            }
            if !seen.insert(srv.address) {
                return Err((at, format!("{} is listed twice", srv.address)));
            }
            if let Some(s) = self
                .services
                .iter()
                .find(|s| s.server == srv.address && s.listen.is_none())
            {
                return Err((
                    at,
                    format!(
                        "{} is the server of service {:?}, which the relay terminates; \
                         require = \"esp\" lets only IPsec reach it",
                        srv.address, s.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `cert = "acme"`: names to issue for, and an `[acme]` to issue them.
    fn validate_acme(&self, i: usize, inb: &Inbound) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let at = |k: &'static str| vec![Key("service"), Index(i), Key("inbound"), Key(k)];
        if self.acme.is_none() {
            return Err((
                at("cert"),
                "\"acme\" needs an [acme] section (the ACME server that issues it)".into(),
            ));
        }
        if inb.key.is_some() {
            return Err((
                at("key"),
                "not with cert = \"acme\": the relay makes the key and keeps it in \
                 [acme] storage"
                    .into(),
            ));
        }
        if inb.names.is_empty() {
            return Err((
                at("names"),
                "required with cert = \"acme\": the DNS names to issue the certificate for".into(),
            ));
        }
        for (n, name) in inb.names.iter().enumerate() {
            let mut path = at("names");
            path.push(Index(n));
            if name.starts_with("*.") {
                return Err((
                    path,
                    format!(
                        "{name:?}: a wildcard needs the dns-01 challenge; the relay answers \
                         tls-alpn-01 on the front port"
                    ),
                ));
            }
            if !acme::valid_name(name) {
                return Err((path, format!("{name:?} is not a DNS name")));
            }
        }
        Ok(())
    }

    fn validate_inbound(&self, i: usize, inb: &Inbound) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let at = |k: &'static str| vec![Key("service"), Index(i), Key("inbound"), Key(k)];
        let level = inb.level;
        if level == Level::Ipsec {
            return self.validate_ipsec_inbound(i, inb);
        }
        if level == Level::Plain {
            for (k, v) in [
                ("cert", &inb.cert),
                ("key", &inb.key),
                ("client_ca", &inb.client_ca),
            ] {
                if v.is_some() {
                    return Err((
                        at(k),
                        "has no effect with level = \"plain\"; remove it".into(),
                    ));
                }
            }
        } else if inb.is_acme() {
            self.validate_acme(i, inb)?;
        } else {
            for (k, v) in [("cert", &inb.cert), ("key", &inb.key)] {
                if v.is_none() {
                    return Err((at(k), format!("required with level = \"{level}\"")));
                }
            }
        }
        if inb.answer_http01 && level != Level::Plain {
            return Err((
                at("answer_http01"),
                "needs level = \"plain\": ACME http-01 is plain HTTP (port 80)".into(),
            ));
        }
        if inb.answer_http01 && self.acme.is_none() {
            return Err((
                at("answer_http01"),
                "has no effect without an [acme] section; remove it".into(),
            ));
        }
        if !inb.is_acme() && !inb.names.is_empty() {
            return Err((
                at("names"),
                "only with cert = \"acme\" (the names the certificate is issued for)".into(),
            ));
        }
        match (level, &inb.client_ca) {
            (Level::Mtls, None) => {
                return Err((
                    at("client_ca"),
                    "required with level = \"mtls\": the CA that signs client certificates".into(),
                ));
            }
            (Level::Tls, Some(_)) => {
                return Err((
                    at("client_ca"),
                    "has no effect with level = \"tls\"; use level = \"mtls\" to verify clients"
                        .into(),
                ));
            }
            _ => {}
        }
        if level != Level::Mtls {
            if !inb.allow.is_empty() {
                return Err((
                    at("allow"),
                    "needs level = \"mtls\": rules match the verified client certificate".into(),
                ));
            }
            if inb.crl.is_some() {
                return Err((
                    at("crl"),
                    "needs level = \"mtls\": it revokes client certificates".into(),
                ));
            }
        }
        if inb.crl_expired.is_some() && inb.crl.is_none() {
            return Err((
                at("crl_expired"),
                "has no effect without `crl`; remove it".into(),
            ));
        }
        match access::Allow::parse(&inb.allow) {
            Err((n, message)) => {
                let mut path = at("allow");
                path.push(Index(n));
                return Err((path, message));
            }
            Ok(allow) if self.directory.is_none() && !allow.directory_rules().is_empty() => {
                return Err((
                    at("allow"),
                    "group: and attr: rules need a [directory] section (the LDAP server that \
                     decides them)"
                        .into(),
                ));
            }
            Ok(_) => {}
        }
        match (level, inb.plaintext) {
            (Level::Plain, Some(_)) => {
                return Err((
                    at("plaintext"),
                    "has no effect with level = \"plain\"; remove it".into(),
                ));
            }
            (Level::Mtls, Some(Plaintext::Relay)) => {
                return Err((
                    at("plaintext"),
                    "\"relay\" would let clients without a certificate past level = \"mtls\"; \
                     use \"reject\" or \"redirect\""
                        .into(),
                ));
            }
            _ => {}
        }
        if level == Level::Plain && !inb.sni.is_empty() {
            return Err((
                at("sni"),
                "has no effect with level = \"plain\"; remove it".into(),
            ));
        }
        if inb.unknown_sni == UnknownSni::Reject && inb.sni.is_empty() {
            return Err((
                at("unknown_sni"),
                "\"reject\" needs [[service.inbound.sni]] entries naming the servers to accept"
                    .into(),
            ));
        }
        let mut sni_names = HashSet::new();
        for (n, e) in inb.sni.iter().enumerate() {
            let at_sni = |k: &'static str| {
                vec![
                    Key("service"),
                    Index(i),
                    Key("inbound"),
                    Key("sni"),
                    Index(n),
                    Key(k),
                ]
            };
            if !access::valid_sni_pattern(&e.name) {
                return Err((
                    at_sni("name"),
                    format!("{:?} is not a DNS name (or `*.` followed by one)", e.name),
                ));
            }
            if !sni_names.insert(e.name.to_ascii_lowercase()) {
                return Err((at_sni("name"), format!("duplicate name {:?}", e.name)));
            }
        }
        Ok(())
    }

    fn validate_outbound(&self, i: usize, s: &Service) -> Result<(), (Vec<Seg>, String)> {
        use Seg::{Index, Key};
        let at = |k: &'static str| vec![Key("service"), Index(i), Key("outbound"), Key(k)];
        let out = &s.outbound;
        let level = out.level;
        if level == Level::Plain {
            for (k, v) in [("ca", &out.ca), ("cert", &out.cert), ("key", &out.key)] {
                if v.is_some() {
                    return Err((
                        at(k),
                        "has no effect with level = \"plain\"; remove it".into(),
                    ));
                }
            }
            if out.server_name.is_some() {
                return Err((
                    at("server_name"),
                    "has no effect with level = \"plain\"; remove it".into(),
                ));
            }
        }
        if level == Level::Mtls {
            for (k, v) in [("cert", &out.cert), ("key", &out.key)] {
                if v.is_none() {
                    return Err((at(k), "required with level = \"mtls\"".into()));
                }
            }
        }
        if level == Level::Tls {
            for (k, v) in [("cert", &out.cert), ("key", &out.key)] {
                if v.is_some() {
                    return Err((
                        at(k),
                        "has no effect with level = \"tls\"; use level = \"mtls\" to present a \
                         client certificate"
                            .into(),
                    ));
                }
            }
        }
        if level == Level::Ipsec {
            self.validate_ipsec_outbound(i, s)?;
        } else if out.identity.is_some() {
            return Err((
                at("identity"),
                "needs level = \"ipsec\" (the backend's IKE identity)".into(),
            ));
        }
        if let Some(name) = &out.server_name
            && let Err(e) = rustls::pki_types::ServerName::try_from(name.as_str())
        {
            return Err((
                at("server_name"),
                format!("{name:?} is not a valid DNS name or IP address: {e}"),
            ));
        }
        Ok(())
    }
}

/// The files an `ipsec` side needs: the first missing one is the error, at its key.
fn ipsec_files(
    at: impl Fn(&'static str) -> Vec<Seg>,
    files: [(&'static str, &Option<PathBuf>, &str); 3],
) -> Result<(), (Vec<Seg>, String)> {
    match files.iter().find(|(_, v, _)| v.is_none()) {
        Some((k, _, what)) => Err((at(k), format!("required with level = \"ipsec\": {what}"))),
        None => Ok(()),
    }
}

/// Turns key paths and serde errors into located [`ConfigError`]s.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn deserialize(&self) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(self.text).map_err(|e| {
            self.error_at(
                e.span().map(|s| s.start),
                "(syntax)".into(),
                e.message().into(),
            )
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            self.error_at(
                inner.span().map(|s| s.start),
                key,
                inner.message().to_string(),
            )
        })
    }

    fn error_at(&self, offset: Option<usize>, key: String, message: String) -> ConfigError {
        let key = if key.is_empty() || key == "." {
            "(top level)".into()
        } else {
            key
        };
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: offset.map_or(1, |o| line_of(self.text, o)),
            key,
            message,
        }
    }

    /// Locates `path` in the document: the line of its key, or of the closest enclosing table
    /// when the key itself is missing.
    fn at(&self, path: &[Seg], message: String) -> ConfigError {
        let offset = toml_edit::Document::parse(self.text)
            .ok()
            .and_then(|doc| offset_of(doc.as_item(), path));
        self.error_at(offset, render(path), message)
    }
}

fn offset_of(root: &toml_edit::Item, path: &[Seg]) -> Option<usize> {
    let mut item = root;
    let mut best = None;
    for seg in path {
        let (next, span) = match seg {
            Seg::Key(k) => match item.as_table_like().and_then(|t| t.get_key_value(k)) {
                Some((key, value)) => (value, key.span().or(value.span())),
                None => return best,
            },
            Seg::Index(n) => match item.get(*n) {
                Some(value) => (value, value.span()),
                None => return best,
            },
        };
        best = span.map(|s| s.start).or(best);
        item = next;
    }
    best
}

/// A key path as the config file spells it: `service[0].inbound.cert`.
pub fn render(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
