//! The data path's programs on crafted packets, through `BPF_PROG_TEST_RUN`: every verdict and
//! the counter it moves. Needs root (CAP_BPF, CAP_NET_ADMIN); fails loudly without it.

use std::path::Path;

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use relay::{
    config::Config,
    datapath::{Datapath, ServiceCounters, UNMATCHED},
};
use relay_common::{BUCKET_ENTRIES, policy_bucket_v4, server_bucket_v6};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const SERVER4: [u8; 4] = [198, 51, 100, 10];
const OTHER4: [u8; 4] = [198, 51, 100, 11];
const CLIENT4: [u8; 4] = [192, 0, 2, 2];
const SERVER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const OTHER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
];
const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;

const CONFIG: &str = r#"
[datapath]
interfaces = ["lo"]

[[service]]
name = "shop4"
server = "198.51.100.10"
port = 443
backend_port = 8080
[service.inbound]
level = "plain"
[service.outbound]
level = "plain"

[[service]]
name = "shop6"
server = "2001:db8:b::10"
port = 443
backend_port = 8080
[service.inbound]
level = "plain"
[service.outbound]
level = "plain"
"#;

// ------------------------------------------------------------------ packet builders

fn eth(tags: &[u16], ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for tpid in tags {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&[0x00, 0x64]); // VLAN 100
    }
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

struct V4 {
    tags: Vec<u16>,
    dst: [u8; 4],
    proto: u8,
    /// Flags and fragment offset field (MF = 0x2000, offset in 8-byte units).
    frag: u16,
    options: Vec<u8>,
    payload: Vec<u8>,
}

impl V4 {
    fn to(dst: [u8; 4], dport: u16) -> V4 {
        V4 {
            tags: vec![],
            dst,
            proto: TCP,
            frag: 0,
            options: vec![],
            payload: tcp(dport, SYN),
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut p = eth(&self.tags, 0x0800);
        let ihl = 5 + self.options.len() / 4;
        let total = (ihl * 4 + self.payload.len()) as u16;
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 1]);
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&CLIENT4);
        ip.extend_from_slice(&self.dst);
        ip.extend_from_slice(&self.options);
        p.extend_from_slice(&ip);
        p.extend_from_slice(&self.payload);
        p
    }
}

/// An IPv6 extension header: its type, and its bytes (the next-header byte is filled in).
type Ext = (u8, Vec<u8>);

/// IPv6 to `dst` with extension headers `ext`, then `payload` of protocol `last`.
fn v6(dst: [u8; 16], ext: &[Ext], last: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = eth(&[], 0x86dd);
    let body_len: usize = ext.iter().map(|(_, b)| b.len()).sum::<usize>() + payload.len();
    let first = ext.first().map_or(last, |(t, _)| *t);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(body_len as u16).to_be_bytes());
    ip.extend_from_slice(&[first, 64]);
    ip.extend_from_slice(&CLIENT6);
    ip.extend_from_slice(&dst);
    p.extend_from_slice(&ip);
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(last, |(t, _)| *t);
        let mut h = bytes.clone();
        h[0] = next;
        p.extend_from_slice(&h);
    }
    p.extend_from_slice(payload);
    p
}

/// An 8-byte options header (hop-by-hop 0, routing 43, destination options 60).
fn opts8() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// Authentication header, 12 bytes of ICV: (payload len 4 => (4+2)*4 = 24 bytes).
fn ah() -> Vec<u8> {
    let mut h = vec![0u8; 24];
    h[1] = 4;
    h
}

