//! The nine level pairs (`plain`, `tls`, `mtls` inbound × outbound), relay against a baseline
//! build of relay (`--baseline REV`) in the same run: memory per idle connection, userspace
//! copies per payload byte (relay's `relay_copied_bytes_total` over `relay_bytes_total`, so
//! only for builds that count them), CPU time per GB downloaded, and which kernel path relay
//! chose to move plaintext between two plaintext sockets (its `relay_plain_copies_total`
//! counter, by `path`: "kernel" for a sockmap redirect, "kernel_lagged" when the worker copied
//! part of it, "splice" for splice(2)). CPU, not
//! speed: the client, nginx and the TLS terminator share the other core, so speed would
//! measure them. Every relay here runs as in the pinned mode of the peer comparison.
//!
//! Where the outbound level is TLS, a second relay (not measured, on the load core) terminates
//! it in front of nginx, so the measured relay does the same work as in production: one TLS
//! side per TLS level.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use relay_tests::{
    pki::{KeyKind, Pki},
    relay::Relay,
};

use super::{
    Results, load, metric_sum,
    peers::{LOAD_CPU, Mode, SERVER_CPU},
    procfs, say, scrape,
};
use crate::{capture, run};

pub const LEVELS: [&str; 3] = ["plain", "tls", "mtls"];

/// One pair's figures, for the current build and the baseline.
pub struct PairRow {
    pub inbound: &'static str,
    pub outbound: &'static str,
    /// KiB per idle connection: (current, baseline).
    pub idle_kib: (Option<f64>, Option<f64>),
    /// Userspace copies per payload byte, current build.
    pub copies_per_byte: Option<f64>,
    /// The kernel paths (`path` label of `relay_plain_copies_total`) the current build took
    /// for its plaintext↔plaintext connections, most used first; empty when it counted none
    /// (no such connection in this pair, or a build without the counter).
    pub plain_paths: Vec<String>,
    /// CPU seconds of the measured relay per GB downloaded: (current, baseline).
    pub cpu_per_gb: (Option<f64>, Option<f64>),
}

/// A relay binary under test and how the report names it.
pub struct Build {
    pub name: String,
    pub bin: PathBuf,
}

pub fn measure(
    results: &mut Results,
    pki: &Pki,
    nginx: u16,
    work: &Path,
    builds: &[Build],
) -> anyhow::Result<()> {
    let idle = results.size.idle.min(2000);
    // The bulk file every scenario downloads.
    let bytes = results.size.bulk_bytes;
    say(&format!(
        "level pairs: memory per idle connection ({idle} open), copies per byte and CPU \
         ({} MiB downloads), {}",
        bytes >> 20,
        builds
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(" vs ")
    ));
    for inbound in LEVELS {
        for outbound in LEVELS {
            let mut row = PairRow {
                inbound,
                outbound,
                idle_kib: (None, None),
                copies_per_byte: None,
                plain_paths: Vec::new(),
                cpu_per_gb: (None, None),
            };
            // The outbound TLS of the measured relay ends here, on the load core.
            let terminator = match outbound {
                "plain" => None,
                level => Some(terminator(pki, level, nginx, work)?),
            };
            let backend = terminator.as_ref().map_or(nginx, |t| t.1);
            for (i, build) in builds.iter().enumerate() {
                let figures = one(
                    pki,
                    (inbound, outbound),
                    backend,
                    work,
                    build,
                    idle,
                    bytes,
                    "",
                )
                .with_context(|| format!("{inbound}→{outbound} with {}", build.name))?;
                if i == 0 {
                    row.idle_kib.0 = Some(figures.idle_kib);
                    row.cpu_per_gb.0 = Some(figures.cpu_per_gb);
                    row.copies_per_byte = figures.copies_per_byte;
                    row.plain_paths = figures.plain_paths.clone();
                } else {
                    row.idle_kib.1 = Some(figures.idle_kib);
                    row.cpu_per_gb.1 = Some(figures.cpu_per_gb);
                }
                eprintln!(
                    "    {inbound:>5} → {outbound:<5} {:18} {:>6.1} KiB/idle conn  {:>5.2} CPU-s/GB  \
                     copies/byte {}  plain↔plain path {}",
                    build.name,
                    figures.idle_kib,
                    figures.cpu_per_gb,
                    figures
                        .copies_per_byte
                        .map_or("n/a".into(), |c| format!("{c:.3}")),
                    plain_paths_cell(&figures.plain_paths),
                );
            }
            results.pairs.push(row);
        }
    }
    // plain → plain once more with the kernel copy, which is opt-in: the current build only
    // (a baseline may not know the key).
    let figures = one(
        pki,
        ("plain", "plain"),
        nginx,
        work,
        &builds[0],
        idle,
        bytes,
        "kernel_copy = true\n",
    )
    .context("plain→plain with kernel_copy = true")?;
    eprintln!(
        "    plain → plain, kernel_copy = true {:>6.1} KiB/idle conn  {:>5.2} CPU-s/GB  path {}",
        figures.idle_kib,
        figures.cpu_per_gb,
        plain_paths_cell(&figures.plain_paths),
    );
    results.pairs.push(PairRow {
        inbound: "plain",
        outbound: "plain (`kernel_copy = true`)",
        idle_kib: (Some(figures.idle_kib), None),
        copies_per_byte: figures.copies_per_byte,
        plain_paths: figures.plain_paths,
        cpu_per_gb: (Some(figures.cpu_per_gb), None),
    });
    Ok(())
}

