//! Config snippets for test relays, built from a [`Pki`].

use std::net::SocketAddr;

use crate::pki::Pki;

/// `[relay]` with a control socket in `dir` and the given extra lines (timeouts, limits).
pub fn relay_section(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[relay]\ncontrol_socket = \"{}\"\n{extra}\n",
        dir.join("control.sock").display()
    )
}

/// `[service.inbound]` for `level`, using the PKI's default server certificate.
pub fn inbound(level: &str, pki: &Pki) -> String {
    let mut s = format!("[service.inbound]\nlevel = \"{level}\"\n");
    if level != "plain" {
        let c = pki.server();
        s += &format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
    }
    if level == "mtls" {
        s += &format!("client_ca = \"{}\"\n", pki.client_ca.display());
    }
    s
}

/// `[service.outbound]` for `level`: TLS trusts the PKI's CA and expects `localhost`; mtls
/// presents the PKI's client certificate.
pub fn outbound(level: &str, pki: &Pki) -> String {
    let mut s = format!("[service.outbound]\nlevel = \"{level}\"\n");
    if level != "plain" {
        s += &format!(
            "ca = \"{}\"\nserver_name = \"localhost\"\n",
            pki.ca.display()
        );
    }
    if level == "mtls" {
        let c = &pki.client;
        s += &format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
    }
    s
}

/// An explicit-mode service listening on `listen` and relaying to `backend`.
pub fn service(
    name: &str,
    listen: SocketAddr,
    backend: SocketAddr,
    inbound: &str,
    outbound: &str,
) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nserver = \"{}\"\nport = {}\nbackend_port = {}\nlisten = \"{listen}\"\n{inbound}{outbound}\n",
        backend.ip(),
        listen.port(),
        backend.port(),
    )
}
