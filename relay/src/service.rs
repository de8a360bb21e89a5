//! Compile once: a configuration and the bytes of every file it names become the services the
//! relay runs — rustls configurations, client policies, backends — checked in full.
//!
//! A change (start, reload, `service add`, a CRL replaced on disk) goes through here once in
//! the supervisor: it reads each file once ([`read`]), compiles from those bytes ([`compile`])
//! to know the change is sound, with errors on the line of the key they are about, and sends
//! the same bytes to the worker, which compiles them again without touching the disk.

use std::{path::Path, sync::Arc};

use rustls::{ClientConfig, pki_types::ServerName};

use crate::{
    config::{self, Config, ConfigError, Level, Seg, Service, Source},
    tls::{self, Files, OnDeclined, Resumption, TlsError},
};

/// A service ready to relay: its config with the TLS state built from its files.
pub struct Compiled {
    pub config: Service,
    /// Inbound `tls` or `mtls`.
    pub server_side: Option<tls::ServerSide>,
    /// Outbound `tls` or `mtls`: the client configuration and the name the backend's
    /// certificate must carry.
    pub connector: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

/// A problem with the material of the service at `index`, at the key `path`.
#[derive(Debug)]
pub struct CompileError {
    pub path: Vec<Seg>,
    pub message: String,
}

impl CompileError {
    fn new(index: usize, e: TlsError) -> CompileError {
        let mut path = vec![Seg::Key("service"), Seg::Index(index)];
        if let Some(n) = e.sni() {
            path.extend([Seg::Key("inbound"), Seg::Key("sni"), Seg::Index(n)]);
        }
        path.extend(e.field().split('.').map(Seg::Key));
        CompileError {
            path,
            message: e.to_string(),
        }
    }

    /// Located in `source` (the config file) when the change came from one.
    pub fn locate(self, source: Option<&Source>) -> ConfigError {
        config::locate(source, &self.path, self.message)
    }
}

/// What the files of one configuration may add up to: they travel to the worker in one
/// handoff message, with room to spare for the rest of it.
const FILES_BUDGET: usize = crate::handoff::MAX_MESSAGE - (1 << 20);

/// Reads every file `services` name, each once.
pub fn read(services: &[Service]) -> Result<Files, CompileError> {
    let mut files = Files::new();
    for (i, s) in services.iter().enumerate() {
        tls::material::read_into(&mut files, s).map_err(|e| CompileError::new(i, e))?;
        let total: usize = files.values().map(Vec::len).sum();
        if total > FILES_BUDGET {
            let e = TlsError::new(
                "name",
                format!(
                    "the files of the services up to this one add up to {} MiB, more than the \
                     {} MiB a configuration may carry to the worker",
                    total >> 20,
                    FILES_BUDGET >> 20
                ),
            );
            return Err(CompileError::new(i, e));
        }
    }
    Ok(files)
}

/// Builds every service from `files`. `declined` gives each service what to tell of the
/// sessions it declines to resume (see `tls::verify`).
pub fn compile(
    services: &[Service],
    files: &Files,
    resumption: &Resumption,
    declined: &dyn Fn(&Service) -> OnDeclined,
) -> Result<Vec<Compiled>, CompileError> {
    services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            compile_one(s, files, resumption, declined(s)).map_err(|e| CompileError::new(i, e))
        })
        .collect()
}

fn compile_one(
    s: &Service,
    files: &Files,
    resumption: &Resumption,
    declined: OnDeclined,
) -> Result<Compiled, TlsError> {
    let server_side = match s.inbound.level {
        Level::Plain | Level::Ipsec => None,
        Level::Tls | Level::Mtls => Some(tls::server_side(
            &s.name, &s.inbound, files, resumption, declined,
        )?),
    };
    let connector = match s.outbound.level {
        Level::Plain => None,
        Level::Tls | Level::Mtls => Some((
            tls::client_config(&s.outbound, files)?,
            tls::server_name(s)?,
        )),
        // charon proves the identities; building the client configuration checks that the
        // certificate, key and CA it will get parse and fit.
        Level::Ipsec => {
            tls::client_config(&s.outbound, files)?;
            None
        }
    };
    Ok(Compiled {
        config: s.clone(),
        server_side,
        connector,
    })
}

/// A configuration checked in full, with the bytes of its files and what they warn of.
pub struct Checked {
    pub config: Config,
    pub files: Files,
    pub warnings: Vec<String>,
    /// `[directory]` ready for the worker: its files read, its host resolved.
    pub directory: Option<crate::directory::Settings>,
}