fn frag6(offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut h = vec![0, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h
}

// ------------------------------------------------------------------ harness

struct Harness {
    dp: Datapath,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(CONFIG)
    }

    fn with_config(config: &str) -> Harness {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "BPF_PROG_TEST_RUN needs root: run `sudo cargo xtask test`"
        );
        let config = Config::parse(Path::new("xdp_packets.toml"), config).unwrap();
        let mut dp = Datapath::load(None).expect("load and verify the programs");
        dp.maps.sync(&config.services, &config.servers).unwrap();
        Harness { dp }
    }

    fn xdp(&self, pkt: &[u8]) -> u32 {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        };
        self.dp
            .xdp()
            .unwrap()
            .test_run(opts)
            .expect("xdp test_run")
            .return_value
    }

    fn tc(&self, pkt: &[u8]) -> u32 {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        };
        self.dp.xdp().unwrap();
        self.dp
            .tc()
            .unwrap()
            .test_run(opts)
            .expect("tc test_run")
            .return_value
    }

    /// Runs `pkt` through XDP, asserts the verdict and that exactly `counter` of `service` moved
    /// by one (and nothing else).
    fn expect(&self, what: &str, pkt: &[u8], verdict: u32, service: &str, counter: &str) {
        let before = self.all();
        let got = self.xdp(pkt);
        assert_eq!(got, verdict, "{what}: verdict (1 = drop, 2 = pass)");
        let after = self.all();
        let moved: Vec<(String, &str)> = diff(&before, &after);
        assert_eq!(
            moved,
            vec![(service.to_string(), counter)],
            "{what}: exactly one counter should move"
        );
    }

    fn all(&self) -> Vec<ServiceCounters> {
        self.dp.maps.counters().unwrap()
    }
}

/// (service, counter) pairs that changed, one entry per unit of change.
fn diff(before: &[ServiceCounters], after: &[ServiceCounters]) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for (b, a) in before.iter().zip(after) {
        for (name, x, y) in [
            ("steered", b.steered, a.steered),
            ("dropped", b.dropped, a.dropped),
            ("passed", b.passed, a.passed),
            ("malformed", b.malformed, a.malformed),
            ("no_listener", b.no_listener, a.no_listener),
        ] {
            for _ in x..y {
                out.push((a.service.clone(), name));
            }
        }
    }
    out
}

// ------------------------------------------------------------------ tests

