//! The plain→TLS→plain tunnel: an iperf3 client sends plaintext to end A, which wraps it in
//! TLS 1.3 toward end B, which terminates it and forwards plaintext to an iperf3 server. This
//! is how two plaintext sites are linked across a network they do not trust; each peer kind
//! plays both ends (two relays, two HAProxys, two stunnels, two stream nginxes), and "direct"
//! (the iperf3 client straight to the server) is the ceiling.
//!
//! B is the TLS terminator the other scenarios measure ([`peers::start`], with the bench's
//! ECDSA P-256 certificate and resumption on); A is started here: plaintext in, TLS 1.3 out,
//! verifying B's chain against the bench CA and B's name ([`SERVER_NAME`]), as a real tunnel
//! must. One TCP stream for the scenario's duration gives the throughput (what the iperf3
//! server received) and, from `/proc`, the CPU time of both ends together per GB received.
//!
//! Pinned: both ends on [`peers::SERVER_CPU`] with one thread each, iperf3 client and server
//! on [`LOAD_CPU`]; defaults: nothing pinned, every end with its default threads.

use std::{fs, path::Path};

use anyhow::Context as _;
use relay_tests::{pki::CertFiles, relay::Relay};

use super::{
    Pass, Results, Row, load,
    peers::{self, CIPHERSUITE, Front, LOAD_CPU, Mode, Peer, Proc, Server},
    procfs, say, tag,
};

/// The scenario's name (`--only tunnel` selects it).
pub const TITLE: &str = "plain→TLS→plain tunnel";

/// The name A asks B for (SNI) and checks B's certificate against: the bench's server
/// certificates are issued for `localhost` (and the loopback addresses).
const SERVER_NAME: &str = "localhost";

/// Runs the scenario for every peer kind and adds its two rows (throughput, CPU per GB) to
/// `results`. `certs` is B's certificate and key, `ca` the CA A verifies it with.
pub fn measure(
    results: &mut Results,
    pass: Pass,
    certs: &CertFiles,
    ca: &Path,
) -> anyhow::Result<()> {
    let mode = pass.mode;
    let title = format!("{TITLE}, one iperf3 stream");
    say(&format!("{title} ({})", mode.name()));
    let mut speed = Row::new(mode, title.clone(), "Gbit/s", true);
    let mut cpu = Row::new(
        mode,
        format!("CPU per GB, {TITLE} (both ends)"),
        "CPU-s",
        false,
    );
    cpu.plotted = false;
    let dir = pass.dir.join("tunnel");
    fs::create_dir_all(&dir).context("creating the tunnel scenario's directory")?;
    let (target, _iperf3_server) = iperf3_server(&dir, mode)?;
    for peer in Peer::ALL {
        // A peer that fails here leaves its cells empty with the reason in the Observations:
        // the rest of the run (often many minutes of it) is still worth its report.
        match one(peer, certs, ca, target, &dir, mode, results.size.duration) {
            Ok(m) => {
                speed.set(peer, m.gbits);
                if let Some(c) = m.cpu_per_gb {
                    cpu.set(peer, c);
                }
                if let Some(neg) = m.negotiated {
                    results.notes.push(format!(
                        "{} tunnel: {}'s TLS hop negotiated {neg} (openssl s_client to end B)",
                        tag(mode),
                        peer.name()
                    ));
                }
                eprintln!(
                    "    {:12} {:>10.2} Gbit/s  {}",
                    peer.name(),
                    m.gbits,
                    m.cpu_per_gb
                        .map_or(String::new(), |c| format!("{c:.2} CPU-s/GB (both ends)"))
                );
            }
            Err(e) => {
                eprintln!("    {:12} failed: {e:#}", peer.name());
                results.notes.push(format!(
                    "{} {TITLE}: {} failed: {e:#}",
                    tag(mode),
                    peer.name()
                ));
            }
        }
    }
    results.rows.push(speed);
    results.rows.push(cpu);
    Ok(())
}

/// What one peer kind's tunnel measured.
struct Measured {
    gbits: f64,
    /// Both ends' CPU seconds per GB received; `None` for direct (no end runs).
    cpu_per_gb: Option<f64>,
    /// What B's TLS negotiates (version, suite, key exchange); `None` for direct.
    negotiated: Option<String>,
}

