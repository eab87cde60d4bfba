//! `ctctl top --watch` through a real terminal (tmux), on a pipe, across a daemon restart, and
//! a watcher that stops reading while the table floods.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::{json, Value};

/// A tmux server of its own (its socket named after the test), killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    /// A detached session running a bare shell in a `cols` x `rows` pane.
    fn new(tag: &str, cols: u16, rows: u16) -> Tmux {
        let t = Tmux {
            name: format!("ctwatch-{tag}-{}", std::process::id()),
        };
        t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "w",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            "env PS1='$ ' TERM=xterm-256color bash --norc --noprofile",
        ]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux is missing: scripts/deps installs it");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Types a line and presses Enter.
    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "w", "-l", line]);
        self.run(&["send-keys", "-t", "w", "Enter"]);
    }

    /// What the pane shows now.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "w"])
    }

    /// A pane variable (`alternate_on`, `cursor_flag`, `history_size`, ...).
    fn var(&self, name: &str) -> String {
        self.run(&["display-message", "-p", "-t", "w", &format!("#{{{name}}}")])
            .trim()
            .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("tmux")
                .args(["-L", &self.name, "capture-pane", "-p", "-t", "w"])
                .status();
        }
        let _ = Command::new("tmux")
            .args(["-L", &self.name, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits until the daemon tracks `n` entries.
fn wait_live(d: &Daemon, n: u64) {
    wait_for(
        &format!("{n} live entries"),
        Duration::from_secs(10),
        || (d.json(&["status"])["live"].as_u64() == Some(n)).then_some(()),
    );
}

/// A table row of the service udp 127.0.0.1:`port` (by service or by flow).
fn has_row(screen: &str, port: u16) -> bool {
    let port = port.to_string();
    screen.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.first() == Some(&"udp") && w.contains(&port.as_str())
    })
}

fn header(screen: &str) -> Option<&str> {
    screen.lines().find(|l| l.starts_with("ctwatch  "))
}

/// In a terminal: frames are drawn in place (one header on screen, nothing scrolled away, the
/// header's time moving), a table taller than the terminal is cut rather than scrolled, rows
/// follow the traffic, the view comes back after the daemon restarts, and Ctrl-C restores the
/// screen the shell had, with the cursor, and exits 0.
/// The flood test measures loss on 2 vCPUs: it runs alone (the others share this lock, it
/// takes it exclusively).
static SOLO: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[test]
fn in_a_terminal_frames_refresh_in_place_and_ctrl_c_leaves_a_clean_screen() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let mut d = Daemon::start(&ns, DaemonOpts::default());
    // 60 flows to one service, and 40 services of one flow each: a frame of 41 rows is taller
    // than the 30-line terminal.
    ns.run(|| {
        udp_flows("127.0.0.1:5301".parse().unwrap(), 60);
        udp_flows_from_one("127.0.0.1:5400".parse().unwrap(), 40);
    });
    wait_live(&d, 100);
    let t = Tmux::new("watch", 160, 30);
    t.type_line("echo before-the-watch");
    wait_for("the shell", Duration::from_secs(5), || {
        t.screen().contains("\nbefore-the-watch").then_some(())
    });
    let cmd = format!(
        "{} --socket {} top --watch --interval 0.2 --limit 100",
        target_bin("ctctl").display(),
        d.socket.display()
    );
    t.type_line(&cmd);
    let first = wait_for("the first frame", Duration::from_secs(10), || {
        let s = t.screen();
        (t.var("alternate_on") == "1" && s.contains("LIVE") && has_row(&s, 5301)).then_some(s)
    });
    assert_eq!(
        first.lines().next().and_then(|l| l.split("  ").next()),
        Some("ctwatch"),
        "the frame starts at the top left:\n{first}"
    );
    assert_eq!(
        t.var("cursor_flag"),
        "0",
        "the cursor is hidden while watching"
    );
    let h0 = header(&first).unwrap().to_string();
    // A later frame replaces the first: still one header, at the top, with a later time, and
    // nothing pushed into the scrollback.
    let later = wait_for("a later frame", Duration::from_secs(10), || {
        let s = t.screen();
        header(&s).filter(|h| *h != h0)?;
        Some(s)
    });
    assert_eq!(
        later.matches("ctwatch  ").count(),
        1,
        "frames are drawn over each other, not one under the other:\n{later}"
    );
    assert!(later.starts_with("ctwatch  "), "{later}");
    assert_eq!(t.var("history_size"), "0", "nothing scrolled");
    assert!(
        later.lines().count() <= 30,
        "the frame fits the terminal:\n{later}"
    );
    // New traffic shows up as a row with its rate.
    ns.run(|| udp_flows("127.0.0.1:5302".parse().unwrap(), 5));
    wait_for("the new flows in the view", Duration::from_secs(10), || {
        has_row(&t.screen(), 5302).then_some(())
    });

    // The daemon goes: the view says so and comes back with the new daemon.
    let stop = d.stop();
    assert!(stop.success());
    wait_for(
        "the view to say it reconnects",
        Duration::from_secs(10),
        || t.screen().contains("reconnecting").then_some(()),
    );
    d.start_again(&ns);
    let back = wait_for(
        "the view after the restart",
        Duration::from_secs(15),
        || {
            let s = t.screen();
            (header(&s).is_some() && has_row(&s, 5301) && !s.contains("reconnecting")).then_some(s)
        },
    );
    assert_eq!(back.matches("ctwatch  ").count(), 1, "{back}");

    // Ctrl-C: the shell's screen comes back as it was, the cursor shown, exit status 0.
    t.run(&["send-keys", "-t", "w", "C-c"]);
    wait_for("the watch to end", Duration::from_secs(5), || {
        (t.var("alternate_on") == "0" && t.var("pane_current_command") == "bash").then_some(())
    });
    t.type_line("echo exit=$?");
    let after = wait_for("the shell again", Duration::from_secs(5), || {
        let s = t.screen();
        s.contains("\nexit=").then_some(s)
    });
    assert!(
        after.contains("\nexit=0"),
        "ctctl exits 0 on Ctrl-C:\n{after}"
    );
    assert!(after.contains("before-the-watch"), "{after}");
    assert!(
        !after.contains("LIVE") && !after.contains("ctwatch  ") && !after.contains("reconnecting"),
        "no frame is left on the shell's screen:\n{after}"
    );
    assert_eq!(t.var("cursor_flag"), "1", "the cursor is shown again");
    assert_eq!(
        t.var("history_size"),
        "0",
        "no frame went to the scrollback"
    );
}

