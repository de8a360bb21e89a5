//! `relay run`: bring every service up, relay until told to stop, then stop gracefully.
//!
//! Explicit-mode services get a listener on their `listen` address. On SIGTERM or SIGINT the
//! relay stops accepting at once and gives established connections up to `shutdown_grace` to
//! finish; whatever is still open then is closed.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, bail};
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
    proxy::{self, ServiceRuntime, Shared},
};

/// Listen backlog: a burst of clients waits in the kernel rather than being refused.
const BACKLOG: i32 = 4096;

pub async fn run(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    if config.datapath.is_some() || config.services.iter().any(|s| s.listen.is_none()) {
        bail!(
            "transparent mode ([datapath] and services without `listen`) is not available in \
             this version yet; give every service a `listen` address"
        );
    }
    let shared = Arc::new(Shared {
        timeouts: (&config.relay).into(),
        total: Arc::new(Semaphore::new(config.relay.max_connections)),
        tracker: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });
    let mut services = Vec::new();
    for s in &config.services {
        let runtime = Arc::new(ServiceRuntime::new(s.clone())?);
        let addr = s.listen.expect("explicit mode checked above");
        let listener =
            bind(addr).with_context(|| format!("service {}: listen on {addr}", s.name))?;
        info!(
            service = %s.name, listen = %addr, backend = %s.backend_addr(),
            inbound = %s.inbound.level, outbound = %s.outbound.level, "service listening"
        );
        services.push(Arc::clone(&runtime));
        tokio::spawn(proxy::serve(listener, runtime, Arc::clone(&shared)));
    }
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
        info!(
            service = %s.name(),
            "final counters: {}",
            s.metrics.summary()
        );
    }
    info!("relay stopped");
    Ok(())
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