#[test]
fn ipv4_policy_vlan_options_and_protocols() {
    let h = Harness::new();
    h.expect(
        "v4 SYN to backend port",
        &V4::to(SERVER4, 8080).build(),
        XDP_DROP,
        "shop4",
        "dropped",
    );
    let before = h.all();
    assert_eq!(
        h.xdp(&V4::to(SERVER4, 443).build()),
        XDP_PASS,
        "front port passes XDP (TC steers)"
    );
    assert_eq!(
        diff(&before, &h.all()),
        vec![],
        "XDP counts nothing for a steered flow"
    );
    h.expect(
        "other port of the server",
        &V4::to(SERVER4, 22).build(),
        XDP_PASS,
        "shop4",
        "passed",
    );
    h.expect(
        "backend port of another host",
        &V4::to(OTHER4, 8080).build(),
        XDP_PASS,
        UNMATCHED,
        "passed",
    );
    let mut udp = V4::to(SERVER4, 8080);
    udp.proto = UDP;
    h.expect(
        "UDP to the backend port number",
        &udp.build(),
        XDP_PASS,
        "shop4",
        "passed",
    );
    for tags in [vec![0x8100], vec![0x88a8, 0x8100], vec![0x8100, 0x8100]] {
        let mut p = V4::to(SERVER4, 8080);
        p.tags = tags.clone();
        h.expect(
            &format!("VLAN {tags:x?}"),
            &p.build(),
            XDP_DROP,
            "shop4",
            "dropped",
        );
    }
    for options in [vec![1, 1, 1, 1], vec![1; 40]] {
        let mut p = V4::to(SERVER4, 8080);
        p.options = options.clone();
        h.expect(
            &format!("{} bytes of IP options", options.len()),
            &p.build(),
            XDP_DROP,
            "shop4",
            "dropped",
        );
    }
    let mut arp = eth(&[], 0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    h.expect("ARP", &arp, XDP_PASS, UNMATCHED, "passed");
}

/// `[[server]] require = "esp"`: only ESP, IKE and path MTU ICMP reach the server, over
/// either family; everything else heading for it is dropped and counted on its slot.
#[test]
fn only_ipsec_reaches_a_server_that_requires_esp() {
    let config = format!(
        "{CONFIG}\n[[server]]\naddress = \"198.51.100.11\"\nrequire = \"esp\"\n\
         [[server]]\naddress = \"2001:db8:b::11\"\nrequire = \"esp\"\n"
    );
    let h = Harness::with_config(&config);
    let (esp4, esp6) = ("esp:198.51.100.11", "esp:2001:db8:b::11");
    let udp4 = |port: u16| {
        let mut p = V4::to(OTHER4, port);
        p.proto = UDP;
        p.build()
    };
    let proto4 = |proto: u8, payload: Vec<u8>| {
        let mut p = V4::to(OTHER4, 0);
        p.proto = proto;
        p.payload = payload;
        p.build()
    };
    // What IPsec needs passes.
    h.expect("v4 ESP", &proto4(50, vec![0; 16]), XDP_PASS, esp4, "passed");
    h.expect("v4 IKE", &udp4(500), XDP_PASS, esp4, "passed");
    h.expect("v4 IKE NAT-T", &udp4(4500), XDP_PASS, esp4, "passed");
    h.expect(
        "v4 fragmentation needed",
        &proto4(1, vec![3, 4, 0, 0, 0, 0, 5, 0xdc]),
        XDP_PASS,
        esp4,
        "passed",
    );
    // Everything else heading for it is dropped: plaintext TCP to any port, other UDP,
    // other ICMP, other protocols, fragments that are not ESP.
    for port in [22, 80, 443, 8080] {
        h.expect(
            &format!("v4 TCP to port {port}"),
            &V4::to(OTHER4, port).build(),
            XDP_DROP,
            esp4,
            "dropped",
        );
    }
    h.expect("v4 UDP to 53", &udp4(53), XDP_DROP, esp4, "dropped");
    h.expect(
        "v4 echo request",
        &proto4(1, vec![8, 0, 0, 0, 0, 1, 0, 1]),
        XDP_DROP,
        esp4,
        "dropped",
    );
    h.expect("v4 GRE", &proto4(47, vec![0; 8]), XDP_DROP, esp4, "dropped");
    h.expect(
        "v4 UDP cut short",
        &proto4(UDP, vec![0x01]),
        XDP_DROP,
        esp4,
        "dropped",
    );
    let mut later = V4::to(OTHER4, 0);
    later.proto = UDP;
    later.frag = 10; // a non-first fragment: no header to judge
    h.expect(
        "v4 non-first UDP fragment",
        &later.build(),
        XDP_DROP,
        esp4,
        "dropped",
    );
    later.proto = 50;
    h.expect(
        "v4 non-first ESP fragment",
        &later.build(),
        XDP_PASS,
        esp4,
        "passed",
    );
    // IPv6: the same, behind extension headers too; neighbour discovery passes.
    let udp6 = |port: u16| {
        let mut u = tcp(port, 0);
        u.truncate(8);
        u
    };
    h.expect(
        "v6 ESP",
        &v6(OTHER6, &[], 50, &[0; 16]),
        XDP_PASS,
        esp6,
        "passed",
    );
    h.expect(
        "v6 IKE",
        &v6(OTHER6, &[(60, opts8())], UDP, &udp6(500)),
        XDP_PASS,
        esp6,
        "passed",
    );
    h.expect(
        "v6 packet too big",
        &v6(OTHER6, &[], 58, &[2, 0, 0, 0]),
        XDP_PASS,
        esp6,
        "passed",
    );
    h.expect(
        "v6 neighbour solicitation",
        &v6(OTHER6, &[], 58, &[135, 0, 0, 0]),
        XDP_PASS,
        esp6,
        "passed",
    );
    h.expect(
        "v6 echo request",
        &v6(OTHER6, &[], 58, &[128, 0, 0, 0]),
        XDP_DROP,
        esp6,
        "dropped",
    );
    h.expect(
        "v6 TCP",
        &v6(OTHER6, &[], TCP, &tcp(443, SYN)),
        XDP_DROP,
        esp6,
        "dropped",
    );
    h.expect(
        "v6 UDP to 53",
        &v6(OTHER6, &[], UDP, &udp6(53)),
        XDP_DROP,
        esp6,
        "dropped",
    );
    // The services' own server keeps its policy.
    h.expect(
        "service server",
        &V4::to(SERVER4, 22).build(),
        XDP_PASS,
        "shop4",
        "passed",
    );
}

#[test]
fn ipv4_fragments_never_reach_a_protected_server() {
    let h = Harness::new();
    let mut first = V4::to(SERVER4, 8080);
    first.frag = 0x2000; // MF, offset 0: carries the ports
    h.expect(
        "first fragment to the backend port",
        &first.build(),
        XDP_DROP,
        "shop4",
        "dropped",
    );
    let mut first_ok = V4::to(SERVER4, 443);
    first_ok.frag = 0x2000;
    assert_eq!(
        h.xdp(&first_ok.build()),
        XDP_PASS,
        "first fragment to the front port"
    );
    for (what, frag) in [("middle", 0x2001u16), ("last", 0x0003)] {
        let mut p = V4::to(SERVER4, 0);
        p.frag = frag;
        p.payload = vec![0xaa; 16]; // no TCP header in a non-first fragment
        h.expect(
            &format!("{what} TCP fragment to the server"),
            &p.build(),
            XDP_DROP,
            "shop4",
            "dropped",
        );
        p.proto = UDP;
        h.expect(
            &format!("{what} UDP fragment to the server"),
            &p.build(),
            XDP_PASS,
            "shop4",
            "passed",
        );
        p.proto = TCP;
        p.dst = OTHER4;
        h.expect(
            &format!("{what} TCP fragment to another host"),
            &p.build(),
            XDP_PASS,
            UNMATCHED,
            "passed",
        );
    }
}

#[test]
fn ipv6_extension_headers_and_fragments() {
    let h = Harness::new();
    let syn = tcp(8080, SYN);
    h.expect(
        "v6 SYN to backend port",
        &v6(SERVER6, &[], TCP, &syn),
        XDP_DROP,
        "shop6",
        "dropped",
    );
    let before = h.all();
    assert_eq!(h.xdp(&v6(SERVER6, &[], TCP, &tcp(443, SYN))), XDP_PASS);
    assert_eq!(diff(&before, &h.all()), vec![]);
    let chains: [(&str, Vec<Ext>); 5] = [
        ("hop-by-hop", vec![(0, opts8())]),
        (
            "hop-by-hop + routing + destination options",
            vec![(0, opts8()), (43, opts8()), (60, opts8())],
        ),
        ("authentication header", vec![(51, ah())]),
        ("first fragment", vec![(44, frag6(0, true))]),
        (
            "destination options + first fragment",
            vec![(60, opts8()), (44, frag6(0, true))],
        ),
    ];
    for (what, chain) in chains {
        h.expect(
            what,
            &v6(SERVER6, &chain, TCP, &syn),
            XDP_DROP,
            "shop6",
            "dropped",
        );
    }
    // A non-first fragment: whatever its next header claims, it may complete a TCP segment.
    for next in [TCP, 60, UDP] {
        let p = v6(SERVER6, &[(44, frag6(2, false))], next, &[0xaa; 16]);
        h.expect(
            &format!("non-first fragment, next header {next}"),
            &p,
            XDP_DROP,
            "shop6",
            "dropped",
        );
    }
    // TCP hidden in a second fragment: the first fragment holds only options.
    let p = v6(SERVER6, &[(44, frag6(0, true)), (60, opts8())], TCP, &[]);
    h.expect(
        "first fragment without the TCP header",
        &p,
        XDP_DROP,
        "shop6",
        "malformed",
    );
    // More extension headers than the parser follows: cannot be judged, so dropped.
    let long: Vec<Ext> = (0..7).map(|_| (60, opts8())).collect();
    h.expect(
        "seven extension headers",
        &v6(SERVER6, &long, TCP, &syn),
        XDP_DROP,
        "shop6",
        "malformed",
    );
    h.expect(
        "UDP",
        &v6(SERVER6, &[], UDP, &[0u8; 8]),
        XDP_PASS,
        "shop6",
        "passed",
    );
}

#[test]
fn truncated_and_inconsistent_headers_at_every_offset() {
    let h = Harness::new();
    // IPv4: Ethernet 14 + IP 20 (dst readable from 34) + ports at 34..38.
    let full = V4::to(SERVER4, 8080).build();
    for cut in 14..full.len() {
        let (verdict, service, counter) = match cut {
            ..34 => (XDP_PASS, UNMATCHED, "malformed"),
            34..38 => (XDP_DROP, "shop4", "malformed"),
            _ => (XDP_DROP, "shop4", "dropped"),
        };
        h.expect(
            &format!("v4 cut at {cut}"),
            &full[..cut],
            verdict,
            service,
            counter,
        );
    }
    // IPv6: Ethernet 14 + IP 40 (dst readable from 54) + ports at 54..58.
    let full = v6(SERVER6, &[], TCP, &tcp(8080, SYN));
    for cut in 14..full.len() {
        let (verdict, service, counter) = match cut {
            ..54 => (XDP_PASS, UNMATCHED, "malformed"),
            54..58 => (XDP_DROP, "shop6", "malformed"),
            _ => (XDP_DROP, "shop6", "dropped"),
        };
        h.expect(
            &format!("v6 cut at {cut}"),
            &full[..cut],
            verdict,
            service,
            counter,
        );
    }
    // A VLAN tag cut in half.
    h.expect(
        "cut VLAN tag",
        &eth(&[0x8100], 0x0800)[..16],
        XDP_PASS,
        UNMATCHED,
        "malformed",
    );
    // Inconsistent headers aimed at a protected server are dropped, elsewhere passed.
    let mut bad = V4::to(SERVER4, 8080).build();
    bad[14] = 0x55; // version 5
    h.expect("IPv4 version field 5", &bad, XDP_DROP, "shop4", "malformed");
    bad[14] = 0x43; // IHL 3 < 5
    h.expect("IHL below 5", &bad, XDP_DROP, "shop4", "malformed");
    bad[14] = 0x4f; // IHL 15: options run past the end
    h.expect("IHL past the end", &bad, XDP_DROP, "shop4", "malformed");
    let mut elsewhere = V4::to(OTHER4, 8080).build();
    elsewhere[14] = 0x4f;
    h.expect(
        "IHL past the end, other host",
        &elsewhere,
        XDP_PASS,
        UNMATCHED,
        "malformed",
    );
    let mut bad6 = v6(SERVER6, &[], TCP, &tcp(8080, SYN));
    bad6[14] = 0x40;
    h.expect(
        "IPv6 version field 4",
        &bad6,
        XDP_DROP,
        "shop6",
        "malformed",
    );
    let runaway = v6(SERVER6, &[(60, vec![0, 200, 0, 0, 0, 0, 0, 0])], TCP, &[]);
    h.expect(
        "extension header longer than the packet",
        &runaway,
        XDP_DROP,
        "shop6",
        "malformed",
    );
}

/// A service of the data path, transparent, with a plain inbound and outbound level.
fn service(name: &str, server: std::net::IpAddr, port: u16, backend_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nserver = \"{server}\"\nport = {port}\n\
         backend_port = {backend_port}\n[service.inbound]\nlevel = \"plain\"\n\
         [service.outbound]\nlevel = \"plain\"\n\n"
    )
}

