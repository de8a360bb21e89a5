//! The `relay` binary: command line, logging, exit codes (0 ok, 1 runtime failure, 2 usage or
//! configuration error).

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser as _};
use relay::{
    cli::{Cli, Command, LogFormat, ServiceCommand, Target},
    config::Config,
    control::{self, Request},
    datapath, supervisor, worker,
};
use tracing_subscriber::EnvFilter;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for warning in c.services.iter().flat_map(relay::tls::key_warnings) {
                    eprintln!("relay: warning: {warning}");
                }
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
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            exit(
                runtime().and_then(|rt| rt.block_on(supervisor::run(path, config, cli.log_format))),
                EXIT_RUNTIME,
            )
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "relay", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => exit(manpages(&dir), EXIT_RUNTIME),
        Command::Worker => exit(
            runtime().and_then(|rt| rt.block_on(worker::run())),
            EXIT_RUNTIME,
        ),
        Command::Status { target, json } => exit(status(&target, json), EXIT_RUNTIME),
        Command::Service { target, command } => exit(service(&target, command), EXIT_RUNTIME),
        Command::Reload { target } => exit(
            call(&target, &Request::Reload {})
                .map(|v| println!("reloaded: {}", v.as_str().unwrap_or_default())),
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

fn call(target: &Target, request: &Request) -> anyhow::Result<serde_json::Value> {
    control::call(&socket_of(target)?, request)
}

fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    match call(target, &Request::Status {}) {
        Ok(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
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

fn print_status(v: &serde_json::Value) {
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    println!(
        "relay: supervisor pid {}, up {} s; worker pid {}, restarts {}",
        v["supervisor_pid"],
        n(&v["uptime_s"]),
        v["worker"]["pid"],
        n(&v["worker_restarts"])
    );
    println!(
        "\n  {:<20} {:<12} {:<28} {:<24} {:>5} {:>5}",
        "service", "mode", "front", "backend", "in", "out"
    );
    for s in v["services"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {:<12} {:<28} {:<24} {:>5} {:>5}",
            s["name"].as_str().unwrap_or(""),
            s["mode"].as_str().unwrap_or(""),
            s["front"].as_str().unwrap_or(""),
            s["backend"].as_str().unwrap_or(""),
            s["inbound"].as_str().unwrap_or(""),
            s["outbound"].as_str().unwrap_or("")
        );
    }
    println!(
        "\n  {:<20} {:>10} {:>8} {:>14} {:>14}  outcomes",
        "service", "accepted", "active", "bytes up", "bytes down"
    );
    for c in v["connections"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {:>10} {:>8} {:>14} {:>14}  {}",
            c["service"].as_str().unwrap_or(""),
            n(&c["accepted"]),
            n(&c["active"]),
            n(&c["bytes_up"]),
            n(&c["bytes_down"]),
            c["outcomes"]
        );
    }
    if !v["datapath"].is_null() {
        println!();
        print_datapath(&v["datapath"]);
    }
}

fn print_datapath(d: &serde_json::Value) {
    println!(
        "  data path pinned in {}",
        d["pin_path"].as_str().unwrap_or("")
    );
    for a in d["attachments"].as_array().into_iter().flatten() {
        println!(
            "  interface {:<16} xdp mode {}",
            a["interface"].as_str().unwrap_or(""),
            a["xdp_mode"].as_str().unwrap_or("")
        );
    }
    println!(
        "\n  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "service", "steered", "dropped", "passed", "malformed", "no_listener"
    );
    for c in d["counters"].as_array().into_iter().flatten() {
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        println!(
            "  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
            c["service"].as_str().unwrap_or(""),
            n("steered"),
            n("dropped"),
            n("passed"),
            n("malformed"),
            n("no_listener")
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
    let v = serde_json::json!({
        "pin_path": pin,
        "attachments": datapath::attachments(pin),
        "counters": datapath::Maps::open_pinned(pin)?.counters()?,
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "datapath": v }))?
        );
    } else {
        println!("relay is not running; the pinned data path:");
        print_datapath(&v);
    }
    Ok(())
}

fn service(target: &Target, command: ServiceCommand) -> anyhow::Result<()> {
    let result = match command {
        ServiceCommand::List => call(target, &Request::ServiceList {})?,
        ServiceCommand::Remove { name } => call(target, &Request::ServiceRemove { name })?,
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
            client_ca,
            allow,
            crl,
            crl_expired,
            plaintext,
            outbound_level,
            ca,
            server_name,
            outbound_cert,
            outbound_key,
            proxy_protocol,
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
                    cert: abs(cert)?,
                    key: abs(key)?,
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
                    proxy_protocol,
                    resumption: true,
                },
            };
            call(
                target,
                &Request::ServiceAdd {
                    service: Box::new(service),
                },
            )?
        }
    };
    match result {
        serde_json::Value::String(s) => println!("{s}"),
        other => println!("{}", serde_json::to_string_pretty(&other)?),
    }
    Ok(())
}

fn detach(config: Option<&Path>) -> anyhow::Result<()> {
    let dp = datapath_config(config)?;
    let removed = datapath::detach(&dp)?;
    if removed.is_empty() {
        println!("nothing to detach");
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}
