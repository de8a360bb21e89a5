//! End to end, the trust core of an `mtls` service, from the attacker's side: a client that
//! keeps a session (openssl `-sess_out`) after its access ended must not get back in with it
//! (`-sess_in`) — revoked by a CRL replaced on disk, dropped from `allow`, expired — over TLS
//! 1.3 tickets, TLS 1.2 tickets and TLS 1.2 session ids; a ticket from one service opens no
//! other; revocation covers intermediates; a stale CRL fails closed unless the operator says
//! otherwise; a CRL that does not parse changes nothing; and the backend is told the name that
//! was authorised.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use relay_tests::{
    env::TestDir,
    free_port,
    http::HttpServer,
    metrics::sample,
    pki::{CertFiles, Fresh, Names},
    relay::Relay,
    replace_file, wait_until,
};

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A real HTTP server whose `page.txt` says `for-allowed-clients`.
fn http_backend(env: &TestDir) -> HttpServer {
    let www = env.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("page.txt"), "for-allowed-clients\n").unwrap();
    HttpServer::start(&www, "127.0.0.1".parse().unwrap(), free_port(), &[]).unwrap()
}

/// TLS versions and resumption mechanisms, as `openssl s_client` flags.
const MECHANISMS: [(&str, &[&str]); 3] = [
    ("TLS 1.3 ticket", &["-tls1_3"]),
    ("TLS 1.2 ticket", &["-tls1_2"]),
    ("TLS 1.2 session id", &["-tls1_2", "-no_ticket"]),
];

/// What one `openssl s_client` run got.
#[derive(Debug)]
struct Visit {
    reused: bool,
    /// The backend's page came back.
    served: bool,
    stderr: String,
}

