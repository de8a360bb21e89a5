//! `cargo xtask demo`: placeholder until written.
use std::path::Path;

pub fn demo(_relay: &Path) -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}

pub fn dev_certs(_dir: &Path) -> anyhow::Result<()> {
    Ok(())
}
