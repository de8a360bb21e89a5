//! The `relay` binary: command line, logging, exit codes (0 ok, 1 runtime failure, 2 usage or
//! configuration error).

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use relay::{
    cli::{Cli, Command, LogFormat},
    config::Config,
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
        Command::Status | Command::Service(_) | Command::Reload | Command::Detach => {
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
