//! The eBPF data path (transparent mode): loading, attaching, pinning, policy, and detaching.
//!
//! On each client-facing interface, `relay_xdp` drops packets to protected backend ports and
//! `relay_tc` (TC ingress, tcx) steers packets for front ports to the relay's transparent
//! listeners with `bpf_sk_assign`. Why TC `sk_assign` rather than `sk_lookup`: `sk_lookup` only
//! runs for packets the kernel already routes locally, so every server address would also need
//! a routing rule (the policy twice, in two places); `sk_assign` needs one fwmark rule and one
//! `local` route for any number of services, and its packet is never rewritten, so the accepted
//! socket's local address is the client's original destination.
//!
//! The policy lives in maps the XDP program reads cheaply, above all for the packets that
//! concern no service (most of them): a bitmap of the ports services use, checked first; the
//! policy by (address, port) and the protected servers by address, each in a hash map per
//! address family (the exact record) with a cache in front (`cache`: an array the programs read
//! without a kernel call). [`Maps::sync`] keeps them consistent with each other and with the
//! config, at every moment of a change.
//!
//! Everything is pinned under the pin directory (default `/sys/fs/bpf/relay`): the maps (so
//! counters and policy survive a restart) and the links (so programs stay attached while the
//! relay is down: the backend port stays dropped). A restarted relay reopens the maps and
//! atomically swaps its programs into the pinned links. `detach` removes all of it, plus the
//! routing rule and routes, and nothing else.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues, SockMap},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};
use relay_common::{
    ACTION_DROP, ACTION_STEER, COUNTER_DROPPED, COUNTER_MALFORMED, COUNTER_NO_LISTENER,
    COUNTER_PASSED, COUNTER_STEERED, COUNTERS, LISTENER_V4, LISTENER_V6, MAX_SERVICES, NAME_LEN,
    PORT_WORDS, Policy, PolicyEntryV4, PolicyEntryV6, PolicyKeyV4, PolicyKeyV6, SERVER_ESP_ONLY,
    STEER_MARK, STEER_MARK_MASK, ServerEntryV4, ServerEntryV6, ServiceName, counter_index,
    port_bit,
};
use tracing::{info, warn};

use crate::config::{self, Service, XdpMode};

mod cache;
use cache::Cached;

/// The eBPF object built by build.rs (aya-build, nightly, bpfel-unknown-none).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// The maps of the eBPF object, in the order [`Maps::from_maps`] takes them. A map whose layout
/// changes takes a new name, so that a relay never opens a pin of another layout under it
/// (and [`check_pinned_layouts`] refuses one that has).
const MAP_NAMES: [&str; 12] = [
    "POLICY_V4",
    "POLICY_V6",
    "SERVERS_V4",
    "SERVERS_V6",
    "POLICY_CACHE_V4",
    "POLICY_CACHE_V6",
    "SERVER_CACHE_V4",
    "SERVER_CACHE_V6",
    "SERVICE_PORTS",
    "COUNTERS_MAP",
    "LISTENERS",
    "NAMES",
];

/// Pins of maps that earlier versions used (one policy and one server map for both address
/// families): removed once this version's maps are in place.
const RETIRED_MAPS: [&str; 2] = ["POLICY", "SERVERS"];

/// The maps shared by the programs and userspace.
pub struct Maps {
    policy_v4: Cached<PolicyEntryV4>,
    policy_v6: Cached<PolicyEntryV6>,
    servers_v4: Cached<ServerEntryV4>,
    servers_v6: Cached<ServerEntryV6>,
    service_ports: Array<MapData, u64>,
    counters: Counters,
    listeners: SockMap<MapData>,
}

/// The per-CPU counters and the names of their slots: all `relay status` needs.
pub struct Counters {
    counters: PerCpuArray<MapData, u64>,
    names: Array<MapData, ServiceName>,
}

/// What the policy maps should hold, computed from the services before any map is touched.
#[derive(Default)]
struct Wanted {
    policy_v4: StdHashMap<PolicyKeyV4, Policy>,
    policy_v6: StdHashMap<PolicyKeyV6, Policy>,
    servers_v4: StdHashMap<[u8; 4], u32>,
    servers_v6: StdHashMap<[u8; 16], u32>,
    service_ports: Vec<u64>,
}