/// Reads ctctl's lines on a thread; `recv` waits (bounded) for the next.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
}

impl Lines {
    fn of(out: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    fn recv(&self, within: Duration) -> Option<String> {
        self.rx.recv_timeout(within).ok()
    }
}

/// On a pipe: `--count N` prints N tables and exits 0; `--json` prints one object per frame,
/// and `--count` counts frames across a daemon restart (the stream starts again: `seq` goes
/// back to 1). Out-of-range intervals are refused, by ctctl and by the daemon, with the reason.
#[test]
fn on_a_pipe_count_n_prints_n_frames_across_a_restart() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let mut d = Daemon::start(&ns, DaemonOpts::default());
    ns.run(|| udp_flows("127.0.0.1:5301".parse().unwrap(), 7));
    wait_live(&d, 7);

    let start = Instant::now();
    let out = ctctl(
        &d.socket,
        &["top", "--watch", "--interval", "0.2", "--count", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.matches("ctwatch  ").count(),
        3,
        "three tables:\n{text}"
    );
    assert_eq!(text.matches("SHARE").count(), 3, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no escape codes on a pipe:\n{text:?}"
    );
    assert!(has_row(&text, 5301), "{text}");
    assert!(start.elapsed() < Duration::from_secs(10));

    // JSON, one object per line, through a restart.
    let mut child = Command::new(target_bin("ctctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "top",
            "--watch",
            "--json",
            "--interval",
            "0.5",
            "--count",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(child.stdout.take().unwrap());
    let mut frames: Vec<Value> = Vec::new();
    while frames.last().map(|f| f["seq"].as_u64()) != Some(Some(2)) {
        let l = lines
            .recv(Duration::from_secs(10))
            .expect("a frame every 0.5 s");
        frames.push(serde_json::from_str(&l).expect("one JSON object per line"));
    }
    d.restart(&ns);
    while let Some(l) = lines.recv(Duration::from_secs(15)) {
        frames.push(serde_json::from_str(&l).expect("one JSON object per line"));
    }
    let status = wait_for("ctctl to end", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(frames.len(), 8, "--count counts frames across reconnects");
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).any(|w| w[1] < w[0]),
        "a second stream after the restart: {seqs:?}"
    );
    for f in &frames {
        for field in ["t", "count", "max", "usage_pct", "new_per_sec", "rows"] {
            assert!(!f[field].is_null(), "{field} missing from {f}");
        }
    }
    let last = frames.last().unwrap();
    let row = last["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dport"] == 5301)
        .unwrap_or_else(|| panic!("{last}"));
    assert_eq!(row["live"], 7, "{last}");

    // Bounds.
    let out = ctctl(&d.socket, &["top", "--watch", "--interval", "0.05"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0.2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v = Varlink::connect(&d.socket).unwrap();
    let r = v
        .call("io.ctwatch.Watch", json!({"interval_ms": 50}))
        .unwrap();
    assert_eq!(r["error"], "io.ctwatch.LimitExceeded", "{r}");
    assert_eq!(r["parameters"]["parameter"], "interval_ms", "{r}");
    assert_eq!(r["parameters"]["bound"], 200, "{r}");
    // Without `more`, one frame.
    let r = v.call("io.ctwatch.Watch", json!({})).unwrap();
    assert_eq!(r["parameters"]["frame"]["seq"], 1, "{r}");
    assert!(r.get("continues").is_none(), "{r}");
    // No daemon: a clear error, not a silent wait.
    d.stop();
    let out = ctctl(&d.socket, &["top", "--watch", "--count", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is ctwatchd running?"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A watcher that asks for frames and never reads them: while the table floods, the daemon
/// drops it (never waits for it) and loses no event; the streams' cap holds, and a watcher that
/// reads keeps getting its frames.
#[test]
fn a_watcher_that_stops_reading_is_dropped_and_costs_no_event() {
    let _solo = SOLO.write().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 150_000;
    let ns = Netns::for_load();
    let d = Daemon::start(&ns, DaemonOpts::default());
    // 300 flows: a frame of 200 rows by flow is ~40 KB, so a non-reader backs up in seconds.
    ns.run(|| udp_flows("127.0.0.1:5301".parse().unwrap(), 300));
    wait_live(&d, 300);
    let mut probe = Varlink::connect(&d.socket).unwrap();
    let mut status =
        || probe.call("io.ctwatch.Status", json!({})).unwrap()["parameters"]["status"].clone();
    let before = status();

    // 15 watchers that never read, and one that does (the 16 streams allowed by default).
    let watch = json!({"method": "io.ctwatch.Watch", "more": true,
        "parameters": {"by": "flow", "limit": 200, "interval_ms": 200}});
    let mut frame = serde_json::to_vec(&watch).unwrap();
    frame.push(0);
    let mut stalled: Vec<UnixStream> = (0..15)
        .map(|_| {
            let mut s = UnixStream::connect(&d.socket).unwrap();
            s.write_all(&frame).unwrap();
            s
        })
        .collect();
    let mut reader = Command::new(target_bin("ctctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "top",
            "--watch",
            "--json",
            "--interval",
            "0.2",
            "--count",
            "1000000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::of(reader.stdout.take().unwrap());
    wait_for("16 watchers", Duration::from_secs(10), || {
        (status()["clients"]["watchers"] == 16).then_some(())
    });
    // A 17th is refused with the reason.
    let mut extra = Varlink::connect(&d.socket).unwrap();
    // A single frame (no `more`) is not a stream: it is answered at the cap.
    let r = extra.call("io.ctwatch.Watch", json!({})).unwrap();
    assert!(r["parameters"]["frame"].is_object(), "{r}");
    let mut s17 = UnixStream::connect(&d.socket).unwrap();
    s17.write_all(&frame).unwrap();
    s17.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    BufReader::new(&s17).read_until(0, &mut buf).unwrap();
    let r: Value = serde_json::from_slice(&buf[..buf.len() - 1]).unwrap();
    assert!(
        r["parameters"]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("too many watchers")),
        "{r}"
    );

    // The flood, while the reader's frames are timed.
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut last, mut worst, mut n) = (Instant::now(), Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if lines.recv(Duration::from_secs(5)).is_none() {
                    break;
                }
                worst = worst.max(last.elapsed());
                last = Instant::now();
                n += 1;
            }
            (n, worst)
        })
    };
    // The entries of namespaces deleted before are freed first (a kernel worker's, for
    // seconds, on the CPUs this measures).
    load::kernel_quiet();
    let sent = load::udp_new_flood(&ns.path(), 1, N, Duration::from_secs(30));
    assert!(sent >= N * 9 / 10, "the flood sent only {sent}");
    let kernel = ns.conntrack_count();
    wait_for("live to equal the kernel", Duration::from_secs(10), || {
        let s = status();
        (s["live"].as_u64() == Some(kernel)).then_some(())
    });
    let s = wait_for(
        "the 15 stalled watchers to be dropped",
        Duration::from_secs(20),
        || {
            let s = status();
            (s["clients"]["watchers_dropped"] == 15).then_some(s)
        },
    );
    assert_eq!(s["clients"]["watchers"], 1, "the reader still watches: {s}");
    stop.store(true, Ordering::Relaxed);
    let (frames, worst) = gaps.join().unwrap();
    let _ = reader.kill();
    let _ = reader.wait();
    let ev = &s["events"];
    let new = ev["new"].as_u64().unwrap() - before["events"]["new"].as_u64().unwrap();
    eprintln!(
        "sent {sent}, NEW seen {new}, lost {}, reader got {frames} frames (largest gap {worst:?})",
        ev["lost"]
    );
    assert_eq!(ev["lost"].as_u64(), Some(0), "events lost: {s}");
    assert_eq!(new, sent, "every NEW event reached the daemon");
    assert!(frames >= 5, "the reading watcher got {frames} frames");
    assert!(
        worst < Duration::from_secs(3),
        "the reading watcher waited {worst:?} for a frame"
    );
    // A dropped watcher's connection is closed: what was sent reads out, then end of file.
    let s0 = &mut stalled[0];
    s0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    s0.read_to_end(&mut all).expect("closed, not left hanging");
    let frames: Vec<&[u8]> = all.split(|&b| b == 0).filter(|f| !f.is_empty()).collect();
    assert!(!frames.is_empty());
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_slice(f).expect("whole frames");
        assert_eq!(v["continues"], true);
    }
}
