//! `relay run`: the supervisor.
//!
//! It reads the config, attaches the data path, opens every listening socket, owns the TLS
//! session ticket keys and the control socket, and starts the worker that relays connections,
//! handing it the sockets and the bytes of the certificates over the handoff channel. It never
//! reads client traffic. When the worker dies, the supervisor starts another (with backoff);
//! because the supervisor still holds the listeners, connections that arrive in the meantime
//! wait in the accept queues and are served by the new worker: none is refused.
//!
//! Its loop only dispatches: nothing in it waits on a client, a file or the worker. Control
//! connections are read in their own tasks ([`control_server`]); a change's files are read and
//! compiled in a blocking task; what needs the worker's answer (status, scrapes, a change)
//! asks it in a task. Their results come back to the loop as [`Event`]s; restarts are a timer. So SIGTERM, `relay status` and scrapes are served
//! whatever else is going on. Changes are [`changes`]' (one at a time, in order); the worker
//! process is [`worker_proc`]'s; the metrics endpoint is [`metrics_http`]'s.

mod acme;
mod changes;
mod cluster;
mod control_server;
mod ipsec;
mod metrics_http;
mod worker_proc;

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use crate::{
    cli::LogFormat,
    config::{Config, Service},
    control::{self, DatapathStatus, Request, Response, WorkerInfo},
    datapath::{self, Datapath, Routing},
    handoff::{FromWorker, Role, ToWorker},
    service::Checked,
    tickets::KeySchedule,
    tls::Files,
    watch::Watch,
    worker::Identity,
};
use changes::{Change, Pending};
use worker_proc::{Backoff, WorkerProc};

/// Listen backlog: a burst of clients, or a worker restart, waits in the kernel.
const BACKLOG: i32 = 4096;
/// Time a worker gets to take a configuration.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a worker gets to answer for status or metrics: `relay status` answers within a
/// second even when the worker does not.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// Quiet time after a watched file changes before it is applied: tools write in steps.
const SETTLE: Duration = Duration::from_millis(150);

/// What tasks report to the loop.
pub enum Event {
    WorkerExited {
        pid: u32,
        status: std::io::Result<ExitStatus>,
    },
    /// A new worker took (or refused) its first configuration.
    WorkerStarted {
        pid: u32,
        result: anyhow::Result<()>,
    },
    /// The change in flight is checked (its files read and compiled, or the error).
    Checked {
        change: u64,
        result: changes::CheckResult,
    },
    /// The worker `pid` took the change in flight, refused it, or did not answer.
    Applied {
        change: u64,
        pid: u32,
        answer: changes::Answer,
    },
}

/// The worker slot: serving, starting (its first configuration in flight), or down until
/// `restart_at`.
enum Worker {
    Running(WorkerProc),
    Starting(WorkerProc),
    Down { restart_at: tokio::time::Instant },
}

struct Supervisor {
    config_path: PathBuf,
    /// The configuration in force: the file's, plus services added at run time.
    config: Config,
    /// The bytes of every file `config` reads, as read when it was checked: a new worker gets
    /// these, without reading the disk again.
    files: Files,
    /// `[directory]` as the worker gets it (read and resolved with the files).
    directory: Option<crate::directory::Settings>,
    log_format: LogFormat,
    listeners: HashMap<Role, std::net::TcpListener>,
    datapath: Option<Datapath>,
    /// plain ↔ plain in the kernel, for every worker; `None`: splice.
    kernel_copy: Option<crate::sockmap::Program>,
    tickets: KeySchedule,
    worker: Worker,
    restarts: u64,
    backoff: Backoff,
    started: Instant,
    /// Told once the first worker serves (systemd's READY=1, the "relay ready" line).
    ready: bool,
    events: mpsc::UnboundedSender<Event>,
    /// The change the worker is taking now, and the ones waiting for it.
    pending: Option<Pending>,
    queue: VecDeque<Change>,
    next_change: u64,
    /// The files of the services in force, watched; `None` where inotify is unavailable.
    watch: Option<Watch>,
    /// Changed files applied, and refused.
    file_reloads: (u64, u64),
    /// `[cluster]`: the link to etcd and what came from it.
    cluster: Option<cluster::Link>,
    /// `[acme]`: the tasks that order the certificates of `cert = "acme"` services.
    acme: Option<crate::acme::Manager>,
    /// Orders waiting for a worker to serve their validation answers.
    answers_waiting: Vec<oneshot::Sender<anyhow::Result<()>>>,
    /// `[ipsec]`: the task that keeps the SAs of `ipsec` services up, and where it reports.
    ipsec: Option<crate::ipsec::Manager>,
    ipsec_tx: mpsc::UnboundedSender<crate::ipsec::PathSet>,
}

