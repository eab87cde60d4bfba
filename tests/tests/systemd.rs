//! The .deb under a real systemd (PID 1 in a debootstrapped Debian root, its own namespaces):
//! `tests/systemd/boot-test.sh` does the work and says what failed. `scripts/test` builds the
//! package first (`scripts/deb`); a missing package, tool or network is a failure, not a skip.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deb() -> PathBuf {
    let dir = repo().join("target/debian");
    let version = env!("CARGO_PKG_VERSION");
    let p = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.to_string_lossy().contains(&format!("ctwatch_{version}-"))
                && p.extension().is_some_and(|e| e == "deb")
        });
    p.unwrap_or_else(|| {
        panic!(
            "no ctwatch_{version}-*.deb in {}: run scripts/deb (scripts/test does)",
            dir.display()
        )
    })
}

#[test]
fn the_package_passes_lintian_without_errors() {
    let out = Command::new("lintian")
        .arg(deb())
        .output()
        .expect("lintian (scripts/deps installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    eprintln!("lintian:\n{text}");
}

#[test]
fn the_package_works_under_a_real_systemd() {
    let out = Command::new("bash")
        .arg(repo().join("tests/systemd/boot-test.sh"))
        .arg(deb())
        .output()
        .expect("bash");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "systemd test failed:\n{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("boot-test: ok"), "{stdout}");
    let score: f64 = stdout
        .split("exposure ")
        .nth(1)
        .and_then(|s| {
            s.trim_end_matches(|c: char| c == ')' || c.is_whitespace())
                .parse()
                .ok()
        })
        .expect("exposure score");
    assert!(
        score <= 1.5,
        "systemd-analyze security exposure {score} > 1.5"
    );
}
