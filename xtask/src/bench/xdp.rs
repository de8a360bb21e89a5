//! Scenario 7, the data path: what the XDP program costs per packet (`BPF_PROG_TEST_RUN` with
//! repeat, from the eBPF test suite) and how fast it drops a flood aimed at a protected
//! backend port, against the usual alternative, an nftables drop rule at the same place.
//!
//! The flood runs in the namespace topology of the tests (client — gateway — server): trafgen
//! (netsniff-ng) sends the same SYN to (server, backend port) from the client namespace as
//! fast as one core allows, once with relay's XDP program attached to the gateway's
//! client-facing veth and once with only an nftables rule (`prerouting`, priority `raw`) in
//! the gateway. Both runs count the drops where they happen and read the whole machine's
//! busy CPU time from `/proc/stat`, sender included, so they are comparable to each other.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail, ensure};
use relay_tests::{
    netns::{CLIENT4, GW_CLIENT_IF, SERVER4, Topology},
    pki::Pki,
    relay::Relay,
};

use crate::capture;

pub struct Flood {
    pub what: &'static str,
    pub sent: u64,
    pub dropped: u64,
    pub seconds: f64,
    /// Busy CPU time of the whole machine per packet, ns.
    pub cpu_ns_per_packet: f64,
}

pub struct XdpFigures {
    /// (packet, ns per packet) of relay's program, from test_run.
    pub cost: Vec<(String, f64)>,
    /// ns per packet of the empty XDP program on the same harness: test_run's own share.
    pub empty: Option<f64>,
    pub floods: Vec<Flood>,
}

impl XdpFigures {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Cost of the XDP program per packet, `BPF_PROG_TEST_RUN` with repeat 10⁶ (least of 5 runs), \
             beside the empty XDP program on the same harness; relay's own cost is the difference:\n"
        );
        let _ = writeln!(
            md,
            "| program: packet | ns/packet | over the empty program |\n|---|---:|---:|"
        );
        if let Some(empty) = self.empty {
            let _ = writeln!(
                md,
                "| empty XDP program (the harness alone) | {empty:.0} | — |"
            );
        }
        for (what, ns) in &self.cost {
            let over = self
                .empty
                .map_or("—".to_string(), |e| format!("{:.0}", ns - e));
            let _ = writeln!(md, "| relay: {what} | {ns:.0} | {over} |");
        }
        let _ = writeln!(
            md,
            "\nFlood of identical SYNs to (server, backend port) from the client namespace (trafgen, one core), dropped at the gateway:\n"
        );
        let _ = writeln!(
            md,
            "| dropped by | packets sent | dropped | seconds | drops/s | machine CPU ns/packet |\n|---|---:|---:|---:|---:|---:|"
        );
        for f in &self.floods {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} |",
                f.what,
                f.sent,
                f.dropped,
                f.seconds,
                f.dropped as f64 / f.seconds,
                f.cpu_ns_per_packet
            );
        }
        if let [x, n] = self.floods.as_slice() {
            let _ = writeln!(
                md,
                "\nXDP/nftables: {:.2}× the drop rate, {:.2}× the CPU per packet.",
                (x.dropped as f64 / x.seconds) / (n.dropped as f64 / n.seconds),
                x.cpu_ns_per_packet / n.cpu_ns_per_packet
            );
        }
        md
    }

    pub fn summary(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .empty
            .iter()
            .map(|e| format!("XDP test_run: empty program: {e:.0} ns/packet"))
            .collect();
        out.extend(self.cost.iter().map(|(w, ns)| {
            let over = self.empty.map_or(String::new(), |e| {
                format!(" ({:.0} over the empty program)", ns - e)
            });
            format!("XDP test_run: {w}: {ns:.0} ns/packet{over}")
        }));
        for f in &self.floods {
            out.push(format!(
                "flood dropped by {}: {:.0} drops/s, {:.0} CPU ns/packet ({} of {} dropped)",
                f.what,
                f.dropped as f64 / f.seconds,
                f.cpu_ns_per_packet,
                f.dropped,
                f.sent
            ));
        }
        out
    }
}

pub fn measure(work: &Path, quick: bool) -> anyhow::Result<XdpFigures> {
    super::say("XDP data path: cost per packet (test_run)");
    let mut cost = test_run_cost()?;
    let empty = cost
        .iter()
        .position(|(what, _)| what == "empty program")
        .map(|i| cost.remove(i).1);
    let packets: u64 = if quick { 500_000 } else { 3_000_000 };
    super::say(&format!(
        "XDP data path: flood of {packets} SYNs to the backend port, XDP vs nftables"
    ));
    let topo = Topology::create("bench")?;
    let pki = Pki::generate(&work.join("pki-xdp"))?;
    let xdp = flood_xdp(&topo, &pki, work, packets)?;
    let nft = flood_nft(&topo, packets)?;
    Ok(XdpFigures {
        cost,
        empty,
        floods: vec![xdp, nft],
    })
}