/// Starts `peer`'s tunnel in front of the iperf3 server on `target`, sends one stream through
/// it and reads what both ends cost.
fn one(
    peer: Peer,
    certs: &CertFiles,
    ca: &Path,
    target: u16,
    dir: &Path,
    mode: Mode,
    duration: std::time::Duration,
) -> anyhow::Result<Measured> {
    let tunnel = Tunnel::start(peer, certs, ca, target, dir, mode)
        .with_context(|| format!("starting the {} tunnel ({} mode)", peer.name(), mode.name()))?;
    // No warm-up connection, unlike the other scenarios: start-up work is done before the
    // ends listen, and the handshakes of iperf3's two connections (control, then data) are
    // nothing next to seconds of bulk data.
    let before = tunnel.cpu_seconds();
    let r = load::iperf3(mode, tunnel.port, duration).with_context(|| {
        format!(
            "measuring the {} tunnel ({} mode)",
            peer.name(),
            mode.name()
        )
    })?;
    let used = tunnel.cpu_seconds().zip(before).map(|(a, b)| a - b);
    let negotiated = match tunnel.tls_port {
        Some(port) => Some(load::negotiated(port)?),
        None => None,
    };
    Ok(Measured {
        gbits: r.bits_per_second / 1e9,
        cpu_per_gb: used.map(|secs| secs / (r.bytes as f64 / 1e9)),
        negotiated,
    })
}

/// The far end of every tunnel of a pass: one iperf3 server, bound to loopback, kept for the
/// whole scenario (it serves one test at a time, which is all the scenario asks of it).
fn iperf3_server(dir: &Path, mode: Mode) -> anyhow::Result<(u16, Proc)> {
    let port = relay_tests::free_port();
    let mut proc = Proc::spawn(
        mode.command(LOAD_CPU, "iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p"])
            .arg(port.to_string()),
        "iperf3-server",
        dir,
    )
    .context("starting the iperf3 server")?;
    // The readiness probe (a connection closed at once) makes iperf3 log an error and wait
    // for the next test: harmless.
    peers::wait_port(port, &mut proc)?;
    Ok((port, proc))
}

/// Both ends of one peer kind's tunnel, stopped when dropped.
struct Tunnel {
    /// Where the iperf3 client connects: A, or the iperf3 server itself for direct.
    port: u16,
    /// B's port, the TLS hop; `None` for direct.
    tls_port: Option<u16>,
    /// The process trees to account: A's root, then B's.
    pids: Vec<u32>,
    // Dropped in this order: A first, so B does not see its clients vanish mid-stream.
    _a: Option<Wrapper>,
    _b: Option<Server>,
}

impl Tunnel {
    fn start(
        peer: Peer,
        certs: &CertFiles,
        ca: &Path,
        target: u16,
        dir: &Path,
        mode: Mode,
    ) -> anyhow::Result<Tunnel> {
        if peer == Peer::Direct {
            return Ok(Tunnel {
                port: target,
                tls_port: None,
                pids: Vec::new(),
                _a: None,
                _b: None,
            });
        }
        // A directory per end, so the files peers::start writes for B (relay.toml,
        // haproxy.cfg, logs, nginx's prefix) and A's do not overwrite each other.
        let dir = dir.join(peer.name().replace(' ', "-"));
        let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
        for d in [&dir_a, &dir_b] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Resumption on, as in the bulk scenarios: a long-lived tunnel would keep it, and
        // iperf3's data connection may resume its control connection's session.
        let front = Front {
            tls: Some(certs.clone()),
            resumption: true,
        };
        let b = peers::start(peer, &front, target, &dir_b, mode)
            .context("starting end B (TLS in, plaintext out)")?
            .context("end B cannot terminate TLS")?;
        let a = Wrapper::start(peer, ca, b.port, &dir_a, mode)
            .context("starting end A (plaintext in, TLS out)")?;
        let b_pid = b.pid.context("end B has no process")?;
        Ok(Tunnel {
            port: a.port,
            tls_port: Some(b.port),
            pids: vec![a.pid, b_pid],
            _a: Some(a),
            _b: Some(b),
        })
    }

