//! A cluster's topology: one LAN (a bridge in its own namespace) joining an etcd server, two
//! gateways, a backend server and a client, each in a namespace of its own, on 203.0.113.0/24:
//!
//! ```text
//!  <p>-etcd 203.0.113.10 ─┐
//!  <p>-gwa  203.0.113.11 ─┤
//!  <p>-gwb  203.0.113.12 ─┼─ br0 in <p>-lan
//!  <p>-srv  203.0.113.20 ─┤
//!  <p>-cli  203.0.113.100─┘
//! ```
//!
//! and a real etcd (Debian's `etcd-server`) with TLS and client certificates, started in
//! `<p>-etcd` and stopped (or killed) by the test. Dropping the topology kills every process
//! left in its namespaces (by PID) and deletes them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    netns::{ip, run},
    pki::Pki,
    wait_until,
};

pub const ETCD: &str = "203.0.113.10";
pub const GW_A: &str = "203.0.113.11";
pub const GW_B: &str = "203.0.113.12";
pub const SERVER: &str = "203.0.113.20";
pub const CLIENT: &str = "203.0.113.100";

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Lan {
    pub prefix: String,
    namespaces: Vec<String>,
}

impl Lan {
    pub fn create(tag: &str) -> anyhow::Result<Lan> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("rl{}-{tag}{n}", std::process::id());
        let mut lan = Lan {
            namespaces: vec![format!("{prefix}-lan")],
            prefix,
        };
        lan.build()
            .with_context(|| format!("build cluster topology {}", lan.prefix))?;
        Ok(lan)
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let lan = self.ns("lan");
        ip(&["netns", "add", &lan])?;
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        for (i, (host, addr)) in [
            ("etcd", ETCD),
            ("gwa", GW_A),
            ("gwb", GW_B),
            ("srv", SERVER),
            ("cli", CLIENT),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&[
                "-n", &lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &lan, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        for addr in [ETCD, GW_A, GW_B, SERVER] {
            run(self.exec("cli", "ping").args(["-c", "1", "-W", "2", addr]))?;
        }
        Ok(())
    }

    /// `ip netns exec <prefix>-<host> <program>`.
    pub fn exec(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// curl from the client namespace to `https://localhost:<port>/<path>` at `addr`
    /// (the test certificate names `localhost`).
    pub fn curl_tls(&self, addr: &str, port: u16, path: &str, ca: &Path) -> Output {
        self.exec("cli", "curl")
            .args(["--silent", "--show-error", "--max-time", "5", "--cacert"])
            .arg(ca)
            .args(["--resolve", &format!("localhost:{port}:{addr}")])
            .arg(format!("https://localhost:{port}/{path}"))
            .output()
            .expect("run curl")
    }

    /// `openssl s_client` from the client namespace, asking for `/index.html` (server name
    /// `localhost`); `extra` adds arguments (`-sess_out F`, `-sess_in F`). Returns its stdout.
    pub fn openssl_get(&self, addr: &str, port: u16, ca: &Path, extra: &[&str]) -> String {
        let out = crate::client::openssl_get_with(
            self.exec("cli", "openssl"),
            &format!("{addr}:{port}"),
            ca,
            "/index.html",
            extra,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            crate::netns::remove(ns);
        }
    }
}

/// A real etcd server in a namespace, TLS with client certificates from the test PKI.
pub struct Etcd {
    child: Option<Child>,
    data: PathBuf,
    ns: String,
    addr: String,
    ca: PathBuf,
    client_ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    logs: Arc<Mutex<Vec<String>>>,
}

impl Etcd {
    /// etcd in the LAN's `<p>-etcd` at [`ETCD`].
    pub fn start(lan: &Lan, pki: &Pki, dir: &Path) -> anyhow::Result<Etcd> {
        Self::start_at(&lan.ns("etcd"), ETCD, pki, dir)
    }

    /// etcd in namespace `ns`, serving clients on `addr` (an address the test PKI's server
    /// certificate names: 203.0.113.10 or 198.51.100.10).
    pub fn start_at(ns: &str, addr: &str, pki: &Pki, dir: &Path) -> anyhow::Result<Etcd> {
        let server = pki.server();
        let mut etcd = Etcd {
            child: None,
            data: dir.join("etcd-data"),
            ns: ns.to_string(),
            addr: addr.to_string(),
            ca: pki.ca.clone(),
            client_ca: pki.client_ca.clone(),
            server: (server.cert.clone(), server.key.clone()),
            client: (pki.client.cert.clone(), pki.client.key.clone()),
            logs: Arc::default(),
        };
        etcd.restart()?;
        Ok(etcd)
    }

    /// The endpoint gateways use.
    pub fn endpoint(&self) -> String {
        format!("https://{}:2379", self.addr)
    }

    /// Starts it again (same data directory) and waits until it serves clients.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        use std::io::{BufRead as _, BufReader};
        let url = self.endpoint();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "etcd",
                "--name",
                "e1",
                "--data-dir",
            ])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "e1=http://127.0.0.1:2380"])
            .args(["--cert-file"])
            .arg(&self.server.0)
            .arg("--key-file")
            .arg(&self.server.1)
            .arg("--trusted-ca-file")
            .arg(&self.client_ca)
            .args(["--client-cert-auth", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start etcd (Debian's etcd-server: `cargo xtask setup`)")?;
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::clone(&self.logs);
        logs.lock().unwrap().clear();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                logs.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let ready = wait_until(Duration::from_secs(20), || {
            self.logs
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("serving client traffic"))
        });
        if !ready {
            bail!(
                "etcd did not start:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
        }
        Ok(())
    }

    /// SIGKILL: as a crash or a cut link would look to the gateways.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs etcd: the child is etcd itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcdctl <args>` in the etcd namespace, with the client certificate.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "etcdctl",
                "--endpoints",
                &self.endpoint(),
            ])
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.client.0)
            .arg("--key")
            .arg(&self.client.1)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl")
    }

    /// The `[cluster]` section for gateway `name`.
    pub fn cluster_section(&self, name: &str, dir: &Path, kek: &Path, extra: &str) -> String {
        format!(
            "[cluster]\netcd = [\"{}\"]\nprefix = \"/relay-test\"\nname = \"{name}\"\nca = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\nkey_encryption_key = \"{}\"\ncache = \"{}\"\n\
             material = \"{}\"\n{extra}\n",
            self.endpoint(),
            self.ca.display(),
            self.client.0.display(),
            self.client.1.display(),
            kek.display(),
            dir.join(format!("cache-{name}/cluster.json")).display(),
            // The test PKI's directory: the certificates services from the cluster may name.
            self.ca.parent().unwrap_or(Path::new("/")).display(),
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connections the relay behind `socket` accepted so far, over all services.
pub fn accepted(socket: &Path) -> u64 {
    relay::control::call::<relay::control::Status>(socket, &relay::control::Request::Status {})
        .ok()
        .and_then(|s| s.connections)
        .map_or(0, |c| c.iter().map(|s| s.accepted).sum())
}
