//! `cargo xtask dist`: a release tarball, laid out to unpack onto `/`:
//!
//! ```text
//! relay-<version>-<arch>/
//!   usr/bin/relay
//!   usr/share/man/man1/relay.1, relay-<subcommand>.1 ...
//!   usr/share/bash-completion/completions/relay
//!   usr/share/zsh/vendor-completions/_relay
//!   usr/share/fish/vendor_completions.d/relay.fish
//!   lib/systemd/system/relay.service
//!   etc/relay/relay.toml.example
//!   usr/share/doc/relay/README.md
//! ```
//!
//! Man pages and completions come from the binary itself (`relay manpages`, `relay
//! completions`), so they always match its clap definitions.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{capture, run};

pub fn dist(relay: &Path) -> anyhow::Result<PathBuf> {
    let version = capture(Command::new(relay).arg("--version"))?
        .trim()
        .trim_start_matches("relay ")
        .to_string();
    let arch = std::env::consts::ARCH;
    let name = format!("relay-{version}-{arch}-linux");
    let out = Path::new("target/dist");
    let root = out.join(&name);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let put = |rel: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, bytes).with_context(|| format!("write {}", p.display()))
    };
    put("usr/bin/relay", &fs::read(relay)?)?;
    run(Command::new("chmod")
        .arg("0755")
        .arg(root.join("usr/bin/relay")))?;
    run(Command::new(relay)
        .arg("manpages")
        .arg(root.join("usr/share/man/man1")))?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/relay"),
        ("zsh", "usr/share/zsh/vendor-completions/_relay"),
        ("fish", "usr/share/fish/vendor_completions.d/relay.fish"),
    ] {
        put(
            path,
            capture(Command::new(relay).args(["completions", shell]))?.as_bytes(),
        )?;
    }
    put(
        "lib/systemd/system/relay.service",
        &fs::read("dist/relay.service")?,
    )?;
    put(
        "etc/relay/relay.toml.example",
        &fs::read("dist/relay.toml.example")?,
    )?;
    put("usr/share/doc/relay/README.md", &fs::read("README.md")?)?;
    let tarball = out.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(out)
        .arg(&name))?;
    eprintln!("built {}", tarball.display());
    Ok(tarball)
}