    /// CPU seconds used so far by both ends' process trees; `None` when nothing runs.
    fn cpu_seconds(&self) -> Option<f64> {
        (!self.pids.is_empty()).then(|| self.pids.iter().map(|p| procfs::cpu_seconds(*p)).sum())
    }
}

/// End A: plaintext in, TLS 1.3 out toward B (TLS 1.3 only, [`CIPHERSUITE`] only where the
/// peer lets the client choose), B's chain verified against the bench CA and its name
/// against [`SERVER_NAME`], sent as SNI.
struct Wrapper {
    port: u16,
    pid: u32,
    _relay: Option<Relay>,
    _proc: Option<Proc>,
}

impl Wrapper {
    fn start(peer: Peer, ca: &Path, b_port: u16, dir: &Path, mode: Mode) -> anyhow::Result<Self> {
        let port = relay_tests::free_port();
        let ca = ca.display();
        let wrapper = |pid, relay, proc| Wrapper {
            port,
            pid,
            _relay: relay,
            _proc: proc,
        };
        Ok(match peer {
            Peer::Relay => {
                let conf = dir.join("relay.toml");
                let metrics = format!("127.0.0.1:{}", relay_tests::free_port());
                fs::write(
                    &conf,
                    peers::relay_service_config(
                        &dir.join("relay-control.sock"),
                        &metrics,
                        port,
                        b_port,
                        "level = \"plain\"\n",
                        &format!(
                            "level = \"tls\"\nca = \"{ca}\"\nserver_name = \"{SERVER_NAME}\"\n"
                        ),
                    ),
                )?;
                let relay = peers::start_relay(&conf, mode)?;
                wrapper(relay.pid(), Some(relay), None)
            }
            Peer::Haproxy => {
                let conf = dir.join("haproxy.cfg");
                fs::write(
                    &conf,
                    peers::haproxy_tcp_config(
                        mode,
                        "",
                        port,
                        "",
                        b_port,
                        // `verifyhost` checks the name; `sni` sends it (HAProxy sends none
                        // by default).
                        &format!(
                            " ssl verify required ca-file {ca} sni str({SERVER_NAME}) \
                             verifyhost {SERVER_NAME}"
                        ),
                    ),
                )?;
                let proc = peers::start_haproxy(&conf, port, "haproxy-tunnel-a", dir, mode)?;
                wrapper(proc.pid(), None, Some(proc))
            }
            Peer::Stunnel => {
                let conf = dir.join("stunnel.conf");
                fs::write(
                    &conf,
                    peers::stunnel_service_config(
                        port,
                        b_port,
                        &format!(
                            "client = yes\nCAfile = {ca}\nverifyChain = yes\n\
                             checkHost = {SERVER_NAME}\nsni = {SERVER_NAME}\n"
                        ),
                    ),
                )?;
                let proc = peers::start_stunnel(&conf, port, "stunnel-tunnel-a", dir, mode)?;
                wrapper(proc.pid(), None, Some(proc))
            }
            Peer::Nginx => {
                let prefix = dir.join("nginx-stream");
                fs::create_dir_all(&prefix).context("creating nginx stream's prefix directory")?;
                let conf = prefix.join("nginx-stream.conf");
                // `proxy_ssl_name` is the name verified; `proxy_ssl_server_name` sends it as
                // SNI (off by default).
                fs::write(
                    &conf,
                    peers::nginx_stream_server_config(
                        port,
                        false,
                        &format!(
                            "    proxy_ssl on;\n    proxy_ssl_verify on;\n    \
                             proxy_ssl_trusted_certificate {ca};\n    \
                             proxy_ssl_name {SERVER_NAME};\n    proxy_ssl_server_name on;\n    \
                             proxy_ssl_protocols TLSv1.3;\n    \
                             proxy_ssl_conf_command Ciphersuites {CIPHERSUITE};\n"
                        ),
                        b_port,
                        &prefix,
                        mode,
                    ),
                )?;
                let proc = peers::start_nginx_stream(
                    &conf,
                    &prefix,
                    port,
                    "nginx-stream-tunnel-a",
                    dir,
                    mode,
                )?;
                wrapper(proc.pid(), None, Some(proc))
            }
            Peer::Direct => anyhow::bail!("direct has no tunnel end"),
        })
    }
}
