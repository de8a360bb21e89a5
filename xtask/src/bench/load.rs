//! The load generators, all real tools from Debian, on [`LOAD_CPU`] in pinned mode and
//! unpinned in defaults mode: wrk for handshake rates, h2load (`--h1`) for keep-alive request
//! rates, curl for one bulk transfer, iperf3 for one TCP stream through a tunnel, openssl for
//! what a handshake negotiated, and a small Python asyncio client that opens and holds idle
//! TLS connections.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use super::peers::{CIPHERSUITE, LOAD_CPU, Mode};
use crate::capture;

/// One wrk or h2load run.
pub struct Rate {
    pub requests: u64,
    pub per_second: f64,
    /// Socket errors, failed requests and non-2xx answers the tool reported.
    pub errors: u64,
}

/// Runs wrk against `url` for `duration` with `connections`; `close` sends `Connection:
/// close`, so every request is a new connection and (for https) a new handshake. wrk resumes
/// TLS sessions when the server allows it, so the server's setting decides full vs resumed.
pub fn wrk(
    mode: Mode,
    url: &str,
    connections: u32,
    duration: Duration,
    close: bool,
) -> anyhow::Result<Rate> {
    let mut cmd = mode.command(LOAD_CPU, "wrk");
    cmd.arg(format!("-t{}", mode.client_threads().min(connections)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout=10s");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = capture(cmd.arg(url))?;
    parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))
}

fn parse_wrk(out: &str) -> Option<Rate> {
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let per_second = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let mut errors = 0;
    for l in out.lines() {
        if let Some(rest) = l.trim().strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = l.trim().strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(Rate {
        requests,
        per_second,
        errors,
    })
}

/// Runs h2load over HTTP/1.1 (`--h1`: keep-alive, one request at a time per connection, as
/// browsers and most API clients do) against `url` for `duration` with `connections`, all of
/// them opened (and their handshakes done) before the timed part starts.
pub fn h2load(mode: Mode, url: &str, connections: u32, duration: Duration) -> anyhow::Result<Rate> {
    let mut cmd = mode.command(LOAD_CPU, "h2load");
    cmd.arg("--h1")
        .arg(format!(
            "--threads={}",
            mode.client_threads().min(connections)
        ))
        .arg(format!("--clients={connections}"))
        .arg(format!("--duration={}", duration.as_secs().max(1)))
        // A connection that stalls for this long ends (and counts as failed), so a stuck
        // server cannot hold the run: wrk's `--timeout=10s`.
        .arg("--connection-inactivity-timeout=10")
        .arg(format!("--tls13-ciphers={CIPHERSUITE}"));
    let out = capture(cmd.arg(url))?;
    let rate = parse_h2load(&out).with_context(|| format!("unexpected h2load output:\n{out}"))?;
    ensure!(
        rate.requests > rate.errors,
        "h2load completed no request against {url}:\n{out}"
    );
    Ok(rate)
}

/// From h2load's summary:
/// `finished in 3.02s, 12003.67 req/s, 14.47MB/s` and
/// `requests: 36011 total, 36111 started, 36011 done, 36011 succeeded, 0 failed, 0 errored, 0 timeout`.
fn parse_h2load(out: &str) -> Option<Rate> {
    let per_second = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))?
        .split(", ")
        .find_map(|f| f.strip_suffix(" req/s"))?
        .trim()
        .parse()
        .ok()?;
    // "36011 total" -> ("total", 36011)
    let counts: Vec<(&str, u64)> = out
        .lines()
        .find_map(|l| l.strip_prefix("requests:"))?
        .split(',')
        .filter_map(|f| {
            let mut it = f.split_whitespace();
            let n = it.next()?.parse().ok()?;
            Some((it.next()?, n))
        })
        .collect();
    let count = |name: &str| counts.iter().find(|(k, _)| *k == name).map(|(_, n)| *n);
    Some(Rate {
        requests: count("total")?,
        per_second,
        // `failed` already holds the errored and timed-out requests and those answered with
        // other than 2xx/3xx (h2load's `status codes:` line): adding those would count them
        // twice.
        errors: count("failed")?,
    })
}

/// Downloads `url` once with curl; returns MB/s (10^6 bytes) after checking the size.
pub fn bulk(mode: Mode, url: &str, expected: u64) -> anyhow::Result<f64> {
    bulk_with(mode, url, expected, &None)
}

