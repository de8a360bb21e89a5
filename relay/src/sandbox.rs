//! The worker's sandbox: what a compromised worker could still do.
//!
//! The worker touches the network only through sockets it is handed (listeners) or opens
//! itself (toward backends); it never needs a file. So before it runs anything that parses
//! peer input, and before its runtime starts a thread (threads inherit the sandbox, the
//! calling thread is the only one Landlock restricts):
//!
//! - it becomes the unprivileged `relay.user` (no capabilities, `PR_SET_NO_NEW_PRIVS`);
//! - **Landlock** takes every filesystem access away: no file or directory can be opened,
//!   created or executed, whatever its permissions;
//! - **seccomp** allows only the system calls the worker makes (an allow-list, below); any
//!   other fails with `EPERM`. `execve` is not on it, and `clone` only for threads
//!   (`CLONE_THREAD`), so it cannot start a program nor fork.
//!
//! A kernel without Landlock leaves the worker without that layer; the relay says so in its
//! log. seccomp is required (every supported kernel has it).

use std::collections::BTreeMap;

use anyhow::Context as _;
use landlock::{ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetStatus};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// How much of the sandbox the kernel enforces.
#[derive(Debug, PartialEq, Eq)]
pub enum Enforced {
    /// Landlock and seccomp.
    Full,
    /// seccomp only: the kernel has no (or a partial) Landlock.
    SeccompOnly(String),
}

/// Confines the calling thread (and every thread it starts afterwards).
pub fn enter() -> anyhow::Result<Enforced> {
    let landlock = restrict_filesystem();
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
    // The allow-list first, then the clone3 filter: of two errors the newest filter's wins.
    for filter in [allow_list()?, no_clone3()?] {
        let program: BpfProgram = filter.try_into().context("compile a seccomp filter")?;
        seccompiler::apply_filter(&program).context("install a seccomp filter")?;
    }
    Ok(landlock)
}

/// Landlock: every filesystem right handled, none granted.
fn restrict_filesystem() -> Enforced {
    let abi = ABI::V5;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match status {
        Ok(s) if s.ruleset == RulesetStatus::FullyEnforced => Enforced::Full,
        Ok(s) => Enforced::SeccompOnly(format!("Landlock {:?} by this kernel", s.ruleset)),
        Err(e) => Enforced::SeccompOnly(format!("Landlock unavailable: {e}")),
    }
}

/// The system calls a worker makes: its runtime (threads, epoll, timers, signals), memory,
/// sockets and splice, and logging to its inherited stderr.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors it holds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_splice,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Sockets: accepting, connecting to backends, the handoff channel (`socket` and `ioctl`
    // are judged by their arguments below).
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    // The runtime: epoll, wakeups, timers, threads.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prctl,
    // Only to install the second filter below (a filter can only narrow what is allowed).
    libc::SYS_seccomp,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_restart_syscall,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_membarrier,
    // Signals (SIGTERM from the supervisor or systemd), and ending.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `enum bpf_cmd`'s values (the libc crate does not carry them).
const BPF_MAP_LOOKUP_ELEM: u64 = 1;
const BPF_MAP_UPDATE_ELEM: u64 = 2;
const BPF_MAP_DELETE_ELEM: u64 = 3;

fn arch() -> anyhow::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .context("seccomp: unsupported architecture")
}

fn allow_list() -> anyhow::Result<SeccompFilter> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    // clone only makes threads: with CLONE_THREAD (a fork has no CLONE_THREAD).
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![thread])?]);
    // New sockets toward backends only: no UNIX socket to reach a local daemon (Landlock does
    // not cover abstract ones), no netlink.
    rules.insert(
        libc::SYS_socket,
        one_of(0, &[libc::AF_INET as u64, libc::AF_INET6 as u64])?,
    );
    // The few requests the worker makes; none on a terminal but asking if it is one (TIOCSTI
    // on an inherited terminal would type into the shell that started the relay).
    rules.insert(
        libc::SYS_ioctl,
        one_of(
            1,
            &[
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::TIOCOUTQ,
                libc::FIONREAD,
                libc::TCGETS,
            ],
        )?,
    );
    // The kernel copy: entries of the maps the worker inherited (sockets in, ledgers read,
    // allowances set, both deleted), nothing else.
    let map_entries = [
        BPF_MAP_LOOKUP_ELEM,
        BPF_MAP_UPDATE_ELEM,
        BPF_MAP_DELETE_ELEM,
    ];
    rules.insert(libc::SYS_bpf, one_of(0, &map_entries)?);
    Ok(SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch()?,
    )?)
}

/// Rules that let a call through when its argument `arg` is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> anyhow::Result<Vec<SeccompRule>> {
    values
        .iter()
        .map(|&v| {
            let is = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            Ok(SeccompRule::new(vec![is])?)
        })
        .collect()
}

/// clone3 hides its flags in memory a filter cannot read: "not implemented" makes the C
/// library fall back to clone, which the allow-list judges.
fn no_clone3() -> anyhow::Result<SeccompFilter> {
    Ok(SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?)
}