pub async fn run(
    config_path: PathBuf,
    checked: Checked,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    crate::sys::raise_fd_limit()?;
    let Checked {
        config,
        files,
        warnings,
        directory,
    } = checked;
    for w in warnings {
        warn!("{w}");
    }
    let control_path = config.relay.control_socket.clone();
    let control = control_server::bind(&control_path)?;
    let (asked_tx, mut asked) = mpsc::channel(64);
    tokio::spawn(control_server::serve(control, asked_tx));
    let (scrapes_tx, mut scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(addr) = config.relay.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        info!(%addr, "metrics on http://{addr}/metrics");
        tokio::spawn(metrics_http::serve(listener, scrapes_tx));
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Without a watcher nothing ever arrives here; the sender is kept so that it stays so.
    let (_no_watcher, mut changed) = mpsc::unbounded_channel();
    let mut watch = None;
    match Watch::new() {
        Ok((w, rx)) => {
            watch = Some(w);
            changed = rx;
        }
        Err(e) => warn!(
            "cannot watch files ({e}): a changed certificate, key or CRL needs `relay reload`"
        ),
    }
    // Without [acme] nothing ever arrives here.
    let (acme_tx, mut acme_events) = mpsc::unbounded_channel();
    let acme = config
        .acme
        .clone()
        .map(|a| crate::acme::Manager::new(a, acme_tx));
    // Without [ipsec] nothing ever arrives here.
    let (ipsec_tx, mut ipsec_paths) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        config_path,
        config,
        files,
        directory,
        log_format,
        listeners: HashMap::new(),
        datapath: None,
        kernel_copy: None,
        tickets: KeySchedule::default(),
        worker: Worker::Down {
            restart_at: tokio::time::Instant::now(),
        },
        restarts: 0,
        backoff: Backoff::default(),
        started: Instant::now(),
        ready: false,
        events: events_tx,
        pending: None,
        queue: VecDeque::new(),
        next_change: 1,
        watch,
        file_reloads: (0, 0),
        cluster: None,
        acme,
        answers_waiting: Vec::new(),
        ipsec: None,
        ipsec_tx,
    };
    // Without [cluster] nothing ever arrives here.
    let (_no_cluster, mut cluster_updates) = mpsc::unbounded_channel();
    let result = async {
        let mut cached = None;
        if let Some(c) = &sup.config.cluster {
            let (link, updates, from_cache) =
                cluster::start(c, sup.config.relay.ticket_rotation).context("[cluster]")?;
            sup.cluster = Some(link);
            cluster_updates = updates;
            cached = from_cache;
        }
        sup.open_listeners()?;
        sup.load_kernel_copy();
        if let Some((state, tickets)) = cached {
            sup.start_from_cache(state, tickets);
        }
        sup.start_worker();
        sup.watch_files();
        sup.acme_sync();
        sup.ipsec_sync();
        let mut inputs = Inputs {
            asked: &mut asked,
            scrapes: &mut scrapes,
            events: &mut events,
            changed: &mut changed,
            cluster_updates: &mut cluster_updates,
            acme_events: &mut acme_events,
            ipsec_paths: &mut ipsec_paths,
        };
        sup.main_loop(&mut inputs).await
    }
    .await;
    sup.stop(&mut events).await;
    let _ = std::fs::remove_file(&control_path);
    result
}

/// Where the loop's work comes from, besides signals and timers.
struct Inputs<'a> {
    asked: &'a mut mpsc::Receiver<control_server::Asked>,
    scrapes: &'a mut mpsc::Receiver<oneshot::Sender<String>>,
    events: &'a mut mpsc::UnboundedReceiver<Event>,
    changed: &'a mut mpsc::UnboundedReceiver<PathBuf>,
    cluster_updates: &'a mut mpsc::UnboundedReceiver<crate::cluster::Update>,
    acme_events: &'a mut mpsc::UnboundedReceiver<crate::acme::Event>,
    ipsec_paths: &'a mut mpsc::UnboundedReceiver<crate::ipsec::PathSet>,
}

