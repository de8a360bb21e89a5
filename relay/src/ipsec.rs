//! `outbound.level = "ipsec"`: the path from the gateway to a backend protected by IPsec ESP,
//! keyed by strongSwan's charon, which the supervisor drives over VICI.
//!
//! For each such service the supervisor loads a connection into charon (the gateway's
//! certificate and key, the backend's CA and identity, traffic selectors narrowed to TCP from
//! the gateway to the backend's port, ESP with AES-GCM), brings its SA up and keeps it up. The
//! worker connects to the backend with an ordinary socket, in clear: the kernel routes the
//! packets through the SA. Two things keep a byte from ever leaving in clear:
//! - the worker forwards a connection only while the supervisor reports the SA up
//!   ([`PathSet`]), and otherwise resets the client, counted as `ipsec_unavailable`;
//! - between the report and the packet, a *fail-closed route* decides: charon routes the
//!   backend into its SA (table 220), and the relay's table after it holds a `prohibit` route
//!   for the backend, so that a packet the SA does not take (charon gone, SA deleted) is
//!   refused by the kernel instead of sent. charon's own IKE packets carry `ike_mark` and skip
//!   the relay's table.
//!
//! The state comes from polling `list-sas` (once a second, and after every change), which
//! also counts rekeys: a CHILD_SA that stays up under a new id was rekeyed.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use futures_util::{StreamExt, pin_mut};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config;

/// The prefix of every connection the relay loads into charon: what it may unload.
const PREFIX: &str = "relay-";
/// How often the SAs' state is read from charon.
const POLL: Duration = Duration::from_secs(1);
/// Waits between attempts to reach charon, or to bring a failed SA up again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- the worker's view

/// Whether the protected path of each `ipsec` service is up; the supervisor sends the whole
/// set after every change. A later generation replaces an earlier one, never the reverse.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathSet {
    pub generation: u64,
    pub paths: Vec<(String, PathState)>,
    /// Inbound `ipsec`: the clients with an SA up, by the traffic selectors charon installed.
    pub peers: Vec<Peer>,
}

/// A client of an inbound `ipsec` service with its CHILD_SA installed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub service: String,
    /// The client's side of the CHILD_SA: what it may send from (`192.0.2.2/32[tcp]`).
    pub ts: Vec<String>,
    /// The IKE identity its certificate proved.
    pub identity: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PathState {
    /// Up toward this backend: a service whose backend changed is not up until its new SA is.
    Up(SocketAddr),
    /// Why not: charon unreachable, the SA refused by the peer, ...
    Down(String),
}

/// The worker's copy of the latest [`PathSet`].
#[derive(Default)]
pub struct Paths {
    latest: RwLock<Latest>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Latest {
    generation: u64,
    paths: HashMap<String, PathState>,
    peers: Vec<Peer>,
}

impl Paths {
    pub fn set(&self, set: PathSet) {
        let mut latest = self.latest.write().unwrap_or_else(|e| e.into_inner());
        if set.generation >= latest.generation {
            *latest = Latest {
                generation: set.generation,
                paths: set.paths.into_iter().collect(),
                peers: set.peers,
            };
            self.changed.notify_waiters();
        }
    }

    /// The IKE identity of the client at `ip` of inbound `ipsec` service `service`: the one
    /// identity whose installed CHILD_SA covers the address. `None` if none does, or if
    /// several identities do (nothing is decided on a guess).
    pub fn peer(&self, service: &str, ip: IpAddr) -> Option<String> {
        let latest = self.latest.read().unwrap_or_else(|e| e.into_inner());
        let mut found = latest
            .peers
            .iter()
            .filter(|p| p.service == service && p.ts.iter().any(|ts| covers(ts, ip)))
            .map(|p| &p.identity);
        let first = found.next()?;
        found.all(|other| other == first).then(|| first.clone())
    }

    /// [`Paths::peer`], waiting up to `limit` for the supervisor to report the client's SA (a
    /// client's first connection often comes right after its SA, before the next report).
    pub async fn wait_peer(&self, service: &str, ip: IpAddr, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if let Some(id) = self.peer(service, ip) {
                return Some(id);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// `Ok` if `service`'s path to `backend` is up; otherwise why it is not. A service the
    /// supervisor has not reported on is down: nothing is forwarded on a guess.
    pub fn check(&self, service: &str, backend: SocketAddr) -> Result<(), String> {
        let latest = self.latest.read().unwrap_or_else(|e| e.into_inner());
        match latest.paths.get(service) {
            Some(PathState::Up(a)) if *a == backend => Ok(()),
            Some(PathState::Up(a)) => Err(format!(
                "its IPsec SA protects {a}, not {backend} (a change under way)"
            )),
            Some(PathState::Down(why)) => Err(why.clone()),
            None => Err("its IPsec SA has not been brought up yet".into()),
        }
    }
}

// ---------------------------------------------------------------- what the supervisor wants

/// The connections the relay keeps loaded in charon, with the files' bytes (already checked
/// by compiling).
#[derive(Clone, Default, PartialEq)]
pub struct Wanted {
    /// `outbound.level = "ipsec"`: the gateway initiates toward the backend.
    pub backends: Vec<Backend>,
    /// `inbound.level = "ipsec"`: clients initiate toward the gateway.
    pub responders: Vec<Responder>,
}

impl Wanted {
    /// The `ipsec` sides of `services`, with their files from `files`.
    pub fn of(services: &[config::Service], files: &crate::tls::Files) -> Wanted {
        let file = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .and_then(|p| files.get(p))
                .cloned()
                .unwrap_or_default()
        };
        let backends = services
            .iter()
            .filter(|s| s.outbound.level == config::Level::Ipsec)
            .map(|s| Backend {
                service: s.name.clone(),
                addr: s.backend_addr(),
                identity: s.outbound.identity.clone().unwrap_or_default(),
                cert: file(&s.outbound.cert),
                key: file(&s.outbound.key),
                ca: file(&s.outbound.ca),
            })
            .collect();
        let responders = services
            .iter()
            .filter(|s| s.inbound.level == config::Level::Ipsec)
            .filter_map(|s| {
                Some(Responder {
                    service: s.name.clone(),
                    listen: s.listen?,
                    cert: file(&s.inbound.cert),
                    key: file(&s.inbound.key),
                    ca: file(&s.inbound.client_ca),
                })
            })
            .collect();
        Wanted {
            backends,
            responders,
        }
    }

    /// Backend addresses that need a fail-closed route.
    pub fn guarded(&self) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = self.backends.iter().map(|b| b.addr.ip()).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// Inbound listeners whose answers may leave only through an SA.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        let mut listens: Vec<SocketAddr> = self.responders.iter().map(|r| r.listen).collect();
        listens.sort();
        listens.dedup();
        listens
    }

    fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.responders.is_empty()
    }

    fn wants(&self, service: &str) -> bool {
        self.backends.iter().any(|b| b.service == service)
            || self.responders.iter().any(|r| r.service == service)
    }
}

/// An inbound `ipsec` service as charon gets it: clients whose certificate `ca` signed may
/// reach its listener over ESP.
#[derive(Clone, PartialEq)]
pub struct Responder {
    pub service: String,
    pub listen: SocketAddr,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl Responder {
    fn conn_name(&self) -> String {
        format!("{PREFIX}in-{}", self.service)
    }
}

/// An outbound `ipsec` service as charon gets it.
#[derive(Clone, PartialEq)]
pub struct Backend {
    pub service: String,
    pub addr: SocketAddr,
    pub identity: String,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl Backend {
    fn conn_name(&self) -> String {
        format!("{PREFIX}out-{}", self.service)
    }
}

/// What `relay status` and the metrics show of one service's SA.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SaInfo {
    pub up: bool,
    /// The backend the SA protects.
    #[serde(default)]
    pub backend: Option<SocketAddr>,
    /// The identity the backend proved (while up) or must prove.
    pub identity: String,
    /// Unix seconds the CHILD_SA was installed, while up.
    pub since: Option<u64>,
    pub initiations: u64,
    pub failures: u64,
    pub rekeys: u64,
    /// Why the path is down, while it is.
    pub problem: Option<String>,
}

/// What `relay status` shows of an inbound `ipsec` service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientsInfo {
    /// Whether charon holds the service's responder connection.
    pub loaded: bool,
    /// Clients with their CHILD_SA installed, by identity.
    pub clients: Vec<String>,
    pub problem: Option<String>,
}

// ---------------------------------------------------------------- the supervisor's side

/// The task that keeps the SAs of the `ipsec` services up, and what it reports.
pub struct Manager {
    wanted: watch::Sender<Wanted>,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    generation: u64,
    /// Outbound services.
    infos: BTreeMap<String, SaInfo>,
    /// Inbound services.
    clients: BTreeMap<String, ClientsInfo>,
    peers: Vec<Peer>,
}

impl Manager {
    /// Starts the task; every change of a path's state reaches `changed` as a new [`PathSet`].
    pub fn new(settings: config::Ipsec, changed: mpsc::UnboundedSender<PathSet>) -> Manager {
        let (wanted, wanted_rx) = watch::channel(Wanted::default());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = Task {
            settings,
            wanted: wanted_rx,
            shared: Arc::clone(&shared),
            changed,
            guard: (Vec::new(), Vec::new()),
            guard_error: None,
            held: Default::default(),
            retry: HashMap::new(),
            children: HashMap::new(),
            keys: HashMap::new(),
            loaded: HashMap::new(),
        };
        tokio::spawn(task.run());
        Manager { wanted, shared }
    }

    /// The `ipsec` services in force now.
    pub fn set(&self, wanted: Wanted) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    /// The paths' state now, for a worker that just started.
    pub fn paths(&self) -> PathSet {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.path_set()
    }

    pub fn infos(&self) -> BTreeMap<String, SaInfo> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.infos.clone()
    }

    pub fn clients(&self) -> BTreeMap<String, ClientsInfo> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.clients.clone()
    }
}

impl Shared {
    fn path_set(&self) -> PathSet {
        PathSet {
            generation: self.generation,
            paths: self
                .infos
                .iter()
                .map(|(name, i)| {
                    let state = match (i.up, i.backend) {
                        (true, Some(backend)) => PathState::Up(backend),
                        _ => PathState::Down(i.problem.clone().unwrap_or_else(|| "no SA".into())),
                    };
                    (name.clone(), state)
                })
                .collect(),
            peers: self.peers.clone(),
        }
    }
}

struct Task {
    settings: config::Ipsec,
    wanted: watch::Receiver<Wanted>,
    shared: Arc<Mutex<Shared>>,
    changed: mpsc::UnboundedSender<PathSet>,
    /// Backend addresses with a fail-closed route, and listeners whose answers have one, now.
    guard: (Vec<IpAddr>, Vec<SocketAddr>),
    /// Why the fail-closed routing could not be installed: every outbound path is down then.
    guard_error: Option<String>,
    /// When a failed service may be tried again (loaded, initiated), and the wait after that.
    retry: HashMap<String, (Instant, Duration)>,
    /// The CHILD_SA id each service's path had when last seen up.
    children: HashMap<String, String>,
    /// The id charon gave each connection's private key.
    keys: HashMap<String, String>,
    /// What charon holds, as loaded in this VICI session: by connection name, the key and
    /// the `load-conn` message.
    loaded: HashMap<String, (Vec<u8>, Message)>,
    /// Connections charon held when this session began, loaded by an earlier session or
    /// relay: what they were loaded with is unknown, so they count as changed.
    held: std::collections::HashSet<String>,
}

/// How long one round of VICI requests (load, list) may take before charon counts as hung.
const VICI_TIMEOUT: Duration = Duration::from_secs(15);

