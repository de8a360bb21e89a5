//! Scenario 7, the data path: what the XDP program costs per packet (`BPF_PROG_TEST_RUN` with
//! repeat, from the eBPF test suite, beside an empty XDP program on the same harness) and how
//! fast it drops a flood aimed at a protected backend port, against the usual alternative, an
//! nftables drop rule at the same place.
//!
//! The flood runs in the namespace topology of the tests (client — gateway — server): trafgen
//! (netsniff-ng) sends the same SYN to (server, backend port) from the client namespace as
//! fast as one core allows, with relay's XDP program attached to the gateway's client-facing
//! veth in native mode, then with that XDP link removed (relay's TC program alone drops), then
//! in generic mode, and last with only an nftables rule (`prerouting`, priority `raw`) in the
//! gateway. Every run counts the drops where they happen and reads two CPU figures: the
//! sender's CPU time (`perf stat` task-clock, which includes the softirq work that runs in its
//! context, on veth all of the receiving side) plus ksoftirqd's, which measures the flood and
//! nothing else; and the whole machine's busy time from `/proc/stat`, which also counts
//! whatever else the machine does meanwhile.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use relay_tests::{
    netns::{CLIENT4, GW_CLIENT_IF, SERVER4, Topology},
    pki::Pki,
    relay::Relay,
};

use crate::capture;

pub struct Flood {
    pub what: String,
    pub sent: u64,
    pub dropped: u64,
    pub seconds: f64,
    /// Busy CPU time of the whole machine per packet, ns.
    pub cpu_ns_per_packet: f64,
    /// CPU time of the sender and of softirq work per packet, ns: the flood's own cost.
    pub sender_ns_per_packet: f64,
}

/// What a flood took: wall time, the whole machine's busy CPU time, the sender's and softirq's.
struct Sent {
    seconds: f64,
    machine_cpu: f64,
    sender_cpu: f64,
}