/// Counters of one service (or of slot 0: traffic that belongs to no service).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceCounters {
    pub service: String,
    pub steered: u64,
    pub dropped: u64,
    pub passed: u64,
    pub malformed: u64,
    pub no_listener: u64,
}

/// Name of slot 0 in counters: packets that belong to no service.
pub const UNMATCHED: &str = "(no service)";

impl Maps {
    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Maps> {
        let mut maps = Vec::with_capacity(MAP_NAMES.len());
        for name in MAP_NAMES {
            maps.push(
                ebpf.take_map(name)
                    .with_context(|| format!("map {name} missing from the eBPF object"))?,
            );
        }
        let maps: [Map; MAP_NAMES.len()] = maps.try_into().ok().context("map count")?;
        Self::from_maps(maps)
    }

    fn from_maps(
        [
            policy_v4,
            policy_v6,
            servers_v4,
            servers_v6,
            policy_cache_v4,
            policy_cache_v6,
            server_cache_v4,
            server_cache_v6,
            service_ports,
            counters,
            listeners,
            names,
        ]: [Map; MAP_NAMES.len()],
    ) -> anyhow::Result<Maps> {
        Ok(Maps {
            policy_v4: Cached::new(
                "POLICY_V4",
                HashMap::try_from(policy_v4)?,
                Array::try_from(policy_cache_v4)?,
            ),
            policy_v6: Cached::new(
                "POLICY_V6",
                HashMap::try_from(policy_v6)?,
                Array::try_from(policy_cache_v6)?,
            ),
            servers_v4: Cached::new(
                "SERVERS_V4",
                HashMap::try_from(servers_v4)?,
                Array::try_from(server_cache_v4)?,
            ),
            servers_v6: Cached::new(
                "SERVERS_V6",
                HashMap::try_from(servers_v6)?,
                Array::try_from(server_cache_v6)?,
            ),
            service_ports: Array::try_from(service_ports)?,
            counters: Counters {
                counters: PerCpuArray::try_from(counters)?,
                names: Array::try_from(names)?,
            },
            listeners: SockMap::try_from(listeners)?,
        })
    }

    /// Makes the maps say exactly what `services` say: (server, port) steered for transparent
    /// services, (server, backend_port) dropped for every service, every protected server known
    /// by address, and the bitmap and caches in front of them.
    ///
    /// No moment opens a port that stays protected. First the port bits are added (old ∪ new)
    /// and the cache buckets that are to change send readers to the hash maps; then new keys go
    /// into the hash maps, and only after all of them the stale keys come out; then the caches
    /// take their new entries (`cache` explains the steps), and the port bits no port needs any
    /// longer go last.
    pub fn sync(&mut self, services: &[Service], servers: &[config::Server]) -> anyhow::Result<()> {
        let names: Vec<String> = services
            .iter()
            .map(|s| s.name.clone())
            .chain(servers.iter().map(esp_slot_name))
            .collect();
        let slots = self.counters.assign_slots(&names)?;
        let w = Wanted::from_services(services, servers, &slots);
        let ports = (0..PORT_WORDS)
            .map(|i| self.service_ports.get(&i, 0))
            .collect::<Result<Vec<u64>, _>>()
            .context("read SERVICE_PORTS")?;
        let ports_union: Vec<u64> = ports
            .iter()
            .zip(&w.service_ports)
            .map(|(o, n)| o | n)
            .collect();
        write_bitmap(&mut self.service_ports, &ports, &ports_union)
            .context("update SERVICE_PORTS")?;

        let plans = (
            self.policy_v4.begin(&w.policy_v4)?,
            self.policy_v6.begin(&w.policy_v6)?,
            self.servers_v4.begin(&w.servers_v4)?,
            self.servers_v6.begin(&w.servers_v6)?,
        );
        self.policy_v4.insert(&w.policy_v4)?;
        self.policy_v6.insert(&w.policy_v6)?;
        self.servers_v4.insert(&w.servers_v4)?;
        self.servers_v6.insert(&w.servers_v6)?;
        self.policy_v4.remove_stale(&w.policy_v4)?;
        self.policy_v6.remove_stale(&w.policy_v6)?;
        self.servers_v4.remove_stale(&w.servers_v4)?;
        self.servers_v6.remove_stale(&w.servers_v6)?;
        self.policy_v4.finish(plans.0)?;
        self.policy_v6.finish(plans.1)?;
        self.servers_v4.finish(plans.2)?;
        self.servers_v6.finish(plans.3)?;

        write_bitmap(&mut self.service_ports, &ports_union, &w.service_ports)
            .context("update SERVICE_PORTS")?;
        Ok(())
    }

