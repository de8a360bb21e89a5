//! A three-namespace topology, client — gateway — server, with documentation addresses:
//!
//! ```text
//!  <p>-cli  cli0 192.0.2.2     2001:db8:a::2  ─┐
//!                                             │ veth
//!  <p>-gw   gw-cli 192.0.2.1   2001:db8:a::1  ─┘   (client-facing: XDP + TC)
//!           gw-srv 198.51.100.1 2001:db8:b::1 ─┐
//!                                             │ veth
//!  <p>-srv  srv0 198.51.100.10 2001:db8:b::10 ─┘
//! ```
//!
//! Names carry a per-run prefix, so runs and tests never collide. Dropping the topology kills
//! the processes inside its namespaces (by PID) and deletes the namespaces, which deletes their
//! veths; it also runs on panic.

use std::{
    net::IpAddr,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

pub const CLIENT4: &str = "192.0.2.2";
pub const CLIENT6: &str = "2001:db8:a::2";
pub const SERVER4: &str = "198.51.100.10";
pub const SERVER6: &str = "2001:db8:b::10";
pub const GW_CLIENT_IF: &str = "gw-cli";

pub struct Topology {
    pub prefix: String,
    pub cli: String,
    pub gw: String,
    pub srv: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails loudly when the capability is missing: these tests are never skipped.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, XDP, bpffs): run `sudo cargo xtask test`"
    );
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("ip").args(args))
}

/// Gives `dev` in `ns` its IPv4 and IPv6 addresses and brings it up.
fn address(ns: &str, dev: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
    ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
    ip(&["-n", ns, "link", "set", dev, "up"])?;
    Ok(())
}

impl Topology {
    /// Creates the namespaces, veths, addresses and routes. `tag` names the test (short).
    pub fn create(tag: &str) -> anyhow::Result<Topology> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("rl{}-{}{}", std::process::id(), tag, n);
        let t = Topology {
            cli: format!("{prefix}-cli"),
            gw: format!("{prefix}-gw"),
            srv: format!("{prefix}-srv"),
            prefix,
        };
        t.build()
            .with_context(|| format!("build topology {}", t.prefix))?;
        Ok(t)
    }

    fn build(&self) -> anyhow::Result<()> {
        let (cli, gw, srv) = (self.cli.as_str(), self.gw.as_str(), self.srv.as_str());
        for ns in [cli, gw, srv] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n", gw, "link", "add", "gw-srv", "type", "veth", "peer", "name", "srv0", "netns", srv,
        ])?;
        for (ns, dev, v4, v6) in [
            (gw, "gw-srv", "198.51.100.1/24", "2001:db8:b::1/64"),
            (srv, "srv0", "198.51.100.10/24", "2001:db8:b::10/64"),
        ] {
            address(ns, dev, v4, v6)?;
        }
        ip(&["-n", srv, "route", "add", "default", "via", "198.51.100.1"])?;
        ip(&[
            "-n",
            srv,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:b::1",
        ])?;
        self.client_link()?;
        run(self
            .exec(gw, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        run(self
            .exec(gw, "sysctl")
            .args(["-qw", "net.ipv6.conf.all.forwarding=1"]))?;
        for gateway in ["198.51.100.1", "2001:db8:b::1"] {
            run(self.exec(srv, "ping").args(["-c", "1", "-W", "2", gateway]))?;
        }
        Ok(())
    }

    /// The gateway's client-facing veth and the client's end of it, with addresses and the
    /// client's routes. Called again after [`Topology::delete_client_link`], it re-creates the
    /// interface under the same name, as a VLAN or container restart would.
    pub fn client_link(&self) -> anyhow::Result<()> {
        let (cli, gw) = (self.cli.as_str(), self.gw.as_str());
        ip(&[
            "-n",
            gw,
            "link",
            "add",
            GW_CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            "cli0",
            "netns",
            cli,
        ])?;
        for (ns, dev, v4, v6) in [
            (cli, "cli0", "192.0.2.2/24", "2001:db8:a::2/64"),
            (gw, GW_CLIENT_IF, "192.0.2.1/24", "2001:db8:a::1/64"),
        ] {
            address(ns, dev, v4, v6)?;
        }
        ip(&["-n", cli, "route", "add", "default", "via", "192.0.2.1"])?;
        ip(&[
            "-n",
            cli,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:a::1",
        ])?;
        // Resolve the neighbours now: in a fresh topology the first IPv6 connection through
        // the gateway otherwise takes 1-2 s (measured without any relay: 3 of 3 runs; with
        // these pings 3 of 3 under a millisecond), which would blur every timing taken here.
        for gateway in ["192.0.2.1", "2001:db8:a::1"] {
            run(self.exec(cli, "ping").args(["-c", "1", "-W", "2", gateway]))?;
        }
        Ok(())
    }

    /// Deletes the gateway's client-facing veth (its peer in the client namespace goes too).
    pub fn delete_client_link(&self) -> anyhow::Result<()> {
        ip(&["-n", &self.gw, "link", "del", GW_CLIENT_IF]).map(drop)
    }

    /// `ip netns exec <ns> <program>`: a command in a namespace (own mount namespace too).
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// `nsenter --net=... <program>`: only the network namespace changes, so bpffs pins made
    /// inside are the host's and survive the process (`ip netns exec` would remount /sys).
    pub fn enter(&self, ns: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }

    /// curl from the client namespace. Returns its output (exit code 28 = timed out).
    pub fn curl(&self, args: &[&str]) -> Output {
        self.exec(&self.cli, "curl")
            .args(["--silent", "--show-error"])
            .args(args)
            .output()
            .expect("run curl in the client namespace")
    }

    /// URL host part for an address (`[v6]` or `v4`).
    pub fn host(ip: &str) -> String {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{ip}]"),
            _ => ip.to_string(),
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it makes belong to `ns` and
/// can be used from anywhere afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd as _;
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) changes this thread's network namespace only; the fd is open.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}

/// Kills the processes left in namespace `ns` (by PID) and deletes it, which deletes its
/// veths. For namespaces a test created, named by its unique prefix.
pub fn remove(ns: &str) {
    let pids: Vec<i32> = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for pid in pids {
        // SAFETY: kill(2) on a process inside a namespace the caller created.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.cli, &self.gw, &self.srv] {
            remove(ns);
        }
    }
}
