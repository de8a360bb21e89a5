//! `relay run`: the supervisor.
//!
//! It reads the config, attaches the data path, opens every listening socket, owns the TLS
//! session ticket keys and the control socket, and starts the worker that relays connections,
//! handing it the sockets and the certificate bytes over the handoff channel. It never reads
//! client traffic. When the worker dies, the supervisor logs it and starts another (with
//! backoff); because the supervisor still holds the listeners, connections that arrive in the
//! meantime wait in the accept queues and are served by the new worker: none is refused.
//!
//! Changes — SIGHUP or `relay reload` (the config file again), `relay service add|remove`, a
//! CRL file replaced on disk ([`crate::watch`]) — are validated in full first; an invalid
//! change is refused with its error and the running configuration stays. Established
//! connections are never touched by a change.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use crate::{
    cli::LogFormat,
    config::{Config, Service},
    control::{self, Request, Response},
    datapath::{self, Datapath, Routing},
    handoff::{self, Channel, FromWorker, Role, ToWorker},
    tickets::KeySchedule,
    tls,
    watch::Watch,
};

/// Listen backlog: a burst of clients, or a worker restart, waits in the kernel.
const BACKLOG: i32 = 4096;
/// A worker that lived this long is healthy again: the next restart is immediate.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time a worker gets to take its configuration.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a worker gets to answer for status or metrics.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet time after a watched file changes before it is applied: tools write in steps.
const SETTLE: Duration = Duration::from_millis(150);

struct WorkerProc {
    pid: u32,
    channel: Channel,
    started: Instant,
}

struct Supervisor {
    config_path: PathBuf,
    /// The configuration in force: the file's, plus services added at run time.
    config: Config,
    log_format: LogFormat,
    listeners: HashMap<Role, std::net::TcpListener>,
    datapath: Option<Datapath>,
    tickets: KeySchedule,
    worker: Option<WorkerProc>,
    exits: mpsc::UnboundedSender<(u32, std::io::Result<ExitStatus>)>,
    restarts: u32,
    /// Consecutive quick deaths, for the backoff.
    quick_deaths: u32,
    started: Instant,
    /// The CRL files, watched; `None` where inotify is unavailable.
    watch: Option<Watch>,
    /// Changed files applied, and refused.
    file_reloads: (u64, u64),
}

