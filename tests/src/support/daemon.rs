//! Starts ctwatchd (the binary cargo built) in a namespace and runs ctctl against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::Netns;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A directory under /tmp removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ctwatch-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A binary of this workspace, from the target directory the tests were built into.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Tests run from target/<profile>/deps/, other binaries from target/<profile>/.
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` first (scripts/test does)",
        p.display()
    );
    p
}

#[derive(Default)]
pub struct DaemonOpts {
    /// Extra lines for the config file.
    pub config: String,
    /// State directory to use (kept across restarts); a fresh one when `None`.
    pub state_dir: Option<PathBuf>,
    /// Extra environment (NOTIFY_SOCKET, WATCHDOG_USEC, CTWATCHD_TEST_FAULT, ...).
    pub env: Vec<(String, String)>,
    /// `--all-netns` (run in the test's own namespace, the host's) instead of `--netns`.
    pub all_netns: bool,
    /// With `all_netns`: run inside the namespace `start` is given instead, so that it is the
    /// daemon's own and what the daemon binds (the metrics endpoint) is there.
    pub inside: bool,
}

pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: TempDir,
    pub log: PathBuf,
    /// What `restart` starts it with again.
    netns: PathBuf,
    state: PathBuf,
    config: String,
    env: Vec<(String, String)>,
    all_netns: bool,
    inside: bool,
}

impl Daemon {
    /// Starts ctwatchd without waiting for it: the command line `start` uses, logging (appending)
    /// to `log`.
    pub fn spawn_raw(ns: &Netns, dir: &Path, state_dir: &Path, config: &str, log: &Path) -> Child {
        Self::spawn_env(Some(ns), None, dir, state_dir, config, log, &[])
    }

    /// `spawn_raw` with extra environment variables.
    /// `ns`: the namespace to watch (`--netns`); `None`: `--all-netns`, run in `inside` (a
    /// namespace file) when given, else in the test's own.
    pub fn spawn_env(
        ns: Option<&Netns>,
        inside: Option<&Path>,
        dir: &Path,
        state_dir: &Path,
        config: &str,
        log: &Path,
        env: &[(String, String)],
    ) -> Child {
        let cfg = dir.join("ctwatchd.toml");
        std::fs::write(&cfg, config).unwrap();
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(target_bin("ctwatchd"));
        if let Some(path) = inside {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let file = std::fs::File::open(path).expect("open the namespace to run in");
            // SAFETY: between fork and exec, only setns on a descriptor opened before the fork
            // (it stays open: `file` lives until `spawn` returns).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        match ns {
            Some(ns) => cmd.arg("--netns").arg(ns.path()),
            None => cmd.arg("--all-netns"),
        };
        cmd.arg("--socket")
            .arg(dir.join("ctwatchd.sock"))
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--config")
            .arg(&cfg)
            .env(
                "RUST_LOG",
                std::env::var("CTWATCH_TEST_LOG").unwrap_or_else(|_| "debug,sled=info".into()),
            )
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("cannot start ctwatchd")
    }

    pub fn start(ns: &Netns, opts: DaemonOpts) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.path().join("ctwatchd.sock");
        let log = dir.path().join("ctwatchd.log");
        let state = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let target = (!opts.all_netns).then_some(ns);
        let inside = (opts.all_netns && opts.inside).then(|| ns.path());
        let child = Self::spawn_env(
            target,
            inside.as_deref(),
            dir.path(),
            &state,
            &opts.config,
            &log,
            &opts.env,
        );
        let mut d = Daemon {
            child: Some(child),
            socket,
            dir,
            log,
            netns: ns.path(),
            state,
            config: opts.config,
            env: opts.env,
            all_netns: opts.all_netns,
            inside: opts.inside,
        };
        d.wait_ready();
        d
    }

    /// SIGTERM, wait, and start it again on the same socket, state and configuration (its
    /// log goes on in the same file).
    pub fn restart(&mut self, ns: &Netns) {
        assert_eq!(ns.path(), self.netns, "restarted in another namespace");
        if self.child.is_some() {
            let status = self.stop();
            assert!(status.success(), "ctwatchd stopped with {status}");
        }
        self.start_again(ns);
    }

    /// Starts it again after `stop` or `kill9`.
    pub fn start_again(&mut self, ns: &Netns) {
        assert!(self.child.is_none(), "ctwatchd is still running");
        let inside = (self.all_netns && self.inside).then(|| ns.path());
        self.child = Some(Self::spawn_env(
            (!self.all_netns).then_some(ns),
            inside.as_deref(),
            self.dir.path(),
            &self.state,
            &self.config,
            &self.log,
            &self.env,
        ));
        self.wait_ready();
    }

    /// Waits (10 s at most) for the history writer to store one more bucket than now: what
    /// was counted before the call is then in the store.
    pub fn await_bucket(&self) {
        let written = |d: &Daemon| d.json(&["status"])["history"]["buckets_written"].as_u64();
        let w0 = written(self).expect("history is on");
        super::wait_for(
            "one more history bucket written",
            Duration::from_secs(10),
            || (written(self)? > w0).then_some(()),
        );
    }

    fn wait_ready(&mut self) {
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ctwatchd exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ctwatchd did not listen within 10 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// ctctl against this daemon; panics unless it succeeds.
    pub fn ctctl(&self, args: &[&str]) -> String {
        let out = ctctl(&self.socket, args);
        assert!(
            out.status.success(),
            "ctctl {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        ctctl_json(&self.socket, args)
    }

    /// Waits for the daemon to exit by itself, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let end = std::time::Instant::now() + within;
        while std::time::Instant::now() < end {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The daemon's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!(
            "ctwatchd did not stop within 5 s of SIGTERM:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..60 {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- ctwatchd log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

pub fn ctctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(target_bin("ctctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ctctl")
}

/// `ctctl --socket S ARGS --json`, parsed.
pub fn ctctl_json(socket: &Path, args: &[&str]) -> Value {
    let mut a: Vec<&str> = args.to_vec();
    a.push("--json");
    let out = ctctl(socket, &a);
    assert!(
        out.status.success(),
        "ctctl {a:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctctl --json printed invalid JSON")
}