/// Runs the eBPF suite's cost test (the same object relay embeds) and collects what it printed.
fn test_run_cost() -> anyhow::Result<Vec<(String, f64)>> {
    let out = Command::new("cargo")
        .args(["test", "--package", "relay", "--test", "xdp_packets"])
        .args(["xdp_cost_per_packet_with_repeat", "--", "--nocapture"])
        .output()
        .context("running the XDP cost test")?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "the XDP cost test failed:\n{text}");
    let cost: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("xdp cost: ")?;
            let (what, ns) = rest.rsplit_once(": ")?;
            Some((
                what.to_string(),
                ns.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect();
    ensure!(
        !cost.is_empty(),
        "the XDP cost test printed no figures:\n{text}"
    );
    Ok(cost)
}

/// Busy (non-idle, non-iowait) jiffies of all CPUs.
fn busy_jiffies() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    v.iter().sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
}

/// Sends `packets` identical SYNs to (server, 8080) from the client namespace; returns the
/// elapsed seconds and the machine's busy CPU seconds meanwhile.
fn send_flood(topo: &Topology, packets: u64) -> anyhow::Result<(f64, f64)> {
    let mac = capture(
        topo.exec(&topo.gw, "cat")
            .arg(format!("/sys/class/net/{GW_CLIENT_IF}/address")),
    )?;
    let spec = format!(
        "{{ eth(da={}), ipv4(sa={CLIENT4}, da={SERVER4}), tcp(sp=40000, dp=8080, syn, win=64240) }}",
        mac.trim()
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = busy_jiffies();
    let t = Instant::now();
    let out = topo
        .exec(&topo.cli, "taskset")
        .args([
            "-c",
            super::peers::LOAD_CPU,
            "trafgen",
            "-o",
            "cli0",
            "--cpus",
            "1",
        ])
        // Leave the machine's socket memory and IRQ affinity alone; no statistics printout.
        .args(["--no-sock-mem", "--notouch-irq", "--no-cpu-stats"])
        .arg("-n")
        .arg(packets.to_string())
        .arg(&spec)
        .output()
        .context("running trafgen")?;
    let seconds = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "trafgen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Let the receiving side drain its queues before anyone counts.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let cpu = (busy_jiffies() - busy) as f64 / hz;
    Ok((seconds, cpu))
}

fn flood_xdp(topo: &Topology, pki: &Pki, work: &Path, packets: u64) -> anyhow::Result<Flood> {
    let pin = format!("/sys/fs/bpf/relay-bench-{}", std::process::id());
    let metrics = "127.0.0.1:9464";
    let cert = pki.server();
    let conf = work.join("relay-xdp.toml");
    fs::write(
        &conf,
        format!(
            "[relay]\ncontrol_socket = \"{}\"\nmetrics = \"{metrics}\"\n\n\
             [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"native\"\npin_path = \"{pin}\"\n\n\
             [[service]]\nname = \"bench\"\nserver = \"{SERVER4}\"\nport = 443\nbackend_port = 8080\n\
             [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [service.outbound]\nlevel = \"plain\"\n",
            work.join("relay-xdp.sock").display(),
            cert.cert.display(),
            cert.key.display()
        ),
    )?;
    let relay_bin = relay_tests::relay::binary();
    let _detach = crate::demo::Detach {
        relay_bin: &relay_bin,
        topo,
        config: conf.clone(),
    };
    let mut relay = Relay::start_with(
        topo.enter(&topo.gw, &relay_tests::relay::binary())
            .args(["run", "--config"])
            .arg(&conf),
    )?;
    let dropped = || -> anyhow::Result<u64> {
        let text = capture(
            topo.exec(&topo.gw, "curl")
                .args(["-sf", &format!("http://{metrics}/metrics")]),
        )?;
        Ok(super::metric_sum(&text, "relay_xdp_packets_total", "action=\"dropped\"") as u64)
    };
    let before = dropped()?;
    let (seconds, cpu) = send_flood(topo, packets)?;
    let after = dropped()?;
    relay.terminate(std::time::Duration::from_secs(10));
    Ok(Flood {
        what: "relay XDP (native, veth)",
        sent: packets,
        dropped: after - before,
        seconds,
        cpu_ns_per_packet: cpu * 1e9 / packets as f64,
    })
}

fn flood_nft(topo: &Topology, packets: u64) -> anyhow::Result<Flood> {
    let rules = format!(
        "table inet relay_bench {{\n  chain pre {{\n    type filter hook prerouting priority raw; policy accept;\n    \
         iifname \"{GW_CLIENT_IF}\" ip daddr {SERVER4} tcp dport 8080 counter drop\n  }}\n}}\n"
    );
    let mut nft = topo.exec(&topo.gw, "nft");
    nft.args(["-f", "-"]);
    crate::run_with_input(&mut nft, rules.as_bytes()).context("loading the nftables rule")?;
    let (seconds, cpu) = send_flood(topo, packets)?;
    let listed =
        capture(
            topo.exec(&topo.gw, "nft")
                .args(["list", "table", "inet", "relay_bench"]),
        )?;
    let dropped = listed
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no counter in the nftables rule")?;
    let _ = topo
        .exec(&topo.gw, "nft")
        .args(["delete", "table", "inet", "relay_bench"])
        .output();
    Ok(Flood {
        what: "nftables (prerouting, raw)",
        sent: packets,
        dropped,
        seconds,
        cpu_ns_per_packet: cpu * 1e9 / packets as f64,
    })
}
