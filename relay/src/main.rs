//! The `relay` binary: command line, logging, exit codes (0 ok, 1 runtime failure, 2 usage or
//! configuration error).

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser as _};
use relay::{
    cli::{CertCommand, Cli, Command, LogFormat, ServiceCommand, Target, TicketsCommand},
    cluster::ClusterStatus,
    config::Config,
    control::{self, ChangeSummary, ClusterWrite, DatapathStatus, Request, Status},
    datapath, service, supervisor, worker,
};
use tracing_subscriber::EnvFilter;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match service::check_file(&config) {
            Ok(checked) => {
                for warning in &checked.warnings {
                    eprintln!("relay: warning: {warning}");
                }
                let c = &checked.config;
                let explicit = c.services.iter().filter(|s| s.listen.is_some()).count();
                println!(
                    "{}: valid, {} service(s): {} explicit, {} transparent",
                    config.display(),
                    c.services.len(),
                    explicit,
                    c.services.len() - explicit
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config: path } => {
            let checked = match service::check_file(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            exit(
                runtime()
                    .and_then(|rt| rt.block_on(supervisor::run(path, checked, cli.log_format))),
                EXIT_RUNTIME,
            )
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "relay", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => exit(manpages(&dir), EXIT_RUNTIME),
        Command::Worker {
            uid,
            gid,
            kernel_copy,
            threads,
        } => {
            let identity = uid.zip(gid).map(|(uid, gid)| worker::Identity { uid, gid });
            let start = worker::Start {
                identity,
                kernel_copy,
                threads,
            };
            exit(worker::main(start), EXIT_RUNTIME)
        }
        Command::Status {
            target,
            json,
            cluster: false,
        } => exit(status(&target, json), EXIT_RUNTIME),
        Command::Status {
            target,
            json,
            cluster: true,
        } => exit(cluster_status(&target, json), EXIT_RUNTIME),
        Command::Tickets {
            target,
            command: TicketsCommand::Rotate,
        } => exit(
            call::<ClusterWrite>(&target, &Request::RotateTickets {}).map(|w| {
                if w.key.is_empty() {
                    println!("ticket keys rotated");
                } else {
                    println!(
                        "ticket keys rotated in {} at revision {}: every gateway takes them",
                        w.key, w.revision
                    );
                }
            }),
            EXIT_RUNTIME,
        ),
        Command::Cert {
            target,
            command: CertCommand::Renew { service },
        } => exit(
            call::<String>(&target, &Request::RenewCertificate { service })
                .map(|s| println!("{s}")),
            EXIT_RUNTIME,
        ),
        Command::Service { target, command } => exit(service(&target, command), EXIT_RUNTIME),
        Command::Reload { target } => exit(
            call::<ChangeSummary>(&target, &Request::Reload {}).map(|s| println!("reloaded: {s}")),
            EXIT_RUNTIME,
        ),
        Command::Detach { config } => exit(detach(config.as_deref()), EXIT_RUNTIME),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn exit(r: anyhow::Result<()>, code: u8) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// The data path section of `config`, or the defaults when no config is given.
fn datapath_config(config: Option<&Path>) -> anyhow::Result<relay::config::Datapath> {
    Ok(match config {
        Some(path) => Config::load(path)?.datapath.unwrap_or_default(),
        None => relay::config::Datapath::default(),
    })
}

/// The control socket of the relay `target` names.
fn socket_of(target: &Target) -> anyhow::Result<PathBuf> {
    if let Some(s) = &target.socket {
        return Ok(s.clone());
    }
    Ok(match &target.config {
        Some(path) => Config::load(path)?.relay.control_socket,
        None => relay::config::RelaySection::default().control_socket,
    })
}

fn call<T: serde::de::DeserializeOwned>(target: &Target, request: &Request) -> anyhow::Result<T> {
    control::call(&socket_of(target)?, request)
}

fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    match call::<Status>(target, &Request::Status {}) {
        Ok(status) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        // Relay down: the pinned data path may still be dropping and counting.
        Err(e) => {
            eprintln!("relay: {e:#}");
            datapath_status(target.config.as_deref(), json)
        }
    }
}

fn cluster_status(target: &Target, json: bool) -> anyhow::Result<()> {
    let c: ClusterStatus = call(target, &Request::ClusterStatus {})?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!(
        "cluster: this gateway {:?}, {}, revision {} applied; leader {}",
        c.name,
        if c.connected {
            "connected to etcd"
        } else {
            "NOT connected to etcd (serving its last state)"
        },
        c.revision,
        c.leader.as_deref().unwrap_or("(none)")
    );
    if let Some(e) = &c.error {
        println!("  members unknown: {e}");
        return Ok(());
    }
    println!(
        "\n  {:<20} {:>10} {:<13} {:>9} {:<16} {:<7} version",
        "member", "revision", "service set", "services", "health", "leader"
    );
    for m in &c.members {
        println!(
            "  {:<20} {:>10} {:<13} {:>9} {:<16} {:<7} {}",
            m.name,
            m.revision,
            m.digest,
            m.services,
            m.health,
            if m.leader { "yes" } else { "" },
            m.version
        );
    }
    println!(
        "\n  {}",
        if c.agree {
            "all members serve the same cluster service set"
        } else {
            "members DISAGREE on the service set (a change still propagating, an entry refused \
             somewhere, or a member cut off)"
        }
    );
    Ok(())
}

/// Each certificate's end of validity and source, and the ACME orders.
fn print_certificates(services: &[relay::control::ServiceInfo]) {
    if services.iter().all(|v| v.certificates.is_empty()) {
        return;
    }
    println!(
        "\n  {:<20} {:<22} {:<22} {:<6} source",
        "service", "certificate", "not after (UTC)", "days"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for v in services {
        for c in &v.certificates {
            let (end, days) = match c.not_after {
                Some(t) => (
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                    )
                    .to_string(),
                    ((t as i64 - now) / 86_400).to_string(),
                ),
                None => ("none yet".to_string(), "-".to_string()),
            };
            println!(
                "  {:<20} {:<22} {:<22} {:<6} {} {}",
                v.name, c.key, end, days, c.source, c.path
            );
        }
        if let Some(a) = &v.acme {
            let last = a
                .last_error
                .as_deref()
                .map(|e| format!("; last failure: {e}"))
                .unwrap_or_default();
            println!(
                "  {:<20} acme: {} order(s), {} failure(s), {} renewal(s){last}",
                "", a.orders, a.failures, a.renewals
            );
        }
    }
}

/// Each `ipsec` service's SA.
fn print_ipsec(services: &[relay::control::ServiceInfo]) {
    for v in services {
        if let Some(c) = &v.ipsec_clients {
            let state = if c.loaded { "loaded" } else { "not loaded" };
            println!(
                "\n  {}: inbound ipsec ({state}), {} client SA(s): {}",
                v.name,
                c.clients.len(),
                c.clients.join(", ")
            );
            if let Some(p) = &c.problem {
                println!("  {:<20} {p}", "");
            }
        }
    }
    if services.iter().all(|v| v.ipsec.is_none()) {
        return;
    }
    println!(
        "\n  {:<20} {:<6} {:<40} {:>6} {:>8} {:>6}",
        "service", "SA", "peer", "tries", "failures", "rekeys"
    );
    for v in services {
        let Some(sa) = &v.ipsec else { continue };
        let state = if sa.up { "up" } else { "down" };
        println!(
            "  {:<20} {:<6} {:<40} {:>6} {:>8} {:>6}",
            v.name,
            state,
            format!(
                "{} ({})",
                sa.backend.map(|b| b.to_string()).unwrap_or_default(),
                sa.identity
            ),
            sa.initiations,
            sa.failures,
            sa.rekeys
        );
        if let Some(p) = &sa.problem {
            println!("  {:<20} {p}", "");
        }
    }
}

fn print_status(s: &Status) {
    let worker = s.worker.as_ref().map_or_else(
        || "being started".to_string(),
        |w| format!("pid {}, up {} s", w.pid, w.uptime_s),
    );
    println!(
        "relay: supervisor pid {}, up {} s; worker {worker}, restarts {}",
        s.supervisor_pid, s.uptime_s, s.worker_restarts
    );
    println!(
        "\n  {:<20} {:<12} {:<28} {:<24} {:>5} {:>5}",
        "service", "mode", "front", "backend", "in", "out"
    );
    for v in &s.services {
        println!(
            "  {:<20} {:<12} {:<28} {:<24} {:>5} {:>5}",
            v.name, v.mode, v.front, v.backend, v.inbound, v.outbound
        );
    }
    println!(
        "\n  {:<20} {:>10} {:>8} {:>14} {:>14}  outcomes",
        "service", "accepted", "active", "bytes up", "bytes down"
    );
    match &s.connections {
        Some(connections) => {
            for c in connections {
                println!(
                    "  {:<20} {:>10} {:>8} {:>14} {:>14}  {:?}",
                    c.service, c.accepted, c.active, c.bytes_up, c.bytes_down, c.outcomes
                );
            }
        }
        None => println!("  (the worker did not answer)"),
    }
    print_certificates(&s.services);
    print_ipsec(&s.services);
    if let Some(d) = &s.directory {
        println!(
            "\n  directory {}: {}; {} lookup(s), {} cache hit(s), {} failure(s), {} stale \
             decision(s), {} identit(ies) cached",
            d.url,
            match &d.last_error {
                None => "reachable".to_string(),
                Some(e) => format!("UNREACHABLE ({e})"),
            },
            d.lookups,
            d.cache_hits,
            d.failures,
            d.stale,
            d.cached
        );
    }
    if let Some(c) = &s.cluster {
        println!(
            "\n  cluster member {:?}: {}, revision {}, {} change(s) applied, {} refused{}; \
             services from the cluster: {:?}",
            c.name,
            if c.connected {
                "connected"
            } else {
                "NOT connected (fail static)"
            },
            c.revision,
            c.applied,
            c.refused,
            if c.leader { ", leader" } else { "" },
            c.services
        );
    }
    if let Some(d) = &s.datapath {
        println!();
        print_datapath(d);
    }
}

fn print_datapath(d: &DatapathStatus) {
    println!("  data path pinned in {}", d.pin_path.display());
    for a in &d.attachments {
        println!("  interface {:<16} xdp mode {}", a.interface, a.xdp_mode);
    }
    println!(
        "\n  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "service", "steered", "dropped", "passed", "malformed", "no_listener"
    );
    for c in &d.counters {
        println!(
            "  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
            c.service, c.steered, c.dropped, c.passed, c.malformed, c.no_listener
        );
    }
}

/// The pinned data path alone (`relay status` with the relay down).
fn datapath_status(config: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let dp = datapath_config(config)?;
    let pin = &dp.pin_path;
    if !pin.exists() {
        anyhow::bail!(
            "no data path attached either ({} does not exist)",
            pin.display()
        );
    }
    let d = DatapathStatus {
        pin_path: pin.clone(),
        attachments: datapath::attachments(pin),
        counters: datapath::Counters::open_pinned(pin)?.read()?,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "datapath": d }))?
        );
    } else {
        println!("relay is not running; the pinned data path:");
        print_datapath(&d);
    }
    Ok(())
}