#[test]
fn keys_beyond_a_cache_bucket_are_judged_by_the_hash_maps() {
    // Six backend ports of one IPv4 server in one bucket of the policy cache, and six IPv6
    // servers in one bucket of the server cache: two keys more than a bucket holds, each.
    let server4 = [198, 51, 100, 12];
    let bucket = policy_bucket_v4(&server4, 1000);
    let ports: Vec<u16> = (1000..60000)
        .filter(|p| policy_bucket_v4(&server4, *p) == bucket)
        .take(BUCKET_ENTRIES + 3)
        .collect();
    let server6 = |n: u16| {
        let mut a = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        a[14..].copy_from_slice(&n.to_be_bytes());
        a
    };
    let bucket6 = server_bucket_v6(&server6(1));
    let servers6: Vec<[u8; 16]> = (1..u16::MAX)
        .map(server6)
        .filter(|a| server_bucket_v6(a) == bucket6)
        .take(BUCKET_ENTRIES + 2)
        .collect();
    let mut config = String::from("[datapath]\ninterfaces = [\"lo\"]\n\n");
    let (crowded, unused) = ports.split_at(BUCKET_ENTRIES + 2);
    for (i, port) in crowded.iter().enumerate() {
        config += &service(
            &format!("crowd4-{i}"),
            server4.into(),
            60000 + i as u16,
            *port,
        );
    }
    for (i, a) in servers6.iter().enumerate() {
        config += &service(&format!("crowd6-{i}"), (*a).into(), 443, 8080);
    }
    // Another server's backend port: a port in the bitmap that leads to the crowded bucket and
    // finds nothing there, nor in the hash map.
    let elsewhere = [198, 51, 100, 13];
    config += &service("elsewhere", elsewhere.into(), 443, unused[0]);
    let h = Harness::with_config(&config);
    for (i, port) in crowded.iter().enumerate() {
        h.expect(
            &format!(
                "v4 backend port {port}, one of {} in a bucket",
                crowded.len()
            ),
            &V4::to(server4, *port).build(),
            XDP_DROP,
            &format!("crowd4-{i}"),
            "dropped",
        );
    }
    h.expect(
        "v4 service port of the crowded bucket that this server does not use",
        &V4::to(server4, unused[0]).build(),
        XDP_PASS,
        "crowd4-0",
        "passed",
    );
    for (i, a) in servers6.iter().enumerate() {
        let name = format!("crowd6-{i}");
        h.expect(
            &format!("{name}: backend port"),
            &v6(*a, &[], TCP, &tcp(8080, SYN)),
            XDP_DROP,
            &name,
            "dropped",
        );
        h.expect(
            &format!("{name}: other port"),
            &v6(*a, &[], TCP, &tcp(22, SYN)),
            XDP_PASS,
            &name,
            "passed",
        );
        h.expect(
            &format!("{name}: non-first fragment"),
            &v6(*a, &[(44, frag6(2, false))], TCP, &[0xaa; 16]),
            XDP_DROP,
            &name,
            "dropped",
        );
    }
}

