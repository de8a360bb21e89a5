//! The `relay` binary: command line, logging, exit codes (0 ok, 1 runtime failure, 2 usage or
//! configuration error).

use std::{io::IsTerminal as _, path::Path, process::ExitCode};

use clap::Parser as _;
use relay::{
    cli::{Cli, Command, LogFormat},
    config::Config,
    datapath,
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
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("relay: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match runtime.block_on(relay::run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Status { config, json } => exit(status(config.as_deref(), json), EXIT_RUNTIME),
        Command::Detach { config } => exit(detach(config.as_deref()), EXIT_RUNTIME),
        Command::Service(_) | Command::Reload => {
            eprintln!(
                "relay: this command talks to a running relay's control socket, which this \
                 version does not have yet"
            );
            ExitCode::from(EXIT_RUNTIME)
        }
    }
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

fn status(config: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let dp = datapath_config(config)?;
    let pin = &dp.pin_path;
    if !pin.exists() {
        anyhow::bail!("no data path attached ({} does not exist)", pin.display());
    }
    let attachments = datapath::attachments(pin);
    let counters = datapath::Maps::open_pinned(pin)?.counters()?;
    if json {
        let v = serde_json::json!({ "pin_path": pin, "attachments": attachments, "counters": counters });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("data path pinned in {}", pin.display());
    for a in &attachments {
        println!("  interface {:<16} xdp mode {}", a.interface, a.xdp_mode);
    }
    println!(
        "\n  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "service", "steered", "dropped", "passed", "malformed", "no_listener"
    );
    for c in counters {
        println!(
            "  {:<24} {:>12} {:>12} {:>12} {:>12} {:>12}",
            c.service, c.steered, c.dropped, c.passed, c.malformed, c.no_listener
        );
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
