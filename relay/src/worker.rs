//! The worker: the process that accepts and relays connections.
//!
//! Started by the supervisor (`relay worker`, not for humans) with one end of the handoff
//! channel at a known descriptor. Before anything else it becomes an unprivileged user and
//! enters its sandbox (`sandbox`): from then on it cannot open a file or start a program, and
//! it needs neither. Everything arrives over the channel: the services, the bytes of their
//! certificates and keys (compiled here from those bytes, as the supervisor compiled them), the
//! session ticket keys, and the listening sockets. It can die at any time (crash, `kill -9`,
//! OOM): the supervisor still holds the listeners, so the connections waiting in their accept
//! queues are served by the next worker.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::OwnedFd,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::RelaySection,
    copy::KernelCopy,
    handoff::{Apply, Channel, DebugOp, Envelope, FromWorker, Role, ToWorker},
    metrics::{ServiceMetrics, WorkerMetrics},
    proxy::{self, Route, ServiceRuntime, Services, Shared, Table, Timeouts},
    sandbox, service,
    tickets::{SharedTicketer, TicketKey},
    tls::{self, challenge::Challenges},
};

/// Who the worker runs as, decided by the supervisor (which may read the user database).
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// How the supervisor started this worker.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    pub identity: Option<Identity>,
    /// The kernel copy's maps are at [`crate::sockmap::MAP_FDS`].
    pub kernel_copy: bool,
    pub threads: Option<usize>,
}

/// `relay worker`: drops privileges, enters the sandbox, then serves until told to stop.
pub fn main(start: Start) -> anyhow::Result<()> {
    let Start {
        identity,
        kernel_copy,
        threads,
    } = start;
    let supervisor = nix::unistd::getppid();
    // Tests (debug builds): a worker that dies at every start.
    if cfg!(debug_assertions) && std::env::var_os("RELAY_DEBUG_WORKER_EXITS").is_some() {
        anyhow::bail!("RELAY_DEBUG_WORKER_EXITS is set: exiting at start");
    }
    let channel_fd = Channel::inherited_fd()?;
    // Opened before the sandbox, which refuses the call that asks what they are.
    let pairs = match kernel_copy.then(inherited_maps).transpose() {
        Ok(p) => p,
        Err(e) => {
            warn!("kernel copy unavailable, plain ↔ plain is spliced: {e:#}");
            None
        }
    };
    if let Some(id) = identity {
        crate::sys::become_user(id.uid, id.gid)?;
    }
    // If the supervisor dies without a word, do not linger holding client connections' fate.
    // After the uid change, which clears the parent-death signal.
    crate::sys::terminate_with_parent(supervisor)?;
    // Before the runtime starts a thread: threads inherit the sandbox.
    match sandbox::enter().context("worker sandbox")? {
        sandbox::Enforced::Full => info!("worker sandboxed: no filesystem, system calls limited"),
        sandbox::Enforced::SeccompOnly(why) => warn!(
            "worker sandbox PARTIAL: system calls limited, but the filesystem is not closed \
             ({why})"
        ),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        runtime.worker_threads(n);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("start the worker's runtime")?;
    runtime.block_on(run(channel_fd, pairs))
}

/// The kernel copy's maps, inherited at [`crate::sockmap::MAP_FDS`].
fn inherited_maps() -> anyhow::Result<crate::sockmap::Pairs> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the supervisor placed the two maps at these descriptors before exec (it passes
    // --kernel-copy only then), and nothing else in this process owns them.
    let fds = crate::sockmap::MAP_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    crate::sockmap::Pairs::inherited(fds)
}

async fn run(channel_fd: OwnedFd, pairs: Option<crate::sockmap::Pairs>) -> anyhow::Result<()> {
    let channel = Channel::new(channel_fd).context("handoff channel")?;
    let kernel_copy = match pairs.map(KernelCopy::new).transpose() {
        Ok(k) => k,
        Err(e) => {
            warn!("kernel copy unavailable, plain ↔ plain is spliced: {e}");
            None
        }
    };
    let mut worker: Option<Worker> = None;
    let mut term = signal(SignalKind::terminate())?;
    // Ctrl-C in a terminal reaches the whole process group; stopping is the supervisor's call.
    // Taken apart from the loop below, whose receive must never be given up on mid-message.
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move { while int.recv().await.is_some() {} });
    // Tests (debug builds): the next answer goes out this late.
    let mut stall: Option<Duration> = None;
    loop {
        let msg = tokio::select! {
            m = channel.recv::<ToWorker>() => m,
            _ = term.recv() => { info!("worker: SIGTERM"); break; }
        };
        let (Envelope { id, body }, fds) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                warn!("worker: supervisor gone, stopping");
                break;
            }
            Err(e) => {
                warn!("worker: handoff channel failed ({e}), stopping");
                break;
            }
        };
        // A stall asked for by an earlier message applies to this answer.
        let late = stall.take();
        let answer = match body {
            ToWorker::Apply(apply) => {
                let w = worker
                    .get_or_insert_with(|| Worker::new(&apply.relay, &apply.tickets, kernel_copy));
                let error = w.apply(apply, fds).err().map(|e| format!("{e:#}"));
                if let Some(e) = &error {
                    warn!("worker: configuration not applied, previous one kept: {e}");
                }
                Some(FromWorker::Applied { error })
            }
            ToWorker::Challenges(answers) => {
                let error = match &worker {
                    Some(w) => w.challenges.set(&answers).err().map(|e| e.to_string()),
                    None => Some("no configuration yet".into()),
                };
                Some(FromWorker::Applied { error })
            }
            ToWorker::Ipsec(paths) => {
                if let Some(w) = &worker {
                    w.ipsec.set(paths);
                }
                None
            }
            ToWorker::Tickets(keys) => {
                if let Some(w) = &worker {
                    w.ticketer.set(&keys);
                }
                None
            }
            ToWorker::Status => Some(FromWorker::Status(
                worker.as_ref().map(Worker::status).unwrap_or_default(),
                worker
                    .as_ref()
                    .and_then(|w| w.directory.as_ref())
                    .map(|d| d.status()),
            )),
            ToWorker::Metrics => Some(FromWorker::Metrics(
                worker.as_ref().map(Worker::encode).unwrap_or_default(),
            )),
            ToWorker::Stop => break,
            ToWorker::Debug(op) => Some(FromWorker::Debug(debug(op, &mut stall))),
        };
        if let Some(body) = answer {
            if let Some(late) = late {
                tokio::time::sleep(late).await;
            }
            channel.send(&Envelope { id, body }, &[]).await?;
        }
    }
    if let Some(w) = worker {
        w.stop().await;
    }
    Ok(())
}