fn service(target: &Target, command: ServiceCommand) -> anyhow::Result<()> {
    let summary: ChangeSummary = match command {
        ServiceCommand::List => {
            let services: Vec<relay::config::Service> = call(target, &Request::ServiceList {})?;
            println!("{}", serde_json::to_string_pretty(&services)?);
            return Ok(());
        }
        ServiceCommand::Remove {
            name,
            cluster: true,
        } => {
            let w: ClusterWrite = call(
                target,
                &Request::ServiceRemove {
                    name,
                    cluster: true,
                },
            )?;
            println!(
                "removed {} at revision {}: every gateway stops taking new connections for it",
                w.key, w.revision
            );
            return Ok(());
        }
        ServiceCommand::Remove {
            name,
            cluster: false,
        } => call(
            target,
            &Request::ServiceRemove {
                name,
                cluster: false,
            },
        )?,
        ServiceCommand::Add {
            name,
            server,
            port,
            backend_port,
            backend,
            listen,
            inbound_level,
            cert,
            key,
            names,
            answer_http01,
            client_ca,
            allow,
            crl,
            crl_expired,
            plaintext,
            outbound_level,
            ca,
            server_name,
            identity,
            outbound_cert,
            outbound_key,
            proxy_protocol,
            cluster,
        } => {
            // The relay resolves nothing relative to its own directory: send absolute paths.
            let abs = |p: Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
                p.map(|p| std::path::absolute(&p).map_err(anyhow::Error::from))
                    .transpose()
            };
            let service = relay::config::Service {
                name,
                server,
                port,
                backend_port,
                backend,
                listen,
                max_connections: None,
                inbound: relay::config::Inbound {
                    level: inbound_level.into(),
                    cert: match cert {
                        Some(c) if c.as_os_str() == relay::config::ACME => Some(c),
                        c => abs(c)?,
                    },
                    key: abs(key)?,
                    names,
                    answer_http01,
                    client_ca: abs(client_ca)?,
                    allow,
                    crl: abs(crl)?,
                    crl_expired,
                    plaintext,
                    sni: Vec::new(),
                    unknown_sni: relay::config::UnknownSni::Default,
                    resumption: true,
                },
                outbound: relay::config::Outbound {
                    level: outbound_level.into(),
                    ca: abs(ca)?,
                    server_name,
                    cert: abs(outbound_cert)?,
                    key: abs(outbound_key)?,
                    identity,
                    proxy_protocol,
                    resumption: true,
                },
            };
            let request = Request::ServiceAdd {
                service: Box::new(service),
                cluster,
            };
            if cluster {
                let w: ClusterWrite = call(target, &request)?;
                println!(
                    "written to {} at revision {}: every gateway applies it",
                    w.key, w.revision
                );
                return Ok(());
            }
            call(target, &request)?
        }
    };
    println!("{summary}");
    Ok(())
}

fn detach(config: Option<&Path>) -> anyhow::Result<()> {
    let dp = datapath_config(config)?;
    let mut removed = datapath::detach(&dp)?;
    // A relay that did not stop cleanly left its IPsec fail-closed routes (on purpose).
    if let Some(path) = config {
        let c = Config::load(path)?;
        if let Some(settings) = &c.ipsec {
            // What is guarded follows from the services alone; their files are not needed.
            let wanted = relay::ipsec::Wanted::of(&c.services, &Default::default());
            removed.extend(relay::ipsec::remove_guard(
                settings,
                &wanted.guarded(),
                &wanted.listeners(),
            ));
        }
    }
    if removed.is_empty() {
        println!("nothing to detach");
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}
