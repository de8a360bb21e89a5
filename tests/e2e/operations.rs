//! Operating the relay: the Prometheus endpoint scraped by a real HTTP client and parsed,
//! `relay status` for humans, JSON logs.

use std::{collections::HashMap, net::SocketAddr, process::Command, time::Duration};

use relay_tests::{
    backend::Backend,
    client::{self, ClientLevel},
    env::TestDir,
    free_port,
    relay::{Relay, binary},
};
use tokio::io::AsyncWriteExt as _;

/// Parses the exposition text: `name{labels} value` per sample, `# TYPE`/`# HELP` lines
/// checked for shape. Returns samples keyed by the line's name and labels as written.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut words = meta.split_whitespace();
            let kind = words.next().unwrap();
            assert!(
                ["TYPE", "HELP", "UNIT", "EOF"].contains(&kind),
                "comment line {line:?}"
            );
            if kind == "TYPE" {
                let t = words.nth(1).unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&t), "{line}");
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        assert!(series.starts_with("relay_"), "prefix: {line}");
        if let Some((name, labels)) = series.split_once('{') {
            assert!(labels.ends_with('}'), "{line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

fn scrape(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "10",
            "--write-out",
            "\n%{http_code}",
        ])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_scraped_and_parsed_and_status_for_humans() {
    let env = TestDir::new();
    let backend = Backend::plain().await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = env.write_config(
        &format!("metrics = \"{metrics}\""),
        &[env.service("shop", front, backend.addr, ("tls", "plain"), ("", ""))],
    );
    let relay = Relay::start(&config).unwrap();

    for _ in 0..2 {
        let s = client::connect(front, &ClientLevel::Tls { ca: &env.pki.ca })
            .await
            .unwrap();
        client::sink(s, &[7u8; 1000]).await.unwrap();
    }
    let mut garbage = tokio::net::TcpStream::connect(front).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    garbage.shutdown().await.unwrap();
    assert!(relay.wait_logs(&["connection closed"], 3, Duration::from_secs(5)));

    let (code, text) = scrape(metrics, "/metrics");
    assert_eq!(code, 200);
    let m = parse_exposition(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("missing {k} in:\n{text}"))
    };
    assert_eq!(
        get("relay_connections_accepted_total{service=\"shop\"}"),
        3.0
    );
    assert_eq!(get("relay_connections_active{service=\"shop\"}"), 0.0);
    assert_eq!(
        get("relay_connections_closed_total{service=\"shop\",reason=\"closed\"}"),
        2.0
    );
    assert_eq!(
        get("relay_connections_closed_total{service=\"shop\",reason=\"plaintext_rejected\"}"),
        1.0
    );
    assert_eq!(
        get(
            "relay_handshake_failures_total{service=\"shop\",side=\"inbound\",reason=\"plaintext_rejected\"}"
        ),
        1.0
    );
    assert_eq!(
        get("relay_handshake_duration_seconds_count{service=\"shop\"}"),
        2.0
    );
    assert!(get("relay_bytes_total{service=\"shop\",direction=\"up\"}") >= 2000.0);
    assert_eq!(get("relay_worker_restarts_total"), 0.0);
    assert_eq!(scrape(metrics, "/other").0, 404);

    // relay status, for humans.
    let out = Command::new(binary())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "supervisor pid",
        "worker pid",
        "restarts 0",
        "shop",
        "explicit",
        &front.to_string(),
        "tls",
    ] {
        assert!(
            status.contains(needle),
            "status lacks {needle:?}:\n{status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_one_object_per_line_without_key_material() {
    let env = TestDir::new();
    let backend = Backend::plain().await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = env.write_config(
        "",
        &[env.service("shop", front, backend.addr, ("tls", "plain"), ("", ""))],
    );
    let mut relay = Relay::start_with(
        Command::new(binary())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config),
    )
    .unwrap();
    let s = client::connect(front, &ClientLevel::Tls { ca: &env.pki.ca })
        .await
        .unwrap();
    client::sink(s, b"logged").await.unwrap();
    assert!(relay.wait_logs(&["connection closed"], 1, Duration::from_secs(5)));
    relay.terminate(Duration::from_secs(10)).unwrap();
    let key = std::fs::read_to_string(&env.pki.server().key).unwrap();
    let key_body: String = key.lines().nth(1).unwrap().to_string();
    for line in relay.logs() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
        assert!(!line.contains(&key_body), "private key material in the log");
    }
    let close = relay
        .logs()
        .into_iter()
        .find(|l| l.contains("connection closed"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&close).unwrap();
    assert_eq!(v["fields"]["service"], "shop");
    assert_eq!(v["fields"]["outcome"], "closed");
    assert_eq!(v["fields"]["bytes_up"], 11, "\"SINK\\n\" and \"logged\"");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_readiness_and_stopping_are_notified() {
    let env = TestDir::new();
    let backend = Backend::plain().await;
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = env.write_config(
        "",
        &[env.service("shop", front, backend.addr, ("plain", "plain"), ("", ""))],
    );
    let notify = env.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut relay = Relay::start_with(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 from the supervisor");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    relay.terminate(Duration::from_secs(10)).unwrap();
    let n = socket.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/relay.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // Point the unit at this build and a config that exists here.
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[relay]\n").unwrap();
    let unit = unit
        .replace("/usr/bin/relay", binary().to_str().unwrap())
        .replace("/etc/relay/relay.toml", config.to_str().unwrap());
    let path = dir.path().join("relay.service");
    std::fs::write(&path, unit).unwrap();
    // Documentation=man:relay(1) must resolve: install the pages the binary generates.
    let man = dir.path().join("man");
    let made = Command::new(binary())
        .arg("manpages")
        .arg(man.join("man1"))
        .status()
        .unwrap();
    assert!(made.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", &man)
        .output()
        .expect("systemd-analyze is installed (`cargo xtask setup`)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("relay.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn man_pages_and_completions_come_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .arg("manpages")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in [
        "relay.1",
        "relay-run.1",
        "relay-status.1",
        "relay-service-add.1",
        "relay-detach.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is roff");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("detach") && text.contains("reload"),
            "{shell}"
        );
    }
}
