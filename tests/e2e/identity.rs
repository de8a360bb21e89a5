//! End to end, identity and protocol features: `allow` rules and CRLs for mtls, the PROXY
//! protocol toward a real consumer (HAProxy) and its TLS TLVs, plaintext recognised on a TLS
//! port, certificates and backends chosen by SNI. Every family runs over IPv4 and IPv6.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Output},
    time::Duration,
};

use relay_tests::{
    env::TestDir,
    free_port,
    haproxy::ProxyConsumer,
    http::HttpServer,
    pki::{CertFiles, Names},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Loopback of each family: every test below runs over both.
const FAMILIES: [&str; 2] = ["127.0.0.1", "::1"];

type Env = TestDir;

fn env() -> Env {
    TestDir::new()
}

/// A real HTTP server whose `page.txt` says `page`.
fn http_backend(env: &Env, page: &str) -> HttpServer {
    let www = env.path().join(format!("www-{page}"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("page.txt"), format!("{page}\n")).unwrap();
    HttpServer::start(&www, "127.0.0.1".parse().unwrap(), free_port(), &[]).unwrap()
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (`cargo xtask setup`)")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `--resolve` for `name:port` to `ip` (bracketed for IPv6).
fn resolve(name: &str, port: u16, ip: &str) -> String {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V6(_) => format!("{name}:{port}:[{ip}]"),
        IpAddr::V4(_) => format!("{name}:{port}:{ip}"),
    }
}

/// curl over TLS to `https://<name>:<port><path>` at `ip`, trusting the test CA.
fn https(
    env: &Env,
    name: &str,
    ip: &str,
    port: u16,
    path: &str,
    cert: Option<&CertFiles>,
) -> Output {
    let res = resolve(name, port, ip);
    let url = format!("https://{name}:{port}{path}");
    let ca = env.pki.ca.to_str().unwrap();
    let mut args = vec!["--cacert", ca, "--resolve", &res];
    let (c, k);
    if let Some(cert) = cert {
        c = cert.cert.display().to_string();
        k = cert.key.display().to_string();
        args.extend(["--cert", &c, "--key", &k]);
    }
    args.push(&url);
    curl(&args)
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_rules_admit_by_uri_dns_or_cn_and_the_crl_revokes() {
    let env = env();
    let pki = &env.pki;
    let web_uri = "spiffe://example.org/ns/prod/sa/web";
    let client = |stem, names: Names, serial| pki.client_with(stem, &names, serial).unwrap();
    let web = client(
        "web",
        Names {
            cn: Some("web"),
            uris: &[web_uri],
            ..Names::default()
        },
        101,
    );
    let api = client(
        "api",
        Names {
            dns: &["api.example.org"],
            ..Names::default()
        },
        102,
    );
    let ops = client(
        "ops",
        Names {
            cn: Some("ops-console"),
            ..Names::default()
        },
        103,
    );
    let intruder_uri = "spiffe://example.org/ns/prod/sa/db";
    let intruder = client(
        "intruder",
        Names {
            cn: Some("db"),
            uris: &[intruder_uri],
            ..Names::default()
        },
        104,
    );
    // Would be allowed by its URI, but its serial number is on the CRL.
    let revoked = client(
        "revoked",
        Names {
            uris: &[web_uri],
            ..Names::default()
        },
        105,
    );
    let crl = pki.client_crl("clients-crl", &[105]).unwrap();

    let http = http_backend(&env, "for-allowed-clients");
    let metrics = at("127.0.0.1", free_port());
    let fronts: Vec<SocketAddr> = FAMILIES.iter().map(|ip| at(ip, free_port())).collect();
    let services: Vec<String> = fronts
        .iter()
        .enumerate()
        .map(|(i, front)| {
            let acl = "allow = [\"uri:spiffe://example.org/ns/*/sa/web\", \"dns:api.example.org\", \
                       \"cn:ops-console\"]\n"
                .to_string() + &format!("crl = \"{}\"\n", crl.display());
            let name = format!("acl{i}");
            env.service(&name, *front, http.addr, ("mtls", "plain"), (&acl, ""))
        })
        .collect();
    let relay = env.start_relay(&format!("metrics = \"{metrics}\""), &services);

    for (i, (ip, front)) in FAMILIES.iter().zip(&fronts).enumerate() {
        for (who, cert) in [("web", &web), ("api", &api), ("ops", &ops)] {
            let out = https(&env, "localhost", ip, front.port(), "/page.txt", Some(cert));
            assert!(
                out.status.success(),
                "{who} over {ip}: {}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stdout), "for-allowed-clients\n");
        }
        for (who, cert) in [("intruder", &intruder), ("revoked", &revoked)] {
            let out = https(&env, "localhost", ip, front.port(), "/page.txt", Some(cert));
            assert!(!out.status.success(), "{who} over {ip} must be refused");
            assert!(
                out.stdout.is_empty(),
                "{who} got data: {}",
                text(&out.stdout)
            );
        }
        let out = https(&env, "localhost", ip, front.port(), "/page.txt", None);
        assert!(
            !out.status.success(),
            "no certificate over {ip} must be refused"
        );

        let svc = format!("acl{i}");
        let sample = |decision: &str| {
            relay_tests::metrics::sample(
                metrics,
                &format!(
                    "relay_access_decisions_total{{service=\"{svc}\",decision=\"{decision}\"}}"
                ),
            )
        };
        assert!(
            relay_tests::wait_until(Duration::from_secs(5), || sample("allowed") == 3.0),
            "allowed decisions for {svc}: {:?}",
            sample("allowed")
        );
        // Both refusals are access decisions: the intruder by the rules, the revoked client
        // by the CRL.
        assert_eq!(sample("denied"), 2.0, "the intruder and the revoked client");
        let denials = |reason: &str| {
            relay_tests::metrics::sample(
                metrics,
                &format!("relay_access_denials_total{{service=\"{svc}\",reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(
            denials("not_allowed"),
            1.0,
            "the intruder, by the allow rules"
        );
        assert_eq!(denials("revoked"), 1.0, "the revoked client, by the CRL");
    }
    let denied = [
        "outcome=\"denied\"",
        &format!("client identity uri:{intruder_uri} matches no allow rule"),
    ];
    assert!(
        relay.wait_logs(&denied, 2, Duration::from_secs(5)),
        "one denial per family, with the identity:\n{}",
        relay.logs().join("\n")
    );
    let allowed = [
        "client allowed",
        &format!("identity=uri:{web_uri}"),
        "rule=uri:spiffe://example.org/ns/*/sa/web",
    ];
    assert_eq!(relay.count_logs(&allowed), 2, "{}", relay.logs().join("\n"));
    assert_eq!(
        relay.count_logs(&[
            "outcome=\"denied\"",
            &format!("uri:{web_uri}: certificate revoked by the CRL")
        ]),
        2,
        "the revoked certificate is refused, once per family, naming the identity it claimed:\n{}",
        relay.logs().join("\n")
    );
    assert_eq!(
        relay.count_logs(&["outcome=\"closed\"", &format!("identity=uri:{web_uri}")]),
        2,
        "the closing line names the client"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_v1_and_v2_tell_haproxy_the_client_address() {
    let env = env();
    let mut services = Vec::new();
    let mut cases = Vec::new();
    let consumers: Vec<ProxyConsumer> = FAMILIES
        .iter()
        .map(|ip| ProxyConsumer::start(env.path(), at(ip, free_port())).unwrap())
        .collect();
    for version in ["v1", "v2"] {
        for (ip, consumer) in FAMILIES.iter().zip(&consumers) {
            let front = at(ip, free_port());
            let name = format!("pp-{version}-{}", if ip.contains(':') { 6 } else { 4 });
            let pp = format!("proxy_protocol = \"{version}\"\n");
            services.push(env.service(&name, front, consumer.addr, ("tls", "plain"), ("", &pp)));
            cases.push((version, *ip, front));
        }
    }
    let _relay = env.start_relay("", &services);

    for (version, ip, front) in cases {
        let res = resolve("localhost", front.port(), ip);
        let url = format!("https://localhost:{}/", front.port());
        let ca = env.pki.ca.to_str().unwrap();
        let out = curl(&[
            "--cacert",
            ca,
            "--resolve",
            &res,
            "-w",
            "\n%{local_port}",
            &url,
        ]);
        assert!(
            out.status.success(),
            "{version} {ip}: {}",
            text(&out.stderr)
        );
        let body = text(&out.stdout);
        let (seen, local_port) = body.rsplit_once('\n').unwrap();
        let seen = seen.trim_end();
        // What HAProxy learnt from the header: the curl's own address and the front port it
        // connected to, not the relay's backend connection.
        let expected = format!("src={ip}:{local_port} dst={ip}:{} authority=", front.port());
        assert!(
            seen.starts_with(&expected),
            "{version}: {seen:?}, expected {expected:?}…"
        );
        if version == "v2" {
            assert!(
                seen.ends_with("authority=localhost"),
                "v2 carries the SNI: {seen:?}"
            );
        } else {
            assert!(
                !seen.ends_with("authority=localhost"),
                "v1 has no TLVs: {seen:?}"
            );
        }
    }
    for consumer in &consumers {
        let log = consumer.log_text();
        assert_eq!(
            log.matches("pp-received src=").count(),
            2,
            "one v1 and one v2 request logged by HAProxy on {}:\n{log}",
            consumer.addr
        );
    }
}

/// Reads one PROXY v2 header with `ppp`, answers one HTTP request, returns (addresses, TLVs).
async fn v2_backend(listener: tokio::net::TcpListener) -> (String, Vec<(u8, Vec<u8>)>) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut head = vec![0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    head.resize(16 + len, 0);
    s.read_exact(&mut head[16..]).await.unwrap();
    let header = ppp::v2::Header::try_from(head.as_slice()).expect("a valid PROXY v2 header");
    let addresses = format!("{:?}", header.addresses);
    let tlvs = header
        .tlvs()
        .map(|t| {
            let t = t.unwrap();
            (t.kind, t.value.to_vec())
        })
        .collect();
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "request cut short");
        request.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        .await
        .unwrap();
    (addresses, tlvs)
}

/// Splits the value of PP2_TYPE_SSL into (client flags, verify, sub-TLVs).
fn ssl_tlv(v: &[u8]) -> (u8, u32, Vec<(u8, String)>) {
    let verify = u32::from_be_bytes([v[1], v[2], v[3], v[4]]);
    let mut subs = Vec::new();
    let mut rest = &v[5..];
    while rest.len() >= 3 {
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        subs.push((rest[0], text(&rest[3..3 + len])));
        rest = &rest[3 + len..];
    }
    (v[0], verify, subs)
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_v2_carries_tls_facts_and_the_verified_identity() {
    let env = env();
    let uri = "spiffe://example.org/ns/prod/sa/web";
    let web = env
        .pki
        .client_with(
            "web",
            &Names {
                cn: Some("web"),
                uris: &[uri],
                ..Names::default()
            },
            7,
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let received = tokio::spawn(v2_backend(listener));
    // The client comes over IPv6, the relay reaches the backend over IPv4: the header still
    // names the client's own family.
    let front = at("::1", free_port());
    let extra = (
        "allow = [\"uri:spiffe://example.org/ns/prod/sa/*\"]\n",
        "proxy_protocol = \"v2\"\n",
    );
    let _relay = env.start_relay(
        "",
        &[env.service("ppv2", front, backend, ("mtls", "plain"), extra)],
    );

    let got = tokio::task::spawn_blocking({
        let env_ca = env.pki.ca.clone();
        let (c, k) = (web.cert.clone(), web.key.clone());
        move || {
            curl(&[
                "--cacert",
                env_ca.to_str().unwrap(),
                "--cert",
                c.to_str().unwrap(),
                "--key",
                k.to_str().unwrap(),
                "--resolve",
                &resolve("localhost", front.port(), "::1"),
                "-w",
                "\n%{local_port}",
                &format!("https://localhost:{}/", front.port()),
            ])
        }
    })
    .await
    .unwrap();
    assert!(got.status.success(), "{}", text(&got.stderr));
    let body = text(&got.stdout);
    let (answer, local_port) = body.rsplit_once('\n').unwrap();
    assert_eq!(answer, "ok\n");
    let (addresses, tlvs) = tokio::time::timeout(Duration::from_secs(5), received)
        .await
        .expect("the backend got a header")
        .unwrap();
    assert!(
        addresses.contains("IPv6")
            && addresses.contains(&format!("source_port: {local_port}"))
            && addresses.contains(&format!("destination_port: {}", front.port())),
        "{addresses}"
    );
    let tlv = |kind: u8| {
        tlvs.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        tlv(0x02).as_deref(),
        Some(&b"localhost"[..]),
        "authority = SNI"
    );
    let (flags, verify, subs) = ssl_tlv(&tlv(0x20).expect("PP2_TYPE_SSL"));
    assert_eq!(flags, 0x01 | 0x02, "SSL, certificate on this connection");
    assert_eq!(verify, 0, "verified");
    let sub = |kind: u8| {
        subs.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(sub(0x21), Some("TLSv1.3"));
    assert!(
        sub(0x23).is_some_and(|c| c.starts_with("TLS_AES_")),
        "{subs:?}"
    );
    assert_eq!(sub(0x22), Some("web"), "client CN");
    assert_eq!(
        tlv(0xE0),
        Some(format!("uri:{uri}").into_bytes()),
        "verified identity"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_port_speaks_tls_and_rejects_relays_or_redirects_plaintext() {
    let env = env();
    let http = http_backend(&env, "one-port");
    let mut fronts = Vec::new();
    let mut services = Vec::new();
    for policy in ["reject", "relay", "redirect"] {
        // `[::]`: one dual-stack socket serves both families.
        let front = at("::", free_port());
        let plaintext = format!("plaintext = \"{policy}\"\n");
        services.push(env.service(policy, front, http.addr, ("tls", "plain"), (&plaintext, "")));
        fronts.push((policy, front.port()));
    }
    let relay = env.start_relay("", &services);
    let ca = env.pki.ca.to_str().unwrap();

    for ip in FAMILIES {
        for &(policy, port) in &fronts {
            let tls = https(&env, "localhost", ip, port, "/page.txt", None);
            assert!(
                tls.status.success(),
                "{policy} {ip} TLS: {}",
                text(&tls.stderr)
            );
            assert_eq!(text(&tls.stdout), "one-port\n");

            let res = resolve("localhost", port, ip);
            let plain_url = format!("http://localhost:{port}/page.txt");
            let plain = curl(&[
                "--resolve",
                &res,
                "-w",
                "%{http_code} %{redirect_url}",
                "-o",
                "/dev/null",
                &plain_url,
            ]);
            let seen = text(&plain.stdout);
            match policy {
                "reject" => assert!(!plain.status.success(), "{ip}: plaintext must be closed"),
                "relay" => assert_eq!(seen, "200 ", "{ip}: {}", text(&plain.stderr)),
                _ => {
                    assert_eq!(
                        seen,
                        format!("301 https://localhost:{port}/page.txt"),
                        "{ip}"
                    );
                    // A browser-like client follows it and lands on the same port over TLS.
                    let followed = curl(&["-L", "--cacert", ca, "--resolve", &res, &plain_url]);
                    assert!(followed.status.success(), "{}", text(&followed.stderr));
                    assert_eq!(text(&followed.stdout), "one-port\n");
                }
            }
        }
    }
    assert!(
        relay.wait_logs(
            &["service=reject", "outcome=\"plaintext_rejected\""],
            2,
            Duration::from_secs(5)
        ),
        "{}",
        relay.logs().join("\n")
    );
    assert_eq!(
        relay.count_logs(&["service=redirect", "outcome=\"redirected\""]),
        4,
        "two redirects per family"
    );
    assert!(
        relay.has_log("peer=127.0.0.1:"),
        "IPv4 clients of the dual-stack socket are logged as IPv4"
    );
    assert!(
        relay.has_log("peer=[::1]:"),
        "IPv6 clients are logged as IPv6"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_the_certificate_and_the_backend() {
    let env = env();
    let default = http_backend(&env, "default");
    let api = http_backend(&env, "api");
    let shop = http_backend(&env, "shop");
    let api_cert = env.pki.server_for("api", &["api.example.org"]).unwrap();
    let shop_cert = env.pki.server_for("shop", &["*.shop.example.org"]).unwrap();
    let front = at("::", free_port());
    let sni = |name: &str, c: &CertFiles, backend: SocketAddr| {
        format!(
            "[[service.inbound.sni]]\nname = \"{name}\"\ncert = \"{}\"\nkey = \"{}\"\nbackend = \"{backend}\"\n",
            c.cert.display(),
            c.key.display()
        )
    };
    let entries = sni("api.example.org", &api_cert, api.addr)
        + &sni("*.shop.example.org", &shop_cert, shop.addr);
    let _relay = env.start_relay(
        "",
        &[env.service("sni", front, default.addr, ("tls", "plain"), (&entries, ""))],
    );
    for ip in FAMILIES {
        for (name, page) in [
            ("localhost", "default"),
            ("api.example.org", "api"),
            ("eu.shop.example.org", "shop"),
        ] {
            // curl checks the certificate against `name`: success means the right one was sent.
            let out = https(&env, name, ip, front.port(), "/page.txt", None);
            assert!(
                out.status.success(),
                "{name} over {ip}: {}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stdout), format!("{page}\n"), "{name} over {ip}");
        }
        // An unknown name gets the default certificate (not valid for it) and backend.
        let out = https(
            &env,
            "other.example.org",
            ip,
            front.port(),
            "/page.txt",
            None,
        );
        assert!(
            !out.status.success(),
            "the default certificate does not cover other.example.org"
        );
        let res = resolve("other.example.org", front.port(), ip);
        let url = format!("https://other.example.org:{}/page.txt", front.port());
        let insecure = curl(&["-k", "--resolve", &res, &url]);
        assert_eq!(
            text(&insecure.stdout),
            "default\n",
            "{}",
            text(&insecure.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn services_added_at_runtime_take_allow_rules_and_proxy_protocol() {
    let env = env();
    let consumer = ProxyConsumer::start(env.path(), at("::1", free_port())).unwrap();
    let config = env.write_config("", &[]);
    let _relay = relay_tests::relay::Relay::start(&config).unwrap();
    let add = |name: &str, front: SocketAddr, allow: &str| {
        let c = env.pki.server();
        let port = front.port().to_string();
        let backend_port = consumer.addr.port().to_string();
        let (listen, backend) = (front.to_string(), consumer.addr.to_string());
        let args = [
            "service",
            "add",
            "--name",
            name,
            "--server",
            "::1",
            "--port",
            &port,
            "--backend-port",
            &backend_port,
            "--backend",
            &backend,
            "--listen",
            &listen,
            "--inbound-level",
            "mtls",
            "--cert",
            c.cert.to_str().unwrap(),
            "--key",
            c.key.to_str().unwrap(),
            "--client-ca",
            env.pki.client_ca.to_str().unwrap(),
            "--allow",
            allow,
            "--plaintext",
            "redirect",
            "--proxy-protocol",
            "v2",
        ];
        Command::new(relay_tests::relay::binary())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let (open, closed) = (at("::1", free_port()), at("::1", free_port()));
    let out = add("open", open, "dns:client.test");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = add("closed", closed, "cn:somebody-else");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bad = add("bad", at("::1", free_port()), "ip:192.0.2.1");
    assert!(!bad.status.success(), "a bad rule is refused");
    assert!(
        text(&bad.stderr).contains("allow[0]"),
        "{}",
        text(&bad.stderr)
    );

    let client = &env.pki.client;
    let served = https(&env, "localhost", "::1", open.port(), "/", Some(client));
    assert!(served.status.success(), "{}", text(&served.stderr));
    let seen = text(&served.stdout);
    assert!(
        seen.starts_with("src=::1:") && seen.trim_end().ends_with("authority=localhost"),
        "HAProxy got the PROXY v2 header: {seen:?}"
    );
    let denied = https(&env, "localhost", "::1", closed.port(), "/", Some(client));
    assert!(
        !denied.status.success(),
        "dns:client.test is not cn:somebody-else"
    );
    let plain = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://[::1]:{}/x", open.port()),
    ]);
    assert_eq!(text(&plain.stdout), "301", "--plaintext redirect");
}