    /// Counters of every named slot, and of slot 0 ([`UNMATCHED`]).
    pub fn counters(&self) -> anyhow::Result<Vec<ServiceCounters>> {
        self.counters.read()
    }

    /// Points the steering at the relay's transparent listeners.
    pub fn set_listeners(
        &mut self,
        v4: &std::net::TcpListener,
        v6: &std::net::TcpListener,
    ) -> anyhow::Result<()> {
        self.listeners
            .set(LISTENER_V4, v4, 0)
            .context("SOCKMAP: IPv4 listener")?;
        self.listeners
            .set(LISTENER_V6, v6, 0)
            .context("SOCKMAP: IPv6 listener")?;
        Ok(())
    }
}

/// The counter slot name of a server only IPsec may reach (no service name has a colon).
fn esp_slot_name(s: &config::Server) -> String {
    format!("esp:{}", s.address)
}

impl Wanted {
    fn from_services(
        services: &[Service],
        servers: &[config::Server],
        slots: &StdHashMap<String, u32>,
    ) -> Wanted {
        let mut w = Wanted {
            service_ports: vec![0; PORT_WORDS as usize],
            ..Wanted::default()
        };
        for s in services {
            let slot = slots[&s.name];
            let mut rules = vec![(s.backend_port, ACTION_DROP)];
            if s.listen.is_none() {
                rules.push((s.port, ACTION_STEER));
            }
            for (port, action) in rules {
                let policy = Policy { action, slot };
                match s.server {
                    IpAddr::V4(a) => w
                        .policy_v4
                        .insert(PolicyKeyV4::new(a.octets(), port), policy),
                    IpAddr::V6(a) => w
                        .policy_v6
                        .insert(PolicyKeyV6::new(a.octets(), port), policy),
                };
                set_bit(&mut w.service_ports, port_bit(port));
            }
            match s.server {
                IpAddr::V4(a) => w.servers_v4.entry(a.octets()).or_insert(slot),
                IpAddr::V6(a) => w.servers_v6.entry(a.octets()).or_insert(slot),
            };
        }
        for s in servers {
            let value = slots[&esp_slot_name(s)] | SERVER_ESP_ONLY;
            match s.address {
                IpAddr::V4(a) => w.servers_v4.insert(a.octets(), value),
                IpAddr::V6(a) => w.servers_v6.insert(a.octets(), value),
            };
        }
        w
    }
}

fn set_bit(bitmap: &mut [u64], (word, bit): (u32, u64)) {
    bitmap[word as usize] |= bit;
}

/// Writes the words of `new` that differ from `old` (what the map holds).
fn write_bitmap(
    map: &mut Array<MapData, u64>,
    old: &[u64],
    new: &[u64],
) -> Result<(), aya::maps::MapError> {
    for (i, (o, n)) in old.iter().zip(new).enumerate() {
        if o != n {
            map.set(i as u32, n, 0)?;
        }
    }
    Ok(())
}

