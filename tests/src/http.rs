//! A real HTTP backend: Python's `http.server` serving a directory.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{accepts, wait_until, wrapped};

/// The loopback address of `ip`'s family (a server bound to `::` answers there too).
fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        other => other,
    }
}

pub struct HttpServer {
    child: Child,
    pub addr: SocketAddr,
}

impl HttpServer {
    /// Serves `dir` on `ip:port`, run through `wrap` (e.g. `ip netns exec NS`) if given.
    pub fn start(dir: &Path, ip: IpAddr, port: u16, wrap: &[&str]) -> anyhow::Result<HttpServer> {
        let child = wrapped(wrap, "python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &ip.to_string(),
            ])
            .arg("--directory")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start python3 -m http.server (is python3 installed? `cargo xtask setup`)")?;
        let mut server = HttpServer {
            child,
            addr: SocketAddr::new(ip, port),
        };
        // Probed where it runs.
        let probe = SocketAddr::new(loopback(ip), port);
        let up = wait_until(Duration::from_secs(10), || accepts(wrap, probe));
        if !up {
            let _ = server.child.kill();
            bail!("http.server did not start on {}", server.addr);
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
