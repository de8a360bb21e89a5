//! The bench's output: `report.md` (what was measured, on what, with which settings, and the
//! ratios relay/peer) and `ratios.svg`, a bar per peer and scenario of relay's advantage
//! (above 1: relay better, whichever direction the figure runs).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use plotters::prelude::*;

use super::{Results, Row, peers::Peer};
use crate::capture;

/// A figure with sensible precision for its magnitude.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// relay's advantage over `peer` in `row`: >1 means relay did better.
fn advantage(row: &Row, peer: Peer) -> Option<f64> {
    let (r, p) = (row.get(Peer::Relay)?, row.get(peer)?);
    if r <= 0.0 || p <= 0.0 {
        return None;
    }
    Some(if row.higher_is_better { r / p } else { p / r })
}

pub fn write(results: &Results, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut md = String::new();
    let size = &results.size;
    writeln!(md, "# relay benchmark\n")?;
    writeln!(
        md,
        "{} run: every timed load lasts {} s; bulk transfer {} MiB; {} idle connections; \
         handshakes with {} concurrent wrk connections (`Connection: close`), keep-alive \
         requests with {}.\n",
        if size.quick { "Quick" } else { "Full" },
        size.duration.as_secs(),
        size.bulk_bytes >> 20,
        size.idle,
        size.handshake_conns,
        size.keepalive_conns
    )?;
    writeln!(md, "## Results\n")?;
    writeln!(
        md,
        "Ratios are relay/peer. ↑ means higher is better, ↓ lower is better. \
         \"direct\" is the client talking plaintext straight to the backend (no relay, no TLS): \
         the ceiling, not a competitor.\n"
    )?;
    writeln!(
        md,
        "| scenario | unit | relay | haproxy | stunnel | direct | relay/haproxy | relay/stunnel |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for row in &results.rows {
        let cell = |p: Peer| row.get(p).map_or("—".to_string(), fmt);
        let ratio = |p: Peer| match (row.get(Peer::Relay), row.get(p)) {
            (Some(r), Some(v)) if v > 0.0 => format!("{:.2}", r / v),
            _ => "—".into(),
        };
        writeln!(
            md,
            "| {} | {} {} | {} | {} | {} | {} | {} | {} |",
            row.title,
            row.unit,
            if row.higher_is_better { "↑" } else { "↓" },
            cell(Peer::Relay),
            cell(Peer::Haproxy),
            cell(Peer::Stunnel),
            cell(Peer::Direct),
            ratio(Peer::Haproxy),
            ratio(Peer::Stunnel),
        )?;
    }
    if !results.pairs.is_empty() {
        level_pairs(&mut md, results)?;
    }
    if let Some(x) = &results.xdp {
        writeln!(md, "\n## XDP data path\n")?;
        md.push_str(&x.markdown());
    }
    writeln!(md, "\n![relay's advantage per scenario](ratios.svg)\n")?;
    writeln!(md, "## Settings\n")?;
    for line in SETTINGS {
        writeln!(md, "- {line}")?;
    }
    writeln!(md, "\n## Observations\n")?;
    for n in &results.notes {
        writeln!(md, "- {n}")?;
    }
    writeln!(md, "\n## Machine and versions\n")?;
    for (what, value) in environment() {
        writeln!(md, "- {what}: {value}")?;
    }
    let path = out_dir.join("report.md");
    fs::write(&path, md)?;
    plot(results, &out_dir.join("ratios.svg"))?;
    Ok(path)
}

/// The level-pair table: relay (and the baseline build, if any) per inbound → outbound pair.
fn level_pairs(md: &mut String, results: &Results) -> anyhow::Result<()> {
    let baseline = results.builds.get(1);
    writeln!(md, "\n## Level pairs\n")?;
    writeln!(
        md,
        "Each of the nine inbound → outbound pairs, {} idle connections held and one download \
         through it. CPU-s per GB: the measured relay's CPU time over the download. Copies \
         per byte: payload bytes relay copied in user space \
         (`relay_copied_bytes_total`) over the bytes it relayed (`relay_bytes_total`); \
         kernel socket copies not counted. Where the outbound level is TLS, a second relay \
         (not measured) terminates it.{}\n",
        results.size.idle.min(2000),
        baseline.map_or(String::new(), |b| format!(
            " The {b} column is the same scenario run with relay built at that commit, in \
             this run (it counts no copies)."
        ))
    )?;
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |(a, b): (Option<f64>, Option<f64>)| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    match baseline {
        Some(b) => {
            writeln!(
                md,
                "| pair | KiB per idle conn ↓ | {b} | ratio | copies per byte ↓ | CPU-s per GB ↓ | {b} | ratio |"
            )?;
            writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        }
        None => {
            writeln!(
                md,
                "| pair | KiB per idle conn ↓ | copies per byte ↓ | CPU-s per GB ↓ |"
            )?;
            writeln!(md, "|---|---:|---:|---:|")?;
        }
    }
    for r in &results.pairs {
        let pair = format!("{} → {}", r.inbound, r.outbound);
        if baseline.is_some() {
            writeln!(
                md,
                "| {pair} | {} | {} | {} | {} | {} | {} | {} |",
                cell(r.idle_kib.0, 1),
                cell(r.idle_kib.1, 1),
                ratio(r.idle_kib),
                cell(r.copies_per_byte, 3),
                cell(r.cpu_per_gb.0, 2),
                cell(r.cpu_per_gb.1, 2),
                ratio(r.cpu_per_gb),
            )?;
        } else {
            writeln!(
                md,
                "| {pair} | {} | {} | {} |",
                cell(r.idle_kib.0, 1),
                cell(r.copies_per_byte, 3),
                cell(r.cpu_per_gb.0, 2),
            )?;
        }
    }
    Ok(())
}

