//! Developer workflow for `relay`: `cargo xtask <command>`.
//!
//! Every command first runs the idempotent toolchain bootstrap (`setup`), so the two README
//! commands work on a fresh machine that has only rustup's stable + nightly toolchains and root.

mod bench;
mod demo;
mod demo_cluster;
mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, demo and test relay")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs (apt packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the relay (and its embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Show relay at work: real curl over TLS through the relay to a real HTTP backend.
    Demo {
        /// Two gateways sharing services and session keys through etcd, behind an ECMP route.
        #[arg(long)]
        cluster: bool,
    },
    /// Run the relay in the foreground with a config (default: examples/relay.toml).
    Run {
        #[arg(long, default_value = "examples/relay.toml")]
        config: PathBuf,
    },
    /// Measure relay against HAProxy, stunnel and nginx stream (and no relay), same run, same
    /// work; writes target/bench/report.md and target/bench/ratios.svg.
    Bench {
        /// A reduced run (shorter loads, smaller transfers) that takes a few minutes.
        #[arg(long)]
        quick: bool,
        /// Servers pinned to one core with one thread, at their defaults unpinned, or both
        /// passes one after the other.
        #[arg(long, value_enum, default_value = "both")]
        mode: bench::Modes,
        /// Run only the scenarios whose title contains this (e.g. "bulk", "idle", "tunnel",
        /// "XDP", "level pairs").
        #[arg(long)]
        only: Option<String>,
        /// Also measure relay as of this git revision (built in its own worktree), side by
        /// side in the level-pair scenario: before/after figures from one run.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
    },
    /// Build a release tarball (binary, man pages, completions, systemd unit, example config).
    Dist,
    /// Lint and run every test (unit, eBPF, end to end). CI runs exactly this.
    Test {
        /// The heavy variants of the hostile-input suite (more connections, larger transfers,
        /// more rounds); sets RELAY_SOAK=1 for the tests.
        #[arg(long)]
        soak: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("\x1b[1;31merror:\x1b[0m {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    std::env::set_current_dir(workspace_root())?;
    setup::setup()?;
    match cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => build(release),
        Cmd::Demo { cluster } => {
            build(false)?;
            if cluster {
                demo_cluster::demo(&relay_bin(false))
            } else {
                demo::demo(&relay_bin(false))
            }
        }
        Cmd::Run { config } => {
            build(false)?;
            demo::dev_certs(Path::new("examples/certs"))?;
            let status = Command::new(relay_bin(false))
                .arg("run")
                .arg("--config")
                .arg(&config)
                .status()
                .context("starting relay")?;
            if !status.success() {
                bail!("relay exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { soak, args } => test(soak, &args),
        Cmd::Bench {
            quick,
            mode,
            only,
            baseline,
        } => {
            let relay = bench::build_release()?;
            bench::bench(quick, only.as_deref(), baseline.as_deref(), mode, &relay)
        }
        Cmd::Dist => {
            build(true)?;
            dist::dist(&relay_bin(true)).map(|_| ())
        }
    }
}

fn test(soak: bool, args: &[String]) -> anyhow::Result<()> {
    if !setup::is_root() {
        eprintln!(
            "\x1b[1;33mwarning:\x1b[0m not root: the eBPF and network-namespace tests will FAIL \
             (they need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run as root, as CI does"
        );
    }
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("clippy found problems")?;
    // `cargo test` builds the relay binary too (its package has integration tests), with the
    // same features as the tests: a separate `cargo build` would compile much of it twice.
    let mut cargo_test = Command::new("cargo");
    cargo_test
        .args(["test", "--no-fail-fast"])
        .args(args)
        .env("RELAY_BIN", relay_bin(false));
    if soak {
        cargo_test.env("RELAY_SOAK", "1");
    }
    run(&mut cargo_test).context("tests failed")?;
    fuzz(if soak { 600 } else { 20 })
}

/// The fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer): every parser of untrusted or
/// operator-written input.
const FUZZ_TARGETS: &[&str] = &[
    "config",
    "control_request",
    "allow_rules",
    "http_redirect",
    "proxy_header",
    "tls_records",
];

/// Runs every fuzz target for `seconds`, starting from the committed seeds. A crash fails the
/// test run and leaves its input in `fuzz/artifacts/<target>/`.
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    setup::cargo_fuzz()?;
    // No sanitizer in this bounded run: the targets are safe Rust, so libFuzzer looks for
    // panics, hangs and runaway memory; it also halves the build. Longer runs: see README.
    run(Command::new("cargo").args(["+nightly", "fuzz", "build", "--sanitizer", "none"]))
        .context("building the fuzz targets")?;
    for target in FUZZ_TARGETS {
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(&corpus)?;
        run(Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                target,
                &corpus,
            ])
            .arg(format!("fuzz/seeds/{target}"))
            .args(["--", "-rss_limit_mb=2048", "-timeout=10"])
            .arg(format!("-max_total_time={seconds}")))
        .with_context(|| format!("fuzz target {target} failed: see fuzz/artifacts/{target}/"))?;
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "relay"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building relay failed")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn relay_bin(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target
        .join(if release { "release" } else { "debug" })
        .join("relay")
}

/// Runs a command with inherited stdio; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{} exited with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command with `input` on its stdin; fails if it fails.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{} exited with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails if it cannot start or fails.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
