//! The relay binary as a child process: started with a config, its log lines captured, stopped
//! with SIGTERM (and killed if it does not stop) when dropped.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::wait_until;

/// Path of the relay binary: `$RELAY_BIN` (set by `cargo xtask test`), else the one cargo built
/// next to this test executable.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/relay
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("relay");
    assert!(
        p.exists(),
        "relay binary not found at {}: run the tests with `cargo xtask test`, or build it with \
         `cargo build -p relay`, or set RELAY_BIN",
        p.display()
    );
    p
}

/// Runs `relay <args>` to completion (for `check`, `--version`, usage errors).
pub fn cli(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run relay binary")
}

/// `relay run --config <config>` on the gateway of `topo` (its network namespace only, so
/// that bpffs pins made there outlive it), once it is ready.
pub fn start_on_gateway(topo: &crate::netns::Topology, config: &Path) -> Relay {
    Relay::start_with(
        topo.enter(&topo.gw, &binary())
            .args(["run", "--config"])
            .arg(config),
    )
    .expect("relay starts on the gateway")
}

/// `relay <args> --config <config>` on the gateway of `topo`.
pub fn cli_on_gateway(topo: &crate::netns::Topology, config: &Path, args: &[&str]) -> Output {
    topo.enter(&topo.gw, &binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run relay on the gateway")
}

pub struct Relay {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    /// Starts `relay run --config <config>` and waits until it logs that it is ready.
    pub fn start(config: &Path) -> anyhow::Result<Relay> {
        Self::start_with(
            Command::new(binary())
                .arg("run")
                .arg("--config")
                .arg(config),
        )
    }

    /// Starts a prepared command (e.g. wrapped in `ip netns exec`) whose stderr is relay's log,
    /// and waits until it logs that it is ready.
    pub fn start_with(cmd: &mut Command) -> anyhow::Result<Relay> {
        let mut relay = Self::launch(cmd)?;
        let ready = wait_until(Duration::from_secs(30), || {
            relay.has_log("relay ready") || relay.exited()
        });
        if !ready || relay.exited() || !relay.has_log("relay ready") {
            bail!("relay did not become ready:\n{}", relay.logs().join("\n"));
        }
        Ok(relay)
    }

    /// Starts a prepared command and returns at once, without waiting for it to be ready.
    pub fn launch(cmd: &mut Command) -> anyhow::Result<Relay> {
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RELAY_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn relay")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        let echo = std::env::var("RELAY_ECHO_LOGS").map_or(true, |v| v != "0");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Shown with a failing test's output; kept for assertions either way.
                if echo {
                    eprintln!("[relay] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Relay { child, logs })
    }

    /// The worker: the supervisor's child process that relays connections.
    pub fn worker_pid(&self) -> Option<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Lines containing every one of `needles`.
    pub fn count_logs(&self, needles: &[&str]) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until at least `n` lines contain every one of `needles`.
    pub fn wait_logs(&self, needles: &[&str], n: usize, limit: Duration) -> bool {
        wait_until(limit, || self.count_logs(needles) >= n)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and waits up to `limit` for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.exited() {
            return;
        }
        if self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
