//! The command line (SPEC §5). Kept in the library so man pages and completions can be generated
//! from the same definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "relay", version, about = "eBPF-accelerated security relay", long_about = None)]
pub struct Cli {
    /// Log line format (the level filter comes from RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0: valid, 2: invalid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the data path: XDP mode per interface and counters per service.
    Status {
        /// Config file naming the pin directory (default: /sys/fs/bpf/relay).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove or list services of the running relay.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Reload the configuration of the running relay.
    Reload,
    /// Remove every program, link, pin, rule and route the relay attached.
    Detach {
        /// Config file naming the pin directory and routing table (default: built-in ones).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service at runtime.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        server: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        backend_port: u16,
    },
    /// Remove a service; its established connections finish.
    Remove { name: String },
    /// List the running services.
    List,
}