/// What veth does to XDP, for the report (measured on the 2-core development VM, kernel 6.18).
const VETH: &str = "\
On veth, XDP cannot do what it does on a NIC. A NIC's driver runs a native XDP program on its \
receive buffer before any `sk_buff` exists; here the sender (trafgen's packet socket) has \
built the `sk_buff` before the packet ever reaches the gateway's veth, so dropping at XDP saves \
no allocation. Worse, native XDP on a veth moves every packet through a detour: with a program \
attached (or GRO on), the peer's `veth_xmit` no longer hands the `sk_buff` to the stack \
(`netif_rx`) but queues it in a ring for the receiving veth's NAPI poll, which copies it into a \
page-pool page (`skb_pp_cow_data`: XDP needs 256 bytes of headroom and a linear, unshared \
buffer; the packet socket gives neither) before the program runs. Generic XDP pays a similar \
copy (`pskb_expand_head`) in the stack's receive path. nftables and relay's TC ingress program \
work on the `sk_buff` as it comes. So on veth the XDP drop costs about what the nftables drop \
costs, and the TC drop less; relay's own program is a few ns of it (see test_run above). On a \
NIC with native XDP, the drop happens before the allocation, and that is where XDP wins.";

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
            "Cost of the XDP program per packet, `BPF_PROG_TEST_RUN` (20 rounds of 2·10⁵ repeats, every \
             packet once a round, the least round kept), beside the empty XDP program on the same \
             harness; relay's own cost is the difference:\n"
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
            "| dropped by | packets sent | dropped | seconds | drops/s | sender + softirq CPU ns/packet | machine CPU ns/packet |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for f in &self.floods {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} |",
                f.what,
                f.sent,
                f.dropped,
                f.seconds,
                f.dropped as f64 / f.seconds,
                f.sender_ns_per_packet,
                f.cpu_ns_per_packet
            );
        }
        let row = |prefix: &str| self.floods.iter().find(|f| f.what.starts_with(prefix));
        if let (Some(x), Some(n)) = (row("relay XDP (native"), row("nftables")) {
            let _ = writeln!(
                md,
                "\nXDP (native)/nftables: {:.2}× the drop rate, {:.2}× the sender + softirq CPU per packet \
                 ({:.2}× the machine's).",
                (x.dropped as f64 / x.seconds) / (n.dropped as f64 / n.seconds),
                x.sender_ns_per_packet / n.sender_ns_per_packet,
                x.cpu_ns_per_packet / n.cpu_ns_per_packet
            );
        }
        let _ = writeln!(md, "\n{VETH}");
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
                "flood dropped by {}: {:.0} drops/s, {:.0} sender + softirq CPU ns/packet, {:.0} machine CPU ns/packet ({} of {} dropped)",
                f.what,
                f.dropped as f64 / f.seconds,
                f.sender_ns_per_packet,
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
        "XDP data path: floods of {packets} SYNs to the backend port: XDP native, TC alone, XDP generic, nftables"
    ));
    let topo = Topology::create("bench")?;
    let pki = Pki::generate(&work.join("pki-xdp"))?;
    let mut floods = flood_relay(&topo, &pki, work, packets)?;
    floods.push(flood_nft(&topo, packets)?);
    Ok(XdpFigures {
        cost,
        empty,
        floods,
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

/// Sends `packets` identical SYNs to (server, 8080) from the client namespace.
fn send_flood(topo: &Topology, packets: u64) -> anyhow::Result<Sent> {
    let mac = capture(
        topo.exec(&topo.gw, "cat")
            .arg(format!("/sys/class/net/{GW_CLIENT_IF}/address")),
    )?;
    let spec = format!(
        "{{ eth(da={}), ipv4(sa={CLIENT4}, da={SERVER4}), tcp(sp=40000, dp=8080, syn, win=64240) }}",
        mac.trim()
    );
    let task_clock = tempfile::NamedTempFile::new()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = busy_jiffies();
    let softirq = ksoftirqd_ns();
    let t = Instant::now();
    let out = topo
        .exec(&topo.cli, "perf")
        .args(["stat", "-x", ",", "-e", "task-clock", "-o"])
        .arg(task_clock.path())
        .args(["--", "taskset", "-c", super::peers::LOAD_CPU])
        .args(["trafgen", "-o", "cli0", "--cpus", "1"])
        // Leave the machine's socket memory and IRQ affinity alone; no statistics printout.
        .args(["--no-sock-mem", "--notouch-irq", "--no-cpu-stats"])
        .arg("-n")
        .arg(packets.to_string())
        .arg(&spec)
        .output()
        .context("running trafgen under perf stat")?;
    let seconds = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "trafgen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Let the receiving side drain its queues before anyone counts.
    std::thread::sleep(Duration::from_millis(300));
    let machine_cpu = (busy_jiffies() - busy) as f64 / hz;
    let softirq = (ksoftirqd_ns() - softirq) as f64 / 1e9;
    // `<msec>,msec,task-clock,...`
    let sender_ms: f64 = fs::read_to_string(task_clock.path())?
        .lines()
        .find(|l| l.contains("task-clock"))
        .and_then(|l| l.split(',').next()?.parse().ok())
        .context("perf stat printed no task-clock")?;
    Ok(Sent {
        seconds,
        machine_cpu,
        sender_cpu: sender_ms / 1e3 + softirq,
    })
}

/// Run time of all ksoftirqd threads, ns: the softirq work that did not run in the sender's
/// context (`/proc/<pid>/schedstat`).
fn ksoftirqd_ns() -> u64 {
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .filter_map(Result::ok)
        .filter(|p| {
            fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(|p| {
            let stat = fs::read_to_string(p.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// One flood, with the drops `dropped` counts.
fn flood(
    topo: &Topology,
    packets: u64,
    what: &str,
    dropped: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<Flood> {
    let before = dropped()?;
    let sent = send_flood(topo, packets)?;
    let after = dropped()?;
    Ok(Flood {
        what: what.to_string(),
        sent: packets,
        dropped: after - before,
        seconds: sent.seconds,
        cpu_ns_per_packet: sent.machine_cpu * 1e9 / packets as f64,
        sender_ns_per_packet: sent.sender_cpu * 1e9 / packets as f64,
    })
}

/// Floods with relay's data path: XDP in native mode; the same with the XDP link removed, so
/// that relay's TC program alone drops (it drops backend ports too); XDP in generic mode.
fn flood_relay(
    topo: &Topology,
    pki: &Pki,
    work: &Path,
    packets: u64,
) -> anyhow::Result<Vec<Flood>> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/relay-bench-{}", std::process::id()));
    let metrics = "127.0.0.1:9464";
    let cert = pki.server();
    let config = |mode: &str| -> anyhow::Result<PathBuf> {
        let path = work.join(format!("relay-xdp-{mode}.toml"));
        fs::write(
            &path,
            format!(
                "[relay]\ncontrol_socket = \"{}\"\nmetrics = \"{metrics}\"\n\n\
                 [datapath]\ninterfaces = [\"{GW_CLIENT_IF}\"]\nxdp_mode = \"{mode}\"\npin_path = \"{}\"\n\n\
                 [[service]]\nname = \"bench\"\nserver = \"{SERVER4}\"\nport = 443\nbackend_port = 8080\n\
                 [service.inbound]\nlevel = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n\
                 [service.outbound]\nlevel = \"plain\"\n",
                work.join("relay-xdp.sock").display(),
                pin.display(),
                cert.cert.display(),
                cert.key.display()
            ),
        )?;
        Ok(path)
    };
    let (native, generic) = (config("native")?, config("generic")?);
    let relay_bin = relay_tests::relay::binary();
    // Both configurations share the pin directory: one detach removes what either attached.
    let _detach = crate::demo::Detach {
        relay_bin: &relay_bin,
        topo,
        config: native.clone(),
    };
    let start = |config: &Path| {
        Relay::start_with(
            topo.enter(&topo.gw, &relay_bin)
                .args(["run", "--config"])
                .arg(config),
        )
    };
    let dropped = || -> anyhow::Result<u64> {
        let text = capture(
            topo.exec(&topo.gw, "curl")
                .args(["-sf", &format!("http://{metrics}/metrics")]),
        )?;
        Ok(super::metric_sum(&text, "relay_xdp_packets_total", "action=\"dropped\"") as u64)
    };
    let mut floods = Vec::new();
    let mut relay = start(&native)?;
    floods.push(flood(topo, packets, "relay XDP (native, veth)", dropped)?);
    // The relay keeps no descriptor of its links: without the pin, the XDP link goes.
    fs::remove_file(pin.join(format!("xdp_native_{GW_CLIENT_IF}")))
        .context("remove the XDP link's pin")?;
    floods.push(flood(
        topo,
        packets,
        "relay TC ingress alone (XDP link removed)",
        dropped,
    )?);
    relay.terminate(Duration::from_secs(10));
    let mut relay = start(&generic)?;
    floods.push(flood(topo, packets, "relay XDP (generic, veth)", dropped)?);
    relay.terminate(Duration::from_secs(10));
    Ok(floods)
}

fn flood_nft(topo: &Topology, packets: u64) -> anyhow::Result<Flood> {
    let rules = format!(
        "table inet relay_bench {{\n  chain pre {{\n    type filter hook prerouting priority raw; policy accept;\n    \
         iifname \"{GW_CLIENT_IF}\" ip daddr {SERVER4} tcp dport 8080 counter drop\n  }}\n}}\n"
    );
    let mut nft = topo.exec(&topo.gw, "nft");
    nft.args(["-f", "-"]);
    crate::run_with_input(&mut nft, rules.as_bytes()).context("loading the nftables rule")?;
    let counted = || -> anyhow::Result<u64> {
        let listed =
            capture(
                topo.exec(&topo.gw, "nft")
                    .args(["list", "table", "inet", "relay_bench"]),
            )?;
        listed
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("no counter in the nftables rule")
    };
    let result = flood(topo, packets, "nftables (prerouting, raw)", counted);
    let _ = topo
        .exec(&topo.gw, "nft")
        .args(["delete", "table", "inet", "relay_bench"])
        .output();
    result
}