/// Tests' misbehaviour on purpose, in debug builds only.
fn debug(op: DebugOp, stall: &mut Option<Duration>) -> String {
    if !cfg!(debug_assertions) {
        return "debug operations exist in debug builds only".into();
    }
    match op {
        DebugOp::Escape => {
            let read = std::fs::read("/etc/hostname").map(|_| ());
            let exec = std::process::Command::new("/bin/true").status().map(|_| ());
            let unix = std::os::unix::net::UnixDatagram::unbound().map(|_| ());
            format!("read /etc/hostname: {read:?}; exec /bin/true: {exec:?}; unix socket: {unix:?}")
        }
        DebugOp::StallNext(ms) => {
            *stall = Some(Duration::from_millis(ms));
            "the next answer will be late".into()
        }
    }
}

struct Worker {
    table: Table,
    shared: Arc<Shared>,
    registry: WorkerMetrics,
    metrics: HashMap<String, Arc<ServiceMetrics>>,
    listeners: HashMap<Role, CancellationToken>,
    ticketer: Arc<SharedTicketer>,
    relay: RelaySection,
    kernel_copy: Option<&'static KernelCopy>,
    /// `[directory]`: one client (its connections and cache) for every service of the worker.
    directory: Option<Arc<crate::directory::Directory>>,
    /// ACME validations answered on the services' front ports.
    challenges: Arc<Challenges>,
    /// Whether each `ipsec` service's SA is up.
    ipsec: Arc<crate::ipsec::Paths>,
}

impl Worker {
    fn new(
        relay: &RelaySection,
        tickets: &[TicketKey],
        kernel_copy: Option<&'static KernelCopy>,
    ) -> Worker {
        Worker {
            table: Arc::new(RwLock::new(Arc::new(Services {
                timeouts: Timeouts::from(relay),
                by_name: HashMap::new(),
                by_destination: HashMap::new(),
            }))),
            shared: Arc::new(Shared {
                total: Arc::new(Semaphore::new(relay.max_connections)),
                tracker: TaskTracker::new(),
            }),
            registry: WorkerMetrics::default(),
            metrics: HashMap::new(),
            listeners: HashMap::new(),
            ticketer: SharedTicketer::new(tickets, relay.ticket_rotation * 2),
            relay: relay.clone(),
            kernel_copy,
            directory: None,
            challenges: Arc::default(),
            ipsec: Arc::default(),
        }
    }

    /// The worker's metrics, the directory's included.
    fn encode(&self) -> String {
        let mut text = self.registry.encode();
        if let Some(d) = &self.directory {
            let at = text.rfind("# EOF").unwrap_or(text.len());
            text.insert_str(at, &crate::metrics::encode_directory(&d.status()));
        }
        text
    }

