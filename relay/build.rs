//! Builds relay-ebpf for bpfel-unknown-none with the nightly toolchain (aya-build), so that the
//! relay binary embeds its eBPF object. Needs bpf-linker and nightly rust-src: `cargo xtask setup`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "relay-ebpf")
        .ok_or_else(|| anyhow!("relay-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (installs it and nightly rust-src)"
        ));
    }
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // aya-build relays every line the nested cargo prints as a cargo warning, replayed on every
    // build; quiet keeps only real errors.
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], Toolchain::default())
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("bpf-linker"))
            .find(|p| p.is_file())
    })
}
