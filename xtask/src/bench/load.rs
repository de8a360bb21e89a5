//! The load generators, all real tools from Debian run on [`LOAD_CPU`]: wrk for request and
//! handshake rates, curl for one bulk transfer, openssl for what a handshake negotiated, and a
//! small Python asyncio client that opens and holds idle TLS connections.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use super::peers::LOAD_CPU;
use crate::capture;

/// One wrk run.
pub struct Rate {
    pub requests: u64,
    pub per_second: f64,
    /// Socket errors and non-2xx answers wrk reported.
    pub errors: u64,
}

/// Runs wrk against `url` for `duration` with `connections`; `close` sends `Connection:
/// close`, so every request is a new connection and (for https) a new handshake. wrk resumes
/// TLS sessions when the server allows it, so the server's setting decides full vs resumed.
pub fn wrk(url: &str, connections: u32, duration: Duration, close: bool) -> anyhow::Result<Rate> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOAD_CPU, "wrk", "-t1"])
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

/// Downloads `url` once with curl; returns MB/s (10^6 bytes) after checking the size.
pub fn bulk(url: &str, expected: u64) -> anyhow::Result<f64> {
    bulk_with(url, expected, &None)
}

/// [`bulk`], presenting a client certificate (cert, key) if given.
pub fn bulk_with(
    url: &str,
    expected: u64,
    client: &Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<f64> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOAD_CPU, "curl", "-sk", "-o", "/dev/null"])
        .args(["-w", "%{size_download} %{speed_download}"])
        .args(["--tls13-ciphers", super::peers::CIPHERSUITE]);
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
    pub fn open(port: u16, count: u32, tls: bool) -> anyhow::Result<Idle> {
        Self::open_with(port, count, tls, &None)
    }

    /// [`Idle::open`], presenting a client certificate (cert, key) if given.
    pub fn open_with(
        port: u16,
        count: u32,
        tls: bool,
        client: &Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Idle> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", LOAD_CPU, "python3", "-c", IDLE_CLIENT])
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