/// Reads and compiles `config`'s files (not needed afterwards: the worker compiles its own);
/// errors are located in `source` when the configuration came from a file.
pub fn check(config: Config, source: Option<&Source>) -> Result<Checked, ConfigError> {
    let mut files = read(&config.services).map_err(|e| e.locate(source))?;
    let mut warnings = Vec::new();
    if let Some(acme) = &config.acme {
        for s in config.services.iter().filter(|s| s.inbound.is_acme()) {
            match acme_certificate(acme, &s.name) {
                Ok(Some(pem)) => {
                    files.insert(tls::material::acme_file(&s.name), pem);
                }
                Ok(None) => {}
                Err(why) => warnings.push(format!("service {}: {why}", s.name)),
            }
        }
    }
    let directory = match &config.directory {
        Some(d) => Some(directory_settings(d).map_err(|(key, message)| {
            config::locate(source, &[Seg::Key("directory"), Seg::Key(key)], message)
        })?),
        None => None,
    };
    let quiet: &dyn Fn(&Service) -> OnDeclined = &|_| Arc::new(|_| {});
    compile(&config.services, &files, &Resumption::default(), quiet)
        .map_err(|e| e.locate(source))?;
    warnings.extend(
        config
            .services
            .iter()
            .flat_map(|s| tls::material::warnings(s, &files)),
    );
    Ok(Checked {
        config,
        files,
        warnings,
        directory,
    })
}

/// The stored ACME certificate of service `name` (key and chain), `None` before the first
/// one; one that cannot be read or does not hold together is an error (the service then
/// waits for a new one, which its ACME task orders).
fn acme_certificate(acme: &config::Acme, name: &str) -> Result<Option<Vec<u8>>, String> {
    let path = acme.stored(name);
    match tls::material::read(&path) {
        Ok(pem) if crate::acme::Stored::parse(&pem).is_some() => Ok(Some(pem)),
        Ok(_) => Err(format!(
            "{}: not a key and certificate chain that fit; ordering a new one",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

/// `[directory]` for the worker (which reads no file and resolves no name): the CA, password
/// and client certificate read, the URL's host resolved. The error names the key.
pub fn directory_settings(
    d: &config::Directory,
) -> Result<crate::directory::Settings, (&'static str, String)> {
    use crate::directory::{Bind, Settings};
    let read = |key: &'static str, path: &Path| {
        tls::material::read(path)
            .map_err(|e| (key, format!("{}: cannot read: {e}", path.display())))
    };
    let ca = d.ca.as_deref().map(|p| read("ca", p)).transpose()?;
    let bind = match (&d.bind_dn, &d.bind_password_file, &d.cert, &d.key) {
        (Some(dn), Some(file), _, _) => {
            let bytes = read("bind_password_file", file)?;
            let password = String::from_utf8(bytes)
                .map_err(|_| ("bind_password_file", "not UTF-8 text".to_string()))?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                // An empty password makes a simple bind unauthenticated (RFC 4513 5.1.2).
                return Err(("bind_password_file", format!("{}: empty", file.display())));
            }
            Bind::Simple {
                dn: dn.clone(),
                password,
            }
        }
        (_, _, Some(cert), Some(key)) => Bind::External {
            cert: read("cert", cert)?,
            key: read("key", key)?,
        },
        _ => Bind::Anonymous,
    };
    let addrs = resolve(&d.url).map_err(|e| ("url", e))?;
    let settings = Settings {
        url: d.url.clone(),
        starttls: d.starttls,
        addrs,
        ca,
        bind,
        base: d.base.clone(),
        filter: d.filter.clone(),
        timeout: d.timeout,
        cache_ttl: d.cache_ttl,
        negative_ttl: d.negative_ttl,
        stale_for: d.stale_for,
        nested_depth: d.nested_depth,
        connections: d.connections,
    };
    // The worker builds the same from these bytes: a bad PEM is refused here, by key.
    if settings.ca.is_some() {
        crate::directory::tls_config(&settings).map_err(|e| {
            let key = if matches!(settings.bind, Bind::External { .. }) {
                "cert"
            } else {
                "ca"
            };
            (key, format!("{e:#}"))
        })?;
    }
    Ok(settings)
}

/// The addresses of an `ldap[s]://host[:port]` URL's host (default ports 389 and 636).
fn resolve(url: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    use std::net::ToSocketAddrs as _;
    let (rest, port) = match url.strip_prefix("ldaps://") {
        Some(rest) => (rest, 636),
        None => (url.strip_prefix("ldap://").unwrap_or(url), 389),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = match authority.rsplit_once(':') {
        Some((_, p)) if !authority.ends_with(']') && p.parse::<u16>().is_ok() => {
            authority.to_string()
        }
        _ => format!("{authority}:{port}"),
    };
    let mut addrs: Vec<_> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve {with_port}: {e}"))?
        .collect();
    // In a stable order: the same answers in another order are the same settings (the worker
    // keeps its directory client, cache and connections).
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{url:?}: {with_port} has no address"));
    }
    Ok(addrs)
}

/// A config file, parsed and checked in full.
pub fn check_file(file: &Path) -> Result<Checked, ConfigError> {
    let source = Source::read(file)?;
    let config = source.parse()?;
    if let Some(c) = &config.cluster
        && let Err(e) = crate::cluster::sealed::Kek::read(&c.key_encryption_key)
    {
        use crate::config::Seg::Key;
        return Err(source.at(
            &[Key("cluster"), Key("key_encryption_key")],
            format!("{e:#}"),
        ));
    }
    check(config, Some(&source))
}
