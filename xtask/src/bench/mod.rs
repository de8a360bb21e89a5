//! `cargo xtask bench`: relay side by side with HAProxy, stunnel and nginx (`stream {}`), same
//! run, same work.
//!
//! Each scenario starts every peer fresh (relay, HAProxy, stunnel, nginx stream, and "direct":
//! no relay at all), one at a time, in front of the same nginx backend, drives it with the same
//! real client tool for the same bounded time, and reads the peer's own CPU time and memory
//! from `/proc`. The plain→TLS→plain tunnel ([`tunnel`]) is the exception: each peer kind
//! plays both ends of a TLS tunnel between an iperf3 client and an iperf3 server, and both
//! ends are accounted together. The scenarios run in up to two passes ([`Mode`]): pinned
//! (servers on one core with one thread, clients and backend on the other, so the CPU-seconds
//! figures compare the work each peer does per unit, whatever the client costs) and defaults
//! (nothing pinned, each server with its own default threads: what users run). The level
//! pairs (relay alone, against a baseline build) and the XDP figures run once.
//! The output is `target/bench/report.md` (a table per mode with ratios relay/peer and
//! relay/best peer, versions, machine, settings) and `target/bench/ratios.svg`; a summary line
//! per scenario is printed at the end.

mod load;
mod pairs;
mod peers;
mod procfs;
mod report;
mod tunnel;
mod xdp;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use peers::{Front, Mode, Peer, Server};
use relay_tests::pki::{KeyKind, Pki};

use crate::{capture, run};

/// How big a run is.
#[derive(Clone, Copy)]
pub struct Size {
    pub quick: bool,
    /// Length of every timed load run.
    pub duration: Duration,
    /// Size of the bulk transfer.
    pub bulk_bytes: u64,
    /// Idle connections held open for the memory scenario.
    pub idle: u32,
    /// Concurrent connections of the handshake scenarios.
    pub handshake_conns: u32,
    /// Concurrent keep-alive connections of the request scenario.
    pub keepalive_conns: u32,
}

impl Size {
    pub fn new(quick: bool) -> Size {
        if quick {
            Size {
                quick,
                duration: Duration::from_secs(3),
                bulk_bytes: 256 << 20,
                idle: 1000,
                handshake_conns: 16,
                keepalive_conns: 100,
            }
        } else {
            Size {
                quick,
                duration: Duration::from_secs(10),
                bulk_bytes: 1 << 30,
                idle: 5000,
                handshake_conns: 16,
                keepalive_conns: 100,
            }
        }
    }
}

/// Which passes `cargo xtask bench --mode` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Modes {
    /// Every server pinned to one core with one thread: cost per core.
    Pinned,
    /// Every server with its default threads, nothing pinned: what users run.
    Defaults,
    /// Both, one after the other (each table in the report).
    Both,
}

impl Modes {
    fn list(self) -> Vec<Mode> {
        match self {
            Modes::Pinned => vec![Mode::Pinned],
            Modes::Defaults => vec![Mode::Defaults],
            Modes::Both => vec![Mode::Pinned, Mode::Defaults],
        }
    }
}

/// One line of the report: a figure per peer, in one mode.
pub struct Row {
    pub mode: Mode,
    pub title: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Indexed like [`Peer::ALL`].
    pub values: [Option<f64>; Peer::ALL.len()],
    /// Shown in the plot (the headline figures; CPU rows are derived from them).
    pub plotted: bool,
}

impl Row {
    fn new(
        mode: Mode,
        title: impl Into<String>,
        unit: &'static str,
        higher_is_better: bool,
    ) -> Row {
        Row {
            mode,
            title: title.into(),
            unit,
            higher_is_better,
            values: [None; Peer::ALL.len()],
            plotted: true,
        }
    }

    fn set(&mut self, peer: Peer, v: f64) {
        self.values[peer.index()] = Some(v);
    }

    pub fn get(&self, peer: Peer) -> Option<f64> {
        self.values[peer.index()]
    }

    /// The competitor with the best figure in this row (highest or lowest, as the row runs),
    /// and that figure.
    pub fn best_peer(&self) -> Option<(Peer, f64)> {
        Peer::COMPETITORS
            .into_iter()
            .filter_map(|p| Some((p, self.get(p).filter(|v| *v > 0.0)?)))
            .reduce(|best, next| {
                let better = if self.higher_is_better {
                    next.1 > best.1
                } else {
                    next.1 < best.1
                };
                if better { next } else { best }
            })
    }