/// [`bulk`], presenting a client certificate (cert, key) if given.
pub fn bulk_with(
    mode: Mode,
    url: &str,
    expected: u64,
    client: &Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<f64> {
    let mut cmd = mode.command(LOAD_CPU, "curl");
    cmd.args(["-sk", "-o", "/dev/null"])
        .args(["-w", "%{size_download} %{speed_download}"])
        .args(["--tls13-ciphers", CIPHERSUITE]);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = capture(cmd.arg(url))?;
    let mut it = out.split_whitespace();
    let size: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let speed: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ensure!(
        size == expected,
        "bulk transfer from {url} delivered {size} of {expected} bytes"
    );
    Ok(speed / 1e6)
}

/// One iperf3 run, as the receiving side counted it.
pub struct Throughput {
    pub bits_per_second: f64,
    /// Bytes the iperf3 server received.
    pub bytes: u64,
}

/// Sends one TCP stream with iperf3 to 127.0.0.1:`port` for `duration` and returns what the
/// iperf3 server received (`end.sum_received` of `--json`): what made it through whatever
/// sits in between. Bounded: iperf3 gives up connecting after 5 s, and `timeout` ends a run
/// that hangs (a stalled tunnel) 30 s after it should have ended.
pub fn iperf3(mode: Mode, port: u16, duration: Duration) -> anyhow::Result<Throughput> {
    let secs = duration.as_secs().max(1);
    let mut cmd = mode.command(LOAD_CPU, "timeout");
    cmd.args(["--kill-after=5", &(secs + 30).to_string(), "iperf3"])
        .args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            &secs.to_string(),
            "--json",
            "--connect-timeout",
            "5000",
        ]);
    let out = cmd.output().context("running iperf3 (under `timeout`)")?;
    let json = String::from_utf8_lossy(&out.stdout);
    // With `--json` iperf3 reports its error inside the JSON, not on stderr, and (3.12, for
    // a refused connection) may still exit with 0: the `error` key decides as well.
    let error = json_string(&json, "error");
    if !out.status.success() || error.is_some() {
        let why = error.unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        let timed_out = if out.status.code() == Some(124) {
            " (timed out)"
        } else {
            ""
        };
        bail!(
            "iperf3 to 127.0.0.1:{port} failed ({}{timed_out}): {why}",
            out.status
        );
    }
    let t = parse_iperf3(&json).with_context(|| format!("unexpected iperf3 output:\n{json}"))?;
    ensure!(
        t.bytes > 0,
        "iperf3 to 127.0.0.1:{port}: the server received nothing"
    );
    Ok(t)
}

/// From iperf3's `--json`, its `end` object's totals as the receiver counted them:
/// `"sum_received": { "start": 0, "end": 2.0, "seconds": 2.0, "bytes": 2457600000,
/// "bits_per_second": 9805200634.4, "sender": true }`. A TCP test has one such object and it
/// holds no nested one, so two numbers are read out of it by hand rather than adding a JSON
/// parser to xtask's dependencies.
fn parse_iperf3(json: &str) -> Option<Throughput> {
    let sum = &json[json.find("\"sum_received\"")?..];
    let sum = &sum[..sum.find('}')?];
    Some(Throughput {
        bits_per_second: json_number(sum, "bits_per_second")?,
        bytes: json_number(sum, "bytes")? as u64,
    })
}

/// The number after `"key":` in `json` (iperf3 writes `"key":\tvalue`).
fn json_number(json: &str, key: &str) -> Option<f64> {
    let quoted = format!("\"{key}\"");
    let rest = json[json.find(&quoted)? + quoted.len()..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `"key":` in `json`, up to its closing quote (escapes left as they are).
fn json_string(json: &str, key: &str) -> Option<String> {
    let quoted = format!("\"{key}\"");
    let rest = json[json.find(&quoted)? + quoted.len()..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// TLS version, cipher suite and key exchange a handshake with `port` negotiates.
pub fn negotiated(port: u16) -> anyhow::Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-brief", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .context("running openssl s_client")?;
    let text = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    Ok(format!(
        "{}, {}, {}",
        field("Protocol version:"),
        field("Ciphersuite:"),
        field("Server Temp Key:")
    ))
}

/// Holds `count` idle TLS (or plain) connections open until dropped.
pub struct Idle {
    child: Child,
    stdin: Option<ChildStdin>,
}

const IDLE_CLIENT: &str = r#"
import asyncio, ssl, sys
port, count, use_tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tls"
ctx = None
if use_tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if len(sys.argv) > 5:
        ctx.load_cert_chain(sys.argv[4], sys.argv[5])
async def main():
    sem = asyncio.Semaphore(64)
    held = []
    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            held.append(w)
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"ready {len(held)} failed {len(failed)}", flush=True)
    if failed:
        print(f"first failure: {failed[0]!r}", file=sys.stderr, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"#;

impl Idle {
    /// Opens the connections (64 handshakes at a time) and returns once all are up.
    pub fn open(mode: Mode, port: u16, count: u32, tls: bool) -> anyhow::Result<Idle> {
        Self::open_with(mode, port, count, tls, &None)
    }

    /// [`Idle::open`], presenting a client certificate (cert, key) if given.
    pub fn open_with(
        mode: Mode,
        port: u16,
        count: u32,
        tls: bool,
        client: &Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Idle> {
        let mut cmd = mode.command(LOAD_CPU, "python3");
        cmd.args(["-c", IDLE_CLIENT])
            .arg(port.to_string())
            .arg(count.to_string())
            .arg(if tls { "tls" } else { "plain" });
        if let Some((cert, key)) = client {
            cmd.arg(cert).arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the idle-connection client (python3)")?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("idle client stdout")?).read_line(&mut line)?;
        let mut idle = Idle { child, stdin };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ready", n, "failed", "0"] if n.parse() == Ok(count) => {}
            _ => {
                idle.close();
                bail!("idle client could not open {count} connections: {line:?}");
            }
        }
        // Let the servers finish their side (backend connects) before anyone measures.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(idle)
    }

    pub fn close(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.close();
    }
}
