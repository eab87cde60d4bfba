//! `ctctl top --watch`: frames streamed by `io.ctwatch.Watch`, drawn in place on a terminal
//! (the alternate screen, restored on exit and on Ctrl-C), or printed one after the other
//! (tables, or JSON objects one per line) elsewhere. The stream survives the daemon
//! restarting: ctctl reconnects and goes on counting frames.

use crate::stdout_err;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ctwatch_proto::{Request, WatchFrame, MAX_REPLY_LEN};
use serde_json::{Map, Value};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches Ctrl-C (and SIGTERM): the loop sees the flag, restores the terminal and ends.
fn catch_signals() {
    // SAFETY: the handler only stores to an atomic; no SA_RESTART, so blocking reads return.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// The terminal in the alternate screen with the cursor hidden, put back on drop.
struct Screen {
    on: bool,
}

impl Screen {
    fn enter(tty: bool) -> Screen {
        if tty {
            print!("\x1b[?1049h\x1b[?25l");
            let _ = std::io::stdout().flush();
        }
        Screen { on: tty }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        if self.on {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
        }
    }
}

/// The terminal's size (rows, columns), if stdout is one.
fn term_size() -> Option<(usize, usize)> {
    // SAFETY: TIOCGWINSZ fills a winsize; all-zero is a valid one.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row as usize, ws.ws_col as usize))
}

/// A frame drawn over the previous one: from the top left, each line cut to the terminal's
/// width and cleared to its end, as many lines as fit, the rest of the screen cleared. Nothing
/// scrolls, so the frame stays in place however long the table.
fn in_place(text: &str) -> String {
    let (rows, cols) = term_size().unwrap_or((24, 80));
    let mut out = String::from("\x1b[H");
    for line in text.lines().take(rows.saturating_sub(1).max(1)) {
        out.extend(line.chars().take(cols));
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// One stream: frames until the daemon ends it or goes.
struct Stream {
    r: BufReader<UnixStream>,
}

impl Stream {
    fn open(socket: &Path, params: &Map<String, Value>) -> std::io::Result<Stream> {
        let s = UnixStream::connect(socket)?;
        // Short reads, so Ctrl-C is seen promptly while waiting for a frame.
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut req = Request::new("io.ctwatch.Watch", params.clone());
        req.more = true;
        let mut b = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
        b.push(0);
        let mut s2 = s.try_clone()?;
        s2.write_all(&b)?;
        Ok(Stream {
            r: BufReader::new(s),
        })
    }

    /// The next frame; `Ok(None)` when the stream ended (daemon gone or stopping); errors the
    /// daemon sends are returned as such.
    fn next(&mut self, patience: Duration) -> Result<Option<WatchFrame>> {
        let start = Instant::now();
        let mut buf = Vec::new();
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match (&mut self.r)
                .take(MAX_REPLY_LEN as u64 + 1)
                .read_until(0, &mut buf)
            {
                Ok(0) => return Ok(None),
                Ok(_) if buf.last() == Some(&0) => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if start.elapsed() > patience {
                        return Ok(None); // the daemon went quiet: reconnect
                    }
                }
                Err(_) => return Ok(None),
            }
        }
        buf.pop();
        let reply: ctwatch_proto::Reply =
            serde_json::from_slice(&buf).context("ctwatchd sent a malformed frame")?;
        if let Some(err) = reply.error {
            let p = reply.parameters.unwrap_or(Value::Null);
            let reason = p
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| p.to_string());
            bail!("ctwatchd answered {err}: {reason}");
        }
        let v = reply.parameters.unwrap_or(Value::Null);
        Ok(Some(
            serde_json::from_value(v["frame"].clone()).context("unexpected Watch frame")?,
        ))
    }
}

use std::io::Read;

/// Runs the watch until Ctrl-C or `count` frames.
pub fn run(
    socket: &Path,
    params: Map<String, Value>,
    interval: Duration,
    count: Option<u64>,
    json: bool,
    draw: impl Fn(&WatchFrame) -> String,
) -> Result<()> {
    catch_signals();
    let tty = std::io::stdout().is_terminal() && !json;
    let _screen = Screen::enter(tty);
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    let mut first = true;
    while !INTERRUPTED.load(Ordering::SeqCst) {
        let mut stream = match Stream::open(socket, &params) {
            Ok(s) => s,
            Err(e) => {
                if first {
                    // The first connection failing is an error, as for any other command.
                    return Err(e).with_context(|| {
                        format!(
                            "cannot connect to {}; is ctwatchd running?",
                            socket.display()
                        )
                    });
                }
                if tty {
                    print!(
                        "{}",
                        in_place(&format!("ctwatchd is not answering ({e}); reconnecting..."))
                    );
                    let _ = out.flush();
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        first = false;
        while let Some(frame) = stream.next(interval * 3 + Duration::from_secs(2))? {
            if json {
                writeln!(out, "{}", serde_json::to_string(&frame)?).map_err(stdout_err)?;
            } else if tty {
                write!(out, "{}", in_place(&draw(&frame))).map_err(stdout_err)?;
            } else {
                writeln!(out, "{}", draw(&frame)).map_err(stdout_err)?;
            }
            out.flush().map_err(stdout_err)?;
            shown += 1;
            if count.is_some_and(|c| shown >= c) {
                return Ok(());
            }
        }
    }
    Ok(())
}