impl Task {
    async fn run(mut self) {
        let mut wait = RETRY_FIRST;
        loop {
            self.guard_routes();
            let problem = match rsvici::unix::connect(&self.settings.vici).await {
                Ok(client) => {
                    wait = RETRY_FIRST;
                    info!(vici = %self.settings.vici.display(), "connected to charon");
                    match self.session(client).await {
                        Ok(()) => return,
                        Err(e) => format!("lost charon's VICI connection: {e:#}"),
                    }
                }
                Err(e) => format!(
                    "cannot reach charon at {}: {e}",
                    self.settings.vici.display()
                ),
            };
            self.loaded.clear();
            self.keys.clear();
            self.all_down(&problem);
            if self.wanted.borrow().is_empty() {
                // Nothing needs charon: wait for a service that does.
                if self.wanted.changed().await.is_err() {
                    return;
                }
                continue;
            }
            warn!("ipsec: {problem}; ipsec services refuse connections until it is back");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = self.wanted.changed() => if r.is_err() { return },
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// One VICI session: loads what is wanted and keeps the SAs up until the connection
    /// breaks or charon stops answering (`Err`), or the manager is dropped (`Ok`).
    async fn session(&mut self, mut client: rsvici::Client) -> anyhow::Result<()> {
        let started = tokio::time::timeout(VICI_TIMEOUT, async {
            check_backend(&mut client).await?;
            self.unload_strays(&mut client).await
        });
        started.await.context("charon did not answer")??;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wanted = self.wanted.borrow_and_update().clone();
            self.guard_routes();
            let round = tokio::time::timeout(VICI_TIMEOUT, async {
                self.load(&mut client, &wanted).await?;
                list_sas(&mut client).await
            });
            let sas = round.await.context("charon did not answer")??;
            self.update(&wanted, &sas);
            for b in &wanted.backends {
                let up = self.shared().infos.get(&b.service).is_some_and(|i| i.up);
                if !up && self.due(&b.service) && self.guard_error.is_none() {
                    let limit = self.settings.initiate_timeout + VICI_TIMEOUT;
                    tokio::time::timeout(limit, self.initiate(&mut client, b))
                        .await
                        .context("charon did not answer an initiate")??;
                }
            }
            tokio::select! {
                _ = tick.tick() => {}
                r = self.wanted.changed() => if r.is_err() { return Ok(()) },
            }
        }
    }

    fn due(&self, service: &str) -> bool {
        self.retry
            .get(service)
            .is_none_or(|(at, _)| Instant::now() >= *at)
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports the outbound `infos`, and the inbound `clients` and `peers` when given, to the
    /// worker if a path changed state.
    fn publish(
        &self,
        infos: BTreeMap<String, SaInfo>,
        inbound: Option<(BTreeMap<String, ClientsInfo>, Vec<Peer>)>,
    ) {
        let mut shared = self.shared();
        type State = Vec<(String, bool, Option<SocketAddr>, Option<String>)>;
        let state = |i: &BTreeMap<String, SaInfo>| -> State {
            i.iter()
                .map(|(n, i)| (n.clone(), i.up, i.backend, i.problem.clone()))
                .collect()
        };
        let mut changed = state(&shared.infos) != state(&infos);
        shared.infos = infos;
        if let Some((clients, peers)) = inbound {
            shared.clients = clients;
            if peers != shared.peers {
                shared.peers = peers;
                changed = true;
            }
        }
        if changed {
            shared.generation += 1;
            let _ = self.changed.send(shared.path_set());
        }
    }

    fn all_down(&mut self, problem: &str) {
        let wanted = self.wanted.borrow().clone();
        let mut infos = self.shared().infos.clone();
        infos.retain(|name, _| wanted.backends.iter().any(|b| &b.service == name));
        for b in &wanted.backends {
            let info = infos.entry(b.service.clone()).or_default();
            info.backend = Some(b.addr);
            info.identity = b.identity.clone();
            info.up = false;
            info.since = None;
            info.problem = Some(problem.to_string());
        }
        let clients = wanted
            .responders
            .iter()
            .map(|r| {
                let info = ClientsInfo {
                    problem: Some(problem.to_string()),
                    ..ClientsInfo::default()
                };
                (r.service.clone(), info)
            })
            .collect();
        self.children.clear();
        self.publish(infos, Some((clients, Vec::new())));
    }

    /// Keeps the fail-closed routing for exactly the wanted backends and listeners; a failure
    /// takes every outbound path down (`guard_error`).
    fn guard_routes(&mut self) {
        let wanted = self.wanted.borrow().clone();
        let next = (wanted.guarded(), wanted.listeners());
        if next == self.guard && self.guard_error.is_none() {
            return;
        }
        let guard = Guard::new(&self.settings);
        if let Err(e) = guard.install(&next.0, &next.1) {
            let e = format!("the fail-closed routes could not be installed: {e:#}");
            warn!("ipsec: {e}; ipsec services refuse connections");
            self.guard_error = Some(e);
            return;
        }
        self.guard_error = None;
        for gone in self.guard.0.iter().filter(|a| !next.0.contains(a)) {
            if let Err(e) = guard.remove_route(*gone) {
                warn!("ipsec: fail-closed route for {gone} not removed: {e:#}");
            }
        }
        for gone in self.guard.1.iter().filter(|l| !next.1.contains(l)) {
            if let Err(e) = guard.remove_listener(*gone) {
                warn!("ipsec: fail-closed rule for {gone} not removed: {e:#}");
            }
        }
        self.guard = next;
    }

    /// Unloads connections an earlier relay left in charon that no service wants now.
    async fn unload_strays(&mut self, client: &mut rsvici::Client) -> anyhow::Result<()> {
        let conns = client.stream_request::<(), HashMap<String, serde::de::IgnoredAny>>(
            "list-conns",
            "list-conn",
            (),
        );
        pin_mut!(conns);
        let mut names = Vec::new();
        while let Some(c) = conns.next().await {
            names.extend(c.context("list-conns")?.into_keys());
        }
        let wanted = self.wanted.borrow().clone();
        self.held.clear();
        for name in names.into_iter().filter(|n| n.starts_with(PREFIX)) {
            let wanted_now = wanted.backends.iter().any(|b| b.conn_name() == name)
                || wanted.responders.iter().any(|r| r.conn_name() == name);
            if wanted_now {
                self.held.insert(name);
            } else {
                unload_conn(client, &name).await?;
            }
        }
        Ok(())
    }

    /// Brings charon's connections in line with `wanted`. A connection that changed loses
    /// its SAs: they were authenticated under the old settings (an identity or CA since
    /// removed, say).
    async fn load(&mut self, client: &mut rsvici::Client, wanted: &Wanted) -> anyhow::Result<()> {
        // (connection name, service, its key, the load-conn message)
        let items: Vec<(String, &str, &[u8], Message)> = wanted
            .backends
            .iter()
            .map(|b| (b.conn_name(), &*b.service, &*b.key, conn(b, &self.settings)))
            .chain(
                wanted
                    .responders
                    .iter()
                    .map(|r| (r.conn_name(), &*r.service, &*r.key, responder_conn(r))),
            )
            .collect();
        let gone: Vec<String> = self
            .loaded
            .keys()
            .filter(|name| !items.iter().any(|(n, ..)| n == *name))
            .cloned()
            .collect();
        for name in gone {
            self.loaded.remove(&name);
            unload_conn(client, &name).await?;
            self.release_key(client, &name).await;
            info!(connection = %name, "ipsec: connection unloaded");
        }
        self.retry.retain(|service, _| wanted.wants(service));
        for (name, service, key, message) in items {
            if self
                .loaded
                .get(&name)
                .is_some_and(|(k, m)| k == key && *m == message)
            {
                continue;
            }
            if !self.due(service) {
                continue;
            }
            let changed = self.loaded.remove(&name).is_some() | self.held.remove(&name);
            if changed {
                // Its SAs were authenticated under the settings being replaced: no connection
                // is forwarded over them from now on.
                self.settings_changed(service);
            }
            self.release_key(client, &name).await;
            let refused = match load_key(client, key).await? {
                Ok(key_id) => {
                    self.keys.insert(name.clone(), key_id);
                    let answer: Answer = client
                        .request("load-conn", &message)
                        .await
                        .with_context(|| format!("{name}: load-conn"))?;
                    answer
                        .ok()
                        .err()
                        .map(|e| format!("charon refused the connection: {e}"))
                }
                Err(e) => Some(format!("charon refused the key: {e}")),
            };
            if let Some(why) = refused {
                // What charon refuses cannot come up; the service stays down with why, and
                // is tried again after a backoff. The version charon still holds goes, with
                // its SAs.
                warn!(service = %service, "ipsec: {why}");
                if changed {
                    unload_conn(client, &name).await?;
                    terminate_all(client, &name).await?;
                }
                self.fail(service, why);
                continue;
            }
            if changed {
                terminate_all(client, &name).await?;
            }
            info!(service = %service, connection = %name, "ipsec: connection loaded");
            self.loaded.insert(name, (key.to_vec(), message));
            // A changed connection is brought up at once.
            self.retry.remove(service);
        }
        Ok(())
    }

    /// A connection's settings changed: its service counts as down until its SA is up anew.
    fn settings_changed(&mut self, service: &str) {
        let mut infos = self.shared().infos.clone();
        if let Some(info) = infos.get_mut(service) {
            info.up = false;
            info.since = None;
            info.problem = Some("its settings changed; bringing its SA up anew".into());
        }
        self.children.remove(service);
        let wanted = self.wanted.borrow().clone();
        let inbound = wanted
            .responders
            .iter()
            .any(|r| r.service == service)
            .then(|| {
                let shared = self.shared();
                let peers = shared
                    .peers
                    .iter()
                    .filter(|p| p.service != service)
                    .cloned()
                    .collect();
                (shared.clients.clone(), peers)
            });
        self.publish(infos, inbound);
    }

    /// Unloads the key of connection `name`, unless another connection uses the same key
    /// (charon holds one copy of equal keys, under one id).
    async fn release_key(&mut self, client: &mut rsvici::Client, name: &str) {
        if let Some(id) = self.keys.remove(name)
            && !self.keys.values().any(|other| *other == id)
        {
            unload_key(client, &id).await;
        }
    }

    /// The wanted services' state from `sas`, counting rekeys, and the inbound services'
    /// clients.
    fn update(&mut self, wanted: &Wanted, sas: &[IkeSa]) {
        let mut infos = self.shared().infos.clone();
        infos.retain(|name, _| wanted.backends.iter().any(|b| &b.service == name));
        // charon may set up a CHILD_SA inside another connection's IKE_SA with the same peer
        // (`reuse_ikesa`): the child's name is what counts. During a rekey the old and the
        // new SA both carry traffic.
        let installed = |name: &str| {
            let mut found: Vec<(&IkeSa, &ChildSa)> = sas
                .iter()
                .filter(|ike| matches!(ike.state.as_str(), "ESTABLISHED" | "REKEYING"))
                .flat_map(|ike| {
                    ike.children
                        .values()
                        .filter(|c| {
                            c.name == name
                                && matches!(
                                    c.state.as_str(),
                                    "INSTALLED" | "REKEYING" | "REKEYED" | "UPDATING"
                                )
                        })
                        .map(move |c| (ike, c))
                })
                .collect();
            // The newest installed child first.
            found.sort_by_key(|(_, c)| {
                (
                    std::cmp::Reverse(c.state == "INSTALLED"),
                    std::cmp::Reverse(c.uniqueid.parse::<u64>().unwrap_or(0)),
                )
            });
            found
        };
        for b in &wanted.backends {
            let info = infos.entry(b.service.clone()).or_default();
            info.backend = Some(b.addr);
            info.identity = b.identity.clone();
            // Up only over the connection loaded now, and toward this backend (a reload may
            // have moved it while the old SA lives on).
            let loaded = self.loaded.contains_key(&b.conn_name());
            let up = installed(&b.conn_name())
                .into_iter()
                .find(|(_, c)| loaded && c.remote_ts.iter().any(|ts| covers(ts, b.addr.ip())));
            match (up, &self.guard_error) {
                (Some((ike, c)), None) => {
                    if let Some(id) = ike.remote_id.as_deref() {
                        info.identity = id.to_string();
                    }
                    let previous = self.children.insert(b.service.clone(), c.uniqueid.clone());
                    if info.up && previous.is_some_and(|p| p != c.uniqueid) {
                        info.rekeys += 1;
                        info!(service = %b.service, "ipsec: CHILD_SA rekeyed");
                    }
                    if !info.up {
                        info!(service = %b.service, backend = %b.addr,
                              identity = %info.identity, "ipsec: SA up");
                    }
                    info.up = true;
                    info.problem = None;
                    let installed = c.install_time.unwrap_or(0);
                    info.since = Some(unix_now().saturating_sub(installed));
                    self.retry.remove(&b.service);
                }
                (_, Some(e)) => {
                    info.up = false;
                    info.since = None;
                    info.problem = Some(e.clone());
                }
                (None, None) => {
                    if info.up {
                        warn!(service = %b.service, "ipsec: SA down; bringing it up again");
                        info.problem = Some("the SA went down".into());
                    }
                    self.children.remove(&b.service);
                    info.up = false;
                    info.since = None;
                    if info.problem.is_none() {
                        info.problem = Some("its IPsec SA has not been brought up yet".into());
                    }
                }
            }
        }
        let mut peers = Vec::new();
        let mut clients = self.shared().clients.clone();
        clients.retain(|name, _| wanted.responders.iter().any(|r| &r.service == name));
        for r in &wanted.responders {
            let info = clients.entry(r.service.clone()).or_default();
            info.loaded = self.loaded.contains_key(&r.conn_name());
            if info.loaded {
                info.problem = None;
            }
            info.clients.clear();
            if let Some(e) = &self.guard_error {
                // Without the rule that keeps its answers in the SAs, no client is known.
                info.problem = Some(e.clone());
                continue;
            }
            if !info.loaded {
                continue;
            }
            for (ike, c) in installed(&r.conn_name()) {
                let identity = ike.remote_id.clone().unwrap_or_default();
                info.clients.push(identity.clone());
                peers.push(Peer {
                    service: r.service.clone(),
                    ts: c.remote_ts.clone(),
                    identity,
                });
            }
        }
        self.publish(infos, Some((clients, peers)));
    }

    /// Initiates `b`'s CHILD_SA and waits for the outcome (at most `initiate_timeout`).
    async fn initiate(&mut self, client: &mut rsvici::Client, b: &Backend) -> anyhow::Result<()> {
        if !self.loaded.contains_key(&b.conn_name()) {
            return Ok(());
        }
        if let Some(info) = self.shared().infos.get_mut(&b.service) {
            info.initiations += 1;
        }
        let name = b.conn_name();
        let timeout = self.settings.initiate_timeout;
        let request = Initiate {
            child: name.clone(),
            ike: name,
            timeout: timeout.as_millis() as u64,
            init_limits: false,
            loglevel: 1,
        };
        let stream = client.stream_request::<_, Log>("initiate", "control-log", request);
        pin_mut!(stream);
        // charon's own account of a failure: the last lines before it gave up.
        let mut last: Vec<String> = Vec::new();
        let outcome = loop {
            match stream.next().await {
                Some(Ok(log)) => {
                    if last.len() == 3 {
                        last.remove(0);
                    }
                    last.push(log.msg);
                }
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            }
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(e) if e.is_command_failed() => {
                let why = relevant(&last).unwrap_or_else(|| e.to_string());
                warn!(service = %b.service, backend = %b.addr, identity = %b.identity,
                      "ipsec: SA not established: {why}");
                self.fail(
                    &b.service,
                    format!("no IPsec SA with {}: {why}", b.addr.ip()),
                );
                Ok(())
            }
            Err(e) => Err(e).context("initiate"),
        }
    }

    /// Counts a failure, schedules the next attempt and reports the service down with `why`.
    fn fail(&mut self, service: &str, why: String) {
        let (_, wait) = self
            .retry
            .get(service)
            .copied()
            .unwrap_or((Instant::now(), RETRY_FIRST / 2));
        let wait = (wait * 2).min(RETRY_MAX);
        self.retry
            .insert(service.to_string(), (Instant::now() + wait, wait));
        let wanted = self.wanted.borrow().clone();
        let mut infos = self.shared().infos.clone();
        let mut clients = self.shared().clients.clone();
        if wanted.responders.iter().any(|r| r.service == service) {
            clients.entry(service.to_string()).or_default().problem = Some(why.clone());
        }
        if wanted.backends.iter().any(|b| b.service == service) {
            let info = infos.entry(service.to_string()).or_default();
            info.failures += 1;
            info.up = false;
            info.since = None;
            info.problem = Some(why);
        }
        let peers = self.shared().peers.clone();
        self.publish(infos, Some((clients, peers)));
    }
}

/// Refuses a charon that would carry the relay's traffic through kernel ESP: the fail-closed
/// routes assume kernel-libipsec, which routes every SA's traffic through its TUN device
/// (table 220); kernel-netlink installs no route for a port-narrowed SA, so the relay's
/// prohibit route would refuse the protected traffic too. Not supported yet: say so.
async fn check_backend(client: &mut rsvici::Client) -> anyhow::Result<()> {
    #[derive(Deserialize)]
    struct Stats {
        #[serde(default)]
        plugins: Vec<String>,
    }
    let stats: Stats = client.request("stats", ()).await.context("stats")?;
    if !stats.plugins.iter().any(|p| p == "kernel-libipsec") {
        bail!(
            "charon runs without the kernel-libipsec plugin; this relay's fail-closed routing \
             supports charon with kernel-libipsec only (see README, IPsec)"
        );
    }
    Ok(())
}

/// Ends every IKE_SA of connection `name` or carrying one of its CHILD_SAs (charon may have
/// put it in another connection's IKE_SA), waiting for charon to have done so: a new CHILD_SA
/// must not be set up inside an IKE_SA authenticated under replaced settings. Other services'
/// CHILD_SAs in a shared IKE_SA go too; they are brought up again at the next round.
async fn terminate_all(client: &mut rsvici::Client, name: &str) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Terminate<'a> {
        #[serde(rename = "ike-id")]
        ike_id: &'a str,
        timeout: i64,
    }
    let sas = list_sas(client).await?;
    for ike in sas
        .iter()
        .filter(|ike| ike.name == name || ike.children.values().any(|c| c.name == name))
    {
        let _ = client
            .request::<_, serde::de::IgnoredAny>(
                "terminate",
                Terminate {
                    ike_id: &ike.uniqueid,
                    timeout: 5000,
                },
            )
            .await;
    }
    Ok(())
}