impl Counters {
    /// Opens the counters a relay pinned in `pin_dir` (`relay status` while it is down).
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Counters> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("open pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Counters {
            counters: PerCpuArray::try_from(open("COUNTERS_MAP")?)?,
            names: Array::try_from(open("NAMES")?)?,
        })
    }

    /// Gives each service a counter slot, keeping the slot (and counters) it had before.
    fn assign_slots(&mut self, names: &[String]) -> anyhow::Result<StdHashMap<String, u32>> {
        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut slots = StdHashMap::new();
        let mut free = Vec::new();
        for slot in 1..=MAX_SERVICES {
            let name = self.names.get(&slot, 0)?;
            match decode_name(&name) {
                Some(n) if wanted.contains(n.as_str()) => {
                    slots.insert(n, slot);
                }
                Some(_) => {
                    self.names.set(slot, empty_name(), 0)?;
                    free.push(slot);
                }
                None => free.push(slot),
            }
        }
        free.reverse();
        let cpus = cpus()?;
        for name in names {
            if slots.contains_key(name) {
                continue;
            }
            let slot = free
                .pop()
                .with_context(|| format!("more than {MAX_SERVICES} services and servers"))?;
            for c in 0..COUNTERS {
                let zeros = PerCpuValues::try_from(vec![0u64; cpus])?;
                self.counters.set(counter_index(slot, c), zeros, 0)?;
            }
            self.names.set(slot, encode_name(name), 0)?;
            slots.insert(name.clone(), slot);
        }
        Ok(slots)
    }

    /// Counters of every named slot, and of slot 0 ([`UNMATCHED`]).
    pub fn read(&self) -> anyhow::Result<Vec<ServiceCounters>> {
        let mut out = vec![self.slot_counters(0, UNMATCHED.to_string())?];
        for slot in 1..=MAX_SERVICES {
            if let Some(name) = decode_name(&self.names.get(&slot, 0)?) {
                out.push(self.slot_counters(slot, name)?);
            }
        }
        Ok(out)
    }

    fn slot_counters(&self, slot: u32, service: String) -> anyhow::Result<ServiceCounters> {
        let sum = |c: u32| -> anyhow::Result<u64> {
            Ok(self.counters.get(&counter_index(slot, c), 0)?.iter().sum())
        };
        Ok(ServiceCounters {
            service,
            steered: sum(COUNTER_STEERED)?,
            dropped: sum(COUNTER_DROPPED)?,
            passed: sum(COUNTER_PASSED)?,
            malformed: sum(COUNTER_MALFORMED)?,
            no_listener: sum(COUNTER_NO_LISTENER)?,
        })
    }
}

fn cpus() -> anyhow::Result<usize> {
    nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))
}

fn empty_name() -> ServiceName {
    ServiceName {
        len: 0,
        bytes: [0; NAME_LEN],
    }
}

fn encode_name(name: &str) -> ServiceName {
    let mut n = empty_name();
    let len = name.len().min(NAME_LEN);
    n.bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    n.len = len as u32;
    n
}

fn decode_name(n: &ServiceName) -> Option<String> {
    let len = (n.len as usize).min(NAME_LEN);
    (len > 0).then(|| String::from_utf8_lossy(&n.bytes[..len]).into_owned())
}

/// The loaded programs with their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
}

/// Where and how the XDP program is attached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    /// `native` or `generic`: the mode actually in use.
    pub xdp_mode: String,
}

impl Datapath {
    /// Loads the programs (through the verifier). With `pin_dir`, the maps are the pinned ones
    /// (created and pinned on first use).
    pub fn load(pin_dir: Option<&Path>) -> anyhow::Result<Datapath> {
        crate::sys::raise_memlock();
        if let Some(dir) = pin_dir {
            check_pinned_layouts(dir)?;
        }
        let paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => MAP_NAMES.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("load the eBPF object (are you root, with BTF in the kernel?)")?;
        let xdp: &mut Xdp = program(&mut ebpf, "relay_xdp")?;
        xdp.load()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("verifier rejected relay_xdp")?;
        let tc: &mut SchedClassifier = program(&mut ebpf, "relay_tc")?;
        tc.load().context("verifier rejected relay_tc")?;
        let maps = Maps::take(&mut ebpf)?;
        if let Some(dir) = pin_dir {
            retire_old_pins(dir)?;
        }
        Ok(Datapath { ebpf, maps })
    }