/// `openssl s_client` to `front` asking for `/page.txt`: with `cert`, saving its session to
/// `session` (or resuming from it with `resume`).
fn visit(
    front: SocketAddr,
    ca: &Path,
    cert: Option<&CertFiles>,
    flags: &[&str],
    session: &Path,
    resume: bool,
) -> Visit {
    let mut args: Vec<std::ffi::OsString> = flags.iter().map(Into::into).collect();
    args.push(if resume { "-sess_in" } else { "-sess_out" }.into());
    args.push(session.into());
    if let Some(c) = cert {
        args.extend([
            "-cert".into(),
            c.cert.clone().into(),
            "-key".into(),
            c.key.clone().into(),
        ]);
        // A chain in the file (a certificate from an intermediate): send all of it.
        let pem = std::fs::read_to_string(&c.cert).unwrap();
        if pem.matches("BEGIN CERTIFICATE").count() > 1 {
            args.extend(["-cert_chain".into(), c.cert.clone().into()]);
        }
    }
    let out = relay_tests::client::openssl_get(front, ca, "/page.txt", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    Visit {
        reused: stdout.contains("Reused, TLSv1."),
        served: stdout.contains("for-allowed-clients"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One `mtls → plain` service in front of a real HTTP server.
struct Gate {
    env: TestDir,
    relay: Relay,
    front: SocketAddr,
    metrics: SocketAddr,
    crl: PathBuf,
    _http: HttpServer,
}

impl Gate {
    /// `allow` and `extra` lines for `[service.inbound]`; the CRL file revokes `revoked`.
    fn start(env: TestDir, allow: &[&str], revoked: &[u64], extra: &str) -> Gate {
        let crl = env.path().join("clients-crl.pem");
        replace_file(&crl, env.pki.client_crl_pem(revoked, Fresh::Yes).unwrap());
        let http = http_backend(&env);
        let (front, metrics) = (at(free_port()), at(free_port()));
        let relay = Gate::launch(&env, front, metrics, http.addr, allow, &crl, extra);
        Gate {
            env,
            relay,
            front,
            metrics,
            crl,
            _http: http,
        }
    }

    fn launch(
        env: &TestDir,
        front: SocketAddr,
        metrics: SocketAddr,
        backend: SocketAddr,
        allow: &[&str],
        crl: &Path,
        extra: &str,
    ) -> Relay {
        env.start_relay(
            &format!("metrics = \"{metrics}\""),
            &[Gate::service(env, front, backend, allow, crl, extra)],
        )
    }

    fn service(
        env: &TestDir,
        front: SocketAddr,
        backend: SocketAddr,
        allow: &[&str],
        crl: &Path,
        extra: &str,
    ) -> String {
        let allow = allow
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let inbound = format!("allow = [{allow}]\ncrl = \"{}\"\n{extra}", crl.display());
        env.service("gate", front, backend, ("mtls", "plain"), (&inbound, ""))
    }

    fn visit(
        &self,
        cert: Option<&CertFiles>,
        flags: &[&str],
        session: &Path,
        resume: bool,
    ) -> Visit {
        visit(self.front, &self.env.pki.ca, cert, flags, session, resume)
    }

    fn session(&self, name: &str) -> PathBuf {
        self.env
            .path()
            .join(format!("{}.session", name.replace(' ', "-")))
    }

    fn counter(&self, family: &str, reason: &str) -> f64 {
        sample(
            self.metrics,
            &format!("relay_{family}_total{{service=\"gate\",reason=\"{reason}\"}}"),
        )
    }

    fn file_reloads(&self, result: &str) -> f64 {
        sample(
            self.metrics,
            &format!("relay_file_reloads_total{{result=\"{result}\"}}"),
        )
    }

    /// Replaces the CRL on disk and waits until the relay reports it applied (or refused).
    fn replace_crl(&self, contents: &str, result: &str) {
        let before = self.file_reloads(result);
        replace_file(&self.crl, contents);
        assert!(
            wait_until(Duration::from_secs(2), || self.file_reloads(result)
                > before),
            "the changed CRL was not {result} within 2 s:\n{}",
            self.relay.logs().join("\n")
        );
    }

    /// Every mechanism: a full handshake saves a session, which then resumes.
    fn sessions_for(&self, who: &CertFiles) {
        for (name, flags) in MECHANISMS {
            let session = self.session(name);
            let first = self.visit(Some(who), flags, &session, false);
            assert!(first.served && !first.reused, "{name}: {first:?}");
            let again = self.visit(Some(who), flags, &session, true);
            assert!(again.served && again.reused, "{name}: resumed: {again:?}");
        }
    }
}

fn client(env: &TestDir, stem: &str, dns: &str, serial: u64) -> CertFiles {
    let names = Names {
        dns: &[dns],
        ..Names::default()
    };
    env.pki.client_with(stem, &names, serial).unwrap()
}

#[test]
fn a_revoked_client_cannot_come_back_with_a_saved_session() {
    let env = TestDir::new();
    let a = client(&env, "client-a", "client-a.example", 201);
    let gate = Gate::start(env, &["dns:client-a.example"], &[], "");
    gate.sessions_for(&a);

    // A's certificate is revoked by a new CRL, replaced on disk while the relay runs.
    let revoking = gate.env.pki.client_crl_pem(&[201], Fresh::Yes).unwrap();
    gate.replace_crl(&revoking, "applied");
    for (name, flags) in MECHANISMS {
        let session = gate.session(name);
        let back = gate.visit(Some(&a), flags, &session, true);
        assert!(!back.reused && !back.served, "{name}: {back:?}");
        assert!(
            back.stderr.contains("certificate revoked"),
            "{name}: {back:?}"
        );
        // Without its certificate at hand the session alone opens nothing either.
        let bare = gate.visit(None, flags, &session, true);
        assert!(!bare.reused && !bare.served, "{name}: {bare:?}");
    }
    // The tickets were declined for the revocation (the session ids went with the old
    // configuration's cache), and every refusal counted as an access decision.
    assert_eq!(gate.counter("resumptions_declined", "revoked"), 4.0);
    assert!(
        wait_until(Duration::from_secs(5), || gate
            .counter("access_denials", "revoked")
            == 3.0),
        "revoked refusals: {}",
        gate.counter("access_denials", "revoked")
    );
    assert_eq!(
        gate.relay
            .count_logs(&["outcome=\"denied\"", "certificate revoked by the CRL"]),
        3
    );
}

#[test]
fn a_client_dropped_from_allow_cannot_resume_and_one_still_allowed_does() {
    let env = TestDir::new();
    let a = client(&env, "client-a", "client-a.example", 301);
    let b = client(&env, "client-b", "client-b.example", 302);
    let gate = Gate::start(
        env,
        &["dns:client-a.example", "dns:client-b.example"],
        &[],
        "",
    );
    gate.sessions_for(&a);
    let b_session = gate.session("b");
    assert!(gate.visit(Some(&b), &["-tls1_3"], &b_session, false).served);

    // `allow` no longer names A; the reload keeps the same ticket keys.
    let config = gate.env.path().join("relay.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"dns:client-a.example\", ", "")).unwrap();
    let out = gate.env.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, flags) in MECHANISMS {
        let back = gate.visit(Some(&a), flags, &gate.session(name), true);
        assert!(!back.reused && !back.served, "{name}: {back:?}");
        assert!(back.stderr.contains("access denied"), "{name}: {back:?}");
    }
    assert_eq!(gate.counter("resumptions_declined", "not_allowed"), 2.0);

    // B's session still resumes: after the reload, and after the worker is killed and
    // replaced (the ticket keys outlive worker generations).
    let again = gate.visit(Some(&b), &["-tls1_3"], &b_session, true);
    assert!(again.reused && again.served, "{again:?}");
    let worker = gate.relay.worker_pid().unwrap();
    // SAFETY: kill(2) on the worker pid the relay's process tree names.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        gate.relay
            .wait_logs(&["new worker accepting"], 1, Duration::from_secs(10))
    );
    let after = gate.visit(Some(&b), &["-tls1_3"], &b_session, true);
    assert!(after.reused && after.served, "{after:?}");
}

#[test]
fn an_expired_certificate_cannot_resume() {
    let env = TestDir::new();
    let until = SystemTime::now() + Duration::from_secs(8);
    let names = Names {
        dns: &["short.example"],
        ..Names::default()
    };
    let short = env
        .pki
        .client_until("short", &names, 401, Some(until))
        .unwrap();
    let gate = Gate::start(env, &["dns:short.example"], &[], "");
    gate.sessions_for(&short);
    // The event: the clock passing the certificate's notAfter (X.509 times are whole seconds).
    assert!(wait_until(Duration::from_secs(15), || {
        SystemTime::now() > until + Duration::from_secs(1)
    }));
    for (name, flags) in MECHANISMS {
        let back = gate.visit(Some(&short), flags, &gate.session(name), true);
        assert!(!back.reused && !back.served, "{name}: {back:?}");
        assert!(
            back.stderr.contains("certificate expired"),
            "{name}: {back:?}"
        );
    }
    // All three mechanisms' sessions, the TLS 1.2 session id from the same cache included.
    assert_eq!(gate.counter("resumptions_declined", "expired"), 3.0);
    assert!(wait_until(Duration::from_secs(5), || gate
        .counter("access_denials", "expired")
        == 3.0));
}

#[test]
fn a_ticket_from_one_service_opens_no_other() {
    // A `tls` service and an `mtls` one share the certificate, the server name and the ticket
    // keys: a session of the first would otherwise resume at the second without any client
    // certificate at all.
    let env = TestDir::new();
    let http = http_backend(&env);
    let (open, gated) = (at(free_port()), at(free_port()));
    let crl = env.path().join("clients-crl.pem");
    replace_file(&crl, env.pki.client_crl_pem(&[], Fresh::Yes).unwrap());
    let services = [
        env.service("open", open, http.addr, ("tls", "plain"), ("", "")),
        Gate::service(&env, gated, http.addr, &["dns:client-a.example"], &crl, ""),
    ];
    let _relay = env.start_relay("", &services);
    let a = client(&env, "client-a", "client-a.example", 501);
    for (name, flags) in &MECHANISMS[..2] {
        let session = env
            .path()
            .join(format!("{}.session", name.replace(' ', "-")));
        let first = visit(open, &env.pki.ca, None, flags, &session, false);
        assert!(first.served, "{name}: {first:?}");
        let stolen = visit(gated, &env.pki.ca, None, flags, &session, true);
        assert!(!stolen.reused && !stolen.served, "{name}: {stolen:?}");
        // With a certificate of its own, the client gets a full handshake there.
        let proper = visit(gated, &env.pki.ca, Some(&a), flags, &session, true);
        assert!(!proper.reused && proper.served, "{name}: {proper:?}");
    }
}

#[test]
fn a_revoked_intermediate_refuses_every_client_below_it() {
    let env = TestDir::new();
    let intermediate = env
        .pki
        .client_intermediate("relay test team CA", 600)
        .unwrap();
    let names = Names {
        dns: &["team.example"],
        ..Names::default()
    };
    let member = intermediate.client("member", &names, 601).unwrap();
    // The intermediate's own CRL only: the root published none here, so the intermediate's
    // status is unknown, which is accepted; the member's is known (not revoked).
    let gate = Gate::start(env, &["dns:team.example"], &[], "");
    gate.replace_crl(&intermediate.crl_pem(&[]).unwrap(), "applied");
    let session = gate.session("member");
    let first = gate.visit(Some(&member), &["-tls1_3"], &session, false);
    assert!(first.served, "{first:?}");

    // Now the root revokes the intermediate: the member is refused, resumption included.
    let both = intermediate.crl_pem(&[]).unwrap()
        + &gate.env.pki.client_crl_pem(&[600], Fresh::Yes).unwrap();
    gate.replace_crl(&both, "applied");
    let back = gate.visit(Some(&member), &["-tls1_3"], &session, true);
    assert!(!back.reused && !back.served, "{back:?}");
    assert!(back.stderr.contains("certificate revoked"), "{back:?}");

    // A CRL that covers nobody's issuer leaves the member's own status unknown: refused.
    gate.replace_crl(
        &gate.env.pki.client_crl_pem(&[], Fresh::Yes).unwrap(),
        "applied",
    );
    let unknown = gate.visit(Some(&member), &["-tls1_3"], &gate.session("fresh"), false);
    assert!(!unknown.served, "{unknown:?}");
    assert!(wait_until(Duration::from_secs(5), || gate
        .counter("access_denials", "revocation_unknown")
        == 1.0));
}

#[test]
fn a_stale_crl_fails_closed_unless_the_operator_accepts_it() {
    let env = TestDir::new();
    let a = client(&env, "client-a", "client-a.example", 701);
    let gate = Gate::start(env, &["dns:client-a.example"], &[], "");
    let stale = gate.env.pki.client_crl_pem(&[], Fresh::Expired).unwrap();
    gate.replace_crl(&stale, "applied");
    assert!(
        gate.relay.wait_logs(
            &["was due for renewal", "refused until it is renewed"],
            1,
            Duration::from_secs(5)
        ),
        "the stale CRL is announced"
    );
    let session = gate.session("a");
    let refused = gate.visit(Some(&a), &["-tls1_3"], &session, false);
    assert!(!refused.served, "{refused:?}");
    assert!(wait_until(Duration::from_secs(5), || gate
        .counter("access_denials", "crl_expired")
        == 1.0));
    assert_eq!(
        gate.relay
            .count_logs(&["outcome=\"denied\"", "past its nextUpdate"]),
        1
    );

    // The operator relaxes it for this service.
    let config = gate.env.path().join("relay.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let relaxed = text.replace("crl = ", "crl_expired = \"accept\"\ncrl = ");
    std::fs::write(&config, relaxed).unwrap();
    let out = gate.env.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let accepted = gate.visit(Some(&a), &["-tls1_3"], &session, false);
    assert!(accepted.served, "{accepted:?}");
}

#[test]
fn a_crl_that_does_not_parse_keeps_the_previous_one() {
    let env = TestDir::new();
    let a = client(&env, "client-a", "client-a.example", 801);
    let revoked = client(&env, "client-r", "client-a.example", 802);
    let gate = Gate::start(env, &["dns:client-a.example"], &[802], "");
    for half_written in ["-----BEGIN X509 CRL-----\nMIIB", "not a CRL at all"] {
        gate.replace_crl(half_written, "refused");
    }
    assert!(
        gate.relay
            .wait_logs(&["changed files NOT applied"], 2, Duration::from_secs(5)),
        "said loudly"
    );
    let session = gate.session("x");
    assert!(gate.visit(Some(&a), &["-tls1_3"], &session, false).served);
    let still = gate.visit(Some(&revoked), &["-tls1_3"], &session, false);
    assert!(!still.served, "the previous CRL still revokes: {still:?}");
}

#[test]
fn the_backend_is_told_the_name_that_was_authorised() {
    // The client's first name is its URI SAN, but the rule that let it in matched its DNS
    // SAN: that is the identity the backend gets in the PROXY v2 header.
    let env = TestDir::new();
    let names = Names {
        cn: Some("web"),
        dns: &["api.example.org"],
        uris: &["spiffe://example.org/ns/prod/sa/web"],
    };
    let web = env.pki.client_with("web", &names, 901).unwrap();
    let backend = TcpListener::bind(at(0)).unwrap();
    let crl = env.path().join("clients-crl.pem");
    replace_file(&crl, env.pki.client_crl_pem(&[], Fresh::Yes).unwrap());
    let front = at(free_port());
    let service = Gate::service(
        &env,
        front,
        backend.local_addr().unwrap(),
        &["dns:api.example.org"],
        &crl,
        "",
    )
    .replace(
        "level = \"plain\"\n",
        "level = \"plain\"\nproxy_protocol = \"v2\"\n",
    );
    let _relay = env.start_relay("", &[service]);
    let reader = std::thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let mut rest = vec![0; len];
        s.read_exact(&mut rest).unwrap();
        [head.to_vec(), rest].concat()
    });
    let _ = visit(
        front,
        &env.pki.ca,
        Some(&web),
        &["-tls1_3"],
        &env.path().join("s"),
        false,
    );
    let header = reader.join().unwrap();
    let parsed = ppp::v2::Header::try_from(header.as_slice()).unwrap();
    let identity = parsed
        .tlvs()
        .map(Result::unwrap)
        .find(|t| t.kind == 0xE0)
        .expect("the identity TLV");
    assert_eq!(
        String::from_utf8_lossy(&identity.value),
        "dns:api.example.org"
    );
}