/// Ends the SAs of connection `name` (without waiting for the peer).
async fn terminate(client: &mut rsvici::Client, name: &str) {
    #[derive(Serialize)]
    struct Terminate<'a> {
        child: &'a str,
        timeout: i64,
    }
    let _ = client
        .request::<_, serde::de::IgnoredAny>(
            "terminate",
            Terminate {
                child: name,
                timeout: -1,
            },
        )
        .await;
}

/// Of charon's last log lines, the one that says why (an authentication or proposal error
/// rather than "establishing CHILD_SA failed").
fn relevant(lines: &[String]) -> Option<String> {
    let telling = |l: &&String| {
        let l = l.to_ascii_lowercase();
        [
            "constraint",
            "authentication",
            "no trusted",
            "no proposal",
            "not responding",
            "identity",
            "received",
            "failed",
            "retransmit",
        ]
        .iter()
        .any(|w| l.contains(w))
    };
    lines
        .iter()
        .rev()
        .find(|l| telling(l) && !l.contains("initiate failed") && !l.contains("establishing"))
        .or(lines.last())
        .cloned()
}

/// Whether traffic selector `ts` (`192.0.2.2/32[tcp]`, `2001:db8::/64`) covers `ip`.
fn covers(ts: &str, ip: IpAddr) -> bool {
    let net = ts.split('[').next().unwrap_or(ts).trim();
    let (addr, len) = match net.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (net, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------- VICI messages

/// A command's answer.
#[derive(Deserialize)]
struct Answer {
    success: bool,
    errmsg: Option<String>,
}

impl Answer {
    fn ok(self) -> Result<(), String> {
        if self.success {
            Ok(())
        } else {
            Err(self.errmsg.unwrap_or_else(|| "(no reason given)".into()))
        }
    }
}

#[derive(Serialize)]
struct LoadKey<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: &'a str,
}

#[derive(Deserialize)]
struct KeyAnswer {
    success: bool,
    errmsg: Option<String>,
    id: Option<String>,
}

/// Loads a private key: its id, or (inner `Err`) why charon refused it; the outer `Err` is a
/// broken VICI connection.
async fn load_key(
    client: &mut rsvici::Client,
    pem: &[u8],
) -> anyhow::Result<Result<String, String>> {
    let Ok(data) = std::str::from_utf8(pem) else {
        return Ok(Err("the key is not PEM".into()));
    };
    let answer: KeyAnswer = client
        .request("load-key", LoadKey { kind: "any", data })
        .await
        .context("load-key")?;
    Ok(match (answer.success, answer.id) {
        (true, Some(id)) => Ok(id),
        (true, None) => Err("charon named no key id".into()),
        (false, _) => Err(answer.errmsg.unwrap_or_else(|| "(no reason given)".into())),
    })
}

async fn unload_key(client: &mut rsvici::Client, id: &str) {
    #[derive(Serialize)]
    struct Id<'a> {
        id: &'a str,
    }
    // A key left loaded is harmless; a failure here changes nothing the relay relies on.
    let _ = client.request::<_, Answer>("unload-key", Id { id }).await;
}