pub async fn run(
    config_path: PathBuf,
    config: Config,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    raise_fd_limit();
    let control_path = config.relay.control_socket.clone();
    let control = bind_control(&control_path)?;
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let (scrapes_tx, mut scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(addr) = config.relay.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        info!(%addr, "metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, scrapes_tx));
    }
    let mut sup = Supervisor {
        config_path,
        config,
        log_format,
        listeners: HashMap::new(),
        datapath: None,
        tickets: KeySchedule::default(),
        worker: None,
        exits: exits_tx,
        restarts: 0,
        quick_deaths: 0,
        started: Instant::now(),
        watch: None,
        file_reloads: (0, 0),
    };
    // Without a watcher nothing ever arrives here; the sender is kept so that it stays so.
    let (_no_watcher, mut changed) = mpsc::unbounded_channel();
    match Watch::new() {
        Ok((watch, rx)) => {
            sup.watch = Some(watch);
            changed = rx;
        }
        Err(e) => warn!("cannot watch files ({e}): a changed CRL needs `relay reload`"),
    }
    let result = async {
        sup.open_listeners()?;
        sup.spawn_worker().await?;
        sup.watch_files();
        info!(
            services = sup.config.services.len(),
            worker = sup.worker.as_ref().map(|w| w.pid),
            control = %control_path.display(),
            "relay ready"
        );
        // Type=notify: systemd considers the service started only now. A no-op elsewhere.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        sup.main_loop(&control, &mut exits, &mut scrapes, &mut changed)
            .await
    }
    .await;
    let _ = std::fs::remove_file(&control_path);
    result
}

impl Supervisor {
    async fn main_loop(
        &mut self,
        control: &UnixListener,
        exits: &mut mpsc::UnboundedReceiver<(u32, std::io::Result<ExitStatus>)>,
        scrapes: &mut mpsc::Receiver<oneshot::Sender<String>>,
        changed: &mut mpsc::UnboundedReceiver<PathBuf>,
    ) -> anyhow::Result<()> {
        let mut changed_files = Vec::new();
        let settle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(settle);
        let mut settling = false;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let rotation = self.config.relay.ticket_rotation;
        let mut rotate = tokio::time::interval_at(tokio::time::Instant::now() + rotation, rotation);
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM received"); break; }
                _ = int.recv() => { info!("SIGINT received"); break; }
                _ = hup.recv() => match self.reload().await {
                    Ok(summary) => info!("SIGHUP: configuration reloaded: {summary}"),
                    Err(e) => error!("SIGHUP: reload refused, previous configuration kept: {e:#}"),
                },
                conn = control.accept() => match conn {
                    Ok((stream, _)) => self.serve_control(stream).await,
                    Err(e) => warn!("control socket accept: {e}"),
                },
                Some((pid, status)) = exits.recv() => self.worker_exited(pid, status).await,
                Some(reply) = scrapes.recv() => {
                    let _ = reply.send(self.metrics_text().await);
                }
                Some(path) = changed.recv() => {
                    if !changed_files.contains(&path) {
                        changed_files.push(path);
                    }
                    settle.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                    settling = true;
                }
                () = &mut settle, if settling => {
                    settling = false;
                    self.files_changed(std::mem::take(&mut changed_files)).await;
                }
                _ = rotate.tick() => {
                    self.tickets.rotate();
                    if let Some(w) = &self.worker
                        && let Err(e) = w.channel.send(&ToWorker::Tickets(self.tickets.keys().to_vec()), &[]).await
                    {
                        warn!("could not send new ticket keys to the worker: {e}");
                    }
                    info!("session ticket key rotated");
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.stop(exits).await;
        Ok(())
    }

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
                .sync(&self.config.services)
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

    /// The Apply message for `services`, with the bytes of every file they read.
    fn apply_message(
        &self,
        services: &[Service],
        add: Vec<Role>,
        close: Vec<Role>,
    ) -> anyhow::Result<ToWorker> {
        let mut files = Vec::new();
        for s in services {
            for warning in tls::key_warnings(s) {
                warn!("{warning}");
            }
            for path in tls::files_of(s) {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("service {}: read {}", s.name, path.display()))?;
                if s.inbound.crl.as_deref() == Some(path) {
                    for warning in tls::crl_warnings(s, &bytes) {
                        warn!("{warning}");
                    }
                }
                files.push((path.to_path_buf(), bytes));
            }
        }
        Ok(ToWorker::Apply {
            relay: self.config.relay.clone(),
            services: services.to_vec(),
            files,
            tickets: self.tickets.keys().to_vec(),
            add,
            close,
        })
    }

    async fn spawn_worker(&mut self) -> anyhow::Result<()> {
        let (ours, theirs) = handoff::pair()?;
        let exe = std::env::current_exe().context("locate the relay binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--log-format")
            .arg(match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
            .arg("worker")
            .stdin(std::process::Stdio::null());
        let raw = theirs.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl.
        unsafe {
            cmd.pre_exec(move || {
                if raw == handoff::WORKER_FD {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, handoff::WORKER_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("start the worker")?;
        drop(theirs);
        let pid = child.id().context("worker pid")?;
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exits.send((pid, status));
        });
        let channel = Channel::new(ours)?;
        let roles: Vec<Role> = self.listeners.keys().cloned().collect();
        let msg = self.apply_message(&self.config.services, roles.clone(), vec![])?;
        let fds: Vec<BorrowedFd<'_>> = roles.iter().map(|r| self.listeners[r].as_fd()).collect();
        if let Err(e) = ask(&channel, &msg, &fds, APPLY_TIMEOUT)
            .await
            .and_then(applied)
        {
            kill(pid);
            return Err(e.context(format!("worker {pid} did not take its configuration")));
        }
        info!(worker = pid, listeners = roles.len(), "worker started");
        self.worker = Some(WorkerProc {
            pid,
            channel,
            started: Instant::now(),
        });
        Ok(())
    }

    async fn worker_exited(&mut self, pid: u32, status: std::io::Result<ExitStatus>) {
        let Some(w) = self.worker.take_if(|w| w.pid == pid) else {
            return; // an earlier worker we already replaced
        };
        self.restarts += 1;
        let lived = w.started.elapsed();
        error!(worker = pid, status = ?status, lived_ms = lived.as_millis() as u64, restarts = self.restarts,
               "worker died; starting a new one (waiting connections stay queued)");
        self.quick_deaths = if lived > HEALTHY_AFTER {
            0
        } else {
            self.quick_deaths + 1
        };
        loop {
            let backoff = match self.quick_deaths {
                0 | 1 => Duration::ZERO,
                n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
            };
            tokio::time::sleep(backoff).await;
            let t = Instant::now();
            match self.spawn_worker().await {
                Ok(()) => {
                    info!(
                        accepting_after_ms = t.elapsed().as_millis() as u64,
                        "new worker accepting"
                    );
                    return;
                }
                Err(e) => {
                    error!("worker restart failed: {e:#}");
                    self.quick_deaths += 1;
                }
            }
        }
    }

    async fn stop(
        &mut self,
        exits: &mut mpsc::UnboundedReceiver<(u32, std::io::Result<ExitStatus>)>,
    ) {
        // Close our copies of the listeners at once: new clients are refused (or, steered, find
        // no listener) rather than queued for a worker that is only draining.
        self.listeners.clear();
        if let Some(w) = self.worker.take() {
            let _ = w.channel.send(&ToWorker::Stop, &[]).await;
            let limit = self.config.relay.shutdown_grace + Duration::from_secs(5);
            // The exit watcher reports the worker's end; nothing to poll.
            let exited = async {
                while let Some((pid, _)) = exits.recv().await {
                    if pid == w.pid {
                        return;
                    }
                }
            };
            if tokio::time::timeout(limit, exited).await.is_err() {
                warn!(worker = w.pid, "worker did not stop in time, killing it");
                kill(w.pid);
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
        info!("relay stopped");
    }

    // ------------------------------------------------------------------ changes

    async fn reload(&mut self) -> anyhow::Result<String> {
        let next = Config::load(&self.config_path)?;
        if next
            .datapath
            .as_ref()
            .map(|d| (&d.interfaces, d.pin_path.clone()))
            != self
                .config
                .datapath
                .as_ref()
                .map(|d| (&d.interfaces, d.pin_path.clone()))
        {
            warn!("reload: [datapath] changes take effect at the next start");
        }
        let mut next_config = self.config.clone();
        next_config.relay = next.relay;
        next_config.services = next.services;
        self.apply(next_config).await
    }

    /// Moves to `next`: binds new listeners, has the worker build every service, then syncs the
    /// data path. Any failure leaves everything as it was.
    async fn apply(&mut self, next: Config) -> anyhow::Result<String> {
        next.check().map_err(anyhow::Error::msg)?;
        if self.datapath.is_none() && next.services.iter().any(|s| s.listen.is_none()) {
            bail!("services without `listen` need the data path: add [datapath] and restart");
        }
        let old: HashMap<&str, &Service> = self
            .config
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let new: HashMap<&str, &Service> =
            next.services.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut opened = Vec::new();
        let mut close = Vec::new();
        for s in &next.services {
            let role = Role::Service(s.name.clone());
            let same_listener = old
                .get(s.name.as_str())
                .is_some_and(|o| o.listen == s.listen);
            if let Some(addr) = s.listen
                && !same_listener
            {
                opened.push((
                    role.clone(),
                    bind(addr).with_context(|| format!("service {}: listen on {addr}", s.name))?,
                ));
            }
            if !same_listener && self.listeners.contains_key(&role) {
                close.push(role);
            }
        }
        for name in old.keys().filter(|n| !new.contains_key(*n)) {
            let role = Role::Service(name.to_string());
            if self.listeners.contains_key(&role) {
                close.push(role);
            }
        }
        let add: Vec<Role> = opened.iter().map(|(r, _)| r.clone()).collect();
        let msg = self.apply_message(&next.services, add, close.clone())?;
        if let Some(w) = &self.worker {
            let fds: Vec<BorrowedFd<'_>> = opened.iter().map(|(_, l)| l.as_fd()).collect();
            ask(&w.channel, &msg, &fds, APPLY_TIMEOUT)
                .await
                .and_then(applied)?;
        }
        if let Some(d) = &mut self.datapath {
            d.maps
                .sync(&next.services)
                .context("sync the policy maps")?;
        }
        for role in &close {
            self.listeners.remove(role);
        }
        self.listeners.extend(opened);
        let added: Vec<&str> = new
            .keys()
            .filter(|n| !old.contains_key(*n))
            .copied()
            .collect();
        let removed: Vec<&str> = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .copied()
            .collect();
        let summary = format!(
            "{} service(s); added {added:?}; removed {removed:?}",
            next.services.len()
        );
        for s in next
            .services
            .iter()
            .filter(|s| added.contains(&s.name.as_str()))
        {
            log_service(s);
        }
        self.config = next;
        self.watch_files();
        Ok(summary)
    }

    /// Watches the CRL files of the services in force.
    fn watch_files(&mut self) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let crls = self
            .config
            .services
            .iter()
            .filter_map(|s| s.inbound.crl.as_deref());
        for warning in watch.set(crls) {
            warn!("{warning}");
        }
    }

    /// Applies watched files that changed: the configuration in force again, with every file
    /// read and validated anew; a file that does not validate leaves the previous material.
    async fn files_changed(&mut self, paths: Vec<PathBuf>) {
        let files = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match self.apply(self.config.clone()).await {
            Ok(_) => {
                self.file_reloads.0 += 1;
                info!(%files, "changed CRL applied: new connections and resumptions use it");
            }
            Err(e) => {
                self.file_reloads.1 += 1;
                error!(%files, "changed CRL NOT applied, the previous one stays in force: {e:#}");
            }
        }
    }

    // ------------------------------------------------------------------ control socket

    async fn serve_control(&mut self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64));
        let response =
            match tokio::time::timeout(control::REQUEST_TIMEOUT, reader.read_line(&mut line)).await
            {
                Err(_) => Response::error("no request within the time limit"),
                Ok(Err(e)) => Response::error(format!("unreadable request: {e}")),
                Ok(Ok(_)) => match control::parse(&line) {
                    Err(e) => Response::error(e),
                    Ok(request) => match self.handle(request).await {
                        Ok(v) => Response::ok(v),
                        Err(e) => Response::error(format!("{e:#}")),
                    },
                },
            };
        let mut out = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        let _ =
            tokio::time::timeout(control::REQUEST_TIMEOUT, write.write_all(out.as_bytes())).await;
    }

    async fn handle(&mut self, request: Request) -> anyhow::Result<serde_json::Value> {
        match request {
            Request::Status {} => self.status().await,
            Request::ServiceList {} => Ok(serde_json::to_value(&self.config.services)?),
            Request::ServiceAdd { service } => {
                let mut next = self.config.clone();
                next.services.push(*service);
                Ok(json!(self.apply(next).await?))
            }
            Request::ServiceRemove { name } => {
                let mut next = self.config.clone();
                let before = next.services.len();
                next.services.retain(|s| s.name != name);
                if next.services.len() == before {
                    bail!("no service named {name:?}");
                }
                Ok(json!(self.apply(next).await?))
            }
            Request::Reload {} => Ok(json!(self.reload().await?)),
        }
    }

    /// The whole scrape: the supervisor's metrics, then the worker's (which end with `# EOF`).
    async fn metrics_text(&mut self) -> String {
        let counters = self
            .datapath
            .as_ref()
            .and_then(|d| d.maps.counters().ok())
            .unwrap_or_default();
        let mut text = crate::metrics::encode_supervisor(
            u64::from(self.restarts),
            self.file_reloads,
            &counters,
        );
        let worker = match &self.worker {
            Some(w) => match ask(&w.channel, &ToWorker::Metrics, &[], ASK_TIMEOUT).await {
                Ok(FromWorker::Metrics(t)) => Some(t),
                _ => None,
            },
            None => None,
        };
        text.push_str(worker.as_deref().unwrap_or("# EOF\n"));
        text
    }

    async fn status(&mut self) -> anyhow::Result<serde_json::Value> {
        let connections = match &self.worker {
            Some(w) => match ask(&w.channel, &ToWorker::Status, &[], ASK_TIMEOUT).await {
                Ok(FromWorker::Status(s)) => Some(s),
                _ => None,
            },
            None => None,
        };
        let datapath = match (&self.datapath, &self.config.datapath) {
            (Some(d), Some(dp)) => json!({
                "pin_path": dp.pin_path,
                "attachments": datapath::attachments(&dp.pin_path),
                "counters": d.maps.counters()?,
            }),
            _ => serde_json::Value::Null,
        };
        let services: Vec<serde_json::Value> = self
            .config
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "mode": if s.listen.is_some() { "explicit" } else { "transparent" },
                    "front": s.listen.map_or_else(|| std::net::SocketAddr::new(s.server, s.port).to_string(), |l| l.to_string()),
                    "backend": s.backend_addr().to_string(),
                    "inbound": s.inbound.level.to_string(),
                    "outbound": s.outbound.level.to_string(),
                })
            })
            .collect();
        Ok(json!({
            "supervisor_pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "worker": self.worker.as_ref().map(|w| json!({"pid": w.pid, "uptime_s": w.started.elapsed().as_secs()})),
            "worker_restarts": self.restarts,
            "services": services,
            "connections": connections,
            "datapath": datapath,
        }))
    }
}

