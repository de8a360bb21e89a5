//! The kernel copy's watch: one epoll instance and one thread per worker, woken by ends,
//! errors and the program's notices, never by the bytes the program moves.

use std::{
    collections::HashMap,
    io,
    os::fd::{BorrowedFd, RawFd},
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
};
use tokio::sync::Notify;

use crate::sockmap::Pairs;

/// One epoll instance for every installed pair of the worker, registered for ends and
/// errors only (`EPOLLRDHUP`, and the `EPOLLERR`/`EPOLLHUP` epoll always reports), and for
/// the program's notice ring: a segment that the program moves does not wake it. Events
/// carry the socket's cookie (the ring's is 0, which no socket has). A thread of its own waits
/// on it and wakes the tasks concerned, whatever runtime they run on.
pub(super) struct Watch {
    epoll: Epoll,
    /// By socket cookie: the direction whose source that socket is.
    directions: Mutex<HashMap<u64, Arc<Notify>>>,
}

/// The notice ring's key in the watch.
const NOTICES: u64 = 0;

impl Watch {
    pub(super) fn new() -> io::Result<Watch> {
        Ok(Watch {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            directions: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn add_notices(&self, ring: RawFd) -> io::Result<()> {
        // SAFETY: the ring belongs to the worker's `Pairs`, which lives as long as the watch.
        let ring = unsafe { BorrowedFd::borrow_raw(ring) };
        let event = EpollEvent::new(EpollFlags::EPOLLIN, NOTICES);
        Ok(self.epoll.add(ring, event)?)
    }

    pub(super) fn add(
        &self,
        sockets: [BorrowedFd<'_>; 2],
        cookies: [u64; 2],
    ) -> io::Result<[Arc<Notify>; 2]> {
        let woken = [Arc::new(Notify::new()), Arc::new(Notify::new())];
        {
            let mut directions = self.directions.lock().unwrap_or_else(|e| e.into_inner());
            for (cookie, w) in cookies.iter().zip(&woken) {
                directions.insert(*cookie, Arc::clone(w));
            }
        }
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        for (s, cookie) in sockets.iter().zip(cookies) {
            if let Err(e) = self.epoll.add(s, EpollEvent::new(flags, cookie)) {
                self.remove(sockets, cookies);
                return Err(e.into());
            }
        }
        Ok(woken)
    }

    pub(super) fn remove(&self, sockets: [BorrowedFd<'_>; 2], cookies: [u64; 2]) {
        for s in sockets {
            let _ = self.epoll.delete(s);
        }
        let mut directions = self.directions.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            directions.remove(&cookie);
        }
    }

    pub(super) fn run(&self, pairs: &Pairs) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // Without the watch no pair would ever be woken again: better a new
                    // worker (the supervisor starts one) than connections that hang.
                    tracing::error!("kernel copy watch failed, the worker exits: {e}");
                    std::process::exit(70);
                }
            };
            let directions = self.directions.lock().unwrap_or_else(|e| e.into_inner());
            let wake = |cookie| {
                if let Some(direction) = directions.get(&cookie) {
                    direction.notify_one();
                }
            };
            for e in &events[..n] {
                match e.data() {
                    NOTICES => pairs.take_notices(wake),
                    cookie => wake(cookie),
                }
            }
        }
    }
}