async fn unload_conn(client: &mut rsvici::Client, name: &str) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Name<'a> {
        name: &'a str,
    }
    let answer: Answer = client
        .request("unload-conn", Name { name })
        .await
        .with_context(|| format!("unload-conn {name}"))?;
    if let Err(e) = answer.ok() {
        warn!("ipsec: charon kept connection {name}: {e}");
    }
    // Unloading leaves established SAs; they go too. The CHILD_SA is named after the
    // connection, its IKE_SA perhaps another's (`reuse_ikesa`).
    terminate(client, name).await;
    Ok(())
}

#[derive(Serialize)]
struct Initiate {
    child: String,
    ike: String,
    timeout: u64,
    #[serde(rename = "init-limits")]
    init_limits: bool,
    loglevel: i32,
}

#[derive(Deserialize)]
struct Log {
    msg: String,
}

/// `load-conn` for `b`: IKEv2 with certificates both ways, one CHILD_SA narrowed to TCP from
/// this gateway to the backend's port, ESP with AES-GCM, trapped so that a packet before the
/// SA is up waits for it inside charon rather than leaving.
fn conn(b: &Backend, settings: &config::Ipsec) -> HashMap<String, Conn> {
    let name = b.conn_name();
    let ip = b.addr.ip();
    let host = match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    };
    let pem = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let child = Child {
        local_ts: vec!["dynamic[tcp]".into()],
        remote_ts: vec![format!("{host}[tcp/{}]", b.addr.port())],
        esp_proposals: vec!["aes256gcm16-x25519".into(), "aes256gcm16".into()],
        start_action: "trap",
        close_action: "trap",
        dpd_action: "trap",
        mode: "tunnel",
    };
    let conn = Conn {
        version: 2,
        local_addrs: Vec::new(),
        remote_addrs: vec![ip.to_string()],
        proposals: vec![
            "aes256gcm16-prfsha384-x25519".into(),
            "aes256gcm16-prfsha256-ecp256".into(),
        ],
        dpd_delay: settings.initiate_timeout.as_secs().clamp(5, 30),
        local: Auth {
            auth: "pubkey",
            certs: vec![pem(&b.cert)],
            id: None,
            cacerts: Vec::new(),
        },
        remote: Auth {
            auth: "pubkey",
            certs: Vec::new(),
            id: Some(b.identity.clone()),
            cacerts: vec![pem(&b.ca)],
        },
        children: HashMap::from([(name.clone(), child)]),
    };
    HashMap::from([(name, conn)])
}

