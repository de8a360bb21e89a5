//! The control socket: how `relay status`, `relay service ...` and `relay reload` talk to a
//! running relay.
//!
//! A Unix stream socket (mode 0600 in a 0700 directory: root only), one request per connection,
//! each a single line of JSON, answered by a single line of JSON:
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"result":{...}}
//! → {"op":"service_remove","name":"shop"}
//! ← {"ok":false,"error":"no service named \"shop\""}
//! ```
//!
//! Requests: `status`, `service_list`, `service_add` (`service`: a service table as in the
//! config file, paths absolute), `service_remove` (`name`), `reload`. A request that cannot be
//! parsed gets an error answer; nothing a client sends can stop the relay.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::config::Service;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 1 << 20;
/// A client that sends nothing for this long is disconnected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty braces rather than unit variants: serde then rejects unknown fields here too.
    Status {},
    ServiceList {},
    ServiceAdd { service: Box<Service> },
    ServiceRemove { name: String },
    Reload {},
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            result: None,
        }
    }
}

/// Parses one request line; the error is what the client is told.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Sends `request` to the relay listening on `socket`, returns its result.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the relay at {} (is it running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the relay's answer")?;
    let response: Response =
        serde_json::from_str(&answer).with_context(|| format!("unexpected answer {answer:?}"))?;
    if !response.ok {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "request failed".into())
        );
    }
    Ok(response.result.unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_an_error() {
        assert!(matches!(
            parse(r#"{"op":"status"}"#),
            Ok(Request::Status {})
        ));
        assert!(matches!(
            parse(r#"{"op":"service_remove","name":"shop"}"#),
            Ok(Request::ServiceRemove { name }) if name == "shop"
        ));
        for bad in [
            "",
            "null",
            "{",
            r#"{"op":"explode"}"#,
            r#"{"op":"status","x":1}"#,
            "\u{0}\u{1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