struct Figures {
    idle_kib: f64,
    cpu_per_gb: f64,
    copies_per_byte: Option<f64>,
    plain_paths: Vec<String>,
}

/// How the report and the progress lines show [`PairRow::plain_paths`]: "kernel", "splice",
/// both (most used first), or "-" when relay counted no plaintext↔plaintext connection.
pub fn plain_paths_cell(paths: &[String]) -> String {
    if paths.is_empty() {
        "-".into()
    } else {
        paths.join(" + ")
    }
}

#[allow(clippy::too_many_arguments)]
fn one(
    pki: &Pki,
    (inbound, outbound): (&str, &str),
    backend: u16,
    work: &Path,
    build: &Build,
    idle: u32,
    bytes: u64,
    relay_extra: &str,
) -> anyhow::Result<Figures> {
    let port = relay_tests::free_port();
    let metrics = format!("127.0.0.1:{}", relay_tests::free_port());
    let conf = work.join(format!("pair-{inbound}-{outbound}.toml"));
    let text = config(pki, inbound, outbound, port, backend, Some(&metrics), work);
    // Keys of the [relay] table go right after its header.
    let text = text.replacen("[relay]\n", &format!("[relay]\n{relay_extra}"), 1);
    fs::write(&conf, text)?;
    let relay = Relay::start_with(
        Command::new("taskset")
            .args(["-c", SERVER_CPU])
            .arg(&build.bin)
            .args(["run", "--config"])
            .arg(&conf)
            .env("TOKIO_WORKER_THREADS", "1"),
    )?;
    let client = client_args(pki, inbound);
    let url = format!(
        "{}://127.0.0.1:{port}/big",
        if inbound == "plain" { "http" } else { "https" }
    );
    // Copies and CPU: one download, the relay's counters and CPU time before and after.
    let pid = relay.pid();
    let before = counters(&metrics);
    let cpu = procfs::cpu_seconds(pid);
    load::bulk_with(Mode::Pinned, &url, bytes, &client)?;
    let cpu_per_gb = (procfs::cpu_seconds(pid) - cpu) / (bytes as f64 / 1e9);
    let after = counters(&metrics);
    let copies_per_byte = match (&before.copies, &after.copies) {
        (Some((c0, b0)), Some((c1, b1))) if b1 > b0 => Some((c1 - c0) / (b1 - b0)),
        _ => None,
    };
    // Memory: the process tree's growth with `idle` connections held open.
    let rss_before = procfs::rss_kib(pid);
    let mut held = load::Idle::open_with(Mode::Pinned, port, idle, inbound != "plain", &client)?;
    let rss_after = procfs::rss_kib(pid);
    held.close();
    // The path of the download's connection; if relay counts a connection only when it ends
    // and had not yet when the download returned, the paths of the whole run instead (the
    // idle connections of the same pair, which go the same way).
    let mut plain_paths = after.paths_since(&before);
    if plain_paths.is_empty() {
        plain_paths = counters(&metrics).paths_since(&before);
    }
    Ok(Figures {
        idle_kib: rss_after.saturating_sub(rss_before) as f64 / f64::from(idle),
        cpu_per_gb,
        copies_per_byte,
        plain_paths,
    })
}

/// What the pair scenario reads from one scrape of relay's metrics.
#[derive(Default)]
struct Counters {
    /// (copied bytes, relayed bytes); `None` for a build without the copy counter.
    copies: Option<(f64, f64)>,
    /// `relay_plain_copies_total` by its `path` label; empty for a build without it (or
    /// before its first plaintext↔plaintext connection).
    plain_paths: BTreeMap<String, f64>,
}

