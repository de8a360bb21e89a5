//! The servers under test, each started fresh for a scenario with the same settings: relay,
//! HAProxy (`mode tcp`, the usual TLS frontend), stunnel, and "direct" (no relay: the client
//! talks plaintext straight to the backend). All of them run pinned to [`SERVER_CPU`] with one
//! thread, so the figures compare cost per core; the backend (nginx) and the load generators
//! run on the other core. TLS is 1.3 only, with `TLS_AES_256_GCM_SHA384` and X25519 (rustls'
//! and OpenSSL's common default), the same certificate and key for everyone.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use relay_tests::{pki::CertFiles, relay::Relay};

/// The core servers under test run on.
pub const SERVER_CPU: &str = "1";
/// The core of the backend and of the load generators.
pub const LOAD_CPU: &str = "0";

pub const CIPHERSUITE: &str = "TLS_AES_256_GCM_SHA384";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Relay,
    Haproxy,
    Stunnel,
    Direct,
}

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Relay, Peer::Haproxy, Peer::Stunnel, Peer::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Relay => "relay",
            Peer::Haproxy => "haproxy",
            Peer::Stunnel => "stunnel",
            Peer::Direct => "direct",
        }
    }
}

/// What the front side of a scenario speaks.
#[derive(Clone, Debug)]
pub struct Front {
    /// `None`: plaintext in.
    pub tls: Option<CertFiles>,
    /// Whether the server may resume sessions (tickets or cache).
    pub resumption: bool,
}