const SETTINGS: &[&str] = &[
    "Servers under test pinned to CPU 1 (`taskset`) with one thread each: relay \
     `TOKIO_WORKER_THREADS=1` (supervisor and worker counted together), HAProxy `nbthread 1` \
     `mode tcp`, stunnel (its threads, all on CPU 1). wrk, curl, the idle client and the nginx \
     backend (one process, sendfile) on CPU 0.",
    "TLS 1.3 only, `TLS_AES_256_GCM_SHA384`, X25519; the same certificate and key for every \
     peer (ECDSA P-256 unless the scenario says RSA-2048), generated by rcgen. The negotiated \
     parameters are checked with `openssl s_client` per peer (see Observations).",
    "New handshakes: resumption disabled on the server (relay `resumption = false`; HAProxy \
     `no-tls-tickets` + `tune.ssl.cachesize 0`; stunnel `NO_TICKET` + a one-entry, one-second \
     session cache). Resumed handshakes: resumption on (tickets) and wrk resumes its sessions.",
    "Logging: relay at `warn` (no per-connection line), HAProxy without a log target, stunnel \
     `debug = err`.",
    "CPU figures are user + system seconds of the server's process tree from \
     `/proc/PID/stat` over the timed load only; memory is `VmRSS`/`VmHWM` summed over the tree. \
     Backend connections are part of every peer's cost alike.",
    "stunnel cannot relay plaintext to plaintext, so it has no plain→plain figure.",
];

fn environment() -> Vec<(&'static str, String)> {
    let first_line = |cmd: &mut Command| {
        cmd.output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.lines()
                    .find(|l| !l.trim().is_empty() && !l.contains("inetd mode"))
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or("?".into(), |k| format!("{:.1} GiB", k as f64 / 1048576.0));
    vec![
        (
            "CPU",
            format!(
                "{cpu}, {} cores",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
        ),
        ("memory", mem),
        ("kernel", first_line(Command::new("uname").arg("-sr"))),
        (
            "relay",
            first_line(Command::new(relay_tests::relay::binary()).arg("--version")),
        ),
        ("HAProxy", first_line(Command::new("haproxy").arg("-v"))),
        (
            "stunnel",
            first_line(Command::new("stunnel").arg("-version")),
        ),
        (
            "nginx (backend)",
            first_line(Command::new("nginx").arg("-v")),
        ),
        ("wrk", first_line(Command::new("wrk").arg("-v"))),
        ("curl", first_line(Command::new("curl").arg("--version"))),
        (
            "OpenSSL",
            first_line(Command::new("openssl").arg("version")),
        ),
        (
            "rustc",
            capture(Command::new("rustc").arg("-V")).map_or("?".into(), |s| s.trim().to_string()),
        ),
    ]
}

/// Horizontal bars, two per scenario (vs HAProxy, vs stunnel), laid out in pixels: a bar of
/// length 1.0 is parity, marked by a vertical line.
fn plot(results: &Results, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<&Row> = results.rows.iter().filter(|r| r.plotted).collect();
    let (label_w, bar_w, row_h, top) = (420i32, 520i32, 44i32, 70i32);
    let height = top + row_h * rows.len() as i32 + 40;
    let width = label_w + bar_w + 80;
    let root = SVGBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .flat_map(|r| [advantage(r, Peer::Haproxy), advantage(r, Peer::Stunnel)])
        .flatten()
        .fold(1.5f64, f64::max)
        * 1.1;
    let x = |v: f64| label_w + (v / max * bar_w as f64) as i32;
    let title = ("sans-serif", 18).into_font();
    let text = ("sans-serif", 13).into_font();
    root.draw(&Text::new(
        "relay's advantage per scenario (×; right of the line: relay better)",
        (10, 10),
        title,
    ))?;
    let peers = [
        (Peer::Haproxy, RGBColor(70, 110, 200)),
        (Peer::Stunnel, RGBColor(230, 140, 40)),
    ];
    for (i, (p, color)) in peers.iter().enumerate() {
        let lx = label_w + i as i32 * 160;
        root.draw(&Rectangle::new([(lx, 40), (lx + 14, 54)], color.filled()))?;
        root.draw(&Text::new(
            format!("vs {}", p.name()),
            (lx + 20, 40),
            text.clone(),
        ))?;
    }
    for (i, row) in rows.iter().enumerate() {
        let y = top + i as i32 * row_h;
        let mut label = row.title.clone();
        if label.len() > 60 {
            label.truncate(57);
            label.push('…');
        }
        root.draw(&Text::new(label, (10, y + 14), text.clone()))?;
        for (j, (p, color)) in peers.iter().enumerate() {
            let y0 = y + 4 + j as i32 * 18;
            match advantage(row, *p) {
                Some(a) => {
                    root.draw(&Rectangle::new(
                        [(label_w, y0), (x(a), y0 + 15)],
                        color.filled(),
                    ))?;
                    root.draw(&Text::new(
                        format!("{a:.2}"),
                        (x(a) + 4, y0 + 1),
                        text.clone(),
                    ))?;
                }
                None => {
                    root.draw(&Text::new("n/a", (label_w + 4, y0 + 1), text.clone()))?;
                }
            }
        }
    }
    let one = x(1.0);
    root.draw(&PathElement::new(
        vec![(one, top - 6), (one, top + row_h * rows.len() as i32)],
        BLACK.stroke_width(2),
    ))?;
    root.draw(&Text::new(
        "1.0",
        (one - 8, top + row_h * rows.len() as i32 + 6),
        text,
    ))?;
    root.present()?;
    Ok(())
}
