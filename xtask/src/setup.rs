//! Toolchain bootstrap: everything `relay` needs beyond rustup's stable + nightly and cargo.
//!
//! Every step checks first and does nothing when its piece is already there, so running it before
//! every other xtask command costs well under a second on a prepared machine. On a fresh Debian
//! machine it installs, with a line of progress each:
//! - Debian packages: LLVM of the same major version as the nightly rustc (bpf-linker links
//!   against it), bpftool, and the peers the tests and the demo drive (curl, openssl, iproute2,
//!   iputils-ping, python3 for `http.server`, systemd-analyze and man for the unit check).
//! - the nightly `rust-src` component (`-Z build-std=core` for the bpfel target). rustup does not
//!   install a toolchain file's components by itself where `RUSTUP_AUTO_INSTALL=0`.
//! - `bpf-linker`, built from crates.io against Debian's `llvm-NN-dev`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{capture, run};

/// bpf-linker release known to build against LLVM 22 with the installed Rust.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the project uses at run or test time (besides LLVM, chosen at run time).
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "curl",
    "openssl",
    "iproute2",
    "iputils-ping",
    "python3",
    "procps",
    // systemd-analyze verifies the unit; it resolves Documentation=man:relay(1) with man.
    "systemd",
    "man-db",
    // The PROXY protocol tests' real consumer, and the capture that proves chained relays send
    // nothing in clear.
    "haproxy",
    "tshark",
    // libFuzzer (the fuzzing step) is C++.
    "g++",
    // The cluster's store: the tests and `demo --cluster` run a real etcd and write with
    // etcdctl; the etcd client crate compiles etcd's protobuf definitions with protoc.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // The directory tests' real LDAP server, and the tools that change its data mid-test.
    "slapd",
    "ldap-utils",
    // The certificate tests' ACME server (Let's Encrypt's pebble, with its test DNS).
    "pebble",
    // IPsec: strongSwan's charon keys `level = "ipsec"` (the relay drives it over VICI);
    // kernel-libipsec (ESP in userspace, for kernels without ESP) is in the extra plugins.
    "strongswan-charon",
    "strongswan-swanctl",
    "libcharon-extra-plugins",
];

pub fn setup() -> anyhow::Result<()> {
    let started = Instant::now();
    let llvm_major = nightly_llvm_major()?;
    let llvm_dev = format!("llvm-{llvm_major}-dev");
    let mut wanted: Vec<&str> = APT_PACKAGES.to_vec();
    wanted.push(&llvm_dev);
    apt_install(&wanted)?;
    rust_src()?;
    bpf_linker(llvm_major)?;
    let took = started.elapsed();
    if took > Duration::from_secs(2) {
        step(&format!("toolchain ready in {}", secs(took)));
    }
    Ok(())
}

fn step(msg: &str) {
    eprintln!("\x1b[1m[setup]\x1b[0m {msg}");
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The LLVM major version of the nightly rustc: bpf-linker must be built against the same one,
/// because it reads the bitcode that rustc's LLVM writes.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let out = capture(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "the nightly toolchain is missing: install it with `rustup toolchain install nightly`",
    )?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unparsable LLVM version {version:?}"))
}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !apt_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "Debian packages missing: {} — run `cargo xtask setup` as root, or `apt-get install {}`",
        missing.join(" "),
        missing.join(" ")
    );
    let t = Instant::now();
    step(&format!(
        "apt: installing {} (about 30 s)",
        missing.join(" ")
    ));
    // Packages such as haproxy and nginx would start their system services on install; a
    // `policy-rc.d` that refuses service starts exists only while apt runs (a machine's own
    // policy-rc.d is respected as is).
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask while apt runs\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: are Debian's package mirrors reachable?")
        .and_then(|_| {
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))
            .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
        });
    if ours {
        std::fs::remove_file(policy).context("removing /usr/sbin/policy-rc.d")?;
    }
    result?;
    step(&format!("apt: done in {}", secs(t.elapsed())));
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("rustup is missing or has no nightly toolchain")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    let t = Instant::now();
    step("rustup: adding rust-src to nightly (build-std for the eBPF target)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("rustup component add rust-src --toolchain nightly failed")?;
    step(&format!("rustup: done in {}", secs(t.elapsed())));
    Ok(())
}

fn bpf_linker(llvm_major: u32) -> anyhow::Result<()> {
    let current = capture(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{llvm_major}");
    if !std::path::Path::new(&format!("{prefix}/bin/llvm-config")).exists() {
        bail!("{prefix}/bin/llvm-config is missing: install llvm-{llvm_major}-dev");
    }
    let t = Instant::now();
    step(&format!(
        "cargo: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} (about 2 min)"
    ));
    let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
    // LLVM_PREFIX and PATH make bpf-linker's build script find Debian's LLVM rather than the
    // distribution default /usr/bin/llvm-config (an older major).
    run(Command::new("cargo")
        .args(["install", "--locked", "--force", "--no-default-features"])
        .arg("--features")
        .arg(format!("llvm-{llvm_major}"))
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path))
    .context("building bpf-linker failed")?;
    step(&format!("cargo: bpf-linker built in {}", secs(t.elapsed())));
    Ok(())
}

/// Debian packages `cargo xtask bench` drives: the peers relay is compared with (HAProxy,
/// stunnel, nginx's stream module), the load generators (wrk for handshakes, h2load from
/// nghttp2-client for keep-alive requests, iperf3 for the tunnel's stream), the backend
/// (nginx), nftables for the drop comparison, trafgen (netsniff-ng) for the packet flood and
/// perf for profiles. Installed only by the bench, so the test command stays lean.
const BENCH_PACKAGES: &[&str] = &[
    "haproxy",
    "stunnel4",
    "wrk",
    "nghttp2-client",
    "nginx-light",
    // `stream {}` as a dynamic module (/usr/lib/nginx/modules/ngx_stream_module.so), for the
    // nginx peer: Debian builds nginx with `--with-stream=dynamic`.
    "libnginx-mod-stream",
    // Client and server of the plain→TLS→plain tunnel. Its debconf question (start an iperf3
    // daemon at boot?) is answered with its default, no, as `apt_install` runs apt
    // noninteractive; the bench starts its own servers.
    "iperf3",
    "nftables",
    "netsniff-ng",
    "linux-perf",
    "util-linux",
];

/// cargo-fuzz, for the fuzzing step of `cargo xtask test`.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    let t = Instant::now();
    step("cargo install cargo-fuzz (about a minute)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("cargo install cargo-fuzz failed: is crates.io reachable?")?;
    step(&format!("cargo-fuzz installed in {}", secs(t.elapsed())));
    Ok(())
}

/// Installs the bench's peers.
pub fn bench_tools() -> anyhow::Result<()> {
    apt_install(BENCH_PACKAGES)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
