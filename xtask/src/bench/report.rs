//! The bench's output: `report.md` (what was measured, on what, with which settings, a table
//! per mode with the ratios relay/peer and relay/best peer) and `ratios.svg`, a bar per
//! competitor, scenario and mode of relay's advantage (above 1: relay better, whichever
//! direction the figure runs).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use plotters::prelude::*;

use super::{
    Results, Row,
    pairs::plain_paths_cell,
    peers::{LOAD_CPU, Mode, Peer, SERVER_CPU},
};
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
         requests with {} h2load connections (`--h1`). Modes: {}.\n",
        if size.quick { "Quick" } else { "Full" },
        size.duration.as_secs(),
        size.bulk_bytes >> 20,
        size.idle,
        size.handshake_conns,
        size.keepalive_conns,
        results
            .modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    for mode in &results.modes {
        let rows: Vec<&Row> = results.rows.iter().filter(|r| r.mode == *mode).collect();
        if !rows.is_empty() {
            results_table(&mut md, *mode, &rows)?;
        }
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
    for line in settings() {
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

/// One mode's table: a figure per peer, the ratios relay/peer and relay/best peer.
fn results_table(md: &mut String, mode: Mode, rows: &[&Row]) -> anyhow::Result<()> {
    match mode {
        Mode::Pinned => writeln!(
            md,
            "## Results, pinned: one core and one thread per server\n\n\
             Every server on CPU {SERVER_CPU} with one thread (nginx: one worker), clients and \
             the nginx backend on CPU {LOAD_CPU}: what each peer costs per core.\n"
        )?,
        Mode::Defaults => writeln!(
            md,
            "## Results, defaults: every server as it starts, unpinned\n\n\
             Nothing pinned; relay with its default threads, HAProxy without `nbthread` (a \
             thread per CPU), nginx `worker_processes auto`, stunnel as it starts; clients \
             with a thread per CPU, the backend with a worker per CPU: what users run. The \
             threads each server ran with are in the Observations.\n"
        )?,
    }
    writeln!(
        md,
        "Ratios are relay/peer; relay/best peer is relay over the best of HAProxy, stunnel and \
         nginx in that row (named). ↑ means higher is better, ↓ lower is better. \
         \"direct\" is the client talking plaintext straight to the backend (no relay, no \
         TLS): the ceiling, not a competitor.\n"
    )?;
    let names: Vec<&str> = Peer::ALL.iter().map(|p| p.name()).collect();
    let ratios: Vec<String> = Peer::COMPETITORS
        .iter()
        .map(|p| format!("relay/{}", p.name()))
        .collect();
    writeln!(
        md,
        "| scenario | unit | {} | {} | relay/best peer |",
        names.join(" | "),
        ratios.join(" | ")
    )?;
    writeln!(
        md,
        "|---|---|{}---:|",
        "---:|".repeat(Peer::ALL.len() + Peer::COMPETITORS.len())
    )?;
    for row in rows {
        let cells: Vec<String> = Peer::ALL
            .iter()
            .map(|p| row.get(*p).map_or("—".to_string(), fmt))
            .collect();
        let ratios: Vec<String> = Peer::COMPETITORS
            .iter()
            .map(|p| row.ratio(*p).map_or("—".to_string(), |v| format!("{v:.2}")))
            .collect();
        let best = row
            .ratio_to_best()
            .map_or("—".to_string(), |(v, p)| format!("{v:.2} ({})", p.name()));
        writeln!(
            md,
            "| {} | {} {} | {} | {} | {best} |",
            row.title,
            row.unit,
            if row.higher_is_better { "↑" } else { "↓" },
            cells.join(" | "),
            ratios.join(" | "),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The level-pair column naming the kernel path relay took for plain ↔ plain connections.
const PATH_HEADING: &str = "plain↔plain path";

/// The level-pair table: relay (and the baseline build, if any) per inbound → outbound pair.
fn level_pairs(md: &mut String, results: &Results) -> anyhow::Result<()> {
    let baseline = results.builds.get(1);
    writeln!(md, "\n## Level pairs\n")?;
    writeln!(
        md,
        "Each of the nine inbound → outbound pairs, {} idle connections held and one download \
         through it, relay pinned as in the pinned mode. CPU-s per GB: the measured relay's \
         CPU time over the download. Copies per byte: payload bytes relay copied in user \
         space (`relay_copied_bytes_total`) over the bytes it relayed (`relay_bytes_total`); \
         kernel socket copies not counted. Plain↔plain path: how relay moved the bytes of \
         its plaintext-to-plaintext connections (`relay_plain_copies_total` by `path`: \
         \"kernel\" a sockmap redirect, \"splice\" splice(2)); \"-\" where it counted none. \
         Where the outbound level is TLS, a second relay (not measured) terminates it.{}\n",
        results.size.idle.min(2000),
        baseline.map_or(String::new(), |b| format!(
            " The {b} columns are the same scenario run with relay built at that commit, in \
             this run (it counts no copies)."
        ))
    )?;
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |(a, b): (Option<f64>, Option<f64>)| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    // One list of (heading, cell) columns, so headings and figures cannot drift apart.
    type Column<'a> = (String, Box<dyn Fn(&super::pairs::PairRow) -> String + 'a>);
    let mut columns: Vec<Column> = vec![(
        "KiB per idle conn ↓".into(),
        Box::new(|r| cell(r.idle_kib.0, 1)),
    )];
    if let Some(b) = baseline {
        columns.push((
            format!("{b}, KiB per idle conn"),
            Box::new(|r| cell(r.idle_kib.1, 1)),
        ));
        columns.push(("ratio".into(), Box::new(|r| ratio(r.idle_kib))));
    }
    columns.push((
        "copies per byte ↓".into(),
        Box::new(|r| cell(r.copies_per_byte, 3)),
    ));
    columns.push((
        PATH_HEADING.into(),
        Box::new(|r| plain_paths_cell(&r.plain_paths)),
    ));
    columns.push((
        "CPU-s per GB ↓".into(),
        Box::new(|r| cell(r.cpu_per_gb.0, 2)),
    ));
    if let Some(b) = baseline {
        columns.push((
            format!("{b}, CPU-s per GB"),
            Box::new(|r| cell(r.cpu_per_gb.1, 2)),
        ));
        columns.push(("ratio".into(), Box::new(|r| ratio(r.cpu_per_gb))));
    }
    let headings: Vec<&str> = columns.iter().map(|(h, _)| h.as_str()).collect();
    writeln!(md, "| pair | {} |", headings.join(" | "))?;
    // Figures right-aligned, the path (a word) centred.
    let align: Vec<&str> = headings
        .iter()
        .map(|h| if *h == PATH_HEADING { ":---:" } else { "---:" })
        .collect();
    writeln!(md, "|---|{}|", align.join("|"))?;
    for r in &results.pairs {
        let cells: Vec<String> = columns.iter().map(|(_, f)| f(r)).collect();
        writeln!(
            md,
            "| {} → {} | {} |",
            r.inbound,
            r.outbound,
            cells.join(" | ")
        )?;
    }
    Ok(())
}

fn settings() -> Vec<String> {
    vec![
        format!(
            "Pinned mode: servers under test pinned to CPU {SERVER_CPU} (`taskset`) with one \
             thread each: relay `TOKIO_WORKER_THREADS=1` (supervisor and worker counted \
             together), HAProxy `nbthread 1` `mode tcp`, stunnel (its threads, all on CPU \
             {SERVER_CPU}), nginx stream `worker_processes 1` (master and worker on CPU \
             {SERVER_CPU}). wrk (`-t1`), h2load (`-t1`), curl, the idle client and the nginx \
             backend (one process, sendfile) on CPU {LOAD_CPU}."
        ),
        "Defaults mode: no `taskset` anywhere. relay as it starts (no thread setting: its \
         default), HAProxy without `nbthread` (its default, a thread per CPU), nginx stream \
         `worker_processes auto`, stunnel unchanged (a thread per connection); wrk and h2load \
         with a thread per CPU; the nginx backend with `worker_processes auto`. Connection \
         limits (relay `max_connections`, HAProxy `maxconn`, nginx `worker_connections`) are \
         raised alike in both modes so the idle scenario fits."
            .into(),
        "nginx stream: a second nginx, apart from the backend (own prefix, configuration and \
         pid file under target/bench/work/nginx-stream), loading \
         `ngx_stream_module.so` (libnginx-mod-stream): `stream { server { listen ... ssl; \
         proxy_pass backend; } }`, `ssl_protocols TLSv1.3`, the cipher suite set with \
         `ssl_conf_command Ciphersuites`, `proxy_timeout 600s`."
            .into(),
        "TLS 1.3 only, `TLS_AES_256_GCM_SHA384`, X25519; the same certificate and key for every \
         peer (ECDSA P-256 unless the scenario says RSA-2048), generated by rcgen. The negotiated \
         parameters are checked with `openssl s_client` per peer (see Observations)."
            .into(),
        "New handshakes: resumption disabled on the server (relay `resumption = false`; HAProxy \
         `no-tls-tickets` + `tune.ssl.cachesize 0`; stunnel `NO_TICKET` + a one-entry, one-second \
         session cache; nginx `ssl_session_tickets off` + `ssl_session_cache off`). Resumed \
         handshakes: resumption on (tickets; nginx also `ssl_session_cache shared`) and wrk \
         resumes its sessions."
            .into(),
        "Keep-alive requests: h2load `--h1` (HTTP/1.1, one request in flight per connection), \
         all connections opened before the timed part; CPU per 1000 requests counts the \
         server's CPU over the whole h2load run (its handshakes included) over the requests of \
         the timed part."
            .into(),
        format!(
            "plain→TLS→plain tunnel: each peer kind runs twice. End A takes plaintext and wraps \
             it in TLS 1.3 toward end B, verifying B's chain against the bench CA and its name \
             (`localhost`, also sent as SNI): relay `outbound.level = \"tls\"` with `ca` and \
             `server_name`; HAProxy `server ... ssl verify required ca-file ... verifyhost ... \
             sni ...`; stunnel `client = yes`, `verifyChain`, `checkHost`; nginx stream \
             `proxy_ssl on`, `proxy_ssl_verify on`, `proxy_ssl_trusted_certificate`, \
             `proxy_ssl_name`. End B is the TLS terminator of the other scenarios (resumption \
             on) and forwards plaintext to an iperf3 server. One iperf3 TCP stream \
             (`iperf3 -c ... -t <load duration> --json`); the throughput is what the iperf3 \
             server received (`sum_received`), CPU per GB is both ends' CPU over the run per GB \
             received. Pinned: both ends on CPU {SERVER_CPU} with one thread each (sharing that \
             core), the iperf3 client and server on CPU {LOAD_CPU}; defaults: nothing pinned. \
             \"direct\" is the iperf3 client straight to the server."
        ),
        "Logging: relay at `warn` (no per-connection line), HAProxy without a log target, stunnel \
         `debug = err`, nginx stream `error_log` at `warn` and no access log."
            .into(),
        "CPU figures are user + system seconds of the server's process tree from \
         `/proc/PID/stat` over the timed load only; memory is `VmRSS`/`VmHWM` summed over the tree. \
         Backend connections are part of every peer's cost alike."
            .into(),
        "stunnel cannot relay plaintext to plaintext, so it has no plain→plain figure.".into(),
    ]
}

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
            "nginx (backend and stream peer)",
            first_line(Command::new("nginx").arg("-v")),
        ),
        ("wrk", first_line(Command::new("wrk").arg("-v"))),
        (
            "h2load",
            first_line(Command::new("h2load").arg("--version")),
        ),
        ("curl", first_line(Command::new("curl").arg("--version"))),
        (
            "iperf3",
            first_line(Command::new("iperf3").arg("--version")),
        ),
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

/// Horizontal bars, one per competitor for each plotted row of each mode, laid out in pixels:
/// a bar of length 1.0 is parity, marked by a vertical line.
fn plot(results: &Results, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<&Row> = results
        .modes
        .iter()
        .flat_map(|m| {
            results
                .rows
                .iter()
                .filter(move |r| r.plotted && r.mode == *m)
        })
        .collect();
    let peers = [
        (Peer::Haproxy, RGBColor(70, 110, 200)),
        (Peer::Stunnel, RGBColor(230, 140, 40)),
        (Peer::Nginx, RGBColor(60, 160, 90)),
    ];
    let bar_h = 18i32;
    let (label_w, bar_w, row_h, top) = (460i32, 520i32, 8 + bar_h * peers.len() as i32, 70i32);
    let height = top + row_h * rows.len() as i32 + 40;
    let width = label_w + bar_w + 80;
    let root = SVGBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .flat_map(|r| peers.iter().map(|(p, _)| advantage(r, *p)))
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
        let mut label = format!("[{}] {}", row.mode.name(), row.title);
        if label.chars().count() > 64 {
            label = label.chars().take(61).collect();
            label.push('…');
        }
        root.draw(&Text::new(label, (10, y + row_h / 2 - 8), text.clone()))?;
        for (j, (p, color)) in peers.iter().enumerate() {
            let y0 = y + 4 + j as i32 * bar_h;
            match advantage(row, *p) {
                Some(a) => {
                    root.draw(&Rectangle::new(
                        [(label_w, y0), (x(a), y0 + bar_h - 3)],
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