/// `load-conn` for an inbound service: any client whose certificate `ca` signed may set up a
/// CHILD_SA for TCP from its own address to the service's listener; who may pass is decided
/// per connection by `allow` against the identity it proved.
fn responder_conn(r: &Responder) -> HashMap<String, Conn> {
    let name = r.conn_name();
    let ip = r.listen.ip();
    let local = if ip.is_unspecified() {
        "dynamic".to_string()
    } else {
        match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        }
    };
    let pem = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let child = Child {
        local_ts: vec![format!("{local}[tcp/{}]", r.listen.port())],
        remote_ts: vec!["dynamic[tcp]".into()],
        esp_proposals: vec!["aes256gcm16-x25519".into(), "aes256gcm16".into()],
        start_action: "none",
        close_action: "none",
        dpd_action: "clear",
        mode: "tunnel",
    };
    let conn = Conn {
        version: 2,
        local_addrs: if ip.is_unspecified() {
            Vec::new()
        } else {
            vec![ip.to_string()]
        },
        remote_addrs: Vec::new(),
        proposals: vec![
            "aes256gcm16-prfsha384-x25519".into(),
            "aes256gcm16-prfsha256-ecp256".into(),
        ],
        dpd_delay: 30,
        local: Auth {
            auth: "pubkey",
            certs: vec![pem(&r.cert)],
            id: None,
            cacerts: Vec::new(),
        },
        remote: Auth {
            auth: "pubkey",
            certs: Vec::new(),
            id: None,
            cacerts: vec![pem(&r.ca)],
        },
        children: HashMap::from([(name.clone(), child)]),
    };
    HashMap::from([(name, conn)])
}

