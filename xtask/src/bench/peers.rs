//! The servers under test, each started fresh for a scenario with the same settings: relay,
//! HAProxy (`mode tcp`, the usual TLS frontend), stunnel, nginx (`stream {}` with TLS
//! termination: a separate instance from the backend, with its own prefix, config and pid
//! file), and "direct" (no relay: the client talks plaintext straight to the backend).
//!
//! Each runs in one of two [`Mode`]s. Pinned: every server on [`SERVER_CPU`] with one thread
//! (one worker process for nginx), the backend and the load generators on [`LOAD_CPU`], so
//! the figures compare cost per core. Defaults: nothing pinned and no thread setting, each
//! server as a user would start it, so the figures show what users get. TLS is 1.3 only, with
//! `TLS_AES_256_GCM_SHA384` and X25519 (rustls' and OpenSSL's common default), the same
//! certificate and key for everyone.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use relay_tests::{pki::CertFiles, relay::Relay};

/// The core servers under test run on (pinned mode).
pub const SERVER_CPU: &str = "1";
/// The core of the backend and of the load generators (pinned mode).
pub const LOAD_CPU: &str = "0";

pub const CIPHERSUITE: &str = "TLS_AES_256_GCM_SHA384";

/// Where nginx's stream module lives on Debian (`libnginx-mod-stream`); the bench's own
/// configuration does not include `/etc/nginx/modules-enabled`, so it loads the module itself.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// How the servers and clients of a pass are placed and threaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every server on [`SERVER_CPU`] with one thread, clients and backend on [`LOAD_CPU`]:
    /// cost per core.
    Pinned,
    /// Every server, client and the backend unpinned, each server with its default threads or
    /// processes: what users run.
    Defaults,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pinned => "pinned",
            Mode::Defaults => "defaults",
        }
    }

    /// `program`, run on `cpu` with taskset when pinned, as is otherwise.
    pub fn command(self, cpu: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Mode::Pinned => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpu]).arg(program);
                cmd
            }
            Mode::Defaults => Command::new(program),
        }
    }

    /// Threads of the load generators: one (their core) when pinned; one per available CPU
    /// otherwise, so the client is not what limits a server that may use every core.
    pub fn client_threads(self) -> u32 {
        match self {
            Mode::Pinned => 1,
            Mode::Defaults => {
                std::thread::available_parallelism().map_or(2, |n| n.get().max(1) as u32)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Relay,
    Haproxy,
    Stunnel,
    Nginx,
    Direct,
}

impl Peer {
    /// Every column of the report, in order; a [`super::Row`]'s values are indexed like this.
    pub const ALL: [Peer; 5] = [
        Peer::Relay,
        Peer::Haproxy,
        Peer::Stunnel,
        Peer::Nginx,
        Peer::Direct,
    ];

    /// The other TLS terminators relay is compared with ("direct" is the ceiling, not one).
    pub const COMPETITORS: [Peer; 3] = [Peer::Haproxy, Peer::Stunnel, Peer::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Relay => "relay",
            Peer::Haproxy => "haproxy",
            Peer::Stunnel => "stunnel",
            Peer::Nginx => "nginx stream",
            Peer::Direct => "direct",
        }
    }

    /// Position in [`Peer::ALL`].
    pub fn index(self) -> usize {
        Peer::ALL
            .iter()
            .position(|p| *p == self)
            .expect("every peer is in Peer::ALL")
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
    pub(super) fn spawn(
        cmd: &mut Command,
        what: &'static str,
        work: &Path,
    ) -> anyhow::Result<Proc> {
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

/// The backend every peer relays to: nginx serving `www` over plaintext. Pinned: one process
/// on [`LOAD_CPU`]. Defaults: unpinned, a worker per core (`worker_processes auto`, as
/// Debian's own configuration has it), so the backend does not limit servers that use both.
pub struct Backend {
    pub port: u16,
    pub proc: Proc,
}

pub fn start_backend(work: &Path, www: &Path, mode: Mode) -> anyhow::Result<Backend> {
    let port = relay_tests::free_port();
    let conf = work.join("nginx.conf");
    let tmp = work.join("nginx-tmp");
    fs::create_dir_all(&tmp)?;
    let processes = match mode {
        Mode::Pinned => "master_process off;\n",
        // Workers as root: they read `www` wherever the checkout is, whatever its modes.
        Mode::Defaults => "master_process on;\nworker_processes auto;\nuser root;\n",
    };
    fs::write(
        &conf,
        format!(
            "daemon off;\n{processes}pid {pid};\nerror_log {err} warn;\n\
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
        mode.command(LOAD_CPU, "nginx")
            .arg("-c")
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

/// Waits until `proc` accepts connections on `port` (10 s at most); fails if it exits first.
pub(super) fn wait_port(port: u16, proc: &mut Proc) -> anyhow::Result<()> {
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

/// Starts `peer` in front of `backend` with the given front side, placed and threaded as
/// `mode` says. `None` when the peer cannot do it (stunnel has no plaintext-to-plaintext
/// mode).
pub fn start(
    peer: Peer,
    front: &Front,
    backend: u16,
    work: &Path,
    mode: Mode,
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
            let relay = start_relay(&conf, mode)?;
            Server {
                metrics: Some(metrics),
                ..server(Some(relay.pid()), Some(relay), None)
            }
        }
        Peer::Haproxy => {
            let conf = work.join("haproxy.cfg");
            fs::write(&conf, haproxy_config(front, port, backend, work, mode)?)?;
            let proc = start_haproxy(&conf, port, "haproxy", work, mode)?;
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
            let proc = start_stunnel(&conf, port, "stunnel", work, mode)?;
            server(Some(proc.pid()), None, Some(proc))
        }
        Peer::Nginx => {
            let prefix = work.join("nginx-stream");
            fs::create_dir_all(&prefix).context("creating nginx stream's prefix directory")?;
            let conf = prefix.join("nginx-stream.conf");
            fs::write(
                &conf,
                nginx_stream_config(front, port, backend, &prefix, mode),
            )?;
            let proc = start_nginx_stream(&conf, &prefix, port, "nginx-stream", work, mode)?;
            server(Some(proc.pid()), None, Some(proc))
        }
    }))
}

/// `relay run` with `conf`: on [`SERVER_CPU`] with one worker thread when pinned, relay's own
/// default otherwise. Returns once relay says it is ready.
pub(super) fn start_relay(conf: &Path, mode: Mode) -> anyhow::Result<Relay> {
    let mut cmd = mode.command(SERVER_CPU, relay_tests::relay::binary());
    cmd.args(["run", "--config"]).arg(conf);
    match mode {
        Mode::Pinned => cmd.env("TOKIO_WORKER_THREADS", "1"),
        // relay's own default (a thread per available core), whatever our caller's
        // environment says.
        Mode::Defaults => cmd.env_remove("TOKIO_WORKER_THREADS"),
    };
    Relay::start_with(&mut cmd).with_context(|| format!("starting relay with {}", conf.display()))
}

/// HAProxy in the foreground with `conf`, once it listens on `port`; its log is
/// `<what>.log` in `work`.
pub(super) fn start_haproxy(
    conf: &Path,
    port: u16,
    what: &'static str,
    work: &Path,
    mode: Mode,
) -> anyhow::Result<Proc> {
    spawn_listening(
        mode.command(SERVER_CPU, "haproxy")
            .args(["-db", "-f"])
            .arg(conf),
        port,
        what,
        work,
    )
}

/// stunnel with `conf` (which keeps it in the foreground), once it listens on `port`.
pub(super) fn start_stunnel(
    conf: &Path,
    port: u16,
    what: &'static str,
    work: &Path,
    mode: Mode,
) -> anyhow::Result<Proc> {
    // Same configuration in both modes: stunnel has no thread setting (a thread per
    // connection), so pinned only confines its threads to the server core.
    spawn_listening(
        mode.command(SERVER_CPU, "stunnel").arg(conf),
        port,
        what,
        work,
    )
}

/// A stream nginx with its own `prefix` and `conf`, once it listens on `port`.
pub(super) fn start_nginx_stream(
    conf: &Path,
    prefix: &Path,
    port: u16,
    what: &'static str,
    work: &Path,
    mode: Mode,
) -> anyhow::Result<Proc> {
    spawn_listening(
        mode.command(SERVER_CPU, "nginx")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(conf)
            // Before it reads the configuration nginx opens its built-in error log
            // (/var/log/nginx): point it at the prefix from the start.
            .arg("-e")
            .arg(prefix.join("error.log")),
        port,
        what,
        work,
    )
}

/// Starts `cmd` (its log `<what>.log` in `work`) and returns once it listens on `port`.
fn spawn_listening(
    cmd: &mut Command,
    port: u16,
    what: &'static str,
    work: &Path,
) -> anyhow::Result<Proc> {
    let mut proc = Proc::spawn(cmd, what, work)?;
    wait_port(port, &mut proc)?;
    Ok(proc)
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
    relay_service_config(
        &work.join("relay-control.sock"),
        metrics,
        port,
        backend,
        &inbound,
        "level = \"plain\"\n",
    )
}

/// A relay configuration with one explicit-mode service listening on `port` toward
/// `backend`; `inbound` and `outbound` are the bodies of its `[service.inbound]` and
/// `[service.outbound]` tables.
pub(super) fn relay_service_config(
    control_socket: &Path,
    metrics: &str,
    port: u16,
    backend: u16,
    inbound: &str,
    outbound: &str,
) -> String {
    format!(
        "[relay]\ncontrol_socket = \"{sock}\"\nmetrics = \"{metrics}\"\nmax_connections = 9000\n\n\
         [[service]]\nname = \"bench\"\nserver = \"127.0.0.1\"\nport = {port}\n\
         backend_port = {backend}\nlisten = \"127.0.0.1:{port}\"\n\
         [service.inbound]\n{inbound}[service.outbound]\n{outbound}",
        sock = control_socket.display(),
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

fn haproxy_config(
    front: &Front,
    port: u16,
    backend: u16,
    work: &Path,
    mode: Mode,
) -> anyhow::Result<String> {
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
    Ok(haproxy_tcp_config(mode, cache, port, &bind, backend, ""))
}

/// HAProxy in `mode tcp` from 127.0.0.1:`port` to 127.0.0.1:`backend`; `bind` and `server`
/// end the `bind` and `server` lines (their TLS settings), `global` adds to the global
/// section. TLS, on whichever side, is 1.3 with [`CIPHERSUITE`] only.
pub(super) fn haproxy_tcp_config(
    mode: Mode,
    global: &str,
    port: u16,
    bind: &str,
    backend: u16,
    server: &str,
) -> String {
    // Defaults: no `nbthread`, so HAProxy starts a thread per CPU it may run on.
    let threads = match mode {
        Mode::Pinned => "  nbthread 1\n",
        Mode::Defaults => "",
    };
    format!(
        "global\n{threads}  maxconn 9000\n{global}  \
         ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
         ssl-default-bind-ciphersuites {CIPHERSUITE}\n  \
         ssl-default-server-options ssl-min-ver TLSv1.3\n  \
         ssl-default-server-ciphersuites {CIPHERSUITE}\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  \
         timeout server 600s\n\
         frontend bench\n  bind 127.0.0.1:{port}{bind}\n  default_backend upstream\n\
         backend upstream\n  server upstream 127.0.0.1:{backend}{server}\n"
    )
}

fn stunnel_config(certs: &CertFiles, resumption: bool, port: u16, backend: u16) -> String {
    // stunnel has no switch for "no resumption" in TLS 1.3: without tickets OpenSSL falls back
    // to stateful tickets from the session cache, so the cache is made useless as well.
    let no_resume = if resumption {
        ""
    } else {
        "options = NO_TICKET\nsessionCacheSize = 1\nsessionCacheTimeout = 1\n"
    };
    stunnel_service_config(
        port,
        backend,
        &format!(
            "cert = {}\nkey = {}\n{no_resume}",
            certs.cert.display(),
            certs.key.display(),
        ),
    )
}

/// stunnel in the foreground with one service from 127.0.0.1:`port` to 127.0.0.1:`backend`,
/// TLS 1.3 with [`CIPHERSUITE`] only; `service` adds the side's settings (certificate and
/// key for a server, `client = yes` and verification for a client).
pub(super) fn stunnel_service_config(port: u16, backend: u16, service: &str) -> String {
    format!(
        "foreground = yes\npid =\ndebug = err\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
         [bench]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\n\
         sslVersionMin = TLSv1.3\nciphersuites = {CIPHERSUITE}\n{service}",
    )
}

/// nginx as a TLS terminator: `stream {}` (plain TCP proxying, no HTTP parsing, like HAProxy's
/// `mode tcp`), `listen ... ssl` with the peers' certificate, to the backend. Its own prefix
/// holds the pid file and the error log, apart from the backend nginx.
fn nginx_stream_config(
    front: &Front,
    port: u16,
    backend: u16,
    prefix: &Path,
    mode: Mode,
) -> String {
    let (ssl, tls) = match &front.tls {
        Some(c) => {
            // Without tickets OpenSSL would resume TLS 1.3 sessions from the (stateful)
            // session cache: both are off for new handshakes. With resumption, a cache shared
            // by the workers, as for stateful clients a user's nginx would have.
            let resumption = if front.resumption {
                "ssl_session_tickets on;\n    ssl_session_cache shared:bench:10m;"
            } else {
                "ssl_session_tickets off;\n    ssl_session_cache off;"
            };
            (
                true,
                format!(
                    "    ssl_certificate {};\n    ssl_certificate_key {};\n    \
                     ssl_protocols TLSv1.3;\n    \
                     ssl_conf_command Ciphersuites {CIPHERSUITE};\n    {resumption}\n",
                    c.cert.display(),
                    c.key.display(),
                ),
            )
        }
        None => (false, String::new()),
    };
    nginx_stream_server_config(port, ssl, &tls, backend, prefix, mode)
}

/// A stream nginx (its own pid file and error log under `prefix`) with one server from
/// 127.0.0.1:`port` (`ssl`: TLS on the listening side) to 127.0.0.1:`backend`; `directives`
/// go into the `server {}` block (each line indented by four spaces and ended by a newline).
pub(super) fn nginx_stream_server_config(
    port: u16,
    ssl: bool,
    directives: &str,
    backend: u16,
    prefix: &Path,
    mode: Mode,
) -> String {
    // Pinned: one worker (plus the master, which only waits) on the server core. Defaults:
    // `auto`, a worker per core, as Debian's own nginx.conf has it.
    let workers = match mode {
        Mode::Pinned => "1",
        Mode::Defaults => "auto",
    };
    format!(
        "load_module {NGINX_STREAM_MODULE};\n\
         daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         pid {pid};\nerror_log {err} warn;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 20000; }}\n\
         stream {{\n  server {{\n    listen 127.0.0.1:{port}{ssl};\n{directives}    \
         tcp_nodelay on;\n    proxy_timeout 600s;\n    \
         proxy_pass 127.0.0.1:{backend};\n  }}\n}}\n",
        ssl = if ssl { " ssl" } else { "" },
        pid = prefix.join("nginx-stream.pid").display(),
        err = prefix.join("error.log").display(),
    )
}
