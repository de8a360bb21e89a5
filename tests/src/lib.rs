//! Harness for relay's end-to-end tests and demo: real peers, real TLS, real processes.
//!
//! - [`pki`]: a throwaway CA with server and client certificates (rcgen), written as PEM files.
//! - [`relay`]: the relay binary as a child process, its log lines, its lifecycle.
//! - [`backend`]: a data backend (plain, TLS or mTLS via rustls) that checks and produces bytes.
//! - [`client`]: clients at each security level, and helpers for curl / openssl.
//! - [`tlspeer`]: a scripted TLS peer that sends malformed records and reads the answers.
//!
//! Nothing here mocks TLS or the network: peers talk over loopback sockets.

pub mod backend;
pub mod charon;
pub mod client;
pub mod cluster;
pub mod config;
pub mod env;
pub mod haproxy;
pub mod http;
pub mod ldap;
pub mod metrics;
pub mod netns;
pub mod pebble;
pub mod pki;
pub mod relay;
pub mod tlspeer;

use std::{
    ffi::OsStr,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

/// Replaces `path` the way certificate tooling does: a new file renamed over the old one.
pub fn replace_file(path: &Path, contents: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `program`, run through `wrap` (e.g. `ip netns exec NS`) when it is not empty.
pub fn wrapped(wrap: &[impl AsRef<OsStr>], program: &str) -> Command {
    match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Whether something accepts TCP connections at `addr`, probed where `wrap` runs programs:
/// from here, or inside a namespace (bash's /dev/tcp).
pub fn accepts(wrap: &[impl AsRef<OsStr>], addr: SocketAddr) -> bool {
    if wrap.is_empty() {
        return std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
    }
    let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
    wrapped(wrap, "bash")
        .args(["-c", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where [`free_port`] hands out ports: below the kernel's ephemeral range (32768–60999 by
/// default), so no `bind(0)` listener and no outgoing connection of a test, a peer or the relay
/// can be given the same port between the check here and the moment a relay binds it.
const TEST_PORTS: std::ops::Range<u16> = 20000..32000;

/// A TCP port free on 127.0.0.1 and ::1 right now, never handed out twice by this process.
///
/// Asking the kernel for an ephemeral port and releasing it (the usual trick) raced in CI: two
/// calls in one test got the same released port for a metrics listener and a service. Each
/// test binary starts at its own offset (its pid), and cargo runs test binaries one at a time.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = TEST_PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free TCP port in {TEST_PORTS:?} on 127.0.0.1 and ::1");
}

/// Deterministic test content: byte `i` of stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    Pattern::new(seed).fill(&mut out);
    out
}

/// The bytes of [`pattern`], produced piece by piece, for transfers too large to hold.
pub struct Pattern {
    x: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            x: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Writes the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            // xorshift64: cheap, and distinct seeds give distinct streams.
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            *b = self.x as u8;
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls `f` every 20 ms until it returns true or `limit` elapses.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's soft limit on open files to its hard limit (tests that hold a
/// thousand sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