/// Sends `msg` (with `fds`) to a worker and waits up to `limit` for its answer.
async fn ask(
    channel: &Channel,
    msg: &ToWorker,
    fds: &[BorrowedFd<'_>],
    limit: Duration,
) -> anyhow::Result<FromWorker> {
    let exchange = async {
        channel.send(msg, fds).await?;
        channel
            .recv::<FromWorker>()
            .await?
            .map(|(answer, _)| answer)
            .context("the worker closed the channel")
    };
    tokio::time::timeout(limit, exchange)
        .await
        .with_context(|| format!("the worker did not answer within {limit:?}"))?
}

/// The worker's answer to `Apply`.
fn applied(answer: FromWorker) -> anyhow::Result<()> {
    match answer {
        FromWorker::Applied { error: None } => Ok(()),
        FromWorker::Applied { error: Some(e) } => bail!("worker refused the configuration: {e}"),
        other => bail!("unexpected answer from the worker: {other:?}"),
    }
}

/// `GET /metrics` over HTTP/1.1; every scrape is answered by the main loop through `scrapes`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes, header::CONTENT_TYPE, service::service_fn};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move {
                    let reply = |status: StatusCode, body: String| {
                        Response::builder()
                            .status(status)
                            .header(
                                CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(body)))
                    };
                    if req.uri().path() != "/metrics" {
                        return reply(StatusCode::NOT_FOUND, "try /metrics\n".into());
                    }
                    let (tx, rx) = oneshot::channel();
                    if scrapes.send(tx).await.is_err() {
                        return reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "relay is stopping\n".into(),
                        );
                    }
                    reply(StatusCode::OK, rx.await.unwrap_or_default())
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service)
                .await;
        });
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

/// The control socket: root only (0600 in a directory created 0700). Refuses to start when
/// another relay answers on the same path.
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another relay is running with control socket {}",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// An edge relay holds two descriptors per connection: use every descriptor the hard limit
/// allows rather than the conservative default soft limit. The worker inherits it across exec.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!("could not raise the open file limit");
            }
        }
    }
}
