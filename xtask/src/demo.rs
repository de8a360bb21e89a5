//! `cargo xtask demo`: relay doing its main job in front of real peers, narrated step by step.
//!
//! A throwaway PKI (rcgen), a real HTTP backend (Python's http.server) that speaks only
//! plaintext, the relay terminating TLS in front of it, and real `curl` as the client. Everything
//! is removed at the end, also on failure or Ctrl-C.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use relay_tests::{free_port, http::HttpServer, pki::Pki, relay::Relay};

const PAGE: &str = "<h1>shop</h1><p>served in plaintext, delivered over TLS by relay</p>\n";

fn say(step: &str) {
    eprintln!("\n\x1b[1;36m==>\x1b[0m \x1b[1m{step}\x1b[0m");
}

fn show(line: &str) {
    eprintln!("    {line}");
}

pub fn demo(relay_bin: &Path) -> anyhow::Result<()> {
    // SAFETY: setting an environment variable before any thread of ours reads it.
    unsafe { std::env::set_var("RELAY_BIN", relay_bin) };
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("Ctrl-C handler")?;
    let check = || -> anyhow::Result<()> {
        ensure!(
            !interrupted.load(Ordering::SeqCst),
            "interrupted, cleaning up"
        );
        Ok(())
    };

    // Everything lives in one temporary directory that is removed when `work` drops.
    let work = tempdir()?;
    let dir = work.path();

    say("Generating a throwaway CA and a certificate for localhost (rcgen)");
    let pki = Pki::generate(&dir.join("pki"))?;
    show(&format!("CA: {}", pki.ca.display()));
    check()?;

    say("Starting a real HTTP backend that speaks only plaintext (python3 -m http.server)");
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), PAGE)?;
    let localhost: IpAddr = "127.0.0.1".parse()?;
    let http = HttpServer::start(&dir.join("www"), localhost, free_port(), &[])?;
    show(&format!("backend: http://{}/", http.addr));
    check()?;

    say("Starting relay: TLS from clients, plaintext toward the backend");
    let front = SocketAddr::new(localhost, free_port());
    let config = dir.join("relay.toml");
    let server = pki.server();
    std::fs::write(
        &config,
        format!(
            r#"[relay]
control_socket = "{dir}/control.sock"

[[service]]
name = "shop"
server = "127.0.0.1"
port = {front_port}
backend_port = {backend_port}
listen = "{front}"

[service.inbound]
level = "tls"
cert = "{cert}"
key = "{key}"

[service.outbound]
level = "plain"
"#,
            dir = dir.display(),
            front_port = front.port(),
            backend_port = http.addr.port(),
            cert = server.cert.display(),
            key = server.key.display(),
        ),
    )?;
    let mut relay = Relay::start(&config)?;
    show(&format!(
        "relay listens on {front} (TLS) and relays to {} (plain)",
        http.addr
    ));
    check()?;

    say("A client fetches the page over TLS through the relay (curl)");
    let url = format!("https://localhost:{}/", front.port());
    let resolve = format!("localhost:{}:127.0.0.1", front.port());
    show(&format!("$ curl --cacert ca.pem {url}"));
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "5",
            "--resolve",
            &resolve,
        ])
        .args([
            "--write-out",
            "\n[%{http_version} %{response_code}, TLS certificate verified: %{ssl_verify_result}]",
        ])
        .arg("--cacert")
        .arg(&pki.ca)
        .arg(&url)
        .output()
        .context("run curl")?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout);
    for line in body.lines() {
        show(line);
    }
    ensure!(body.contains(PAGE.trim()), "the page did not come through");
    check()?;

    say("A client that speaks plaintext to the TLS port is turned away");
    let plain_url = format!("http://localhost:{}/", front.port());
    show(&format!("$ curl {plain_url}"));
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "5",
            "--resolve",
            &resolve,
            &plain_url,
        ])
        .output()?;
    ensure!(!out.status.success(), "plaintext must not get through");
    show(String::from_utf8_lossy(&out.stderr).trim());
    show("(relay answered the non-TLS bytes with a TLS alert and closed; the log counts it)");

    say("Stopping relay (SIGTERM): it stops accepting, lets connections finish, prints counters");
    let status = relay
        .terminate(Duration::from_secs(10))
        .context("relay did not stop")?;
    if !status.success() {
        bail!("relay exited with {status}");
    }
    for line in relay
        .logs()
        .iter()
        .filter(|l| l.contains("connection closed") || l.contains("final counters"))
    {
        show(line);
    }
    drop(http);
    say("Done: backend and relay stopped, temporary files removed");
    Ok(())
}

/// Generates the development PKI used by examples/relay.toml, once.
pub fn dev_certs(dir: &Path) -> anyhow::Result<()> {
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    eprintln!("generating development certificates in {}", dir.display());
    Pki::generate(dir)?;
    Ok(())
}

fn tempdir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("relay-demo-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
