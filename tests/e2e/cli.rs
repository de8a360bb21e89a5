//! The command line as SPEC §5 describes it: exit codes, `check`, `--version`, usage errors.

use relay_tests::{pki::Pki, relay::cli};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_and_help() {
    let v = cli(&["--version"]);
    assert!(v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("relay "),
        "{v:?}"
    );
    let h = cli(&["--help"]);
    let help = String::from_utf8_lossy(&h.stdout).into_owned();
    for cmd in ["run", "check", "status", "service", "reload", "detach"] {
        assert!(help.contains(cmd), "--help lists {cmd}:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(cli(&[]).status.code(), Some(2));
    assert_eq!(cli(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(cli(&["run"]).status.code(), Some(2), "run without --config");
}

#[test]
fn check_accepts_a_valid_file_and_rejects_an_invalid_one_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path()).unwrap();
    let good = format!(
        r#"[[service]]
name = "shop"
server = "203.0.113.10"
port = 443
backend_port = 8080
listen = "127.0.0.1:8443"

[service.inbound]
level = "mtls"
cert = "{}"
key = "{}"
client_ca = "{}"

[service.outbound]
level = "plain"
"#,
        pki.server().cert.display(),
        pki.server().key.display(),
        pki.client_ca.display()
    );
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &good).unwrap();
    let ok = cli(&["check", "--config", file.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("1 service(s)"));

    std::fs::write(&file, good.replace("client_ca = ", "# client_ca = ")).unwrap();
    let bad = cli(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    let msg = stderr(&bad);
    assert!(
        msg.contains(&format!(
            "{}:8: service[0].inbound.client_ca:",
            file.display()
        )),
        "names file, line and key: {msg}"
    );
    // `run` refuses the same file with the same exit code, before binding anything.
    let run = cli(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));

    let missing = cli(&["check", "--config", "/nonexistent/relay.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("/nonexistent/relay.toml"));
}

#[test]
fn the_readme_has_each_heading_once() {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            assert!(
                seen.insert(line),
                "README.md has the heading {line:?} twice"
            );
        }
    }
    assert!(seen.len() > 10, "headings found: {seen:?}");
}