#[test]
fn tc_steers_only_front_ports_and_fails_closed_without_a_listener() {
    let h = Harness::new();
    // No listener is registered: a steered SYN must be dropped, never forwarded past the relay.
    let before = h.all();
    assert_eq!(
        h.tc(&V4::to(SERVER4, 443).build()),
        TC_ACT_SHOT,
        "front port, no listener"
    );
    assert_eq!(h.tc(&v6(SERVER6, &[], TCP, &tcp(443, SYN))), TC_ACT_SHOT);
    assert_eq!(
        diff(&before, &h.all()),
        vec![
            ("shop4".to_string(), "no_listener"),
            ("shop6".to_string(), "no_listener")
        ]
    );
    // Defence in depth: TC also drops the backend port.
    assert_eq!(h.tc(&V4::to(SERVER4, 8080).build()), TC_ACT_SHOT);
    // Everything else is left alone.
    let before = h.all();
    assert_eq!(h.tc(&V4::to(SERVER4, 22).build()), TC_ACT_OK);
    assert_eq!(h.tc(&V4::to(OTHER4, 443).build()), TC_ACT_OK);
    assert_eq!(diff(&before, &h.all()), vec![]);
}

/// The empty XDP program (relay-ebpf's `empty-xdp` bin, built with relay's object): what
/// `BPF_PROG_TEST_RUN` costs by itself.
static EMPTY_XDP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/empty-xdp"));

