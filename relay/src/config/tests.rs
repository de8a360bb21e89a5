use std::{fs, path::Path};

use super::*;

/// A directory with a throwaway CA, a server certificate and key, and a config file name.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        fs::write(dir.path().join("other.key"), other_key.serialize_pem()).unwrap();
        fs::write(dir.path().join("garbage.pem"), "not a pem file\n").unwrap();
        Self { dir }
    }

    /// Checks `text` in full, as `relay check` does: the schema here, the files they name
    /// in `service`, errors located in the file either way.
    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        let file = self.dir.path().join("relay.toml");
        fs::write(&file, text).unwrap();
        crate::service::check_file(&file).map(|c| c.config)
    }

    /// Parses `text`, expects an error, returns (line, key, message).
    fn error(&self, text: &str) -> (usize, String, String) {
        match self.parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(ConfigError::Invalid {
                file,
                line,
                key,
                message,
            }) => {
                assert_eq!(file, self.dir.path().join("relay.toml"));
                (line, key, message)
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}

const TLS_TO_PLAIN: &str = r#"
[relay]
handshake_timeout = "250ms"

[[service]]
name = "shop"
server = "203.0.113.10"
port = 443
backend_port = 8080
listen = "127.0.0.1:8443"

[service.inbound]
level = "tls"
cert = "server.pem"
key = "server.key"

[service.outbound]
level = "plain"
"#;

#[test]
fn valid_config_parses_with_defaults_and_resolved_paths() {
    let f = Fixture::new();
    let c = f.parse(TLS_TO_PLAIN).unwrap();
    assert_eq!(c.relay.handshake_timeout, Duration::from_millis(250));
    assert_eq!(c.relay.idle_timeout, Duration::from_secs(300), "default");
    assert_eq!(c.relay.control_socket, Path::new("/run/relay/control.sock"));
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(s.backend_addr(), "203.0.113.10:8080".parse().unwrap());
    assert_eq!(
        s.inbound.cert.as_deref(),
        Some(f.dir.path().join("server.pem").as_path())
    );
    assert!(s.inbound.resumption, "resumption defaults to on");
    assert!(c.datapath.is_none());
}

#[test]
fn every_level_pair_is_accepted() {
    let f = Fixture::new();
    let mut text = String::new();
    let mut n = 0;
    for inb in ["plain", "tls", "mtls"] {
        for out in ["plain", "tls", "mtls"] {
            n += 1;
            text.push_str(&format!(
                "[[service]]\nname = \"s{n}\"\nserver = \"2001:db8::1\"\nport = {}\nbackend_port = 9\nlisten = \"[::1]:{}\"\n",
                1000 + n,
                2000 + n
            ));
            text.push_str(&format!("[service.inbound]\nlevel = \"{inb}\"\n"));
            if inb != "plain" {
                text.push_str("cert = \"server.pem\"\nkey = \"server.key\"\n");
            }
            if inb == "mtls" {
                text.push_str("client_ca = \"ca.pem\"\n");
            }
            text.push_str(&format!("[service.outbound]\nlevel = \"{out}\"\n"));
            if out != "plain" {
                text.push_str("ca = \"ca.pem\"\nserver_name = \"localhost\"\n");
            }
            if out == "mtls" {
                text.push_str("cert = \"server.pem\"\nkey = \"server.key\"\n");
            }
        }
    }
    let c = f.parse(&text).unwrap();
    assert_eq!(c.services.len(), 9);
}

#[test]
fn syntax_error_names_the_line() {
    let f = Fixture::new();
    let (line, _, message) = f.error("[relay]\nmetrics = \n");
    assert_eq!(line, 2, "{message}");
}

#[test]
fn unknown_key_names_line_and_key() {
    let f = Fixture::new();
    let text = TLS_TO_PLAIN.replace("cert = \"server.pem\"", "cret = \"server.pem\"");
    let (line, key, message) = f.error(&text);
    assert_eq!(line, 14);
    assert!(key.starts_with("service[0].inbound"), "{key}");
    assert!(message.contains("unknown field `cret`"), "{message}");
}

#[test]
fn wrong_type_and_out_of_range_port() {
    let f = Fixture::new();
    let (line, key, _) = f.error(&TLS_TO_PLAIN.replace("port = 443", "port = \"443\""));
    assert_eq!((line, key.as_str()), (8, "service[0].port"));
    let (line, key, message) = f.error(&TLS_TO_PLAIN.replace("port = 443", "port = 70000"));
    assert_eq!((line, key.as_str()), (8, "service[0].port"), "{message}");
    let (line, key, _) = f.error(&TLS_TO_PLAIN.replace("port = 443", "port = 0"));
    assert_eq!((line, key.as_str()), (8, "service[0].port"));
}

#[test]
fn bad_level_and_bad_address() {
    let f = Fixture::new();
    let (line, key, message) =
        f.error(&TLS_TO_PLAIN.replace("level = \"plain\"", "level = \"ssl\""));
    assert_eq!((line, key.as_str()), (18, "service[0].outbound.level"));
    assert!(
        message.contains("plain") && message.contains("mtls"),
        "{message}"
    );
    let (line, key, _) = f.error(&TLS_TO_PLAIN.replace("203.0.113.10", "example"));
    assert_eq!((line, key.as_str()), (7, "service[0].server"));
}

#[test]
fn mtls_without_client_ca_points_at_the_inbound_table() {
    let f = Fixture::new();
    let (line, key, message) =
        f.error(&TLS_TO_PLAIN.replace("level = \"tls\"", "level = \"mtls\""));
    assert_eq!(key, "service[0].inbound.client_ca");
    assert_eq!(line, 12, "the [service.inbound] header");
    assert!(message.contains("required"), "{message}");
}

#[test]
fn unreadable_or_invalid_files_name_the_key() {
    let f = Fixture::new();
    let (line, key, message) = f.error(&TLS_TO_PLAIN.replace("server.pem", "missing.pem"));
    assert_eq!((line, key.as_str()), (14, "service[0].inbound.cert"));
    assert!(
        message.contains("missing.pem") && message.contains("cannot read"),
        "{message}"
    );
    let (_, key, message) = f.error(&TLS_TO_PLAIN.replace("server.key", "garbage.pem"));
    assert_eq!(key, "service[0].inbound.key", "{message}");
    let (_, key, message) = f.error(&TLS_TO_PLAIN.replace("server.key", "other.key"));
    assert_eq!(key, "service[0].inbound.key");
    assert!(message.contains("does not fit"), "{message}");
}

#[test]
fn contradictions_are_rejected() {
    let f = Fixture::new();
    let (_, key, _) = f.error(&TLS_TO_PLAIN.replace("backend_port = 8080", "backend_port = 443"));
    assert_eq!(key, "service[0].backend_port");
    let (_, key, _) = f.error(&TLS_TO_PLAIN.replace("listen = \"127.0.0.1:8443\"\n", ""));
    assert_eq!(key, "service[0].listen");
    let plain_with_cert = TLS_TO_PLAIN.replace("level = \"tls\"", "level = \"plain\"");
    let (line, key, _) = f.error(&plain_with_cert);
    assert_eq!((line, key.as_str()), (14, "service[0].inbound.cert"));
    let twice = format!(
        "{TLS_TO_PLAIN}{}",
        TLS_TO_PLAIN.replace("[relay]\nhandshake_timeout = \"250ms\"\n", "")
    );
    let (line, key, message) = f.error(&twice);
    assert_eq!((line, key.as_str()), (22, "service[1].name"), "{message}");
}

#[test]
fn transparent_services_need_a_datapath_interface() {
    let f = Fixture::new();
    let text = format!(
        "[datapath]\ninterfaces = []\n{}",
        TLS_TO_PLAIN.replace("listen = \"127.0.0.1:8443\"\n", "")
    );
    let (line, key, _) = f.error(&text);
    assert_eq!((line, key.as_str()), (2, "datapath.interfaces"));
    let ok = text.replace(
        "interfaces = []",
        "interfaces = [\"eth0\"]\nxdp_mode = \"native\"",
    );
    let c = f.parse(&ok).unwrap();
    assert_eq!(c.datapath.unwrap().xdp_mode, XdpMode::Native);
}

#[test]
fn missing_file_is_a_read_error() {
    let e = Config::load(Path::new("/nonexistent/relay.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/relay.toml"), "{e}");
}

#[test]
fn max_buffer_is_bounded() {
    let f = Fixture::new();
    let c = f.parse(TLS_TO_PLAIN).unwrap();
    assert_eq!(c.relay.max_buffer, 64 << 10, "default");
    let text = TLS_TO_PLAIN.replace(
        "handshake_timeout = \"250ms\"",
        "handshake_timeout = \"250ms\"\nmax_buffer = 1000",
    );
    let (line, key, message) = f.error(&text);
    assert_eq!((line, key.as_str()), (4, "relay.max_buffer"), "{message}");
    assert!(message.contains("between 4096 and 131072"), "{message}");
    let ok = TLS_TO_PLAIN.replace(
        "handshake_timeout = \"250ms\"",
        "handshake_timeout = \"250ms\"\nmax_buffer = 16384",
    );
    assert_eq!(f.parse(&ok).unwrap().relay.max_buffer, 16384);
}

#[test]
fn allow_and_crl_need_mtls_and_valid_rules() {
    let f = Fixture::new();
    let tls_with_allow = TLS_TO_PLAIN.replace(
        "key = \"server.key\"\n",
        "key = \"server.key\"\nallow = [\"dns:api.example.org\"]\n",
    );
    let (_, key, message) = f.error(&tls_with_allow);
    assert_eq!(key, "service[0].inbound.allow");
    assert!(message.contains("mtls"), "{message}");
    let mtls = TLS_TO_PLAIN
        .replace("level = \"tls\"", "level = \"mtls\"")
        .replace(
            "key = \"server.key\"\n",
            "key = \"server.key\"\nclient_ca = \"ca.pem\"\n",
        );
    let bad_rule = mtls.replace(
        "client_ca = \"ca.pem\"\n",
        "client_ca = \"ca.pem\"\nallow = [\"cn:ops\", \"uri:spiffe://*.org/x\"]\n",
    );
    let (line, key, message) = f.error(&bad_rule);
    assert_eq!(
        (line, key.as_str()),
        (17, "service[0].inbound.allow[1]"),
        "{message}"
    );
    assert!(message.contains("path only"), "{message}");
    let good = mtls.replace(
        "client_ca = \"ca.pem\"\n",
        "client_ca = \"ca.pem\"\nallow = [\"uri:spiffe://example.org/ns/*/sa/web\", \"cn:ops\"]\n",
    );
    assert_eq!(f.parse(&good).unwrap().services[0].inbound.allow.len(), 2);
    let crl_garbage = mtls.replace(
        "client_ca = \"ca.pem\"\n",
        "client_ca = \"ca.pem\"\ncrl = \"garbage.pem\"\n",
    );
    let (_, key, message) = f.error(&crl_garbage);
    assert_eq!(key, "service[0].inbound.crl", "{message}");
}

#[test]
fn plaintext_policy_and_sni_entries() {
    let f = Fixture::new();
    let c = f.parse(TLS_TO_PLAIN).unwrap();
    assert_eq!(
        c.services[0].inbound.plaintext(),
        Plaintext::Reject,
        "default"
    );
    let redirect = TLS_TO_PLAIN.replace(
        "key = \"server.key\"\n",
        "key = \"server.key\"\nplaintext = \"redirect\"\n",
    );
    assert_eq!(
        f.parse(&redirect).unwrap().services[0].inbound.plaintext(),
        Plaintext::Redirect
    );
    let mtls_relay = redirect
        .replace("level = \"tls\"", "level = \"mtls\"")
        .replace("\"redirect\"", "\"relay\"\nclient_ca = \"ca.pem\"");
    let (_, key, message) = f.error(&mtls_relay);
    assert_eq!(key, "service[0].inbound.plaintext");
    assert!(message.contains("without a certificate"), "{message}");

    let sni = |name: &str, key: &str| {
        TLS_TO_PLAIN.replace(
            "[service.outbound]",
            &format!(
                "[[service.inbound.sni]]\nname = \"{name}\"\ncert = \"server.pem\"\nkey = \"{key}\"\n\
                 backend = \"198.51.100.20:8080\"\n\n[service.outbound]"
            ),
        )
    };
    let c = f.parse(&sni("*.example.org", "server.key")).unwrap();
    let entry = &c.services[0].inbound.sni[0];
    assert_eq!(entry.cert, f.dir.path().join("server.pem"), "resolved path");
    assert_eq!(entry.backend, Some("198.51.100.20:8080".parse().unwrap()));
    let (line, key, message) = f.error(&sni("not a name", "server.key"));
    assert_eq!(
        (line, key.as_str()),
        (18, "service[0].inbound.sni[0].name"),
        "{message}"
    );
    let (line, key, message) = f.error(&sni("api.example.org", "other.key"));
    assert_eq!(
        (line, key.as_str()),
        (20, "service[0].inbound.sni[0].key"),
        "{message}"
    );
    assert!(message.contains("does not fit"), "{message}");
}

#[test]
fn directory_and_cluster_sections_are_checked_with_their_keys() {
    let f = Fixture::new();
    let directory = |extra: &str| {
        format!(
            "[directory]\nurl = \"ldaps://127.0.0.1:6360\"\nca = \"ca.pem\"\nbase = \"dc=example,dc=org\"\n{extra}\n"
        )
    };
    assert!(f.parse(&directory("")).is_ok(), "ldaps with a CA is fine");
    for (text, key, needle) in [
        (
            directory("").replace("ldaps://", "ldap://"),
            "directory.url",
            "StartTLS",
        ),
        (
            directory("").replace("ca = \"ca.pem\"\n", ""),
            "directory.ca",
            "required",
        ),
        (
            directory("starttls = true"),
            "directory.starttls",
            "TLS already",
        ),
        (
            directory("bind_dn = \"cn=relay\""),
            "directory.bind_password_file",
            "go together",
        ),
        (
            directory("filter = \"(uid=alice)\""),
            "directory.filter",
            "{uri}",
        ),
        (
            directory("filter = \"(cn={cn}\""),
            "directory.filter",
            "not an LDAP filter",
        ),
        (
            directory("nested_depth = 0"),
            "directory.nested_depth",
            "1-16",
        ),
        (
            directory("").replace("ca.pem", "missing.pem"),
            "directory.ca",
            "cannot read",
        ),
    ] {
        let (_, k, message) = f.error(&text);
        assert_eq!(k, key, "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
    let cluster = "[cluster]\netcd = [\"http://192.0.2.5:2379\"]\nname = \"gw\"\nkey_encryption_key = \"kek\"\n";
    let (_, k, message) = f.error(cluster);
    assert_eq!(k, "cluster.etcd[0]");
    assert!(message.contains("insecure"), "{message}");
    let (_, k, message) = f.error(&format!("{cluster}insecure = true\n"));
    assert_eq!(k, "cluster.key_encryption_key", "{message}");
}

#[test]
fn acme_certificates_are_checked_with_their_keys() {
    let f = Fixture::new();
    let acme = "[acme]\ndirectory = \"https://acme.example/dir\"\nstorage = \"acme-store\"\n";
    let service = |inbound: &str| {
        TLS_TO_PLAIN.replace(
            "cert = \"server.pem\"\nkey = \"server.key\"\n",
            &format!("{inbound}\n"),
        )
    };
    let good = service("cert = \"acme\"\nnames = [\"shop.example.org\"]");
    let c = f.parse(&format!("{good}\n{acme}")).unwrap();
    let s = &c.services[0];
    assert!(s.inbound.is_acme(), "\"acme\" is not a path made absolute");
    assert_eq!(s.inbound.names, ["shop.example.org"]);
    let a = c.acme.unwrap();
    assert_eq!(a.storage, f.dir.path().join("acme-store"));
    assert_eq!(
        a.account_path(),
        f.dir.path().join("acme-store/account.json")
    );
    assert_eq!(a.stored("shop"), f.dir.path().join("acme-store/shop.pem"));

    for (text, key, needle) in [
        (good.clone(), "service[0].inbound.cert", "[acme]"),
        (
            format!("{}\n{acme}", service("cert = \"acme\"")),
            "service[0].inbound.names",
            "required",
        ),
        (
            format!(
                "{}\n{acme}",
                service("cert = \"acme\"\nkey = \"server.key\"\nnames = [\"a.example\"]")
            ),
            "service[0].inbound.key",
            "makes the key",
        ),
        (
            format!(
                "{}\n{acme}",
                service("cert = \"acme\"\nnames = [\"*.example.org\"]")
            ),
            "service[0].inbound.names[0]",
            "dns-01",
        ),
        (
            format!(
                "{}\n{acme}",
                service("cert = \"acme\"\nnames = [\"a..example\"]")
            ),
            "service[0].inbound.names[0]",
            "not a DNS name",
        ),
        (
            TLS_TO_PLAIN.replace(
                "key = \"server.key\"\n",
                "key = \"server.key\"\nnames = [\"a.example\"]\n",
            ),
            "service[0].inbound.names",
            "only with cert",
        ),
        (
            format!("{good}\n{}", acme.replace("https://", "http://")),
            "acme.directory",
            "https://",
        ),
        (
            format!("{good}\n{acme}contact = [\"ops@example.org\"]\n"),
            "acme.contact[0]",
            "mailto:",
        ),
        (
            format!("{good}\n{acme}challenge = \"http-01\"\n"),
            "acme.challenge",
            "answer_http01",
        ),
        (
            format!("{good}\n{acme}challenge = \"dns-01\"\n"),
            "acme.challenge",
            "unknown variant",
        ),
        (
            format!(
                "{}\n{acme}",
                good.replace("names = [", "answer_http01 = true\nnames = [")
            ),
            "service[0].inbound.answer_http01",
            "level = \"plain\"",
        ),
    ] {
        let (_, k, message) = f.error(&text);
        assert_eq!(k, key, "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
}

#[test]
fn a_half_written_certificate_is_pointed_at_by_line() {
    let f = Fixture::new();
    let pem = fs::read_to_string(f.dir.path().join("server.pem")).unwrap();
    let cut = &pem[..pem.len() / 2];
    fs::write(
        f.dir.path().join("server.pem"),
        format!("# renewed\n\n{cut}"),
    )
    .unwrap();
    let (_, key, message) = f.error(TLS_TO_PLAIN);
    assert_eq!(key, "service[0].inbound.cert");
    assert!(
        message.contains("line 3: the CERTIFICATE section begun here has no END line"),
        "{message}"
    );
}

#[test]
fn ipsec_levels_and_servers_are_checked_with_their_keys() {
    let f = Fixture::new();
    let ipsec = "[ipsec]\nvici = \"/run/test.vici\"\n";
    let outbound = "level = \"ipsec\"\ncert = \"server.pem\"\nkey = \"server.key\"\nca = \"ca.pem\"\n\
                    identity = \"CN=db.test\"\n";
    let tls_to = |out: &str| TLS_TO_PLAIN.replace("level = \"plain\"\n", out);
    let good = format!("{}\n{ipsec}", tls_to(outbound));
    let c = f.parse(&good).unwrap();
    assert_eq!(c.services[0].outbound.level, Level::Ipsec);
    let i = c.ipsec.unwrap();
    assert_eq!(
        (i.ike_mark, i.table),
        (0x42, 221),
        "charon's recipe by default"
    );
    let inbound_ipsec = TLS_TO_PLAIN.replace(
        "level = \"tls\"\ncert = \"server.pem\"\nkey = \"server.key\"\n",
        "level = \"ipsec\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
         allow = [\"dns:client.test\"]\n",
    );
    f.parse(&format!("{inbound_ipsec}\n{ipsec}")).unwrap();
    let second_plain = "\n[[service]]\nname = \"other\"\nserver = \"203.0.113.10\"\nport = 444\n\
                        backend_port = 8081\nlisten = \"127.0.0.1:8444\"\n\
                        [service.inbound]\nlevel = \"plain\"\n[service.outbound]\nlevel = \"plain\"\n";
    for (text, key, needle) in [
        (tls_to(outbound), "service[0].outbound.level", "[ipsec]"),
        (
            format!(
                "{}\n{ipsec}",
                tls_to(&outbound.replace("ca = \"ca.pem\"\n", ""))
            ),
            "service[0].outbound.ca",
            "required",
        ),
        (
            format!(
                "{}\n{ipsec}",
                tls_to(&outbound.replace("identity = \"CN=db.test\"\n", ""))
            ),
            "service[0].outbound.identity",
            "required",
        ),
        (
            format!(
                "{}\n{ipsec}",
                tls_to("level = \"tls\"\nidentity = \"CN=db.test\"\n")
            ),
            "service[0].outbound.identity",
            "needs level = \"ipsec\"",
        ),
        (
            format!("{}{second_plain}\n{ipsec}", tls_to(outbound)),
            "service[0].outbound.level",
            "in clear",
        ),
        (
            format!(
                "{}\n{ipsec}",
                inbound_ipsec.replace("listen = \"127.0.0.1:8443\"\n", "")
            ),
            "service[0].listen",
            "explicit mode",
        ),
        (
            format!(
                "{}\n{ipsec}",
                inbound_ipsec.replace("client_ca = \"ca.pem\"\n", "")
            ),
            "service[0].inbound.client_ca",
            "required",
        ),
        (
            format!(
                "{}\n{ipsec}",
                inbound_ipsec.replace("[\"dns:client.test\"]", "[\"group:cn=ops\"]")
            ),
            "service[0].inbound.allow",
            "IKE identity",
        ),
        (format!("{ipsec}table = 220\n"), "ipsec.table", "221-32000"),
        (
            format!(
                "{}\n{ipsec}",
                inbound_ipsec.replace("127.0.0.1:8443", "0.0.0.0:8443")
            ),
            "service[0].listen",
            "one gateway address",
        ),
        (
            format!("{TLS_TO_PLAIN}\n[[server]]\naddress = \"198.51.100.20\"\nrequire = \"esp\"\n"),
            "server[0].require",
            "[datapath]",
        ),
    ] {
        let (_, got_key, message) = f.error(&text);
        assert_eq!(got_key, key, "{message}");
        assert!(message.contains(needle), "{key}: {message}");
    }
}

#[test]
fn an_ike_identity_gives_the_names_allow_rules_match() {
    use crate::access::Identity;
    assert_eq!(Identity::from_ike("client.test").dns, ["client.test"]);
    assert_eq!(
        Identity::from_ike("C=CH, O=strongSwan, CN=moon.test")
            .cn
            .as_deref(),
        Some("moon.test")
    );
    assert_eq!(Identity::from_ike("192.0.2.2"), Identity::default());
    // An O value that smuggles a second CN gives no name at all.
    assert_eq!(
        Identity::from_ike("O=x, CN=admin.test, CN=user.test").cn,
        None
    );
    assert_eq!(Identity::from_ike("O=\"x, CN=admin.test\", CN=u").cn, None);
    assert_eq!(Identity::from_ike("ops@example.org"), Identity::default());
}