/// A `load-conn` request: one connection by its name.
type Message = HashMap<String, Conn>;

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Conn {
    version: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    local_addrs: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remote_addrs: Vec<String>,
    proposals: Vec<String>,
    dpd_delay: u64,
    local: Auth,
    remote: Auth,
    children: HashMap<String, Child>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Auth {
    auth: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    certs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cacerts: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Child {
    local_ts: Vec<String>,
    remote_ts: Vec<String>,
    esp_proposals: Vec<String>,
    start_action: &'static str,
    close_action: &'static str,
    dpd_action: &'static str,
    mode: &'static str,
}

/// An IKE_SA as `list-sas` tells it (the fields the relay reads).
#[derive(Debug, Deserialize)]
struct IkeSa {
    /// Its connection's name (the key `list-sas` gives it under).
    #[serde(skip)]
    name: String,
    uniqueid: String,
    state: String,
    #[serde(rename = "remote-id")]
    remote_id: Option<String>,
    #[serde(rename = "child-sas", default)]
    children: HashMap<String, ChildSa>,
}

#[derive(Debug, Deserialize)]
struct ChildSa {
    name: String,
    uniqueid: String,
    state: String,
    /// Seconds since the CHILD_SA was installed.
    #[serde(rename = "install-time")]
    install_time: Option<u64>,
    /// The peer's side (`192.0.2.2/32[tcp]`).
    #[serde(rename = "remote-ts", default)]
    remote_ts: Vec<String>,
}

/// Every IKE_SA charon has.
async fn list_sas(client: &mut rsvici::Client) -> anyhow::Result<Vec<IkeSa>> {
    let stream = client.stream_request::<(), HashMap<String, IkeSa>>("list-sas", "list-sa", ());
    pin_mut!(stream);
    let mut sas = Vec::new();
    while let Some(sa) = stream.next().await {
        sas.extend(sa.context("list-sas")?.into_iter().map(|(name, mut ike)| {
            ike.name = name;
            ike
        }));
    }
    Ok(sas)
}

// ---------------------------------------------------------------- the fail-closed routes

/// The fail-closed routing, consulted after charon's table 220 (which routes what an SA
/// carries into it), for the gateway's own packets (`iif lo`) only; charon's IKE packets
/// (marked) take the main table before it:
/// - priority `table`: marked packets → main;
/// - priority `table + 1`: → `table`, a `prohibit` route per outbound `ipsec` backend;
/// - priority `table + 2`: TCP from an inbound `ipsec` listener → `table + 1`, which holds
///   only `prohibit` defaults: the answers to a client go through its SA or nowhere.
struct Guard {
    table: u32,
    mark: u32,
}

impl Guard {
    fn new(settings: &config::Ipsec) -> Guard {
        Guard {
            table: settings.table,
            mark: settings.ike_mark,
        }
    }

    fn base_rules(&self) -> [Vec<String>; 2] {
        [
            strings(&[
                "priority",
                &self.table.to_string(),
                "fwmark",
                &format!("{:#x}", self.mark),
                "lookup",
                "main",
            ]),
            strings(&[
                "priority",
                &(self.table + 1).to_string(),
                "iif",
                "lo",
                "lookup",
                &self.table.to_string(),
            ]),
        ]
    }

    fn listener_rule(&self, listen: SocketAddr) -> Vec<String> {
        strings(&[
            "priority",
            &(self.table + 2).to_string(),
            "iif",
            "lo",
            "from",
            &listen.ip().to_string(),
            "ipproto",
            "tcp",
            "sport",
            &listen.port().to_string(),
            "lookup",
            &(self.table + 1).to_string(),
        ])
    }

    fn family(ip: IpAddr) -> &'static str {
        if ip.is_ipv4() { "-4" } else { "-6" }
    }

    /// `ip <family> rule add <rule>` unless it is there.
    fn add_rule(family: &str, rule: &[String]) -> anyhow::Result<()> {
        let mut list = vec![family.to_string(), "rule".into(), "list".into()];
        list.extend(rule.iter().cloned());
        if crate::datapath::ip(&list)?.trim().is_empty() {
            let mut add = vec![family.to_string(), "rule".into(), "add".into()];
            add.extend(rule.iter().cloned());
            crate::datapath::ip(&add)?;
        }
        Ok(())
    }

    fn install(&self, addrs: &[IpAddr], listens: &[SocketAddr]) -> anyhow::Result<()> {
        for family in ["-4", "-6"] {
            for rule in self.base_rules() {
                Self::add_rule(family, &rule)?;
            }
        }
        for addr in addrs {
            crate::datapath::ip(&[
                Self::family(*addr),
                "route",
                "replace",
                "prohibit",
                &addr.to_string(),
                "table",
                &self.table.to_string(),
            ])?;
        }
        if !listens.is_empty() {
            for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
                crate::datapath::ip(&[
                    family,
                    "route",
                    "replace",
                    "prohibit",
                    default,
                    "table",
                    &(self.table + 1).to_string(),
                ])?;
            }
        }
        for listen in listens {
            Self::add_rule(Self::family(listen.ip()), &self.listener_rule(*listen))?;
        }
        Ok(())
    }

    fn remove_route(&self, addr: IpAddr) -> anyhow::Result<()> {
        crate::datapath::ip(&[
            Self::family(addr),
            "route",
            "del",
            "prohibit",
            &addr.to_string(),
            "table",
            &self.table.to_string(),
        ])
        .map(drop)
    }

    fn remove_listener(&self, listen: SocketAddr) -> anyhow::Result<()> {
        let mut del = vec![
            Self::family(listen.ip()).to_string(),
            "rule".into(),
            "del".into(),
        ];
        del.extend(self.listener_rule(listen));
        crate::datapath::ip(&del).map(drop)
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Removes the fail-closed routing `settings` names for these backends and listeners (at a
/// clean stop, or `relay detach`: nothing left behind). Returns what was removed.
pub fn remove_guard(
    settings: &config::Ipsec,
    addrs: &[IpAddr],
    listens: &[SocketAddr],
) -> Vec<String> {
    let guard = Guard::new(settings);
    let mut removed = Vec::new();
    for addr in addrs {
        if guard.remove_route(*addr).is_ok() {
            removed.push(format!("ip route prohibit {addr} table {}", guard.table));
        }
    }
    for listen in listens {
        if guard.remove_listener(*listen).is_ok() {
            removed.push(format!(
                "ip rule {}",
                guard.listener_rule(*listen).join(" ")
            ));
        }
    }
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let table = (guard.table + 1).to_string();
        let del = ["route", "del", "prohibit", default, "table", &table];
        if crate::datapath::ip(&[&[family][..], &del[..]].concat()).is_ok() {
            removed.push(format!(
                "ip {family} route prohibit {default} table {table}"
            ));
        }
    }
    for family in ["-4", "-6"] {
        for rule in guard.base_rules() {
            let mut del = vec![family.to_string(), "rule".into(), "del".into()];
            del.extend(rule.iter().cloned());
            if crate::datapath::ip(&del).is_ok() {
                removed.push(format!("ip {family} rule {}", rule.join(" ")));
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_path_set_wins_and_an_unknown_service_is_down() {
        let paths = Paths::default();
        let db: SocketAddr = "192.0.2.2:5432".parse().unwrap();
        assert!(paths.check("db", db).is_err());
        paths.set(PathSet {
            generation: 2,
            paths: vec![("db".into(), PathState::Up(db))],
            peers: Vec::new(),
        });
        assert_eq!(paths.check("db", db), Ok(()));
        // Up toward another backend is not up toward this one (a reload under way).
        let moved: SocketAddr = "192.0.2.3:5432".parse().unwrap();
        assert!(paths.check("db", moved).is_err());
        // An older set that arrives late changes nothing.
        paths.set(PathSet {
            generation: 1,
            paths: vec![("db".into(), PathState::Down("gone".into()))],
            peers: Vec::new(),
        });
        assert_eq!(paths.check("db", db), Ok(()));
        paths.set(PathSet {
            generation: 3,
            paths: vec![("db".into(), PathState::Down("charon gone".into()))],
            peers: Vec::new(),
        });
        assert_eq!(paths.check("db", db), Err("charon gone".into()));
        assert!(paths.check("other", db).is_err());
    }

    #[test]
    fn the_connection_narrows_the_child_sa_to_the_backend_port() {
        let b = Backend {
            service: "db".into(),
            addr: "192.0.2.2:5432".parse().unwrap(),
            identity: "CN=db.test".into(),
            cert: b"CERT".to_vec(),
            key: b"KEY".to_vec(),
            ca: b"CA".to_vec(),
        };
        let settings: config::Ipsec = toml::from_str("").unwrap();
        let c = &conn(&b, &settings)["relay-out-db"];
        assert_eq!(c.remote_addrs, ["192.0.2.2"]);
        assert_eq!(c.remote.id.as_deref(), Some("CN=db.test"));
        assert_eq!(c.remote.cacerts, ["CA"]);
        let child = &c.children["relay-out-db"];
        assert_eq!(child.remote_ts, ["192.0.2.2/32[tcp/5432]"]);
        assert_eq!(child.local_ts, ["dynamic[tcp]"]);
        assert!(
            child
                .esp_proposals
                .iter()
                .all(|p| p.starts_with("aes256gcm16"))
        );
        assert_eq!(child.start_action, "trap");
    }

    #[test]
    fn a_client_is_known_only_by_the_one_identity_whose_sa_covers_it() {
        let paths = Paths::default();
        let peer = |ts: &str, id: &str| Peer {
            service: "app".into(),
            ts: vec![ts.into()],
            identity: id.into(),
        };
        paths.set(PathSet {
            generation: 1,
            paths: Vec::new(),
            peers: vec![
                peer("192.0.2.2/32[tcp]", "client.test"),
                peer("192.0.2.0/24[tcp]", "lan.test"),
                peer("2001:db8:a::/64[tcp]", "v6.test"),
            ],
        });
        let at = |ip: &str| paths.peer("app", ip.parse().unwrap());
        // Two identities cover 192.0.2.2: nothing is decided on a guess.
        assert_eq!(at("192.0.2.2"), None);
        assert_eq!(at("192.0.2.3").as_deref(), Some("lan.test"));
        assert_eq!(at("::ffff:192.0.2.3").as_deref(), Some("lan.test"));
        assert_eq!(at("2001:db8:a::7").as_deref(), Some("v6.test"));
        assert_eq!(at("198.51.100.1"), None);
        assert_eq!(paths.peer("other", "192.0.2.3".parse().unwrap()), None);
    }

    #[test]
    fn the_telling_log_line_is_kept() {
        let lines = [
            "received AUTHENTICATION_FAILED notify error".to_string(),
            "establishing CHILD_SA relay-db{1} failed".to_string(),
        ];
        assert_eq!(
            relevant(&lines).as_deref(),
            Some("received AUTHENTICATION_FAILED notify error")
        );
    }
}
