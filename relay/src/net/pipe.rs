//! Per-thread pool of non-blocking pipes for `splice(2)`, and the call itself (through nix).
//! A pipe is given back only when empty; where none can be had (out of descriptors) the caller
//! moves the data through a pooled buffer instead.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl},
    unistd::pipe2,
};

const KEEP: usize = 64;
/// A bigger pipe moves a bulk flow in fewer splices; its pages exist only while full.
pub const PIPE_SIZE: usize = 256 << 10;

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    pub fn r(&self) -> &OwnedFd {
        &self.r
    }

    pub fn w(&self) -> &OwnedFd {
        &self.w
    }
}

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pooled or new pipe; `None` when none can be created (e.g. out of descriptors).
pub fn take() -> Option<Pipe> {
    if let Some(p) = FREE.with(|f| f.borrow_mut().pop()) {
        return Some(p);
    }
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
    // Failure leaves the default size, which works.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int));
    Some(Pipe { r, w })
}

pub fn give(p: Pipe) {
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(p);
        }
    });
}

/// Moves up to `len` bytes from `from` to `to` without a userspace copy (one of them a pipe);
/// never blocks.
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}
