//! `cargo xtask demo`: relay doing its main job, narrated step by step.
//!
//! Three network namespaces — client, gateway, server — joined by veths with documentation
//! addresses. The server runs a real HTTP server (Python's http.server) that speaks only
//! plaintext on port 8080. The relay on the gateway attaches its XDP and TC programs to the
//! client-facing veth: real curl from the client reaches https://server:443 (steered to the
//! relay, TLS terminated there, plaintext to 8080 behind it), while a direct hit on
//! server:8080 from the client side is dropped at the NIC. Everything is removed at the end,
//! also on failure or Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, ensure};
use relay_tests::{
    http::HttpServer,
    netns::{CLIENT4, CLIENT6, GW_CLIENT_IF, SERVER4, SERVER6, Topology},
    pki::Pki,
    relay::Relay,
};

const PAGE: &str =
    "<h1>shop</h1><p>served in plaintext on :8080, delivered over TLS by relay</p>\n";

pub fn say(step: &str) {
    eprintln!("\n\x1b[1;36m==>\x1b[0m \x1b[1m{step}\x1b[0m");
}

pub fn show(line: &str) {
    eprintln!("    {line}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

/// Removes a namespaced relay's pins, rules and routes when dropped (after the relay stopped),
/// showing what `relay detach` reports. The demo and the bench's XDP scenario use it.
pub struct Detach<'a> {
    pub relay_bin: &'a Path,
    pub topo: &'a Topology,
    pub config: PathBuf,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let out = self
            .topo
            .enter(&self.topo.gw, self.relay_bin)
            .args(["detach", "--config"])
            .arg(&self.config)
            .output();
        if let Ok(out) = out {
            for line in text(&out.stdout).lines() {
                show(line);
            }
        }
    }
}

pub fn demo(relay_bin: &Path) -> anyhow::Result<()> {
    ensure!(
        crate::setup::is_root(),
        "the demo creates network namespaces and attaches XDP: run it as root"
    );
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("RELAY_BIN", relay_bin);
        // The demo shows chosen log lines itself rather than all of them.
        std::env::set_var("RELAY_ECHO_LOGS", "0");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("Ctrl-C handler")?;
    let check = || -> anyhow::Result<()> {
        ensure!(
            !interrupted.load(Ordering::SeqCst),
            "interrupted: cleaning up"
        );
        Ok(())
    };
    let work = tempfile::Builder::new().prefix("relay-demo-").tempdir()?;
    let dir = work.path();

    say("Building the network: client — gateway — server (three namespaces, veth pairs)");
    let topo = Topology::create("demo")?;
    show(&format!(
        "client   {CLIENT4}  {CLIENT6}            (namespace {})",
        topo.cli
    ));
    show(&format!(
        "gateway  192.0.2.1  2001:db8:a::1 | 198.51.100.1  2001:db8:b::1 (namespace {})",
        topo.gw
    ));
    show(&format!(
        "server   {SERVER4}  {SERVER6}      (namespace {})",
        topo.srv
    ));
    check()?;

    say("Starting the server application: plaintext HTTP on port 8080 (python3 -m http.server)");
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), PAGE)?;
    let srv_ns = topo.srv.clone();
    let _http = HttpServer::start(
        &dir.join("www"),
        "::".parse()?,
        8080,
        &["ip", "netns", "exec", &srv_ns],
    )?;
    let pki = Pki::generate(&dir.join("pki"))?;
    show(&format!(
        "a throwaway CA signed the service certificate for {SERVER4} and {SERVER6}"
    ));
    check()?;

    say("Starting relay on the gateway: TLS on :443 for clients, plaintext :8080 behind it");
    let pin_path = format!("/sys/fs/bpf/relay-demo-{}", std::process::id());
    let config = dir.join("relay.toml");
    let cert = pki.server();
    let mut text_config = format!(
        "[relay]\ncontrol_socket = \"{}/control.sock\"\n\n[datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"auto\"\npin_path = \"{pin_path}\"\n\n",
        dir.display()
    );
    for (name, server) in [("shop", SERVER4), ("shop-v6", SERVER6)] {
        text_config += &format!(
            "[[service]]\nname = \"{name}\"\nserver = \"{server}\"\nport = 443\nbackend_port = 8080\n\n\
             [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\n[service.outbound]\nlevel = \"plain\"\n\n",
            cert.cert.display(),
            cert.key.display()
        );
    }
    std::fs::write(&config, &text_config)?;
    let _detach = Detach {
        relay_bin,
        topo: &topo,
        config: config.clone(),
    };
    let mut relay = Relay::start_with(
        topo.enter(&topo.gw, relay_bin)
            .args(["run", "--config"])
            .arg(&config),
    )?;
    for line in relay
        .logs()
        .iter()
        .filter(|l| l.contains("data path attached") || l.contains("service steered"))
    {
        show(
            line.split_once("relay::run: ")
                .map_or(line.as_str(), |(_, rest)| rest),
        );
    }
    check()?;

    let ca = pki.ca.to_str().context("CA path")?.to_string();
    for server in [SERVER4, SERVER6] {
        let host = Topology::host(server);
        say(&format!(
            "The client fetches https://{host}/ — steered to relay, TLS terminated there"
        ));
        show(&format!("$ curl --cacert ca.pem https://{host}/"));
        let out = topo.curl(&[
            "--max-time",
            "10",
            "--cacert",
            &ca,
            "--write-out",
            "[HTTP %{response_code} over TLS, certificate verified: %{ssl_verify_result}, TCP connect %{time_connect}s]\n",
            &format!("https://{host}/"),
        ]);
        report(&out);
        ensure!(
            out.status.success() && text(&out.stdout).contains("<h1>shop</h1>"),
            "the page did not come through"
        );
        check()?;
    }

    say(&format!(
        "The client tries the weak port directly: http://{SERVER4}:8080/ — dropped at the NIC"
    ));
    show(&format!(
        "$ curl --connect-timeout 2 http://{SERVER4}:8080/"
    ));
    let direct = topo.curl(&["--connect-timeout", "2", &format!("http://{SERVER4}:8080/")]);
    report(&direct);
    ensure!(
        direct.status.code() == Some(28),
        "the direct hit was not dropped: {direct:?}"
    );
    show("(exit code 28: the SYN vanished — no answer at all, not even a refusal)");
    let from_gw = topo
        .exec(&topo.gw, "curl")
        .args([
            "--silent",
            "--max-time",
            "5",
            "--output",
            "/dev/null",
            "--write-out",
            "%{response_code}",
        ])
        .arg(format!("http://{SERVER4}:8080/"))
        .output()?;
    show(&format!(
        "the gateway itself still reaches it: HTTP {} (only client-facing traffic is dropped)",
        text(&from_gw.stdout)
    ));
    check()?;

    say("relay status: services, connections, worker, data path counters");
    let status = topo
        .enter(&topo.gw, relay_bin)
        .args(["status", "--config"])
        .arg(&config)
        .output()?;
    for line in text(&status.stdout).lines() {
        show(line);
    }

    say("Stopping relay, detaching the data path, removing the namespaces");
    relay
        .terminate(Duration::from_secs(10))
        .context("relay did not stop")?;
    drop(_detach);
    drop(topo);
    show("done: nothing left behind");
    Ok(())
}

fn report(out: &Output) {
    for line in text(&out.stdout).lines().chain(text(&out.stderr).lines()) {
        show(line);
    }
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
