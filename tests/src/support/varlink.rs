//! A minimal Varlink client for tests and the benchmark: one connection, calls answered in
//! order, replies parsed as JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

pub struct Varlink {
    r: BufReader<UnixStream>,
}

impl Varlink {
    pub fn connect(socket: &Path) -> std::io::Result<Varlink> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Varlink {
            r: BufReader::new(s),
        })
    }

    /// Sends a call and reads its reply (the whole reply object: `parameters` or `error`).
    pub fn call(&mut self, method: &str, parameters: Value) -> std::io::Result<Value> {
        let mut b =
            serde_json::to_vec(&json!({"method": method, "parameters": parameters})).expect("json");
        b.push(0);
        self.r.get_mut().write_all(&b)?;
        self.read()
    }

    /// Reads one reply.
    pub fn read(&mut self) -> std::io::Result<Value> {
        let mut buf = Vec::new();
        let n = self.r.read_until(0, &mut buf)?;
        if n == 0 || buf.last() != Some(&0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a reply",
            ));
        }
        buf.pop();
        serde_json::from_slice(&buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}