    /// relay's figure over `peer`'s, the report's ratio.
    pub fn ratio(&self, peer: Peer) -> Option<f64> {
        match (self.get(Peer::Relay), self.get(peer)) {
            (Some(r), Some(v)) if v > 0.0 => Some(r / v),
            _ => None,
        }
    }

    /// relay's figure over the best competitor's, and which competitor that is.
    pub fn ratio_to_best(&self) -> Option<(f64, Peer)> {
        let (peer, best) = self.best_peer()?;
        Some((self.get(Peer::Relay)? / best, peer))
    }
}

/// Everything a run found, for the report.
pub struct Results {
    pub size: Size,
    /// The passes run, in order.
    pub modes: Vec<Mode>,
    /// Every mode's rows, each tagged with its mode.
    pub rows: Vec<Row>,
    /// Observations worth a line in the report (negotiated parameters, errors, resumption).
    pub notes: Vec<String>,
    pub xdp: Option<xdp::XdpFigures>,
    /// The level-pair table, and the names of the builds it compares.
    pub pairs: Vec<pairs::PairRow>,
    pub builds: Vec<String>,
    pub started: Instant,
}

/// Where a scenario runs: the pass's mode and backend, the work directory.
#[derive(Clone, Copy)]
struct Pass<'a> {
    mode: Mode,
    backend: u16,
    dir: &'a Path,
}

