//! The worker: the process that accepts and relays connections.
//!
//! Started by the supervisor (`relay worker`, not for humans) with one end of the handoff channel
//! at a known descriptor. Everything it needs arrives over that channel: the services, the bytes
//! of their certificates and keys, the session ticket keys, and the listening sockets. After the
//! first of these messages it drops its privileges: it never opens a file or binds a port, so it
//! needs none. It can die at any time (crash, `kill -9`, OOM): the supervisor still holds the
//! listeners, so the connections waiting in their accept queues are served by the next worker.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::OwnedFd,
    sync::{Arc, RwLock},
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
    config::{self, RelaySection, Service},
    handoff::{Channel, FromWorker, Role, ToWorker},
    metrics::{ServiceMetrics, WorkerMetrics},
    proxy::{self, Route, ServiceRuntime, Services, Shared, Table},
    tickets::SharedTicketer,
    tls,
};

struct Worker {
    table: Table,
    shared: Arc<Shared>,
    registry: WorkerMetrics,
    metrics: HashMap<String, Arc<ServiceMetrics>>,
    listeners: HashMap<Role, CancellationToken>,
    ticketer: Arc<SharedTicketer>,
    relay: RelaySection,
}

pub async fn run() -> anyhow::Result<()> {
    // If the supervisor dies without a word, do not linger holding client connections' fate.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let channel = Channel::inherited().context("handoff channel (is this run by `relay run`?)")?;
    let mut worker: Option<Worker> = None;
    let mut term = signal(SignalKind::terminate())?;
    // Ctrl-C in a terminal reaches the whole process group; stopping is the supervisor's call.
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let msg = tokio::select! {
            m = channel.recv::<ToWorker>() => m,
            _ = term.recv() => { info!("worker: SIGTERM"); break; }
            _ = int.recv() => continue,
        };
        match msg {
            Ok(Some((
                ToWorker::Apply {
                    relay,
                    services,
                    files,
                    tickets,
                    add,
                    close,
                },
                fds,
            ))) => {
                let first = worker.is_none();
                let w = worker.get_or_insert_with(|| Worker::new(&relay, &tickets));
                w.ticketer.set(&tickets);
                let error = w
                    .apply(
                        relay,
                        services,
                        files.into_iter().collect(),
                        add,
                        fds,
                        close,
                    )
                    .err()
                    .map(|e| format!("{e:#}"));
                if let Some(e) = &error {
                    warn!("worker: configuration not applied, previous one kept: {e}");
                }
                channel.send(&FromWorker::Applied { error }, &[]).await?;
                if first {
                    drop_privileges(worker.as_ref().and_then(|w| w.relay.user.as_deref()))?;
                }
            }
            Ok(Some((ToWorker::Tickets(keys), _))) => {
                if let Some(w) = &worker {
                    w.ticketer.set(&keys);
                }
            }
            Ok(Some((ToWorker::Status, _))) => {
                let status = worker.as_ref().map(Worker::status).unwrap_or_default();
                channel.send(&FromWorker::Status(status), &[]).await?;
            }
            Ok(Some((ToWorker::Metrics, _))) => {
                let text = worker
                    .as_ref()
                    .map(|w| w.registry.encode())
                    .unwrap_or_default();
                channel.send(&FromWorker::Metrics(text), &[]).await?;
            }
            Ok(Some((ToWorker::Stop, _))) => break,
            Ok(None) => {
                warn!("worker: supervisor gone, stopping");
                break;
            }
            Err(e) => {
                warn!("worker: handoff channel failed ({e}), stopping");
                break;
            }
        }
    }
    if let Some(w) = worker {
        w.stop().await;
    }
    Ok(())
}

impl Worker {
    fn new(relay: &RelaySection, tickets: &[crate::tickets::TicketKey]) -> Worker {
        Worker {
            table: Arc::new(RwLock::new(Arc::new(Services {
                timeouts: relay.into(),
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
        }
    }

    /// Builds every service first, then swaps them in at once: a service that fails to build
    /// leaves the previous set untouched.
    fn apply(
        &mut self,
        relay: RelaySection,
        services: Vec<Service>,
        files: tls::Files,
        add: Vec<Role>,
        fds: Vec<OwnedFd>,
        close: Vec<Role>,
    ) -> anyhow::Result<()> {
        if add.len() != fds.len() {
            bail!("{} listeners announced, {} received", add.len(), fds.len());
        }
        let resumption = tls::Resumption {
            ticketer: Some(self.ticketer.clone()),
        };
        let mut by_name = HashMap::new();
        let mut by_destination: HashMap<(IpAddr, u16), Arc<ServiceRuntime>> = HashMap::new();
        for s in services {
            let registry = &self.registry;
            let metrics = Arc::clone(
                self.metrics
                    .entry(s.name.clone())
                    .or_insert_with(|| Arc::new(registry.service(&s.name))),
            );
            let name = s.name.clone();
            let transparent = s
                .listen
                .is_none()
                .then_some((s.server.to_canonical(), s.port));
            let runtime = Arc::new(ServiceRuntime::new(s, &files, &resumption, metrics)?);
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
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Services {
            timeouts: (&relay).into(),
            by_name,
            by_destination,
        });
        self.relay = relay;
        for role in close {
            if let Some(stop) = self.listeners.remove(&role) {
                stop.cancel();
            }
        }
        for (role, fd) in add.into_iter().zip(fds) {
            let std_listener = std::net::TcpListener::from(fd);
            std_listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(std_listener)?;
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

/// Becomes `user` (when root): no capabilities, no way back.
fn drop_privileges(user: Option<&str>) -> anyhow::Result<()> {
    // SAFETY: plain libc calls with checked results.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(());
        }
        let name = user.unwrap_or("nobody");
        let Some((uid, gid)) = config::user_ids(name) else {
            bail!("worker: no user named {name:?} to drop privileges to");
        };
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            bail!(
                "worker: cannot become {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        // Leaving uid 0 clears every capability; make sure nothing can regain them.
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        info!(user = name, uid, "worker dropped privileges");
    }
    Ok(())
}
