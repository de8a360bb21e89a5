//! The control socket's server side. Each connection is read in its own task (a client that
//! connects and says nothing costs that task its timeout, and nothing else); the request goes
//! to the supervisor's loop with a channel for the answer, which the task writes back.

use std::path::Path;

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::control::{self, Request, Response};

/// A request for the loop, and where its answer goes.
pub type Asked = (Request, oneshot::Sender<Response>);

/// The control socket: root only (0600 in a directory created 0700). Refuses to start when
/// another relay answers on the same path.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another relay is running with control socket {}",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts control connections until the loop goes away.
pub async fn serve(listener: UnixListener, to_loop: mpsc::Sender<Asked>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, to_loop.clone()));
            }
            Err(e) => {
                warn!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        if to_loop.is_closed() {
            return;
        }
    }
}

async fn connection(stream: UnixStream, to_loop: mpsc::Sender<Asked>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64));
    let read = tokio::time::timeout(control::REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => Response::error("no request within the time limit"),
        Ok(Err(e)) => Response::error(format!("unreadable request: {e}")),
        Ok(Ok(_)) => match control::parse(&line) {
            Err(e) => Response::error(e),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                match to_loop.send((request, tx)).await {
                    Ok(()) => rx
                        .await
                        .unwrap_or_else(|_| Response::error("the relay is stopping")),
                    Err(_) => Response::error("the relay is stopping"),
                }
            }
        },
    };
    let mut out = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    out.push('\n');
    let _ = tokio::time::timeout(control::REQUEST_TIMEOUT, write.write_all(out.as_bytes())).await;
}
