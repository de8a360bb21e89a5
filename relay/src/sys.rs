//! What the relay asks of the operating system beyond sockets: users and privileges, resource
//! limits, signals to its own children, the bpffs mount, and the mount namespace it runs in.
//! All of it through nix's safe wrappers.

use std::path::Path;

use anyhow::{Context as _, bail};
use nix::{
    mount::MsFlags,
    sys::{
        resource::{Resource, getrlimit, setrlimit},
        signal::{Signal, kill},
    },
    unistd::{Gid, Pid, Uid, User, getppid, setgid, setgroups, setuid},
};

/// (uid, gid) of a user name, from the system's user database (`getpwnam_r`).
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let user = User::from_name(name).ok()??;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// The (uid, gid) a worker of a supervisor running as root should become: `user`'s. `None`
/// when not root (nothing to drop).
pub fn worker_ids(user: &str) -> anyhow::Result<Option<(u32, u32)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match user_ids(user) {
        Some(ids) => Ok(Some(ids)),
        None => bail!("no user named {user:?} for the worker to run as"),
    }
}

/// Becomes `uid`/`gid`: no supplementary groups, no capabilities left (leaving uid 0 clears
/// them), and no way to regain any (`PR_SET_NO_NEW_PRIVS`).
pub fn become_user(uid: u32, gid: u32) -> anyhow::Result<()> {
    setgroups(&[])
        .and_then(|()| setgid(Gid::from_raw(gid)))
        .and_then(|()| setuid(Uid::from_raw(uid)))
        .with_context(|| format!("cannot become uid {uid}"))?;
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")
}

/// Asks the kernel to send this process SIGTERM when its parent (`parent`) dies.
pub fn terminate_with_parent(parent: Pid) -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).context("PR_SET_PDEATHSIG")?;
    // The parent may have died before the signal was asked for.
    if getppid() != parent {
        anyhow::bail!("the supervisor is gone");
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: an edge relay holds two descriptors
/// per connection. Children inherit it across exec.
pub fn raise_fd_limit() -> anyhow::Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raise the open file limit")?;
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK: lift it (best effort).
pub fn raise_memlock() {
    let infinity = nix::sys::resource::RLIM_INFINITY;
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, infinity, infinity);
}

/// Kills a child of ours outright.
pub fn kill_now(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Mounts bpffs on `target` (mode 0700).
pub fn mount_bpffs(target: &Path) -> anyhow::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mount bpffs on {}", target.display()))
}

/// Whether this process runs in a mount namespace of its own: not its parent's (a supervisor's,
/// a shell's), nor PID 1's. A relay started in one (as `ip netns exec` does) sees mounts that
/// vanish with it. Namespaces it may not look at (PID 1's often) say nothing.
pub fn in_private_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let Some(ours) = ns("self") else {
        return false;
    };
    let parent = nix::unistd::getppid().as_raw().to_string();
    [ns(&parent), ns("1")]
        .into_iter()
        .flatten()
        .any(|other| other != ours)
}