impl Supervisor {
    async fn main_loop(&mut self, i: &mut Inputs<'_>) -> anyhow::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let rotation = self.config.relay.ticket_rotation;
        let mut rotate = tokio::time::interval_at(tokio::time::Instant::now() + rotation, rotation);
        let mut changed_files = Vec::new();
        let settle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(settle);
        let mut settling = false;
        loop {
            let restart_at = match &self.worker {
                Worker::Down { restart_at } => Some(*restart_at),
                _ => None,
            };
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM received"); return Ok(()); }
                _ = int.recv() => { info!("SIGINT received"); return Ok(()); }
                _ = hup.recv() => self.change(Change::reload(None)),
                Some((request, reply)) = i.asked.recv() => self.control(request, reply),
                Some(reply) = i.scrapes.recv() => self.scrape(reply),
                Some(event) = i.events.recv() => self.event(event),
                () = sleep_until(restart_at), if restart_at.is_some() => self.start_worker(),
                Some(path) = i.changed.recv() => {
                    if !changed_files.contains(&path) {
                        changed_files.push(path);
                    }
                    settle.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                    settling = true;
                }
                () = &mut settle, if settling => {
                    settling = false;
                    self.change(Change::files(std::mem::take(&mut changed_files)));
                }
                // With [cluster], the cluster's leader rotates for every gateway.
                _ = rotate.tick(), if self.cluster.is_none() => self.rotate_tickets(),
                Some(update) = i.cluster_updates.recv() => self.cluster_update(update),
                Some(event) = i.acme_events.recv() => self.acme_event(event),
                Some(paths) = i.ipsec_paths.recv() => self.send_paths(paths),
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::WorkerExited { pid, status } => self.worker_exited(pid, status),
            Event::WorkerStarted { pid, result } => self.worker_started(pid, result),
            Event::Checked { change, result } => self.checked(change, result),
            Event::Applied {
                change,
                pid,
                answer,
            } => self.applied(change, pid, answer),
        }
    }

