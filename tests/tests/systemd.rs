//! The .deb under a real systemd (PID 1 in a debootstrapped Debian root, its own namespaces), on
//! Debian 12 and 13: `tests/systemd/boot-test.sh` does the work and says what failed.
//! `scripts/test` builds the package first (`scripts/deb`); a missing package, tool or network is
//! a failure, not a skip.

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

/// Debian releases the package is booted on, one after the other (two PID 1s would share the
/// host's cgroup v2 hierarchy): 12 with systemd 252, 13 with systemd 257 and varlinkctl.
/// `CTWATCH_SYSTEMD_RELEASES` (space-separated) picks a subset.
const RELEASES: &[&str] = &["bookworm", "trixie"];

/// `systemd-analyze security` exposure ceilings, as the boot test's last line names them: the
/// unit alone, with the metrics drop-in, with the all-netns drop-in (README.md gives each).
const CEILINGS: &[(&str, f64)] = &[("exposure", 1.5), ("+metrics", 1.8), ("+all-netns", 2.1)];

/// What one release's run printed: the exposure score of the booted unit alone and with each
/// drop-in (in `CEILINGS` order), or why it failed.
fn boot_test(release: &str) -> Result<Vec<f64>, String> {
    let out = Command::new("bash")
        .arg(repo().join("tests/systemd/boot-test.sh"))
        .arg(deb())
        .arg(release)
        .output()
        .expect("bash");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ok = stdout.lines().find(|l| l.starts_with("boot-test: ok"));
    let Some(ok) = ok.filter(|_| out.status.success()) else {
        return Err(format!("{release}: systemd test failed:\n{err}{stdout}"));
    };
    // boot-test: ok (trixie, systemd 257, exposure 1.5, +metrics 1.8, +all-netns 2.1)
    CEILINGS
        .iter()
        .map(|(key, _)| {
            ok.split(&format!(" {key} "))
                .nth(1)
                .and_then(|s| s.split([',', ')']).next()?.trim().parse().ok())
                .ok_or_else(|| format!("{release}: no {key} score in {ok}"))
        })
        .collect()
}

#[test]
fn the_package_works_under_a_real_systemd() {
    let chosen = std::env::var("CTWATCH_SYSTEMD_RELEASES").ok();
    let releases: Vec<&str> = match &chosen {
        Some(list) => list.split_whitespace().collect(),
        None => RELEASES.to_vec(),
    };
    let mut failures = Vec::new();
    for release in releases {
        let started = std::time::Instant::now();
        let result = boot_test(release);
        eprintln!("{release}: {:.0?}", started.elapsed());
        match result {
            Ok(scores) => {
                for ((key, ceiling), score) in CEILINGS.iter().zip(scores) {
                    eprintln!("{release}: {key} {score}");
                    if score > *ceiling {
                        failures.push(format!(
                            "{release}: systemd-analyze security {key} {score} > {ceiling}"
                        ));
                    }
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
