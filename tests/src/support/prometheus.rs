//! Debian's `prometheus`, started by hand inside a test's namespace (no systemd): loopback
//! only, a scrape and rule evaluation every second, storage in a temporary directory. Stopped
//! in `Drop`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{http_get, url_encode, wait_for, Netns, TempDir};

pub struct Prometheus<'a> {
    ns: &'a Netns,
    child: Option<Child>,
    pub dir: TempDir,
    /// Where its HTTP API listens, inside the namespace.
    pub addr: String,
}

impl<'a> Prometheus<'a> {
    /// Scrapes `target` (job "ctwatch") every second and evaluates `rules`.
    pub fn start(ns: &'a Netns, target: &str, rules: &Path) -> Prometheus<'a> {
        let bin = which("prometheus");
        let dir = TempDir::new("prometheus");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: ctwatch\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = "127.0.0.1:9090".to_string();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start prometheus");
        let mut p = Prometheus {
            ns,
            child: Some(child),
            dir,
            addr,
        };
        wait_for("prometheus to be ready", Duration::from_secs(30), || {
            if let Some(s) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("prometheus exited with {s}:\n{}", p.log());
            }
            http_get(p.ns, &p.addr, "/-/ready", &[])
                .ok()
                .filter(|r| r.status == 200)
        });
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: the result vector (`metric`, value), or an error message.
    pub fn query(&self, expr: &str) -> Result<Vec<(Value, f64)>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let r = http_get(self.ns, &self.addr, &path, &[]).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{expr}: {v}"));
        }
        let data = &v["data"];
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|s| {
                    let x = s["value"][1].as_str().and_then(|x| x.parse().ok());
                    (s["metric"].clone(), x.unwrap_or(f64::NAN))
                })
                .collect()),
            Some("scalar") => Ok(vec![(
                Value::Null,
                data["result"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN),
            )]),
            other => Err(format!("{expr}: result type {other:?}")),
        }
    }

    /// The value of a query that returns one series.
    pub fn one(&self, expr: &str) -> Option<f64> {
        match self.query(expr) {
            Ok(v) if v.len() == 1 => Some(v[0].1),
            _ => None,
        }
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs prometheus: the child is prometheus itself.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

/// A program on PATH, or a message saying what installs it.
pub fn which(tool: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|f| f.is_file())
        })
        .unwrap_or(None);
    match found {
        Some(p) => p.display().to_string(),
        None => panic!("`{tool}` is missing: run scripts/deps (it installs Debian's prometheus package and PyPI's kubernetes-validate)"),
    }
}