    fn control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        match request {
            Request::Status {} => self.status(reply),
            Request::ServiceList {} => {
                let _ = reply.send(Response::ok(&self.config.services));
            }
            Request::ServiceAdd {
                service,
                cluster: false,
            } => self.change(Change::add(*service, reply)),
            Request::ServiceAdd {
                service,
                cluster: true,
            } => self.cluster_add(*service, reply),
            Request::ServiceRemove {
                name,
                cluster: false,
            } if self.is_cluster_service(&name) => {
                let _ = reply.send(Response::error(format!(
                    "service {name:?} comes from the cluster: remove it with --cluster"
                )));
            }
            Request::ServiceRemove {
                name,
                cluster: false,
            } => self.change(Change::remove(name, reply)),
            Request::ServiceRemove {
                name,
                cluster: true,
            } => self.cluster_remove(name, reply),
            Request::Reload {} => self.change(Change::reload(Some(reply))),
            Request::ClusterStatus {} => self.cluster_status(reply),
            Request::RotateTickets {} => self.rotate_now(reply),
            Request::RenewCertificate { service } => self.renew_certificate(service, reply),
            Request::Debug { what } => self.debug(what, reply),
        }
    }

    /// Tests' misbehaviour on purpose: passed on to the worker, in debug builds only.
    fn debug(&mut self, op: crate::handoff::DebugOp, reply: oneshot::Sender<Response>) {
        let Worker::Running(w) = &self.worker else {
            let _ = reply.send(Response::error("no worker running"));
            return;
        };
        if !cfg!(debug_assertions) {
            let _ = reply.send(Response::error(
                "debug operations exist in debug builds only",
            ));
            return;
        }
        let asker = w.asker.clone();
        tokio::spawn(async move {
            let _ = reply.send(
                match asker
                    .ask(ToWorker::Debug(op), &[], Duration::from_secs(5))
                    .await
                {
                    Ok(FromWorker::Debug(what)) => Response::ok(&what),
                    Ok(other) => Response::error(format!("unexpected answer: {other:?}")),
                    Err(e) => Response::error(format!("{e:#}")),
                },
            );
        });
    }

    // ------------------------------------------------------------------ the worker

    /// Starts a worker and hands it the configuration in force (from memory: no file is read
    /// again); its answer comes back as [`Event::WorkerStarted`].
    fn start_worker(&mut self) {
        // The pair ledgers of an earlier worker died with its sockets; only one worker copies
        // at a time, and this one has not started.
        if let Some(program) = &mut self.kernel_copy {
            program.forget_pairs();
        }
        let user = self.config.relay.user.as_deref().unwrap_or("nobody");
        let identity = match crate::sys::worker_ids(user) {
            Ok(ids) => ids.map(|(uid, gid)| Identity { uid, gid }),
            Err(e) => return self.worker_failed(None, e),
        };
        let proc = match WorkerProc::spawn(
            self.log_format,
            identity,
            self.config.relay.threads,
            self.kernel_copy.as_ref(),
            self.events.clone(),
        ) {
            Ok(p) => p,
            Err(e) => return self.worker_failed(None, e),
        };
        let roles: Vec<Role> = self.listeners.keys().cloned().collect();
        let listeners = match self.dup_listeners(&roles) {
            Ok(l) => l,
            Err(e) => return self.worker_failed(Some(proc.pid), e),
        };
        let msg = ToWorker::Apply(self.apply_message(
            &self.config,
            &self.files,
            &self.directory,
            roles,
            vec![],
        ));
        let pid = proc.pid;
        self.apply_in_task(&proc.asker, msg, listeners, move |answer| {
            Event::WorkerStarted {
                pid,
                result: answer.and_then(changes::applied_answer),
            }
        });
        self.worker = Worker::Starting(proc);
    }

    fn worker_started(&mut self, pid: u32, result: anyhow::Result<()>) {
        let Worker::Starting(proc) = &self.worker else {
            return;
        };
        if proc.pid != pid {
            return;
        }
        if let Err(e) = result {
            return self.worker_failed(
                Some(pid),
                e.context(format!("worker {pid} did not take its configuration")),
            );
        }
        let Worker::Starting(proc) = std::mem::replace(
            &mut self.worker,
            Worker::Down {
                restart_at: tokio::time::Instant::now(),
            },
        ) else {
            unreachable!("checked above")
        };
        info!(
            worker = pid,
            listeners = self.listeners.len(),
            "worker started"
        );
        self.worker = Worker::Running(proc);
        if !self.ready {
            self.ready = true;
            info!(
                services = self.config.services.len(),
                worker = pid,
                control = %self.config.relay.control_socket.display(),
                "relay ready"
            );
            // Type=notify: systemd considers the service started only now. A no-op elsewhere.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        } else {
            info!(worker = pid, "new worker accepting");
        }
        // Keys that came (from the cluster) while it started went to no worker, and so did
        // the ACME validation answers of an order under way.
        self.send_tickets();
        self.answers_to_new_worker();
        self.paths_to_new_worker();
        self.publish_member();
        // A change that waited for a worker goes on now.
        self.next_queued();
    }

    /// A worker could not start: it is killed (if it runs) and another is tried later.
    fn worker_failed(&mut self, pid: Option<u32>, e: anyhow::Error) {
        if let Some(pid) = pid {
            crate::sys::kill_now(pid);
            self.restarts += 1;
        }
        let wait = self.backoff.failed();
        error!("worker start failed, next try in {wait:?}: {e:#}");
        self.worker = Worker::Down {
            restart_at: tokio::time::Instant::now() + wait,
        };
    }

    fn worker_exited(&mut self, pid: u32, status: std::io::Result<ExitStatus>) {
        let lived = match &self.worker {
            Worker::Running(p) | Worker::Starting(p) if p.pid == pid => p.started.elapsed(),
            _ => return, // an earlier worker, already replaced
        };
        self.restarts += 1;
        let wait = self.backoff.died(lived);
        error!(worker = pid, status = ?status, lived_ms = lived.as_millis() as u64,
               restarts = self.restarts, next_in_ms = wait.as_millis() as u64,
               "worker died; starting a new one (waiting connections stay queued)");
        self.worker = Worker::Down {
            restart_at: tokio::time::Instant::now() + wait,
        };
        self.publish_member();
        // A change the dead worker was taking is answered when its request fails (the
        // channel closed); nothing to do here.
    }

    fn rotate_tickets(&mut self) {
        self.tickets.rotate();
        info!("session ticket key rotated");
        self.send_tickets();
    }

    /// Hands the ticket keys in force to the worker.
    fn send_tickets(&self) {
        if let Worker::Running(w) = &self.worker {
            let (asker, keys) = (w.asker.clone(), self.tickets.keys().to_vec());
            tokio::spawn(async move {
                if let Err(e) = asker.tell(ToWorker::Tickets(keys)).await {
                    warn!("could not send new ticket keys to the worker: {e}");
                }
            });
        }
    }

    // ------------------------------------------------------------------ answers

    fn status(&mut self, reply: oneshot::Sender<Response>) {
        let datapath = match (&self.datapath, &self.config.datapath) {
            (Some(d), Some(dp)) => match d.maps.counters() {
                Ok(counters) => Some(DatapathStatus {
                    pin_path: dp.pin_path.clone(),
                    attachments: datapath::attachments(&dp.pin_path),
                    counters,
                }),
                Err(e) => {
                    let _ = reply.send(Response::error(format!("{e:#}")));
                    return;
                }
            },
            _ => None,
        };
        let running = match &self.worker {
            Worker::Running(w) => Some((w.pid, w.started, w.asker.clone())),
            _ => None,
        };
        let mut status = control::Status {
            supervisor_pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            worker: running.as_ref().map(|(pid, started, _)| WorkerInfo {
                pid: *pid,
                uptime_s: started.elapsed().as_secs(),
            }),
            worker_restarts: self.restarts,
            services: self.service_infos(),
            connections: None,
            datapath,
            cluster: self.cluster_info(),
            directory: None,
        };
        let Some((_, _, asker)) = running else {
            let _ = reply.send(Response::ok(&status));
            return;
        };
        tokio::spawn(async move {
            if let Ok(FromWorker::Status(s, d)) =
                asker.ask(ToWorker::Status, &[], ASK_TIMEOUT).await
            {
                status.connections = Some(s);
                status.directory = d;
            }
            let _ = reply.send(Response::ok(&status));
        });
    }

    /// The whole scrape: the supervisor's metrics, then the worker's (which end with `# EOF`).
    fn scrape(&mut self, reply: oneshot::Sender<String>) {
        let counters = self
            .datapath
            .as_ref()
            .and_then(|d| d.maps.counters().ok())
            .unwrap_or_default();
        let late = match &self.worker {
            Worker::Running(w) | Worker::Starting(w) => w.asker.late_answers(),
            Worker::Down { .. } => 0,
        };
        let mut text = crate::metrics::encode_supervisor(
            self.restarts,
            self.file_reloads,
            late,
            &counters,
            self.cluster_info().as_ref(),
            &self.service_infos(),
        );
        let asker = match &self.worker {
            Worker::Running(w) => Some(w.asker.clone()),
            _ => None,
        };
        tokio::spawn(async move {
            let worker = match asker {
                Some(a) => match a.ask(ToWorker::Metrics, &[], ASK_TIMEOUT).await {
                    Ok(FromWorker::Metrics(t)) => Some(t),
                    _ => None,
                },
                None => None,
            };
            text.push_str(worker.as_deref().unwrap_or("# EOF\n"));
            let _ = reply.send(text);
        });
    }

    // ------------------------------------------------------------------ sockets

    /// Binds the explicit listeners and attaches the data path with its transparent listeners.
    fn open_listeners(&mut self) -> anyhow::Result<()> {
        for s in &self.config.services {
            if let Some(addr) = s.listen {
                let l =
                    bind(addr).with_context(|| format!("service {}: listen on {addr}", s.name))?;
                self.listeners.insert(Role::Service(s.name.clone()), l);
            }
            log_service(s);
        }
        if let Some(dp) = self.config.datapath.clone() {
            datapath::prepare_pin_dir(&dp.pin_path)?;
            let mut d = Datapath::load(Some(&dp.pin_path))?;
            if tracing::enabled!(tracing::Level::DEBUG)
                && let Err(e) = d.spawn_logger()
            {
                warn!("eBPF debug log unavailable: {e:#}");
            }
            // Policy first: a freshly attached program must drop backend ports at once.
            d.maps
                .sync(&self.config.services, &self.config.servers)
                .context("sync the policy maps")?;
            Routing {
                table: dp.route_table,
            }
            .install()
            .context("install the steering route")?;
            for interface in &dp.interfaces {
                let a = d.attach(&dp.pin_path, interface, dp.xdp_mode)?;
                info!(interface = %a.interface, xdp_mode = %a.xdp_mode, "data path attached");
            }
            let v4 = datapath::transparent_listener("127.0.0.1:0".parse()?)?;
            let v6 = datapath::transparent_listener("[::1]:0".parse()?)?;
            // The SOCKMAP holds the supervisor's sockets: steering survives worker restarts.
            d.maps.set_listeners(&v4, &v6)?;
            self.listeners.insert(Role::TransparentV4, v4);
            self.listeners.insert(Role::TransparentV6, v6);
            self.datapath = Some(d);
        }
        Ok(())
    }

    /// Loads the kernel copy program for the workers, unless `[relay] kernel_copy = false`;
    /// without it (no privilege, an older kernel) plain ↔ plain is spliced.
    fn load_kernel_copy(&mut self) {
        if !self.config.relay.kernel_copy {
            info!("kernel copy off ([relay] kernel_copy = false): plain ↔ plain is spliced");
            return;
        }
        match crate::sockmap::Program::load(self.config.relay.max_connections) {
            Ok(p) => {
                info!("kernel copy loaded: plain ↔ plain bytes move inside the kernel");
                self.kernel_copy = Some(p);
            }
            Err(e) => info!("kernel copy unavailable, plain ↔ plain is spliced: {e:#}"),
        }
    }

    /// Copies of the listeners of `roles`, for a message in flight (the kernel copies them
    /// once more into the worker).
    fn dup_listeners(&self, roles: &[Role]) -> anyhow::Result<Vec<std::net::TcpListener>> {
        roles
            .iter()
            .map(|r| {
                self.listeners[r]
                    .try_clone()
                    .context("duplicate a listener for the worker")
            })
            .collect()
    }

    /// Watches the files of the services in force: certificates, keys, CAs, CRLs.
    fn watch_files(&mut self) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let files = self
            .config
            .services
            .iter()
            .flat_map(crate::tls::material::files_of)
            .map(|(_, _, path)| path);
        for warning in watch.set(files) {
            warn!("{warning}");
        }
    }

    // ------------------------------------------------------------------ the end

    async fn stop(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.leave_cluster().await;
        // Close our copies of the listeners at once: new clients are refused (or, steered, find
        // no listener) rather than queued for a worker that is only draining.
        self.listeners.clear();
        let worker = match std::mem::replace(
            &mut self.worker,
            Worker::Down {
                restart_at: tokio::time::Instant::now(),
            },
        ) {
            Worker::Running(w) | Worker::Starting(w) => Some(w),
            Worker::Down { .. } => None,
        };
        if let Some(w) = worker {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), w.asker.tell(ToWorker::Stop)).await;
            let limit = self.config.relay.shutdown_grace + Duration::from_secs(5);
            // The exit watcher reports the worker's end; nothing to poll.
            let exited = async {
                while let Some(event) = events.recv().await {
                    if matches!(event, Event::WorkerExited { pid, .. } if pid == w.pid) {
                        return;
                    }
                }
            };
            if tokio::time::timeout(limit, exited).await.is_err() {
                warn!(worker = w.pid, "worker did not stop in time, killing it");
                crate::sys::kill_now(w.pid);
            }
        }
        if let Some(d) = &self.datapath {
            if let Ok(counters) = d.maps.counters() {
                for c in counters {
                    info!(service = %c.service, steered = c.steered, dropped = c.dropped,
                          passed = c.passed, malformed = c.malformed, no_listener = c.no_listener,
                          "data path counters");
                }
            }
            info!(
                "data path stays attached (backend ports stay dropped); `relay detach` removes it"
            );
        }
        self.ipsec_stop();
        info!("relay stopped");
    }
}

/// Sleeps until `at`; never resolves without one (the arm is disabled then anyway).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log_service(s: &Service) {
    match s.listen {
        Some(addr) => info!(
            service = %s.name, listen = %addr, backend = %s.backend_addr(),
            inbound = %s.inbound.level, outbound = %s.outbound.level, "service listening"
        ),
        None => info!(
            service = %s.name, front = %std::net::SocketAddr::new(s.server, s.port),
            backend = %s.backend_addr(), dropped = %std::net::SocketAddr::new(s.server, s.backend_port),
            inbound = %s.inbound.level, outbound = %s.outbound.level, "service steered"
        ),
    }
}

fn bind(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted relay must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    // `[::]` means every address of both families, whatever net.ipv6.bindv6only says: IPv4
    // clients arrive as ::ffff:a.b.c.d and are logged and forwarded as IPv4.
    if let std::net::SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
    {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