/// Rounds of the cost test: each round runs every case once, `COST_REPEAT` times over. A case's
/// figure is its least round: whatever else the machine does (a build, the other vCPU's
/// sibling) only ever adds to a round, and interleaving the cases exposes them all alike.
const COST_ROUNDS: usize = 20;
const COST_REPEAT: u32 = 200_000;

/// ns per packet of one round of `prog` on `pkt`, checking the verdict.
fn cost(prog: &Xdp, what: &str, pkt: &[u8], verdict: u32) -> u128 {
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat: COST_REPEAT,
        ..Default::default()
    };
    let r = prog.test_run(opts).unwrap();
    assert_eq!(r.return_value, verdict, "{what}");
    r.duration.as_nanos()
}

/// Not an assertion on speed (benchmarks measure that): prints the XDP cost per packet for the
/// record, beside the empty program's on the same harness, and checks that repeated runs keep
/// the verdict.
#[test]
fn xdp_cost_per_packet_with_repeat() {
    let h = Harness::new();
    let mut empty = Ebpf::load(EMPTY_XDP).expect("load the empty XDP program");
    let empty: &mut Xdp = empty.program_mut("empty_xdp").unwrap().try_into().unwrap();
    empty.load().expect("verify the empty XDP program");
    let relay = h.dp.xdp().unwrap();
    let v4 = V4::to(SERVER4, 8080).build();
    let ext3 = [(0, opts8()), (43, opts8()), (60, opts8())];
    let cases: Vec<(&str, &Xdp, Vec<u8>, u32)> = vec![
        ("empty program", &*empty, v4.clone(), XDP_PASS),
        ("drop v4 backend port", relay, v4, XDP_DROP),
        (
            "pass v4 front port",
            relay,
            V4::to(SERVER4, 443).build(),
            XDP_PASS,
        ),
        (
            "pass v4 server's other port",
            relay,
            V4::to(SERVER4, 22).build(),
            XDP_PASS,
        ),
        (
            "pass v4 unrelated",
            relay,
            V4::to(OTHER4, 80).build(),
            XDP_PASS,
        ),
        (
            "drop v6 backend port",
            relay,
            v6(SERVER6, &[], TCP, &tcp(8080, SYN)),
            XDP_DROP,
        ),
        (
            "drop v6 backend port behind 3 ext headers",
            relay,
            v6(SERVER6, &ext3, TCP, &tcp(8080, SYN)),
            XDP_DROP,
        ),
        (
            "pass v6 front port",
            relay,
            v6(SERVER6, &[], TCP, &tcp(443, SYN)),
            XDP_PASS,
        ),
        (
            "pass v6 unrelated",
            relay,
            v6(OTHER6, &[], TCP, &tcp(80, SYN)),
            XDP_PASS,
        ),
    ];
    let mut least = vec![u128::MAX; cases.len()];
    for _ in 0..COST_ROUNDS {
        for (i, (what, prog, pkt, verdict)) in cases.iter().enumerate() {
            least[i] = least[i].min(cost(prog, what, pkt, *verdict));
        }
    }
    for ((what, ..), ns) in cases.iter().zip(least) {
        eprintln!(
            "xdp cost: {what}: {ns} ns/packet (test_run, repeat {COST_REPEAT}, least of {COST_ROUNDS} rounds)"
        );
    }
}
