//! A blocking Varlink client: one call, one reply, over the daemon's Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ctwatch_proto::{errors, Reply, Request, MAX_REPLY_LEN};
use serde_json::{Map, Value};

/// Longer than the daemon's longest deadline (Advise: 30 s), so its own answer comes first.
const TIMEOUT: Duration = Duration::from_secs(40);

pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is ctwatchd running? Start it with `systemctl start ctwatchd`, or run \
                     `ctwatchd --socket PATH` and pass the same --socket to ctctl"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "ask for membership of the `ctwatch` group, or run ctctl as root"
                }
                _ => "check the path given with --socket",
            };
            anyhow!("cannot connect to {}: {e}; {hint}", socket.display())
        })?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        Ok(Client {
            stream: BufReader::new(stream),
        })
    }

    /// Calls `method` and returns the reply's parameters, or a readable error.
    pub fn call(&mut self, method: &str, params: Map<String, Value>) -> Result<Value> {
        let mut out = serde_json::to_vec(&Request::new(method, params))?;
        out.push(0);
        let sent = self.stream.get_mut().write_all(&out);
        let mut buf = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_REPLY_LEN as u64 + 1)
            .read_until(0, &mut buf);
        if let Err(e) = sent {
            // A daemon that refuses a connection answers and closes it before reading the
            // request: its answer, if any, says why.
            if buf.last() != Some(&0) {
                return Err(e).context("cannot send the request to ctwatchd");
            }
        }
        let n = read.context("no reply from ctwatchd")?;
        if n == 0 || buf.last() != Some(&0) {
            bail!("ctwatchd closed the connection without a complete reply");
        }
        buf.pop();
        let reply: Reply =
            serde_json::from_slice(&buf).context("ctwatchd sent a malformed reply")?;
        if let Some(err) = reply.error {
            let p = reply.parameters.unwrap_or(Value::Null);
            let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            bail!(match err.as_str() {
                errors::METHOD_NOT_FOUND | errors::INTERFACE_NOT_FOUND => format!(
                    "ctwatchd does not know {method}: upgrade the daemon to match this ctctl"
                ),
                errors::INVALID_PARAMETER =>
                    format!("ctwatchd rejected parameter `{}`", field("parameter")),
                errors::PERMISSION_DENIED =>
                    "permission denied: ctctl needs root or membership of the `ctwatch` group"
                        .to_string(),
                errors::UNAVAILABLE => format!("ctwatchd cannot answer now: {}", field("reason")),
                errors::LIMIT_EXCEEDED => format!(
                    "ctwatchd refused: {} is beyond its bound of {} ({})",
                    field("parameter"),
                    p.get("bound").cloned().unwrap_or_default(),
                    field("reason")
                ),
                errors::DEADLINE_EXCEEDED => format!(
                    "ctwatchd gave up: {}; try a narrower request",
                    field("reason")
                ),
                errors::NO_SUCH_NETNS => field("reason"),
                errors::NO_SUCH_INCIDENT => format!(
                    "no incident {} (see ctctl incidents)",
                    p.get("id").cloned().unwrap_or_default()
                ),
                other => format!("ctwatchd answered {other}: {p}"),
            });
        }
        Ok(reply.parameters.unwrap_or(Value::Null))
    }
}

use std::io::Read;
