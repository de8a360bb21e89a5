//! The kernel objects of plain ↔ plain copying in the kernel: the `relay_copy` stream verdict
//! program and its two SOCKHASH maps (see relay-ebpf's `copy.rs` for how they work together).
//!
//! The supervisor loads them once ([`Program::load`]) and keeps them for its whole life, like
//! the listeners: each worker it starts inherits the two maps' descriptors ([`MAP_FDS`]) and
//! opens them before it enters its sandbox ([`Pairs::inherited`]). The worker then only ever
//! updates, reads and deletes map entries, which needs no privilege on a map it holds.
//! Sockets leave the SOCKHASHes by themselves when they close; the worker deletes a pair's
//! ledger and allowance when the pair ends, and the supervisor clears what a dead worker left
//! ([`Program::forget_pairs`]).
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
    maps::{HashMap, Map, MapData, MapError, RingBuf, SockHash},
    programs::SkSkb,
    sys::SyscallError,
};
use relay_common::{COPY_WINDOW, CopyAllowance, CopyLedger};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay-copy"));

/// The maps, in the order a worker finds them at [`MAP_FDS`].
const MAPS: [&str; 5] = ["MEMBERS", "TARGETS", "LEDGER", "ALLOWANCE", "NOTICES"];

/// Where a worker finds the maps (after the handoff channel's 3).
pub const MAP_FDS: [RawFd; 5] = [4, 5, 6, 7, 8];

/// The loaded program, attached to `MEMBERS`; dropping it detaches the program.
pub struct Program {
    ebpf: Ebpf,
}