/// A child process killed (TERM, then KILL) when dropped.
pub struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    /// Starts `cmd`; its output goes to `<what>.log` in `work` (kept for a look after a run).
    fn spawn(cmd: &mut Command, what: &'static str, work: &Path) -> anyhow::Result<Proc> {
        let log = fs::File::create(work.join(format!("{what}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, whose pid has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running server under test.
pub struct Server {
    pub port: u16,
    pub tls: bool,
    /// Root of the process tree to account (`None` for direct: nothing runs).
    pub pid: Option<u32>,
    /// relay's metrics address (relay only).
    pub metrics: Option<String>,
    _relay: Option<Relay>,
    _proc: Option<Proc>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }
}

/// The backend every peer relays to: nginx, one process, serving `www` over plaintext.
pub struct Backend {
    pub port: u16,
    pub proc: Proc,
}

pub fn start_backend(work: &Path, www: &Path) -> anyhow::Result<Backend> {
    let port = relay_tests::free_port();
    let conf = work.join("nginx.conf");
    let tmp = work.join("nginx-tmp");
    fs::create_dir_all(&tmp)?;
    fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {pid};\nerror_log {err} warn;\n\
             worker_rlimit_nofile 20000;\nevents {{ worker_connections 20000; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  \
             keepalive_requests 10000000;\n  keepalive_timeout 600s;\n  \
             client_header_timeout 600s;\n  \
             client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  \
             fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  \
             scgi_temp_path {tmp}/scgi;\n  \
             server {{ listen 127.0.0.1:{port}; root {www}; }}\n}}\n",
            pid = work.join("nginx.pid").display(),
            err = work.join("nginx.err").display(),
            tmp = tmp.display(),
            www = www.display(),
        ),
    )?;
    let proc = Proc::spawn(
        Command::new("taskset")
            .args(["-c", LOAD_CPU, "nginx", "-c"])
            .arg(&conf)
            .arg("-e")
            .arg(work.join("nginx.err")),
        "nginx",
        work,
    )?;
    let mut b = Backend { port, proc };
    wait_port(port, &mut b.proc)?;
    Ok(b)
}

fn wait_port(port: u16, proc: &mut Proc) -> anyhow::Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let up = relay_tests::wait_until(Duration::from_secs(10), || {
        !proc.alive() || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    if !proc.alive() {
        bail!("{} exited during start-up", proc.what);
    }
    if !up {
        bail!(
            "{} does not listen on 127.0.0.1:{port} after 10 s",
            proc.what
        );
    }
    Ok(())
}

/// Starts `peer` in front of `backend` with the given front side. `None` when the peer cannot
/// do it (stunnel has no plaintext-to-plaintext mode).
pub fn start(
    peer: Peer,
    front: &Front,
    backend: u16,
    work: &Path,
) -> anyhow::Result<Option<Server>> {
    let port = relay_tests::free_port();
    let tls = front.tls.is_some();
    let server = |pid, relay, proc| Server {
        port,
        tls,
        pid,
        metrics: None,
        _relay: relay,
        _proc: proc,
    };
    Ok(Some(match peer {
        Peer::Direct => Server {
            port: backend,
            tls: false,
            pid: None,
            metrics: None,
            _relay: None,
            _proc: None,
        },
        Peer::Relay => {
            let conf = work.join("relay.toml");
            let metrics = format!("127.0.0.1:{}", relay_tests::free_port());
            fs::write(&conf, relay_config(front, port, backend, &metrics, work))?;
            let relay = Relay::start_with(
                Command::new("taskset")
                    .args(["-c", SERVER_CPU])
                    .arg(relay_tests::relay::binary())
                    .args(["run", "--config"])
                    .arg(&conf)
                    .env("TOKIO_WORKER_THREADS", "1"),
            )?;
            Server {
                metrics: Some(metrics),
                ..server(Some(relay.pid()), Some(relay), None)
            }
        }
        Peer::Haproxy => {
            let conf = work.join("haproxy.cfg");
            fs::write(&conf, haproxy_config(front, port, backend, work)?)?;
            let mut proc = Proc::spawn(
                Command::new("taskset")
                    .args(["-c", SERVER_CPU, "haproxy", "-db", "-f"])
                    .arg(&conf),
                "haproxy",
                work,
            )?;
            wait_port(port, &mut proc)?;
            server(Some(proc.pid()), None, Some(proc))
        }
        Peer::Stunnel => {
            let Some(certs) = &front.tls else {
                return Ok(None);
            };
            let conf = work.join("stunnel.conf");
            fs::write(
                &conf,
                stunnel_config(certs, front.resumption, port, backend),
            )?;
            let mut proc = Proc::spawn(
                Command::new("taskset")
                    .args(["-c", SERVER_CPU, "stunnel"])
                    .arg(&conf),
                "stunnel",
                work,
            )?;
            wait_port(port, &mut proc)?;
            server(Some(proc.pid()), None, Some(proc))
        }
    }))
}

fn relay_config(front: &Front, port: u16, backend: u16, metrics: &str, work: &Path) -> String {
    let inbound = match &front.tls {
        Some(c) => format!(
            "level = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\nresumption = {}\n",
            c.cert.display(),
            c.key.display(),
            front.resumption
        ),
        None => "level = \"plain\"\n".to_string(),
    };
    format!(
        "[relay]\ncontrol_socket = \"{sock}\"\nmetrics = \"{metrics}\"\nmax_connections = 9000\n\n\
         [[service]]\nname = \"bench\"\nserver = \"127.0.0.1\"\nport = {port}\n\
         backend_port = {backend}\nlisten = \"127.0.0.1:{port}\"\n\
         [service.inbound]\n{inbound}[service.outbound]\nlevel = \"plain\"\n",
        sock = work.join("relay-control.sock").display(),
    )
}

/// HAProxy wants certificate and key in one file.
fn combined_pem(certs: &CertFiles, work: &Path) -> anyhow::Result<PathBuf> {
    let path = work.join("haproxy.pem");
    let mut pem = fs::read(&certs.cert)?;
    pem.extend(fs::read(&certs.key)?);
    fs::write(&path, pem)?;
    Ok(path)
}

fn haproxy_config(front: &Front, port: u16, backend: u16, work: &Path) -> anyhow::Result<String> {
    let bind = match &front.tls {
        Some(c) => format!(
            " ssl crt {}{}",
            combined_pem(c, work)?.display(),
            if front.resumption {
                ""
            } else {
                " no-tls-tickets"
            }
        ),
        None => String::new(),
    };
    let cache = if front.resumption {
        ""
    } else {
        "  tune.ssl.cachesize 0\n"
    };
    Ok(format!(
        "global\n  nbthread 1\n  maxconn 9000\n{cache}  \
         ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
         ssl-default-bind-ciphersuites {CIPHERSUITE}\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  \
         timeout server 600s\n\
         frontend bench\n  bind 127.0.0.1:{port}{bind}\n  default_backend nginx\n\
         backend nginx\n  server nginx 127.0.0.1:{backend}\n"
    ))
}

fn stunnel_config(certs: &CertFiles, resumption: bool, port: u16, backend: u16) -> String {
    // stunnel has no switch for "no resumption" in TLS 1.3: without tickets OpenSSL falls back
    // to stateful tickets from the session cache, so the cache is made useless as well.
    let no_resume = if resumption {
        ""
    } else {
        "options = NO_TICKET\nsessionCacheSize = 1\nsessionCacheTimeout = 1\n"
    };
    format!(
        "foreground = yes\npid =\ndebug = err\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
         [bench]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\n\
         sslVersionMin = TLSv1.3\nciphersuites = {CIPHERSUITE}\n{no_resume}",
        certs.cert.display(),
        certs.key.display(),
    )
}
