//! `relay run`: bring every service up, relay until told to stop, then stop gracefully.
//!
//! Explicit-mode services get a listener on their `listen` address. Transparent services are
//! reached through the data path: its programs are attached (or taken over from a previous
//! run) on the client-facing interfaces, the policy maps are synced with the config, and two
//! transparent listeners (IPv4, IPv6) receive every steered connection.
//!
//! On SIGTERM or SIGINT the relay stops accepting at once and gives established connections up
//! to `shutdown_grace` to finish. The data path stays attached and pinned: the backend ports
//! stay dropped while the relay is down, and steered SYNs are dropped (clients retransmit)
//! until a relay listens again. `relay detach` removes it.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::Config,
    datapath::{self, Datapath, Routing},
    proxy::{self, Route, ServiceRuntime, Shared},
};

/// Listen backlog: a burst of clients waits in the kernel rather than being refused.
const BACKLOG: i32 = 4096;

pub async fn run(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    let shared = Arc::new(Shared {
        timeouts: (&config.relay).into(),
        total: Arc::new(Semaphore::new(config.relay.max_connections)),
        tracker: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });
    let mut services = Vec::new();
    let mut transparent = HashMap::new();
    for s in &config.services {
        let runtime = Arc::new(ServiceRuntime::new(s.clone())?);
        services.push(Arc::clone(&runtime));
        match s.listen {
            Some(addr) => {
                let listener =
                    bind(addr).with_context(|| format!("service {}: listen on {addr}", s.name))?;
                info!(
                    service = %s.name, listen = %addr, backend = %s.backend_addr(),
                    inbound = %s.inbound.level, outbound = %s.outbound.level, "service listening"
                );
                tokio::spawn(proxy::serve(
                    listener,
                    Route::Service(runtime),
                    Arc::clone(&shared),
                ));
            }
            None => {
                info!(
                    service = %s.name, front = %SocketAddr::new(s.server, s.port),
                    backend = %s.backend_addr(), dropped = %SocketAddr::new(s.server, s.backend_port),
                    inbound = %s.inbound.level, outbound = %s.outbound.level, "service steered"
                );
                transparent.insert((s.server.to_canonical(), s.port), runtime);
            }
        }
    }
    let datapath = match &config.datapath {
        Some(dp) => Some(start_datapath(dp, &config, transparent, &shared)?),
        None => None,
    };
    info!(services = services.len(), "relay ready");

    wait_for_stop().await?;
    shared.shutdown.cancel();
    shared.tracker.close();
    let open = shared.tracker.len();
    let grace = config.relay.shutdown_grace;
    info!(
        open_connections = open,
        "stopping: no new connections, waiting up to {grace:?}"
    );
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open_connections = shared.tracker.len(),
            "shutdown grace elapsed, closing the remaining connections"
        );
    }
    for s in &services {
        info!(service = %s.name(), "final counters: {}", s.metrics.summary());
    }
    if let Some(dp) = datapath {
        for c in dp.maps.counters()? {
            info!(
                service = %c.service, steered = c.steered, dropped = c.dropped,
                passed = c.passed, malformed = c.malformed, no_listener = c.no_listener,
                "data path counters"
            );
        }
        info!("data path stays attached (backend ports stay dropped); `relay detach` removes it");
    }
    info!("relay stopped");
    Ok(())
}

/// Attaches (or takes over) the data path and starts the transparent listeners.
fn start_datapath(
    dp: &crate::config::Datapath,
    config: &Config,
    transparent: HashMap<(std::net::IpAddr, u16), Arc<ServiceRuntime>>,
    shared: &Arc<Shared>,
) -> anyhow::Result<Datapath> {
    datapath::prepare_pin_dir(&dp.pin_path)?;
    let mut datapath = Datapath::load(Some(&dp.pin_path))?;
    if tracing::enabled!(tracing::Level::DEBUG)
        && let Err(e) = datapath.spawn_logger()
    {
        warn!("eBPF debug log unavailable: {e:#}");
    }
    // Policy first: a freshly attached program must drop backend ports from its first packet.
    datapath
        .maps
        .sync(&config.services)
        .context("sync the policy maps")?;
    Routing {
        table: dp.route_table,
    }
    .install()
    .context("install the steering route")?;
    for interface in &dp.interfaces {
        let a = datapath.attach(&dp.pin_path, interface, dp.xdp_mode)?;
        info!(interface = %a.interface, xdp_mode = %a.xdp_mode, "data path attached");
    }
    let v4 = datapath::transparent_listener("127.0.0.1:0".parse()?)?;
    let v6 = datapath::transparent_listener("[::1]:0".parse()?)?;
    datapath.maps.set_listeners(&v4, &v6)?;
    let route = Route::ByDestination(Arc::new(transparent));
    for l in [v4, v6] {
        let l = TcpListener::from_std(l)?;
        tokio::spawn(proxy::serve(l, route.clone(), Arc::clone(shared)));
    }
    Ok(datapath)
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted relay must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT received"); return Ok(()); }
            // SIGHUP would terminate the process by default; reload arrives with the supervisor.
            _ = hup.recv() => warn!("SIGHUP: configuration reload is not available in this version yet; ignored"),
        }
    }
}

/// An edge relay holds two descriptors per connection: use every descriptor the hard limit
/// allows rather than the conservative default soft limit.
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