impl Program {
    /// Loads and attaches the program, with room for `max_connections` pairs.
    pub fn load(max_connections: usize) -> anyhow::Result<Program> {
        // Bytes the program leaves with a socket are read through tcp_bpf; before 6.4 such a
        // read did not advance `copied_seq` nor open the window again (e5c6de5fa025), and a
        // held-back sender would wait on probes.
        let release = nix::sys::utsname::uname().context("uname")?;
        let release = release.release().to_string_lossy().into_owned();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        anyhow::ensure!(
            version >= (6, 4),
            "kernel {release} is older than 6.4, whose SOCKHASH receive path the kernel copy needs"
        );
        // Two entries per connection in each map; the maps allocate per entry, so the bound
        // costs nothing until it is used.
        let entries = u32::try_from(max_connections.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("MEMBERS", entries)
            .map_max_entries("TARGETS", entries)
            .map_max_entries("LEDGER", entries)
            .map_max_entries("ALLOWANCE", entries)
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
    pub fn map_fds(&self) -> anyhow::Result<[BorrowedFd<'_>; 5]> {
        let mut fds = Vec::with_capacity(MAPS.len());
        for name in MAPS {
            let data = match self.ebpf.map(name) {
                Some(Map::SockHash(data) | Map::HashMap(data) | Map::RingBuf(data)) => data,
                _ => anyhow::bail!("no {name} map in the kernel copy object"),
            };
            fds.push(data.fd().as_fd());
        }
        fds.try_into()
            .map_err(|_| anyhow::anyhow!("kernel copy maps miscounted"))
    }

    /// Deletes every ledger and allowance: called when the worker that owned them is gone,
    /// with its sockets (so none of them is a member any more).
    pub fn forget_pairs(&mut self) {
        fn clear<V: aya::Pod>(ebpf: &mut Ebpf, name: &str) {
            let Some(Ok(mut map)) = ebpf.map_mut(name).map(HashMap::<_, u64, V>::try_from) else {
                return;
            };
            let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
        clear::<CopyLedger>(&mut self.ebpf, "LEDGER");
        clear::<CopyAllowance>(&mut self.ebpf, "ALLOWANCE");
    }
}

/// A worker's handle on the maps: puts pairs of sockets in, keeps their allowances, hears
/// the program's notices.
pub struct Pairs {
    members: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    ledger: Mutex<HashMap<MapData, u64, CopyLedger>>,
    allowance: Mutex<HashMap<MapData, u64, CopyAllowance>>,
    notices: Mutex<RingBuf<MapData>>,
    /// How far TCP may grow a socket's receive buffer on its own (`net.ipv4.tcp_rmem`'s
    /// maximum), read before the sandbox closes /proc.
    rmem_max: u64,
}

impl Pairs {
    /// Opens the maps at [`MAP_FDS`]; called once, before the sandbox (it asks the kernel
    /// what the descriptors are, a call the sandbox refuses).
    pub fn inherited(fds: [OwnedFd; 5]) -> anyhow::Result<Pairs> {
        let [members, targets, ledger, allowance, notices] =
            fds.map(|fd| MapData::from_fd(fd).context("open an inherited kernel copy map"));
        Ok(Pairs {
            members: Mutex::new(SockHash::try_from(Map::SockHash(members?))?),
            targets: Mutex::new(SockHash::try_from(Map::SockHash(targets?))?),
            ledger: Mutex::new(HashMap::try_from(Map::HashMap(ledger?))?),
            allowance: Mutex::new(HashMap::try_from(Map::HashMap(allowance?))?),
            notices: Mutex::new(RingBuf::try_from(Map::RingBuf(notices?))?),
            rmem_max: rmem_max(),
        })
    }

    /// What the program may leave with `socket` beyond what the worker copied
    /// ([`CopyAllowance::pass_room`]): twice the most its receive buffer can hold, and a
    /// margin for segments in flight. Bytes left with a socket are charged to its buffer, so
    /// only uncharged ones get past this. The most, not the size now: TCP grows the buffer
    /// (to `tcp_rmem`'s maximum) without the worker knowing, and a worker short of CPU may
    /// not tell the program the new size before the sender has filled it; a bound taken from
    /// the size at the last report then reset connections whose peers were both reading.
    pub fn pass_room(&self, socket: BorrowedFd<'_>) -> u64 {
        let rcvbuf = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .map_or(32 << 20, |b| b as u64);
        2 * rcvbuf.max(self.rmem_max) + COPY_WINDOW / 4
    }

    /// Installs the pair: from now on the kernel moves the bytes that arrive on either socket
    /// to the other one, [`COPY_WINDOW`] at first. Both sockets have a ledger and an
    /// allowance, and are targets, before either is a member (see the module doc of
    /// relay-ebpf's `copy.rs`).
    ///
    /// A failure before the backend became a member leaves both sockets as they were
    /// (`Err`): the caller can copy by other means. A client that cannot become a member
    /// once the backend is one (it ended in between: a SOCKHASH takes established sockets
    /// only) gives [`Installed::BackendOnly`]: the client's bytes stay in its socket, for the
    /// caller to copy.
    pub fn install(
        &self,
        (client, client_cookie): (BorrowedFd<'_>, u64),
        (backend, backend_cookie): (BorrowedFd<'_>, u64),
    ) -> Result<Installed, std::io::Error> {
        let cookies = [client_cookie, backend_cookie];
        let untouched = |e| {
            self.forget(cookies);
            e
        };
        for (cookie, fd) in [(client_cookie, client), (backend_cookie, backend)] {
            self.open_ledger(cookie, fd).map_err(untouched)?;
        }
        let insert = |map: &mut SockHash<MapData, u64>, key: u64, fd: BorrowedFd<'_>| {
            map.insert(key, fd.as_raw_fd(), 0).map_err(io_error)
        };
        let mut targets = lock(&self.targets);
        insert(&mut targets, client_cookie, backend).map_err(untouched)?;
        if let Err(e) = insert(&mut targets, backend_cookie, client) {
            let _ = targets.remove(&client_cookie);
            return Err(untouched(e));
        }
        drop(targets);
        let mut members = lock(&self.members);
        if let Err(e) = insert(&mut members, backend_cookie, backend) {
            let mut targets = lock(&self.targets);
            let _ = targets.remove(&client_cookie);
            let _ = targets.remove(&backend_cookie);
            return Err(untouched(e));
        }
        match insert(&mut members, client_cookie, client) {
            Ok(()) => Ok(Installed::Both),
            Err(_) => Ok(Installed::BackendOnly),
        }
    }

    fn open_ledger(&self, cookie: u64, socket: BorrowedFd<'_>) -> std::io::Result<()> {
        lock(&self.ledger)
            .insert(cookie, CopyLedger::default(), 0)
            .map_err(io_error)?;
        self.allow(
            cookie,
            CopyAllowance {
                total: COPY_WINDOW,
                copied: 0,
                pass_room: self.pass_room(socket),
            },
        )
    }

    /// What the program has done with `cookie`'s bytes so far.
    pub fn ledger(&self, cookie: u64) -> std::io::Result<CopyLedger> {
        lock(&self.ledger).get(&cookie, 0).map_err(io_error)
    }

    /// What the program may do with `cookie`'s bytes.
    #[cfg(test)]
    pub fn allowance(&self, cookie: u64) -> std::io::Result<CopyAllowance> {
        lock(&self.allowance).get(&cookie, 0).map_err(io_error)
    }

    /// Tells the program what it may do with `cookie`'s bytes from now on.
    pub fn allow(&self, cookie: u64, allowance: CopyAllowance) -> std::io::Result<()> {
        lock(&self.allowance)
            .insert(cookie, allowance, 0)
            .map_err(io_error)
    }

    /// Deletes the pair's ledgers and allowances (the sockets leave the SOCKHASHes by
    /// themselves when they close).
    pub fn forget(&self, cookies: [u64; 2]) {
        let (mut ledger, mut allowance) = (lock(&self.ledger), lock(&self.allowance));
        for cookie in cookies {
            let _ = ledger.remove(&cookie);
            let _ = allowance.remove(&cookie);
        }
    }

    /// The notice ring, for the worker's epoll set: readable when the program left notices.
    pub fn notices_fd(&self) -> std::os::fd::RawFd {
        lock(&self.notices).as_raw_fd()
    }

    /// Hands every notice waiting in the ring (the cookie of a socket that needs the worker)
    /// to `each`.
    pub fn take_notices(&self, mut each: impl FnMut(u64)) {
        let mut ring = lock(&self.notices);
        while let Some(item) = ring.next() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&*item) {
                each(u64::from_ne_bytes(bytes));
            }
        }
    }
}

/// `net.ipv4.tcp_rmem`'s maximum (the third field), or 32 MiB where it cannot be read.
fn rmem_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(32 << 20)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_error(e: MapError) -> std::io::Error {
    match e {
        MapError::SyscallError(SyscallError { io_error, .. }) => io_error,
        other => std::io::Error::other(other),
    }
}

/// How much of a pair [`Pairs::install`] put in the kernel's hands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// Both sockets' bytes are moved by the program.
    Both,
    /// The backend's bytes are moved by the program; the client's stay in its socket.
    BackendOnly,
}
