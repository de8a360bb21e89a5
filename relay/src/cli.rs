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

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Show the running relay: services, connections, worker, data path mode and counters.
    /// With the relay down, shows what the pinned data path still does.
    Status {
        #[command(flatten)]
        target: Target,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The members of this gateway's cluster (from etcd) and whether they agree on the
        /// service set.
        #[arg(long)]
        cluster: bool,
    },
    /// Add, remove or list services of the running relay.
    Service {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Reload the configuration file of the running relay (as SIGHUP does).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// TLS session ticket keys of the running relay.
    Tickets {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: TicketsCommand,
    },
    /// Certificates of the running relay.
    Cert {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (relay.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// The worker process, started by `relay run`; not for direct use.
    #[command(hide = true)]
    Worker {
        /// The user and group to run as (the supervisor's `relay.user`, when it runs as root).
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// The kernel copy's maps are at descriptors 4 and 5.
        #[arg(long)]
        kernel_copy: bool,
        /// Runtime threads (`[relay] threads`); default: one per CPU the worker may use.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Remove every program, link, pin, rule and route the relay attached.
    Detach {
        /// Config file naming the pin directory and routing table (default: built-in ones).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Which running relay a command talks to.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The relay's config file (names its control socket and pin directory).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// The control socket, when not given by --config (default /run/relay/control.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TicketsCommand {
    /// Draw a new current key now (the previous stays valid for decryption); with [cluster],
    /// for every gateway.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Order a new ACME certificate for a service with cert = "acme" now (it replaces the
    /// current one for new connections once issued).
    Renew { service: String },
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service at runtime: live at once (listener or data path entry).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        server: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        backend_port: u16,
        /// Another backend than (server, backend-port).
        #[arg(long)]
        backend: Option<std::net::SocketAddr>,
        /// Explicit mode: listen here instead of being steered to by the data path.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[arg(long, value_enum, default_value_t = LevelArg::Plain)]
        inbound_level: LevelArg,
        /// A PEM file, or "acme" for a certificate from [acme] for --names.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// With --cert acme: a DNS name the certificate is issued for (repeat for more).
        #[arg(long = "acme-name")]
        names: Vec<String>,
        /// A plain port (80) that answers ACME http-01 validations ([acme] challenge = "http-01").
        #[arg(long)]
        answer_http01: bool,
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// Identity allowed in (mtls; repeat for more): dns:NAME, uri:URI (`*` within a path
        /// segment) or cn:NAME.
        #[arg(long)]
        allow: Vec<String>,
        /// Revocation lists for client certificates, PEM (mtls).
        #[arg(long)]
        crl: Option<PathBuf>,
        /// A CRL past its nextUpdate: reject its clients (default) or accept the stale list.
        #[arg(long, value_enum)]
        crl_expired: Option<crate::config::CrlExpired>,
        /// Plaintext on the TLS front port: reject, relay or redirect (default reject).
        #[arg(long, value_enum)]
        plaintext: Option<crate::config::Plaintext>,
        #[arg(long, value_enum, default_value_t = LevelArg::Plain)]
        outbound_level: LevelArg,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        server_name: Option<String>,
        /// Outbound ipsec: the IKE identity the backend must prove (e.g. "CN=db.example").
        #[arg(long)]
        identity: Option<String>,
        /// Client certificate toward the backend (outbound mtls).
        #[arg(long)]
        outbound_cert: Option<PathBuf>,
        #[arg(long)]
        outbound_key: Option<PathBuf>,
        /// PROXY protocol header toward the backend.
        #[arg(long, value_enum, default_value_t = crate::config::ProxyProtocol::None)]
        proxy_protocol: crate::config::ProxyProtocol,
        /// Write it to the cluster (etcd): every gateway serves it. Files are named by
        /// absolute path and must exist on every gateway.
        #[arg(long)]
        cluster: bool,
    },
    /// Remove a service; its established connections finish.
    Remove {
        name: String,
        /// Remove it from the cluster (etcd): every gateway stops taking new connections.
        #[arg(long)]
        cluster: bool,
    },
    /// List the running services.
    List,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    Plain,
    Tls,
    Mtls,
    Ipsec,
}

impl From<LevelArg> for crate::config::Level {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Plain => Self::Plain,
            LevelArg::Tls => Self::Tls,
            LevelArg::Mtls => Self::Mtls,
            LevelArg::Ipsec => Self::Ipsec,
        }
    }
}

/// Values of config enums on the command line: the config module knows no clap.
macro_rules! value_enum {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$ty>::$variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(match self {
                    $(<$ty>::$variant => $name),+
                }))
            }
        }
    };
}

value_enum!(crate::config::Plaintext {
    Reject => "reject",
    Relay => "relay",
    Redirect => "redirect",
});
value_enum!(crate::config::ProxyProtocol {
    None => "none",
    V1 => "v1",
    V2 => "v2",
});
value_enum!(crate::config::CrlExpired {
    Reject => "reject",
    Accept => "accept",
});
