//! The kernel objects of plain ↔ plain copying in the kernel: the `relay_copy` stream verdict
//! program and its two SOCKHASH maps (see relay-ebpf's `copy.rs` for how they work together).
//!
//! The supervisor loads them once ([`Program::load`]) and keeps them for its whole life, like
//! the listeners: each worker it starts inherits the two maps' descriptors ([`MAP_FDS`]) and
//! opens them before it enters its sandbox ([`Pairs::inherited`]). The worker then only ever
//! makes one `bpf(2)` call, `BPF_MAP_UPDATE_ELEM`, which needs no privilege on a map it holds.
//! Sockets leave the maps by themselves when they close, so a dead worker leaves nothing behind.
//!
//! Where the program cannot be loaded (no `CAP_BPF`, a kernel without SOCKHASH verdicts) or
//! `[relay] kernel_copy = false`, there is no [`Program`] and plain ↔ plain goes through
//! `splice(2)` as before.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    sync::Mutex,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapError, SockHash},
    programs::SkSkb,
    sys::SyscallError,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay-copy"));

/// Where a worker finds the maps: `MEMBERS`, then `TARGETS` (after the handoff channel's 3).
pub const MAP_FDS: [RawFd; 2] = [4, 5];

/// The loaded program, attached to `MEMBERS`; dropping it detaches the program.
pub struct Program {
    ebpf: Ebpf,
}

impl Program {
    /// Loads and attaches the program, with room for `max_connections` pairs.
    pub fn load(max_connections: usize) -> anyhow::Result<Program> {
        // Two entries per connection in each map; the maps allocate per entry, so the bound
        // costs nothing until it is used.
        let entries = u32::try_from(max_connections.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("MEMBERS", entries)
            .map_max_entries("TARGETS", entries)
            .load(OBJECT)
            .context("load the kernel copy program")?;
        let members: SockHash<_, u64> =
            SockHash::try_from(ebpf.map("MEMBERS").context("no MEMBERS map")?)?;
        let members = members
            .fd()
            .try_clone()
            .context("duplicate the MEMBERS map")?;
        let program: &mut SkSkb = ebpf
            .program_mut("relay_copy")
            .context("no relay_copy program")?
            .try_into()?;
        program.load().context("verify the kernel copy program")?;
        program
            .attach(&members)
            .context("attach the kernel copy program to its map")?;
        Ok(Program { ebpf })
    }

    /// The maps' descriptors, in [`MAP_FDS`] order, for a worker to inherit.
    pub fn map_fds(&self) -> anyhow::Result<[BorrowedFd<'_>; 2]> {
        let fd = |name| -> anyhow::Result<BorrowedFd<'_>> {
            match self.ebpf.map(name) {
                Some(Map::SockHash(data)) => Ok(data.fd().as_fd()),
                _ => anyhow::bail!("no {name} SOCKHASH in the kernel copy object"),
            }
        };
        Ok([fd("MEMBERS")?, fd("TARGETS")?])
    }
}

/// A worker's handle on the maps: puts pairs of sockets in.
pub struct Pairs {
    members: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
}

impl Pairs {
    /// Opens the maps at [`MAP_FDS`]; called once, before the sandbox (it asks the kernel
    /// what the descriptors are, a call the sandbox refuses).
    pub fn inherited(fds: [OwnedFd; 2]) -> anyhow::Result<Pairs> {
        let [members, targets] = fds;
        let open = |fd: OwnedFd| -> anyhow::Result<SockHash<MapData, u64>> {
            let data = MapData::from_fd(fd).context("open an inherited kernel copy map")?;
            Ok(SockHash::try_from(Map::SockHash(data))?)
        };
        Ok(Pairs {
            members: Mutex::new(open(members)?),
            targets: Mutex::new(open(targets)?),
        })
    }

    /// Installs the pair: from now on the kernel moves every byte that arrives on either socket
    /// to the other one. Both sockets are targets before either is a member (see the module
    /// doc of relay-ebpf's `copy.rs`).
    ///
    /// A failure before the first socket became a member leaves both sockets as they were
    /// (`Err(Untouched)`): the caller can copy by other means. After, it cannot.
    pub fn install(
        &self,
        (client, client_cookie): (BorrowedFd<'_>, u64),
        (backend, backend_cookie): (BorrowedFd<'_>, u64),
    ) -> Result<(), InstallError> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let insert = |map: &mut SockHash<MapData, u64>, key: u64, fd: BorrowedFd<'_>| {
            map.insert(key, fd.as_raw_fd(), 0).map_err(|e| match e {
                MapError::SyscallError(SyscallError { io_error, .. }) => io_error,
                other => std::io::Error::other(other),
            })
        };
        insert(&mut targets, client_cookie, backend).map_err(InstallError::Untouched)?;
        if let Err(e) = insert(&mut targets, backend_cookie, client) {
            let _ = targets.remove(&client_cookie);
            return Err(InstallError::Untouched(e));
        }
        drop(targets);
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = insert(&mut members, backend_cookie, backend) {
            let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            let _ = targets.remove(&client_cookie);
            let _ = targets.remove(&backend_cookie);
            return Err(InstallError::Untouched(e));
        }
        insert(&mut members, client_cookie, client).map_err(InstallError::HalfInstalled)
    }
}

/// Why a pair could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Nothing changed: the caller can still copy the pair itself.
    #[error("kernel copy not installed: {0}")]
    Untouched(std::io::Error),
    /// The backend's bytes already flow through the kernel, the client's cannot: the
    /// connection cannot be copied in order any more.
    #[error("kernel copy half installed: {0}")]
    HalfInstalled(std::io::Error),
}