    /// Forwards the programs' aya-log messages (rare paths only, e.g. a failed sk_assign) to
    /// the relay's log. Only worth its task at debug level; without it the messages cost nothing
    /// but a full ring that nobody reads.
    pub fn spawn_logger(&mut self) -> anyhow::Result<()> {
        use tokio::io::{Interest, unix::AsyncFd};
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf).context("start the eBPF logger")?;
        // SAFETY: the logger owns its ring buffer fd, keeps it open and unchanged until dropped,
        // and the AsyncFd owns the logger.
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("register the eBPF log ring: {e}"))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// The loaded XDP program (for `BPF_PROG_TEST_RUN`).
    pub fn xdp(&self) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program("relay_xdp")
            .context("relay_xdp missing")?
            .try_into()?)
    }

    /// The loaded TC program (for `BPF_PROG_TEST_RUN`).
    pub fn tc(&self) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program("relay_tc")
            .context("relay_tc missing")?
            .try_into()?)
    }

    /// Attaches both programs to `interface` (or swaps them into links pinned by an earlier
    /// run, without a gap) and pins the links.
    pub fn attach(
        &mut self,
        pin_dir: &Path,
        interface: &str,
        mode: XdpMode,
    ) -> anyhow::Result<Attachment> {
        let xdp_mode = self.attach_xdp(pin_dir, interface, mode)?;
        self.attach_tc(pin_dir, interface)?;
        Ok(Attachment {
            interface: interface.to_string(),
            xdp_mode,
        })
    }

    fn attach_xdp(
        &mut self,
        pin_dir: &Path,
        interface: &str,
        mode: XdpMode,
    ) -> anyhow::Result<String> {
        let prog: &mut Xdp = program(&mut self.ebpf, "relay_xdp")?;
        for existing in ["native", "generic"] {
            let pin = pin_dir.join(format!("xdp_{existing}_{interface}"));
            if !pin.exists() {
                continue;
            }
            let compatible = match mode {
                XdpMode::Auto => true,
                XdpMode::Native => existing == "native",
                XdpMode::Generic => existing == "generic",
            };
            if compatible {
                let replaced = PinnedLink::from_pin(&pin)
                    .map_err(anyhow::Error::from)
                    .and_then(|link| Ok(XdpLink::try_from(FdLink::from(link))?))
                    .and_then(|link| Ok(prog.attach_to_link(link).map(drop)?));
                match replaced {
                    Ok(()) => {
                        info!(
                            interface,
                            xdp_mode = existing,
                            "XDP program replaced in the pinned link"
                        );
                        return Ok(existing.to_string());
                    }
                    // The interface was deleted (and maybe re-created) while the relay was
                    // down: the link is severed. A new one is attached below.
                    Err(e) if severed(&e) => warn!(
                        interface,
                        error = %format!("{e:#}"),
                        "pinned XDP link severed (interface re-created?): attaching anew"
                    ),
                    // A live link that will not take this program: keep it (it still drops
                    // the backend ports) rather than open them while trying another way.
                    Err(e) => return Err(e).with_context(|| keep_link(interface, &pin)),
                }
            } else {
                warn!(interface, "XDP mode changes from {existing}: re-attaching");
            }
            std::fs::remove_file(&pin)
                .with_context(|| format!("remove the stale pin {}", pin.display()))?;
        }
        let attempts: &[(AyaXdpMode, &str)] = match mode {
            XdpMode::Auto => &[(AyaXdpMode::Driver, "native"), (AyaXdpMode::Skb, "generic")],
            XdpMode::Native => &[(AyaXdpMode::Driver, "native")],
            XdpMode::Generic => &[(AyaXdpMode::Skb, "generic")],
        };
        let mut last_error = None;
        for (flags, name) in attempts {
            match prog.attach(interface, *flags) {
                Ok(id) => {
                    let link = FdLink::try_from(prog.take_link(id)?)
                        .context("XDP attached without a bpf_link (kernel older than 5.9?)")?;
                    link.pin(pin_dir.join(format!("xdp_{name}_{interface}")))
                        .context("pin the XDP link")?;
                    info!(interface, xdp_mode = name, "XDP program attached");
                    return Ok(name.to_string());
                }
                Err(e) => {
                    warn!(interface, xdp_mode = name, error = %e, "XDP attach failed");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("no XDP mode")))
        .with_context(|| format!("attach XDP to {interface}"))
    }

    fn attach_tc(&mut self, pin_dir: &Path, interface: &str) -> anyhow::Result<()> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, "relay_tc")?;
        let pin = pin_dir.join(format!("tc_{interface}"));
        if pin.exists() {
            let replaced = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(SchedClassifierLink::try_from(FdLink::from(link))?))
                .and_then(|link| Ok(prog.attach_to_link(link).map(drop)?));
            match replaced {
                Ok(()) => return Ok(()),
                Err(e) if severed(&e) => warn!(
                    interface,
                    error = %format!("{e:#}"),
                    "pinned TC link severed (interface re-created?): attaching anew"
                ),
                Err(e) => return Err(e).with_context(|| keep_link(interface, &pin)),
            }
            std::fs::remove_file(&pin)
                .with_context(|| format!("remove the stale pin {}", pin.display()))?;
        }
        let id = prog
            .attach(interface, TcAttachType::Ingress)
            .with_context(|| format!("attach TC ingress (tcx) to {interface}"))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("TC attached without tcx (kernel older than 6.6?)")?;
        link.pin(&pin).context("pin the TC link")?;
        Ok(())
    }
}

