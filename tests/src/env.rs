//! A test's working directory: a fresh PKI, and the relay config written next to it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{
    config::{inbound, outbound, relay_section, service},
    pki::Pki,
    relay::Relay,
};

pub struct TestDir {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pki = Pki::generate(&dir.path().join("pki")).expect("generate the test PKI");
        TestDir { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `relay.toml`: a `[relay]` section with `relay_extra`, then `services`.
    pub fn write_config(&self, relay_extra: &str, services: &[String]) -> PathBuf {
        let text = relay_section(self.path(), relay_extra) + &services.concat();
        let file = self.path().join("relay.toml");
        std::fs::write(&file, text).expect("write relay.toml");
        file
    }

    /// Writes the config and starts `relay run` on it.
    pub fn start_relay(&self, relay_extra: &str, services: &[String]) -> Relay {
        Relay::start(&self.write_config(relay_extra, services)).expect("relay starts")
    }

    /// An explicit-mode service from `levels.0` (inbound) to `levels.1` (outbound), with the
    /// PKI's certificates; `extra` lines go into `[service.inbound]` and `[service.outbound]`.
    pub fn service(
        &self,
        name: &str,
        listen: SocketAddr,
        backend: SocketAddr,
        levels: (&str, &str),
        extra: (&str, &str),
    ) -> String {
        let inb = inbound(levels.0, &self.pki) + extra.0;
        let out = outbound(levels.1, &self.pki) + extra.1;
        service(name, listen, backend, &inb, &out)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}