impl Counters {
    /// The paths counted since `earlier`, most used first.
    fn paths_since(&self, earlier: &Counters) -> Vec<String> {
        let mut grown: Vec<(&String, f64)> = self
            .plain_paths
            .iter()
            .map(|(path, n)| {
                (
                    path,
                    n - earlier.plain_paths.get(path).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        grown.sort_by(|a, b| b.1.total_cmp(&a.1));
        grown.into_iter().map(|(p, _)| p.clone()).collect()
    }
}

/// relay's counters from its metrics; a counter the build does not export is simply absent
/// (an unreachable endpoint reads as all absent: the figures show "n/a", the run goes on).
fn counters(metrics: &str) -> Counters {
    let Ok(text) = scrape(metrics) else {
        return Counters::default();
    };
    Counters {
        copies: text.contains("relay_copied_bytes_total").then(|| {
            (
                metric_sum(&text, "relay_copied_bytes_total", ""),
                metric_sum(&text, "relay_bytes_total", ""),
            )
        }),
        plain_paths: plain_copies(&text),
    }
}

/// `relay_plain_copies_total{service="...",path="kernel"} 3` lines summed by `path` (over
/// services: the pair relays have one).
fn plain_copies(text: &str) -> BTreeMap<String, f64> {
    let mut by_path = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("relay_plain_copies_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Some(path) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("path=\""))
            .and_then(|v| v.strip_suffix('"'))
        else {
            continue;
        };
        // The value, then an optional timestamp.
        let Some(Ok(value)) = value.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        *by_path.entry(path.to_string()).or_insert(0.0) += value;
    }
    by_path
}

/// A relay in front of nginx that accepts `level` (the measured relay's outbound side).
fn terminator(pki: &Pki, level: &str, nginx: u16, work: &Path) -> anyhow::Result<(Relay, u16)> {
    let port = relay_tests::free_port();
    let conf = work.join(format!("terminator-{level}.toml"));
    fs::write(&conf, config(pki, level, "plain", port, nginx, None, work))?;
    let relay = Relay::start_with(
        Command::new("taskset")
            .args(["-c", LOAD_CPU])
            .arg(relay_tests::relay::binary())
            .args(["run", "--config"])
            .arg(&conf),
    )?;
    Ok((relay, port))
}

fn config(
    pki: &Pki,
    inbound: &str,
    outbound: &str,
    port: u16,
    backend: u16,
    metrics: Option<&str>,
    work: &Path,
) -> String {
    let server = pki.server_of(KeyKind::EcdsaP256);
    let mut inb = format!("level = \"{inbound}\"\n");
    if inbound != "plain" {
        inb += &format!(
            "cert = \"{}\"\nkey = \"{}\"\nresumption = false\n",
            server.cert.display(),
            server.key.display()
        );
    }
    if inbound == "mtls" {
        inb += &format!("client_ca = \"{}\"\n", pki.client_ca.display());
    }
    let mut out = format!("level = \"{outbound}\"\n");
    if outbound != "plain" {
        out += &format!("ca = \"{}\"\nresumption = false\n", pki.ca.display());
    }
    if outbound == "mtls" {
        out += &format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            pki.client.cert.display(),
            pki.client.key.display()
        );
    }
    let metrics = metrics.map_or(String::new(), |m| format!("metrics = \"{m}\"\n"));
    let sock = work.join(format!("pair-{port}.sock"));
    format!(
        "[relay]\ncontrol_socket = \"{sock}\"\n{metrics}max_connections = 9000\n\n\
         [[service]]\nname = \"pair\"\nserver = \"127.0.0.1\"\nport = {port}\n\
         backend_port = {backend}\nlisten = \"127.0.0.1:{port}\"\n\
         [service.inbound]\n{inb}[service.outbound]\n{out}",
        sock = sock.display(),
    )
}

/// What a client at `inbound` level presents: a client certificate for `mtls`.
fn client_args(pki: &Pki, inbound: &str) -> Option<(PathBuf, PathBuf)> {
    (inbound == "mtls").then(|| (pki.client.cert.clone(), pki.client.key.clone()))
}

/// Builds relay as of `rev` (a git revision) in its own worktree and target directory, for
/// a before/after comparison in one run; the worktree is removed afterwards, the build kept
/// (under `target/`) for the next run.
pub fn build_baseline(rev: &str) -> anyhow::Result<Build> {
    let root = crate::workspace_root();
    let commit = capture(Command::new("git").args(["-C"]).arg(&root).args([
        "rev-parse",
        "--short",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("--baseline {rev}: not a git revision of this repository"))?;
    let commit = commit.trim().to_string();
    let tree = root.join("target/bench/baseline-src");
    let target = root.join("target/bench/baseline-target");
    if tree.exists() {
        let _ = run(Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["worktree", "remove", "--force"])
            .arg(&tree));
    }
    run(Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["worktree", "add", "--detach", "--force"])
        .arg(&tree)
        .arg(&commit))?;
    say(&format!(
        "building the baseline relay at {commit} (release)"
    ));
    let built = run(Command::new("cargo")
        .current_dir(&tree)
        .args(["build", "--release", "--package", "relay"])
        .env("CARGO_TARGET_DIR", &target));
    let removed = run(Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["worktree", "remove", "--force"])
        .arg(&tree));
    built.context("building the baseline")?;
    removed?;
    let bin = target.join("release/relay");
    if !bin.exists() {
        bail!("the baseline build left no {}", bin.display());
    }
    Ok(Build {
        name: format!("baseline {commit}"),
        bin,
    })
}