/// Refuses pinned maps whose layout (type, key and value sizes, entries, flags) is not the one
/// this relay's programs were built for. aya would reuse such a pin as it is: at best the
/// verifier rejects the programs with an obscure message, at worst they misread it. Refusing
/// before anything changes keeps the pinned programs attached with their own maps: the backend
/// ports stay dropped (fail closed) until `relay detach` clears the way.
fn check_pinned_layouts(pin_dir: &Path) -> anyhow::Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parse the embedded eBPF object")?;
    for name in MAP_NAMES {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapInfo::from_pin(&path)
            .with_context(|| format!("read the pinned map {}", path.display()))?;
        let ours = object
            .maps
            .get(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let layout = |t: u32, k: u32, v: u32, n: u32, f: u32| {
            format!("type {t}, key {k} B, value {v} B, {n} entries, flags {f:#x}")
        };
        let theirs = layout(
            pinned.map_type()? as u32,
            pinned.key_size(),
            pinned.value_size(),
            pinned.max_entries(),
            pinned.map_flags(),
        );
        let wanted = layout(
            ours.map_type(),
            ours.key_size(),
            ours.value_size(),
            ours.max_entries(),
            ours.map_flags(),
        );
        if theirs != wanted {
            bail!(
                "the pinned map {} has another layout ({theirs}) than this relay's ({wanted}); \
                 the pinned data path stays as it is (backend ports stay dropped): \
                 `relay detach`, then start again, to replace it",
                path.display()
            );
        }
    }
    Ok(())
}

/// Removes the pins of maps this version no longer uses. Programs still attached that use them
/// keep them (a pin is one reference among others) until this relay's programs replace them.
fn retire_old_pins(pin_dir: &Path) -> anyhow::Result<()> {
    for name in RETIRED_MAPS {
        let path = pin_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("remove the retired pin {}", path.display()))?;
            info!(pin = %path.display(), "pin of a map earlier versions used removed");
        }
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    Ok(p.try_into()?)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there, as systemd would, and creates the
/// pin directory.
pub fn prepare_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        crate::sys::mount_bpffs(root)?;
        info!("mounted bpffs on /sys/fs/bpf");
        if crate::sys::in_private_mount_namespace() {
            // `ip netns exec` and containers give a private mount namespace: this bpffs, and
            // the pins in it, vanish with the relay, and so does the drop of the backend ports.
            warn!(
                "bpffs was mounted in a PRIVATE mount namespace (not its parent's): the pinned data \
                 path will NOT survive this relay, so backend ports open the moment it stops \
                 (fail open). Start relay in the host's mount namespace (systemd unit, or \
                 `nsenter --net=/run/netns/NAME relay run ...` instead of `ip netns exec`)"
            );
        }
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("create pin directory {}", pin_dir.display()))
}

/// Whether a pinned link failed because its interface is gone (`ENOLINK`): deleted, maybe
/// created again under the same name, while the relay was down.
fn severed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOLINK))
    })
}

fn keep_link(interface: &str, pin: &Path) -> String {
    format!(
        "the pinned link {} on {interface} does not take this relay's program; it stays attached \
         (backend ports stay dropped): `relay detach`, then start again, to replace it",
        pin.display()
    )
}

fn is_bpffs(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                f.next();
                let (Some(target), Some(fstype)) = (f.next(), f.next()) else {
                    return false;
                };
                Path::new(target) == path && fstype == "bpf"
            })
        })
        .unwrap_or(false)
}

// IPV6_TRANSPARENT, which nix defines for IPv4 only (`IpTransparent`).
sockopt_impl!(
    Ipv6Transparent,
    Both,
    libc::SOL_IPV6,
    libc::IPV6_TRANSPARENT,
    bool
);

