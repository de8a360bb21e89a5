//! A real ACME server for the certificate tests: Debian's `pebble` (Let's Encrypt's test
//! server), with `pebble-challtestsrv` as its DNS, both on loopback ports of their own;
//! started and stopped by the test, killed when dropped.
//!
//! Every name resolves to one address through that DNS (127.0.0.1, or the server's address in
//! a namespace topology: [`Place`]), and pebble validates tls-alpn-01 on the port the test
//! gives (the relay's front port). pebble's own HTTPS certificate comes from the test PKI
//! (`ca`, for `[acme] ca`); the certificates it issues chain to a root it makes at start
//! ([`Pebble::root`], for clients).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{free_port, pki::Pki, wait_until};

/// Where pebble runs and what it resolves names to.
pub struct Place {
    /// A command prefix running a program there (`ip netns exec NS`), empty for here.
    pub wrap: Vec<String>,
    /// The address pebble listens on (and its certificate names).
    pub ip: IpAddr,
    /// What every name resolves to: where the service is.
    pub names_to: IpAddr,
}

impl Place {
    /// On this host's loopback.
    pub fn loopback() -> Place {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Place {
            wrap: Vec::new(),
            ip: lo,
            names_to: lo,
        }
    }

    fn command(&self, program: &str) -> Command {
        crate::wrapped(&self.wrap, program)
    }

    fn accepts(&self, addr: SocketAddr) -> bool {
        crate::accepts(&self.wrap, addr)
    }
}

pub struct Pebble {
    place: Place,
    dir: PathBuf,
    config: PathBuf,
    dns: Child,
    dns_port: u16,
    pebble: Option<Child>,
    acme: SocketAddr,
    management: SocketAddr,
    /// The CA of pebble's own HTTPS certificate.
    pub ca: PathBuf,
}

impl Pebble {
    /// pebble on loopback, validating tls-alpn-01 on `tls_port`: see [`Pebble::at`].
    pub fn new(dir: &Path, pki: &Pki, tls_port: u16) -> anyhow::Result<Pebble> {
        Pebble::at(Place::loopback(), dir, pki, tls_port, free_port())
    }

    /// pebble's configuration in `dir`, its DNS started at `place`; pebble itself is started
    /// by [`Pebble::start`]. Validations go to `place.names_to`, port `tls_port` for
    /// tls-alpn-01 and `http_port` for http-01.
    pub fn at(
        place: Place,
        dir: &Path,
        pki: &Pki,
        tls_port: u16,
        http_port: u16,
    ) -> anyhow::Result<Pebble> {
        std::fs::create_dir_all(dir)?;
        let ip = place.ip.to_string();
        let https = pki.server_for("pebble", &["localhost", &ip])?;
        let acme = SocketAddr::new(place.ip, free_port());
        let management = SocketAddr::new(place.ip, free_port());
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({ "pebble": {
                "listenAddress": acme.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": https.cert,
                "privateKey": https.key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }})
            .to_string(),
        )?;
        let dns_port = free_port();
        let names_to = place.names_to.to_string();
        let dns = place
            .command("pebble-challtestsrv")
            .args(["-defaultIPv4", &names_to, "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start pebble-challtestsrv (Debian's pebble: `cargo xtask setup`)")?;
        Ok(Pebble {
            place,
            dir: dir.to_path_buf(),
            config,
            dns,
            dns_port,
            pebble: None,
            acme,
            management,
            ca: pki.ca.clone(),
        })
    }

    /// `[acme] directory`.
    pub fn directory(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    /// Starts pebble and waits until it accepts connections.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("pebble.log"))?;
        let child = self
            .place
            .command("pebble")
            .arg("-config")
            .arg(&self.config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            // No random wait before validating, no nonce refused on purpose, no authorization
            // reused: every order validates through the relay.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start pebble (Debian's pebble: `cargo xtask setup`)")?;
        self.pebble = Some(child);
        let (acme, management) = (self.acme, self.management);
        if !wait_until(Duration::from_secs(20), || {
            self.place.accepts(acme) && self.place.accepts(management)
        }) {
            bail!("pebble did not start: {}", self.log());
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The root pebble issues under (made at its start), written to a file for clients.
    pub fn root(&self) -> anyhow::Result<PathBuf> {
        let out = self
            .place
            .command("curl")
            .args(["-sf", "--cacert"])
            .arg(&self.ca)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .context("curl")?;
        if !out.status.success() {
            bail!("pebble's root: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = self.dir.join("root.pem");
        std::fs::write(&path, &out.stdout)?;
        Ok(path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}
