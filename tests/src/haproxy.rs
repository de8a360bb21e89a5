//! A real consumer of the PROXY protocol: HAProxy (from Debian) with `accept-proxy`, answering
//! every HTTP request with what the PROXY header told it, and logging the same to a file.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::wait_until;

pub struct ProxyConsumer {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

/// What the consumer reports for each request, in its response body and log line.
pub const FORMAT: &str =
    "src=%[src]:%[src_port] dst=%[dst]:%[dst_port] authority=%[fc_pp_authority]";

impl ProxyConsumer {
    /// HAProxy in HTTP mode on `addr`, every connection starting with a PROXY header (v1 or v2,
    /// HAProxy tells them apart itself).
    pub fn start(dir: &Path, addr: SocketAddr) -> anyhow::Result<ProxyConsumer> {
        Self::start_in(dir, addr, &[])
    }

    /// Like [`ProxyConsumer::start`], run through `wrap` (e.g. `ip netns exec NS`); `[::]`
    /// listens on both families there.
    pub fn start_in(dir: &Path, addr: SocketAddr, wrap: &[&str]) -> anyhow::Result<ProxyConsumer> {
        let config = dir.join(format!("haproxy-{}.cfg", addr.port()));
        let log = dir.join(format!("haproxy-{}.log", addr.port()));
        let v4v6 = if addr.ip().is_unspecified() && addr.is_ipv6() {
            " v4v6"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "global\n  log stdout format raw local0\ndefaults\n  mode http\n  log global\n  \
                 timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
                 frontend pp\n  bind {addr}{v4v6} accept-proxy\n  log-format \"pp-received {FORMAT}\"\n  \
                 http-request return status 200 content-type text/plain lf-string \"{FORMAT}\\n\"\n"
            ),
        )?;
        let out = std::fs::File::create(&log)?;
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("haproxy");
                c
            }
            None => Command::new("haproxy"),
        };
        let child = cmd
            .args(["-db", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start haproxy (is it installed? `cargo xtask setup`)")?;
        let mut consumer = ProxyConsumer { child, addr, log };
        let up = wait_until(Duration::from_secs(10), || match wrap.split_first() {
            // Another namespace: ask `ss` there whether the port is listening.
            Some((first, rest)) => Command::new(first)
                .args(rest)
                .args(["ss", "-Hltn", &format!("sport = :{}", addr.port())])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty()),
            None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        });
        if !up {
            let _ = consumer.child.kill();
            bail!("haproxy did not start on {addr}: {}", consumer.log_text());
        }
        Ok(consumer)
    }

    /// Everything HAProxy wrote so far (its log lines start with `pp-received`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProxyConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
