//! A test's working directory: a fresh PKI, the relay config written next to it, and the
//! relay's control socket, spoken to through the CLI with the relay's own typed replies.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use relay::control::Status;

use crate::{
    config::{inbound, outbound, relay_section, service},
    pki::Pki,
    relay::{Relay, binary},
    wait_until,
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

    /// The relay's config file.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("relay.toml")
    }

    /// The relay's control socket (see `config::relay_section`).
    pub fn socket(&self) -> PathBuf {
        self.path().join("control.sock")
    }

    /// Writes `relay.toml`: a `[relay]` section with `relay_extra`, then `services`.
    pub fn write_config(&self, relay_extra: &str, services: &[String]) -> PathBuf {
        let text = relay_section(self.path(), relay_extra) + &services.concat();
        let file = self.config_path();
        std::fs::write(&file, text).expect("write relay.toml");
        file
    }

    /// Starts `relay run` on the config written before.
    pub fn start(&self) -> Relay {
        Relay::start(&self.config_path()).expect("relay starts")
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

    /// `relay <args> --socket <control socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("run the relay CLI")
    }

    /// `relay status`, as the relay types it.
    pub fn status(&self) -> Status {
        self.try_status().expect("relay status")
    }

    /// `relay status`, or why it failed.
    pub fn try_status(&self) -> Result<Status, String> {
        relay::control::call(&self.socket(), &relay::control::Request::Status {})
            .map_err(|e| format!("{e:#}"))
    }

    /// The worker serving now.
    pub fn worker_pid(&self) -> u32 {
        self.status().worker.expect("a worker runs").pid
    }

    /// Kills the worker with SIGKILL and waits for the supervisor to report a new one.
    /// Returns the old pid, when the kill was sent, and how long until a new worker showed.
    pub fn kill_worker(&self) -> (u32, Instant, Duration) {
        let old = self.worker_pid();
        let t = Instant::now();
        // SAFETY: kill(2) on the worker pid the relay reported.
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(10), || {
                self.try_status()
                    .is_ok_and(|s| s.worker.is_some_and(|w| w.pid != old))
            }),
            "no new worker after killing {old}"
        );
        (old, t, t.elapsed())
    }

    /// A debug build's worker, made to misbehave on purpose; its report.
    pub fn debug(&self, op: relay::handoff::DebugOp) -> String {
        relay::control::call(&self.socket(), &relay::control::Request::Debug { what: op })
            .expect("debug request")
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}