/// A listener for steered connections: `IP_TRANSPARENT`, so it may accept connections whose
/// destination is not a local address and answer from that address. Bound to loopback on an
/// ephemeral port: `bpf_sk_assign` delivers to it whatever its address, and nobody can reach
/// it directly from outside.
pub fn transparent_listener(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv4() {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpTransparent, &true)
    } else {
        s.set_only_v6(true)?;
        nix::sys::socket::setsockopt(&s, Ipv6Transparent, &true)
    }
    .context("IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The policy routing that delivers marked (steered) packets locally.
pub struct Routing {
    pub table: u32,
}

impl Routing {
    fn rule_spec(&self) -> String {
        format!(
            "fwmark {STEER_MARK:#x}/{STEER_MARK_MASK:#x} lookup {}",
            self.table
        )
    }

    /// `ip <family> rule <verb> <our rule>`.
    fn rule(&self, family: &str, verb: &str) -> anyhow::Result<String> {
        let mut args = vec![family.to_string(), "rule".into(), verb.into()];
        args.extend(self.rule_spec().split(' ').map(String::from));
        ip(&args)
    }

    /// `ip <family> route <verb> local <any> dev lo table <table>`.
    fn route(&self, family: &str, verb: &str) -> anyhow::Result<String> {
        let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
        ip(&[
            family,
            "route",
            verb,
            "local",
            any,
            "dev",
            "lo",
            "table",
            &self.table.to_string(),
        ])
    }

    /// Adds the rule and the `local` routes for IPv4 and IPv6, unless present.
    pub fn install(&self) -> anyhow::Result<()> {
        for family in ["-4", "-6"] {
            if self.rule(family, "list")?.trim().is_empty() {
                self.rule(family, "add")?;
            }
            self.route(family, "replace")?;
        }
        Ok(())
    }

    /// Removes exactly what `install` adds; returns what was removed.
    pub fn remove(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for family in ["-4", "-6"] {
            while self
                .rule(family, "list")
                .is_ok_and(|o| !o.trim().is_empty())
            {
                if self.rule(family, "del").is_err() {
                    break;
                }
                removed.push(format!("ip {family} rule {}", self.rule_spec()));
            }
            if self.route(family, "del").is_ok() {
                let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
                removed.push(format!(
                    "ip {family} route local {any} table {}",
                    self.table
                ));
            }
        }
        removed
    }
}

pub fn ip<S: AsRef<str>>(args: &[S]) -> anyhow::Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("ip")
        .args(&args)
        .output()
        .context("run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every link and map pinned in `pin_dir` (detaching the programs), the directory, and
/// the routing. Returns what was removed.
pub fn detach(dp: &config::Datapath) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    if dp.pin_path.exists() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dp.pin_path)
            .with_context(|| format!("read {}", dp.pin_path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        // Links first: the programs stop before their maps go.
        entries.sort_by_key(|p| !is_link_pin(p));
        for p in entries {
            std::fs::remove_file(&p).with_context(|| format!("unpin {}", p.display()))?;
            removed.push(p.display().to_string());
        }
        std::fs::remove_dir(&dp.pin_path)
            .with_context(|| format!("remove {}", dp.pin_path.display()))?;
        removed.push(dp.pin_path.display().to_string());
    }
    removed.extend(
        Routing {
            table: dp.route_table,
        }
        .remove(),
    );
    Ok(removed)
}

fn is_link_pin(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("xdp_") || n.starts_with("tc_"))
}

/// XDP attachments recorded by the pinned links' names: `xdp_<mode>_<interface>`.
pub fn attachments(pin_dir: &Path) -> Vec<Attachment> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut out: Vec<Attachment> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("xdp_")?;
            let (mode, interface) = rest.split_once('_')?;
            Some(Attachment {
                interface: interface.to_string(),
                xdp_mode: mode.to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_object_has_the_programs_and_maps() {
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("embedded eBPF object parses");
        for prog in ["relay_xdp", "relay_tc"] {
            assert!(
                obj.programs.contains_key(prog),
                "programs: {:?}",
                obj.programs.keys()
            );
        }
        for map in super::MAP_NAMES {
            assert!(obj.maps.contains_key(map), "maps: {:?}", obj.maps.keys());
        }
    }

    #[test]
    fn names_round_trip_and_truncate() {
        let n = super::encode_name("shop");
        assert_eq!(super::decode_name(&n).as_deref(), Some("shop"));
        assert_eq!(super::decode_name(&super::empty_name()), None);
        let long = "x".repeat(100);
        assert_eq!(
            super::decode_name(&super::encode_name(&long))
                .unwrap()
                .len(),
            64
        );
    }
}
