//! `cargo xtask demo --cluster`: two gateways sharing their services and session ticket keys
//! through etcd, behind one ECMP route.
//!
//! One LAN (`relay_tests::cluster::Lan`): etcd with TLS and client certificates, gateways A and
//! B, the backend server, the client. The service address 192.0.2.80 is on both gateways'
//! loopback; the client reaches it through a route with one nexthop per gateway, hashed on
//! ports, so its connections spread over both. The service is added once, with `relay service
//! add --cluster` on A, and serves on both. Then the gateway that issued the client's TLS
//! session stops, its nexthop is withdrawn (what a health check or BGP would do), and the
//! client goes on through the other gateway, resuming the same session there.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use relay_tests::{
    cluster::{CLIENT, Etcd, GW_A, GW_B, Lan, SERVER, accepted},
    http::HttpServer,
    pki::Pki,
    relay::Relay,
};

use crate::demo::{say, show};

const VIP: &str = "192.0.2.80";
const NAME: &str = "shop.example";
const PAGE: &str = "<h1>shop</h1><p>one service, two gateways, shared through etcd</p>\n";
const REQUESTS: usize = 12;

pub fn demo(relay_bin: &Path) -> anyhow::Result<()> {
    ensure!(
        crate::setup::is_root(),
        "the demo creates network namespaces: run it as root"
    );
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("RELAY_BIN", relay_bin);
        std::env::set_var("RELAY_ECHO_LOGS", "0");
    }
    let work = tempfile::Builder::new()
        .prefix("relay-demo-cluster-")
        .tempdir()?;
    let dir = work.path();

    say("Building the network: etcd, gateways A and B, a server and a client on one LAN");
    let lan = Lan::create("demo")?;
    for (who, addr) in [
        ("etcd", "203.0.113.10"),
        ("gateway A", GW_A),
        ("gateway B", GW_B),
        ("server", SERVER),
        ("client", CLIENT),
    ] {
        show(&format!("{who:<10} {addr}"));
    }
    for gw in ["gwa", "gwb"] {
        run(lan
            .exec(gw, "ip")
            .args(["addr", "add", &format!("{VIP}/32"), "dev", "lo"]))?;
    }
    run(lan.exec("cli", "ip").args([
        "route",
        "add",
        &format!("{VIP}/32"),
        "nexthop",
        "via",
        GW_A,
        "nexthop",
        "via",
        GW_B,
    ]))?;
    // Hash on ports too: one client's connections spread over both gateways.
    run(lan
        .exec("cli", "sysctl")
        .args(["-qw", "net.ipv4.fib_multipath_hash_policy=1"]))?;
    show(&format!(
        "service address {VIP} on both gateways; the client's route: nexthop via {GW_A} nexthop via {GW_B}"
    ));

    say("Starting etcd (TLS, client certificates) and the plaintext backend on :8080");
    let pki = Pki::generate(&dir.join("pki"))?;
    let _etcd = Etcd::start(&lan, &pki, dir)?;
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), PAGE)?;
    let wrap = ["ip", "netns", "exec", &lan.ns("srv")];
    let _http = HttpServer::start(&dir.join("www"), SERVER.parse()?, 8080, &wrap)?;
    let kek = dir.join("cluster.kek");
    std::fs::write(&kek, format!("{}\n", "3c".repeat(32)))?;
    show("every gateway has the same key-encryption key file: ticket keys are sealed in etcd");

    say("Starting relay on both gateways with [cluster] and no service of their own");
    let mut gateways = Vec::new();
    for gw in ["gwa", "gwb"] {
        let gdir = dir.join(gw);
        std::fs::create_dir_all(&gdir)?;
        let socket = gdir.join("control.sock");
        let config = gdir.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\ncontrol_socket = \"{}\"\n{}",
                socket.display(),
                _etcd.cluster_section(gw, dir, &kek, "lease_ttl = \"3s\"")
            ),
        )?;
        let mut cmd = lan.exec(gw, relay_bin);
        cmd.args(["run", "--config"]).arg(&config);
        let relay = Relay::start_with(&mut cmd)?;
        ensure!(
            relay.wait_logs(&["cluster: connected to etcd"], 1, Duration::from_secs(20)),
            "{gw} did not connect to etcd"
        );
        if gw == "gwa" {
            ensure!(
                relay.wait_logs(&["this gateway leads"], 1, Duration::from_secs(10)),
                "no leader"
            );
            show("gwa: connected; it leads, so it draws the session ticket keys");
        } else {
            show("gwb: connected; it takes the sealed ticket keys from etcd");
        }
        gateways.push((gw, relay, socket));
    }

    say("Adding the service once, on gateway A: relay service add --cluster");
    let cert = pki.server_for("shop", &[NAME])?;
    let socket_a = &gateways[0].2;
    let out = Command::new(relay_bin)
        .args([
            "service",
            "add",
            "--cluster",
            "--name",
            "shop",
            "--server",
            VIP,
        ])
        .args(["--port", "443", "--backend-port", "8080"])
        .args(["--backend", &format!("{SERVER}:8080")])
        .args(["--listen", &format!("{VIP}:443"), "--inbound-level", "tls"])
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .arg("--socket")
        .arg(socket_a)
        .output()?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    show(&format!(
        "$ relay service add --cluster --name shop ... → {}",
        text(&out.stdout)
    ));
    for (gw, relay, _) in &gateways {
        ensure!(
            relay.wait_logs(&["cluster: service applied"], 1, Duration::from_secs(10)),
            "{gw} did not apply it"
        );
        show(&format!("{gw}: service applied from the watch"));
    }

    say(&format!(
        "The client makes {REQUESTS} requests to https://{NAME}/ (ECMP)"
    ));
    let before: Vec<u64> = gateways.iter().map(|(_, _, s)| accepted(s)).collect();
    let mut ok = 0;
    for _ in 0..REQUESTS {
        if curl(&lan, &pki.ca)?.contains("<h1>shop</h1>") {
            ok += 1;
        }
    }
    let spread: Vec<u64> = gateways
        .iter()
        .zip(&before)
        .map(|((_, _, s), b)| accepted(s) - b)
        .collect();
    show(&format!(
        "{ok}/{REQUESTS} served: gwa took {}, gwb took {}",
        spread[0], spread[1]
    ));
    ensure!(ok == REQUESTS, "not every request was served");

    say("relay status --cluster (on gateway B)");
    let out = Command::new(relay_bin)
        .args(["status", "--cluster", "--socket"])
        .arg(&gateways[1].2)
        .output()?;
    for line in text(&out.stdout).lines() {
        show(line);
    }

    say("The client opens a TLS 1.3 session and keeps it (openssl s_client -sess_out)");
    let session = dir.join("session.pem");
    let before: Vec<u64> = gateways.iter().map(|(_, _, s)| accepted(s)).collect();
    let first = openssl(&lan, &pki.ca, "-sess_out", &session)?;
    ensure!(first.contains("New, TLSv1.3"), "no new session: {first}");
    let issuer = gateways
        .iter()
        .zip(&before)
        .position(|((_, _, s), b)| accepted(s) > *b)
        .context("neither gateway counted the connection")?;
    let (gone, _, _) = gateways[issuer];
    let (other, _, _) = gateways[1 - issuer];
    show(&format!("{gone} issued the session"));

    say(&format!(
        "{gone} stops; its nexthop is withdrawn (as a health check or BGP would do)"
    ));
    let (_, mut relay, _) = gateways.remove(issuer);
    relay
        .terminate(Duration::from_secs(10))
        .context("the gateway did not stop")?;
    let via = if other == "gwa" { GW_A } else { GW_B };
    run(lan
        .exec("cli", "ip")
        .args(["route", "replace", &format!("{VIP}/32"), "via", via]))?;
    show(&format!(
        "{gone}: stopped (its lease revoked: {other} leads now if it did not)"
    ));

    say(&format!(
        "The client resumes its session: now through {other}"
    ));
    let resumed = openssl(&lan, &pki.ca, "-sess_in", &session)?;
    let line = resumed
        .lines()
        .find(|l| l.contains("TLSv1.3") && (l.contains("Reused") || l.contains("New")))
        .unwrap_or("?");
    show(&format!("openssl s_client -sess_in: {line}"));
    ensure!(
        resumed.contains("Reused, TLSv1.3") && resumed.contains("<h1>shop</h1>"),
        "the session did not resume on {other}: {resumed}"
    );
    show(&format!(
        "resumed on {other} with the key {gone} sealed it with: no full handshake"
    ));
    ensure!(curl(&lan, &pki.ca)?.contains("<h1>shop</h1>"), "not served");
    show(&format!("and new connections are served by {other}"));

    say("Stopping everything, removing the namespaces");
    drop(gateways);
    drop(lan);
    show("done: nothing left behind");
    Ok(())
}

fn curl(lan: &Lan, ca: &Path) -> anyhow::Result<String> {
    let out = lan
        .exec("cli", "curl")
        .args(["--silent", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{NAME}:443:{VIP}")])
        .arg(format!("https://{NAME}/"))
        .output()?;
    Ok(text(&out.stdout))
}

fn openssl(lan: &Lan, ca: &Path, flag: &str, session: &Path) -> anyhow::Result<String> {
    use std::{io::Write as _, process::Stdio};
    let mut child = lan
        .exec("cli", "openssl")
        .args(["s_client", "-connect", &format!("{VIP}:443")])
        .args(["-servername", NAME, "-ign_eof", "-CAfile"])
        .arg(ca)
        .arg(flag)
        .arg(session)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("GET / HTTP/1.0\r\nHost: {NAME}\r\n\r\n").as_bytes())?;
    Ok(text(&child.wait_with_output()?.stdout))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    crate::run(cmd)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}
