//! The Varlink socket under abuse, an independent client, and the errors people meet first.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::{json, Value};

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send(s: &mut UnixStream, v: &Value) {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(0);
    s.write_all(&b).unwrap();
}

fn recv(s: &mut UnixStream) -> Value {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed before a reply");
        if byte[0] == 0 {
            return serde_json::from_slice(&buf).unwrap();
        }
        buf.push(byte[0]);
    }
}

fn call(s: &mut UnixStream, v: Value) -> Value {
    send(s, &v);
    recv(s)
}

/// A fresh client gets a Status reply quickly.
fn healthy(d: &Daemon) -> Duration {
    let t = Instant::now();
    let mut s = connect(d);
    let r = call(&mut s, json!({"method": "io.ctwatch.Status"}));
    assert!(r["parameters"]["status"]["count"].is_u64(), "{r}");
    t.elapsed()
}

#[test]
fn protocol_errors_are_typed_and_the_connection_survives() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, DaemonOpts::default());
    let mut s = connect(&d);
    let r = call(&mut s, json!({"method": "io.ctwatch.Nope"}));
    assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
    assert_eq!(r["parameters"]["method"], "io.ctwatch.Nope");
    let r = call(&mut s, json!({"method": "com.example.Thing"}));
    assert_eq!(r["error"], "org.varlink.service.InterfaceNotFound");
    let r = call(
        &mut s,
        json!({"method": "io.ctwatch.Top", "parameters": {"limit": "ten"}}),
    );
    assert_eq!(r["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(r["parameters"]["parameter"], "limit");
    let r = call(
        &mut s,
        json!({"method": "io.ctwatch.Top", "parameters": {"by": "service", "colour": 1}}),
    );
    assert_eq!(
        (r["error"].as_str(), r["parameters"]["parameter"].as_str()),
        (Some("org.varlink.service.InvalidParameter"), Some("colour"))
    );
    // Garbage inside a frame: an error reply, and the same connection goes on working.
    s.write_all(b"this is not json\0").unwrap();
    let r = recv(&mut s);
    assert_eq!(r["error"], "io.ctwatch.InvalidRequest", "{r}");
    s.write_all(b"[1,2,3]\0").unwrap();
    assert_eq!(recv(&mut s)["error"], "io.ctwatch.InvalidRequest");
    let r = call(&mut s, json!({"method": "org.varlink.service.GetInfo"}));
    assert_eq!(r["parameters"]["product"], "ctwatchd");
    let r = call(
        &mut s,
        json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.ctwatch"}}),
    );
    assert!(r["parameters"]["description"]
        .as_str()
        .unwrap()
        .contains("interface io.ctwatch"));
    let r = call(
        &mut s,
        json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.nope"}}),
    );
    assert_eq!(r["error"], "org.varlink.service.InterfaceNotFound");
    // oneway: no reply; the next call's reply is the next thing on the wire.
    send(
        &mut s,
        &json!({"method": "io.ctwatch.Status", "oneway": true}),
    );
    let r = call(&mut s, json!({"method": "org.varlink.service.GetInfo"}));
    assert_eq!(r["parameters"]["vendor"], "ctwatch");
}

#[test]
fn abusive_clients_do_not_stall_the_others() {
    let ns = Netns::new();
    let mut d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "[limits]\nwrite_timeout_secs = 1\nidle_timeout_secs = 3\n".into(),
            ..Default::default()
        },
    );
    // 1. Oversized: 1 MiB without a NUL. Answered with an error, then closed.
    let mut big = connect(&d);
    let chunk = vec![b'x'; 1 << 20];
    let _ = big.write_all(&chunk);
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("io.ctwatch.InvalidRequest"), "{text}");
    // 2. Stalled mid-request: half a frame, then nothing.
    let mut stalled = connect(&d);
    stalled.write_all(br#"{"method": "io.ctwa"#).unwrap();
    // 3. Never reads: floods calls whose replies it never reads.
    let mut deaf = connect(&d);
    deaf.set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let flood = std::thread::spawn(move || {
        let mut req = serde_json::to_vec(&json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.ctwatch"}})).unwrap();
        req.push(0);
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut sent = 0;
        while Instant::now() < deadline && sent < 200_000 {
            if deaf.write_all(&req).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // 4. Disconnects mid-request.
    for _ in 0..20 {
        let mut s = connect(&d);
        s.write_all(br#"{"method":"io.ctwatch.Top","para"#).unwrap();
        drop(s);
    }
    // Meanwhile, everyone else is served promptly.
    for _ in 0..10 {
        let took = healthy(&d);
        assert!(
            took < Duration::from_secs(1),
            "a well-behaved client waited {took:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = flood.join().unwrap();
    assert!(sent > 0);
    drop(stalled);
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    healthy(&d);
    assert!(d.stop().success());
}

#[test]
fn python_varlink_client_can_call_status() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, DaemonOpts::default());
    let out = Command::new("python3")
        .args(["-m", "varlink.cli", "call"])
        .arg(format!("unix:{}/io.ctwatch.Status", d.socket.display()))
        .arg("{}")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python varlink client failed (scripts/test installs it with pip): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["status"]["max"].as_u64().unwrap() > 0, "{v}");
    assert!(v["status"]["events"]["new"].is_u64());
}

#[test]
fn ctctl_without_a_daemon_names_the_socket_and_how_to_start() {
    let dir = TempDir::new("nodaemon");
    let sock = dir.path().join("none.sock");
    let out = ctctl(&sock, &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("ctwatchd"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn ctwatchd_without_cap_net_admin_says_so() {
    let dir = TempDir::new("nocap");
    let out = Command::new("setpriv")
        .args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
        .arg(target_bin("ctwatchd"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}

#[test]
fn bad_flags_and_config_get_one_line() {
    let out = Command::new(target_bin("ctwatchd"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--frobnicate"), "{err}");

    let dir = TempDir::new("badcfg");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "socket = \"/tmp/x.sock\"\n[limits]\nmax_flows = -3\n").unwrap();
    let out = Command::new(target_bin("ctwatchd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("{}:3:", cfg.display())), "{err}");

    std::fs::write(&cfg, "[limits]\nmax_flows = 1000\n").unwrap();
    let out = Command::new(target_bin("ctwatchd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(target_bin("ctctl"))
        .args(["top", "--by", "pod"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs ctctl as another user (uid 65534) with the given primary and supplementary groups.
fn ctctl_as(socket: &std::path::Path, gid: u32, groups: &str) -> std::process::Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", &format!("--regid={gid}")]);
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={groups}"));
    }
    c.arg("--")
        .arg(target_bin("ctctl"))
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .output()
        .expect("setpriv")
}

#[test]
fn peer_credentials_decide_who_may_ask() {
    let ns = Netns::new();
    // nogroup (65534) plays the socket group.
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "socket_group = \"nogroup\"\n".into(),
            ..Default::default()
        },
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534, "socket group");
    // ctctl needs the binary to be reachable by uid 65534 through the target dir.
    let mut p = target_bin("ctctl");
    while let Some(parent) = p.parent().map(|x| x.to_path_buf()) {
        if parent.as_os_str().is_empty() || parent == std::path::Path::new("/") {
            break;
        }
        let _ = std::fs::set_permissions(
            &parent,
            std::fs::Permissions::from_mode(std::fs::metadata(&parent).unwrap().mode() | 0o711),
        );
        p = parent;
    }
    // A member through a supplementary group, and one through the primary group: allowed.
    let out = ctctl_as(&d.socket, 1, "65534");
    assert!(
        out.status.success(),
        "group member refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctctl_as(&d.socket, 65534, "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Anyone else is refused, even when the file mode would let them connect.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctctl_as(&d.socket, 1, "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        d.log_text().contains("connection refused"),
        "refusal is logged"
    );
}
