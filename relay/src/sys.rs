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

/// Writes `bytes` to `path` for the owner only (0600, its directory created 0700), atomically:
/// a temporary file beside it, fsync, rename, fsync of the directory. A reader sees the old
/// content or the new, never part of it, also after a crash. The temporary file is made anew
/// (`O_EXCL`) and never through a link planted in its place (`O_NOFOLLOW`).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{
        io::Write as _,
        os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    // Unique per write: two writes of one path at once (the same inline PEM, say) do not share
    // a temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        // A file left by a crash is ours to replace.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("write {}", path.display()))
}

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