pub fn bench(
    quick: bool,
    only: Option<&str>,
    baseline: Option<&str>,
    modes: Modes,
    relay_bin: &Path,
) -> anyhow::Result<()> {
    ensure!(
        crate::setup::is_root(),
        "the bench installs its peers with apt and measures the XDP data path: run it as root"
    );
    crate::setup::bench_tools()?;
    raise_fd_limit();
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("RELAY_BIN", relay_bin);
        std::env::set_var("RELAY_ECHO_LOGS", "0");
        // One log line per connection would be work the peers (no logs) do not do.
        std::env::set_var("RELAY_TEST_LOG", "warn,relay::supervisor=info");
    }
    let out_dir = crate::workspace_root().join("target/bench");
    let work = out_dir.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).context("clearing target/bench/work")?;
    }
    fs::create_dir_all(&work)?;
    let size = Size::new(quick);
    let mut results = Results {
        size,
        modes: modes.list(),
        rows: Vec::new(),
        notes: Vec::new(),
        xdp: None,
        pairs: Vec::new(),
        builds: Vec::new(),
        started: Instant::now(),
    };
    let www = work.join("www");
    write_content(&www, size.bulk_bytes)?;
    let pki = Pki::generate(&work.join("pki"))?;

    let ecdsa = pki.server_of(KeyKind::EcdsaP256).clone();
    let rsa = pki.server_of(KeyKind::Rsa2048).clone();
    let full = |certs: &relay_tests::pki::CertFiles| Front {
        tls: Some(certs.clone()),
        resumption: false,
    };
    let resumable = Front {
        tls: Some(ecdsa.clone()),
        resumption: true,
    };
    let plain = Front {
        tls: None,
        resumption: true,
    };

    let wanted = |title: &str| only.is_none_or(|o| title.contains(o));
    let scenarios = [
        "new TLS 1.3 handshakes, ECDSA P-256",
        "new TLS 1.3 handshakes, RSA-2048",
        "resumed TLS 1.3 handshakes, ECDSA P-256",
        "bulk TLS→plain",
        "bulk plain→plain",
        "keep-alive requests",
        "idle connection memory",
        tunnel::TITLE,
    ];
    for mode in results.modes.clone() {
        if !scenarios.iter().any(|s| wanted(s)) {
            break;
        }
        // Each pass has its own backend: pinned to the load core, or unpinned with a worker
        // per core.
        let backend = peers::start_backend(&work, &www, mode)
            .with_context(|| format!("starting the nginx backend ({} mode)", mode.name()))?;
        say(&match mode {
            Mode::Pinned => format!(
                "bench ({}), pinned: servers on CPU {} with one thread, clients and nginx \
                 backend on CPU {}",
                if quick { "quick" } else { "full" },
                peers::SERVER_CPU,
                peers::LOAD_CPU
            ),
            Mode::Defaults => format!(
                "bench ({}), defaults: every server with its default threads, nothing pinned",
                if quick { "quick" } else { "full" },
            ),
        });
        let pass = Pass {
            mode,
            backend: backend.port,
            dir: &work,
        };
        for (title, front) in [
            (scenarios[0], full(&ecdsa)),
            (scenarios[1], full(&rsa)),
            (scenarios[2], resumable.clone()),
        ] {
            if wanted(title) {
                handshakes(&mut results, pass, title, &front)?;
            }
        }
        if wanted(scenarios[3]) {
            bulk(&mut results, pass, "TLS→plain", &resumable)?;
        }
        if wanted(scenarios[4]) {
            bulk(&mut results, pass, "plain→plain", &plain)?;
        }
        if wanted(scenarios[5]) {
            keepalive(&mut results, pass, &resumable)?;
        }
        if wanted(scenarios[6]) {
            idle(&mut results, pass, &resumable)?;
        }
        if wanted(scenarios[7]) {
            tunnel::measure(&mut results, pass, &ecdsa, &pki.ca)?;
        }
    }
    if wanted("level pairs") {
        // relay alone, measured per core: as in the pinned pass, whichever passes ran.
        let backend = peers::start_backend(&work, &www, Mode::Pinned)
            .context("starting the nginx backend (level pairs)")?;
        let mut builds = vec![pairs::Build {
            name: "relay".into(),
            bin: relay_bin.to_path_buf(),
        }];
        if let Some(rev) = baseline {
            builds.push(pairs::build_baseline(rev)?);
        }
        results.builds = builds.iter().map(|b| b.name.clone()).collect();
        pairs::measure(&mut results, &pki, backend.port, &work, &builds)?;
    }

    if wanted("XDP data path") {
        match xdp::measure(&work, quick) {
            Ok(x) => results.xdp = Some(x),
            Err(e) => results.notes.push(format!("XDP scenario failed: {e:#}")),
        }
    }

    let report = report::write(&results, &out_dir)?;
    summary(&results);
    say(&format!(
        "report: {} (plot: {}); took {:.0} s",
        report.display(),
        out_dir.join("ratios.svg").display(),
        results.started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn say(msg: &str) {
    eprintln!("\x1b[1;36m[bench]\x1b[0m {msg}");
}

/// Lets every peer (and the idle client) hold thousands of sockets: they inherit this limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `small` (1 KiB, the request scenarios) and `big` (the bulk scenario).
fn write_content(www: &Path, bulk: u64) -> anyhow::Result<()> {
    fs::create_dir_all(www)?;
    fs::write(www.join("small"), relay_tests::pattern(1, 1024))?;
    let chunk = relay_tests::pattern(2, 1 << 20);
    let mut f = std::io::BufWriter::new(fs::File::create(www.join("big"))?);
    for _ in 0..bulk / chunk.len() as u64 {
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

/// Starts `peer`, runs `work` against it and returns what it measured plus the peer's CPU
/// seconds during `work`. `None` when the peer cannot serve this front side.
fn with_peer<T>(
    pass: Pass,
    peer: Peer,
    front: &Front,
    work: impl FnOnce(&Server) -> anyhow::Result<T>,
) -> anyhow::Result<Option<(T, Option<f64>, Server)>> {
    let Some(server) = peers::start(peer, front, pass.backend, pass.dir, pass.mode)
        .with_context(|| format!("starting {} ({} mode)", peer.name(), pass.mode.name()))?
    else {
        return Ok(None);
    };
    // One request first, so start-up work (certificate parsing, first allocations) is not
    // counted as load.
    let _ = load::bulk(pass.mode, &server.url("/small"), 1024);
    let cpu_before = server.pid.map(procfs::cpu_seconds);
    let out = work(&server)
        .with_context(|| format!("measuring {} ({} mode)", peer.name(), pass.mode.name()))?;
    let cpu = match (cpu_before, server.pid) {
        (Some(b), Some(pid)) => Some(procfs::cpu_seconds(pid) - b),
        _ => None,
    };
    Ok(Some((out, cpu, server)))
}

fn handshakes(results: &mut Results, pass: Pass, title: &str, front: &Front) -> anyhow::Result<()> {
    let mode = pass.mode;
    say(&format!("{title} ({})", mode.name()));
    let size = results.size;
    let mut rate = Row::new(mode, title, "handshakes/s", true);
    let mut cpu = Row::new(mode, format!("CPU per 1000 {title}"), "CPU-s", false);
    cpu.plotted = false;
    for peer in Peer::ALL {
        let Some((r, secs, server)) = with_peer(pass, peer, front, |s| {
            load::wrk(
                mode,
                &s.url("/small"),
                size.handshake_conns,
                size.duration,
                true,
            )
        })?
        else {
            continue;
        };
        note_errors(results, mode, peer, title, &r);
        rate.set(peer, r.per_second);
        if let Some(secs) = secs {
            cpu.set(peer, secs / r.requests as f64 * 1000.0);
        }
        if server.tls {
            let neg = load::negotiated(server.port)?;
            results.notes.push(format!(
                "{} {title}: {} negotiated {neg}",
                tag(mode),
                peer.name()
            ));
        }
        if peer == Peer::Relay {
            note_resumption(results, mode, title, &server, r.requests);
        }
        eprintln!("    {:12} {:>10.0} handshakes/s", peer.name(), r.per_second);
    }
    results.rows.push(rate);
    results.rows.push(cpu);
    Ok(())
}

/// Records how many of relay's handshakes resumed, from its own metrics: it shows the
/// scenario measured what it says (0 for new handshakes, nearly all for resumed ones).
fn note_resumption(results: &mut Results, mode: Mode, title: &str, server: &Server, requests: u64) {
    let Some(addr) = &server.metrics else { return };
    let Ok(text) = scrape(addr) else {
        return;
    };
    let value = |name: &str| metric_sum(&text, name, "");
    results.notes.push(format!(
        "{} {title}: relay counted {:.0} resumed of {:.0} accepted connections (wrk made {requests} requests)",
        tag(mode),
        value("relay_tls_resumed_total"),
        value("relay_connections_accepted_total"),
    ));
}

/// Sum of the samples of metric `name` whose labels contain `label`, in Prometheus text.
/// relay's metrics, in Prometheus text, from its `metrics` address.
fn scrape(addr: &str) -> anyhow::Result<String> {
    capture(Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]))
}

fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// How notes say which pass they come from.
fn tag(mode: Mode) -> String {
    format!("[{}]", mode.name())
}

fn note_errors(results: &mut Results, mode: Mode, peer: Peer, title: &str, r: &load::Rate) {
    if r.errors > 0 {
        results.notes.push(format!(
            "{} {title}: {} had {} errors in {} requests",
            tag(mode),
            peer.name(),
            r.errors,
            r.requests
        ));
    }
}

fn bulk(results: &mut Results, pass: Pass, kind: &str, front: &Front) -> anyhow::Result<()> {
    let mode = pass.mode;
    let title = format!(
        "bulk {kind}, {} MiB transfers (median)",
        results.size.bulk_bytes >> 20
    );
    say(&format!("{title} ({})", mode.name()));
    let mut speed = Row::new(mode, title.clone(), "MB/s", true);
    let mut cpu = Row::new(mode, format!("CPU per GB, {kind}"), "CPU-s", false);
    cpu.plotted = false;
    let (bytes, duration) = (results.size.bulk_bytes, results.size.duration);
    for peer in Peer::ALL {
        // One transfer lasts well under a second: repeat for the scenario's duration (at
        // least three times) and keep the median, which single transfers are too noisy for.
        let Some(((mbps, count), secs, _server)) = with_peer(pass, peer, front, |s| {
            let started = Instant::now();
            let mut speeds = Vec::new();
            while speeds.len() < 3 || started.elapsed() < duration {
                speeds.push(load::bulk(mode, &s.url("/big"), bytes)?);
            }
            speeds.sort_by(f64::total_cmp);
            Ok((speeds[speeds.len() / 2], speeds.len()))
        })?
        else {
            continue;
        };
        speed.set(peer, mbps);
        if let Some(secs) = secs {
            cpu.set(peer, secs / (count as f64 * bytes as f64 / 1e9));
        }
        eprintln!("    {:12} {:>10.0} MB/s", peer.name(), mbps);
    }
    results.rows.push(speed);
    results.rows.push(cpu);
    Ok(())
}

/// Keep-alive HTTP/1.1 requests for a 1 KiB file over TLS 1.3 (ECDSA P-256), with h2load: the
/// per-request cost of the record layer and the relaying, handshakes done before the timing.
fn keepalive(results: &mut Results, pass: Pass, front: &Front) -> anyhow::Result<()> {
    let mode = pass.mode;
    let size = results.size;
    let title = format!(
        "1 KiB keep-alive requests over TLS 1.3, ECDSA P-256, {} connections (h2load --h1)",
        size.keepalive_conns
    );
    say(&format!("{title} ({})", mode.name()));
    let mut rate = Row::new(mode, title.clone(), "requests/s", true);
    let mut cpu = Row::new(mode, "CPU per 1000 keep-alive requests", "CPU-s", false);
    cpu.plotted = false;
    let mut peak = Row::new(mode, "peak RSS under keep-alive load", "MiB", false);
    for peer in Peer::ALL {
        let Some((r, secs, server)) = with_peer(pass, peer, front, |s| {
            load::h2load(mode, &s.url("/small"), size.keepalive_conns, size.duration)
        })?
        else {
            continue;
        };
        note_errors(results, mode, peer, &title, &r);
        rate.set(peer, r.per_second);
        if let (Some(secs), Some(pid)) = (secs, server.pid) {
            cpu.set(peer, secs / r.requests as f64 * 1000.0);
            peak.set(peer, procfs::peak_rss_kib(pid) as f64 / 1024.0);
            // What each server actually ran with (the defaults pass leaves it to them).
            let (processes, threads) = procfs::processes_and_threads(pid);
            results.notes.push(format!(
                "{} keep-alive: {} ran as {processes} process(es) with {threads} thread(s) in all",
                tag(mode),
                peer.name()
            ));
        }
        eprintln!("    {:12} {:>10.0} requests/s", peer.name(), r.per_second);
    }
    results.rows.extend([rate, cpu, peak]);
    Ok(())
}

fn idle(results: &mut Results, pass: Pass, front: &Front) -> anyhow::Result<()> {
    let mode = pass.mode;
    let n = results.size.idle;
    let title = format!("memory per idle TLS connection ({n} open)");
    say(&format!("{title} ({})", mode.name()));
    let mut per_conn = Row::new(mode, title, "KiB", false);
    for peer in Peer::ALL {
        if peer == Peer::Direct {
            continue;
        }
        let Some((kib, _, _server)) = with_peer(pass, peer, front, |s| {
            let pid = s.pid.context("no process")?;
            let before = procfs::rss_kib(pid);
            let mut held = load::Idle::open(mode, s.port, n, s.tls)?;
            let after = procfs::rss_kib(pid);
            held.close();
            Ok(after.saturating_sub(before) as f64 / n as f64)
        })?
        else {
            continue;
        };
        per_conn.set(peer, kib);
        eprintln!(
            "    {:12} {:>10.1} KiB per idle connection",
            peer.name(),
            kib
        );
    }
    results.rows.push(per_conn);
    Ok(())
}

fn summary(results: &Results) {
    say("summary (ratio relay/peer; see the report for direction and units)");
    for mode in &results.modes {
        let rows: Vec<&Row> = results.rows.iter().filter(|r| r.mode == *mode).collect();
        if rows.is_empty() {
            continue;
        }
        eprintln!("  {}:", mode.name());
        for row in rows {
            let Some(relay) = row.get(Peer::Relay) else {
                continue;
            };
            let ratios: Vec<String> = Peer::COMPETITORS
                .into_iter()
                .map(|p| {
                    format!(
                        "×{} {}",
                        p.name(),
                        row.ratio(p)
                            .map_or("  n/a".to_string(), |v| format!("{v:5.2}"))
                    )
                })
                .collect();
            let best = row
                .ratio_to_best()
                .map_or("n/a".to_string(), |(v, p)| format!("{v:.2} ({})", p.name()));
            eprintln!(
                "    {:58} relay {:>10} {:12} {}  ×best {best}",
                row.title,
                report::fmt(relay),
                row.unit,
                ratios.join(" "),
            );
        }
    }
    if let Some(x) = &results.xdp {
        for line in x.summary() {
            eprintln!("  {line}");
        }
    }
}

/// The release build of relay the bench measures.
pub fn build_release() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").args(["build", "--release", "--package", "relay"]))
        .context("building relay (release) failed")?;
    Ok(crate::relay_bin(true))
}