    /// Compiles every service first, then swaps them in at once: a service that fails to
    /// build leaves the previous set untouched.
    fn apply(&mut self, apply: Apply, fds: Vec<OwnedFd>) -> anyhow::Result<()> {
        let Apply {
            relay,
            services,
            files,
            tickets,
            add,
            close,
            directory,
        } = apply;
        if add.len() != fds.len() {
            bail!("{} listeners announced, {} received", add.len(), fds.len());
        }
        // Everything that can fail comes before the swap: a refused change leaves the worker
        // exactly as it was, as the supervisor assumes.
        let listeners = fds
            .into_iter()
            .map(|fd| {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("listeners received")?;
        // The same directory settings keep the same client: its connections and its cache.
        let directory = match directory {
            None => None,
            Some(settings) => match &self.directory {
                Some(d) if *d.settings() == settings => Some(Arc::clone(d)),
                _ => Some(crate::directory::Directory::new(settings).context("[directory]")?),
            },
        };
        let resumption = tls::Resumption {
            ticketer: Some(self.ticketer.clone()),
        };
        let registry = &self.registry;
        let fresh: Vec<String> = services
            .iter()
            .filter(|s| !self.metrics.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect();
        for name in &fresh {
            self.metrics
                .insert(name.clone(), Arc::new(registry.service(name)));
        }
        let metrics = &self.metrics;
        let declined =
            |s: &crate::config::Service| proxy::declined(&s.name, Arc::clone(&metrics[&s.name]));
        let compiled = match service::compile(&services, &files, &resumption, &declined) {
            Ok(c) => c,
            Err(e) => {
                for name in &fresh {
                    self.metrics.remove(name);
                    registry.remove(name);
                }
                bail!("{}: {}", crate::config::render(&e.path), e.message);
            }
        };
        self.ticketer.set(&tickets);
        let mut by_name = HashMap::new();
        let mut by_destination: HashMap<(IpAddr, u16), Arc<ServiceRuntime>> = HashMap::new();
        for c in compiled {
            let metrics = Arc::clone(&self.metrics[&c.config.name]);
            let name = c.config.name.clone();
            let transparent = c
                .config
                .listen
                .is_none()
                .then_some((c.config.server.to_canonical(), c.config.port));
            let runtime = Arc::new(ServiceRuntime::new(
                c,
                metrics,
                directory.clone(),
                Arc::clone(&self.challenges),
                Arc::clone(&self.ipsec),
            ));
            if let Some(dst) = transparent {
                by_destination.insert(dst, Arc::clone(&runtime));
            }
            by_name.insert(name, runtime);
        }
        let registry = &self.registry;
        self.metrics.retain(|name, _| {
            let keep = by_name.contains_key(name);
            if !keep {
                registry.remove(name);
            }
            keep
        });
        let names: Vec<&String> = by_name.keys().collect();
        info!(services = ?names, "worker: services applied");
        let timeouts = Timeouts {
            kernel_copy: self.kernel_copy.filter(|_| relay.kernel_copy),
            ..Timeouts::from(&relay)
        };
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Services {
            timeouts,
            by_name,
            by_destination,
        });
        self.resize_total(relay.max_connections);
        self.relay = relay;
        self.directory = directory;
        for role in close {
            if let Some(stop) = self.listeners.remove(&role) {
                stop.cancel();
            }
        }
        for (role, listener) in add.into_iter().zip(listeners) {
            let route = match &role {
                Role::Service(name) => Route::Named(name.clone()),
                Role::TransparentV4 | Role::TransparentV6 => Route::ByDestination,
            };
            let stop = CancellationToken::new();
            if let Some(old) = self.listeners.insert(role, stop.clone()) {
                old.cancel();
            }
            tokio::spawn(proxy::serve(
                listener,
                route,
                Arc::clone(&self.table),
                Arc::clone(&self.shared),
                stop,
            ));
        }
        Ok(())
    }

    /// `[relay] max_connections` changed by a reload: the total limit follows, without
    /// touching connections already admitted (a lower limit is reached as they end).
    fn resize_total(&self, limit: usize) {
        let before = self.relay.max_connections;
        let total = &self.shared.total;
        if limit > before {
            total.add_permits(limit - before);
        } else if limit < before {
            let owed = (before - limit) - total.forget_permits(before - limit);
            if owed > 0 {
                let total = Arc::clone(total);
                tokio::spawn(async move {
                    if let Ok(permits) = total
                        .acquire_many_owned(u32::try_from(owed).unwrap_or(u32::MAX))
                        .await
                    {
                        permits.forget();
                    }
                });
            }
        }
    }

    fn status(&self) -> Vec<crate::metrics::ServiceStatus> {
        let mut out: Vec<_> = self
            .metrics
            .iter()
            .map(|(name, m)| m.snapshot(name))
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    async fn stop(self) {
        for stop in self.listeners.values() {
            stop.cancel();
        }
        self.shared.tracker.close();
        let grace = self.relay.shutdown_grace;
        info!(
            open_connections = self.shared.tracker.len(),
            "worker stopping: no new connections, waiting up to {grace:?}"
        );
        if tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open_connections = self.shared.tracker.len(),
                "shutdown grace elapsed, closing the remaining connections"
            );
        }
        for s in self.status() {
            info!(service = %s.service, accepted = s.accepted, bytes_up = s.bytes_up,
                  bytes_down = s.bytes_down, outcomes = ?s.outcomes, "final counters");
        }
    }
}
