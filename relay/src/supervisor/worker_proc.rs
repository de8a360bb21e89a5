//! The worker as the supervisor sees it: a child process started with one end of the handoff
//! channel at [`handoff::WORKER_FD`], an [`Asker`] to talk to it, a task that reports its exit
//! to the loop, and the backoff that paces restarts of a worker that keeps dying.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use command_fds::{CommandFdExt as _, FdMapping};
use tokio::sync::mpsc;

use super::Event;
use crate::{
    cli::LogFormat,
    handoff::{self, Asker, Channel},
    worker::Identity,
};

/// A worker that lived this long is healthy again: the next restart is immediate.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct WorkerProc {
    pub pid: u32,
    pub asker: Arc<Asker>,
    pub started: Instant,
}

impl WorkerProc {
    /// Starts `relay worker`; its exit arrives in the loop as [`Event::WorkerExited`].
    pub fn spawn(
        log_format: LogFormat,
        identity: Option<Identity>,
        threads: Option<usize>,
        kernel_copy: Option<&crate::sockmap::Program>,
        events: mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<WorkerProc> {
        let (ours, theirs) = handoff::pair()?;
        let exe = std::env::current_exe().context("locate the relay binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--log-format")
            .arg(match log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
            .arg("worker");
        if let Some(id) = identity {
            cmd.arg("--uid")
                .arg(id.uid.to_string())
                .arg("--gid")
                .arg(id.gid.to_string());
        }
        if let Some(n) = threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.stdin(std::process::Stdio::null());
        // The worker finds its end of the channel at WORKER_FD, and the kernel copy's maps
        // after it (dup2'd between fork and exec).
        let mut fds = vec![FdMapping {
            parent_fd: theirs,
            child_fd: handoff::WORKER_FD,
        }];
        if let Some(program) = kernel_copy {
            for (fd, child_fd) in program.map_fds()?.iter().zip(crate::sockmap::MAP_FDS) {
                fds.push(FdMapping {
                    parent_fd: fd
                        .try_clone_to_owned()
                        .context("duplicate a kernel copy map")?,
                    child_fd,
                });
            }
            cmd.arg("--kernel-copy");
        }
        cmd.fd_mappings(fds)
            .context("map the worker's descriptors")?;
        let mut child = cmd.spawn().context("start the worker")?;
        // The command holds our copy of the worker's end: closed now, so that the channel ends
        // when the worker does.
        drop(cmd);
        let pid = child.id().context("worker pid")?;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = events.send(Event::WorkerExited { pid, status });
        });
        let asker = Asker::new(Channel::new(ours)?);
        tokio::spawn({
            let asker = Arc::clone(&asker);
            async move { asker.answers().await }
        });
        Ok(WorkerProc {
            pid,
            asker,
            started: Instant::now(),
        })
    }
}

/// How soon a dead worker is replaced: at once after a healthy life, then 100 ms, doubling
/// up to [`MAX_BACKOFF`] while workers keep dying young.
#[derive(Debug, Default)]
pub struct Backoff {
    quick_deaths: u32,
}

impl Backoff {
    /// A worker died after `lived`: the wait before the next one.
    pub fn died(&mut self, lived: Duration) -> Duration {
        self.quick_deaths = if lived > HEALTHY_AFTER {
            0
        } else {
            self.quick_deaths + 1
        };
        self.wait()
    }

    /// A worker could not even start.
    pub fn failed(&mut self) -> Duration {
        self.quick_deaths += 1;
        self.wait()
    }

    fn wait(&self) -> Duration {
        match self.quick_deaths {
            0 | 1 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
        }
    }
}
