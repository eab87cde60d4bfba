//! What runs in a process, from its cgroup paths (`/proc/PID/cgroup`): a Kubernetes pod, a
//! container, a systemd unit. Pure functions over the file's text; no I/O.
//!
//! Shapes understood, cgroup v2 (`0::PATH`) and v1 (`ID:CONTROLLERS:PATH`, any controller,
//! `name=systemd` included) alike:
//! - kubelet, systemd driver: `…/kubepods[-QOS]-pod<UID with _>.slice/<runtime>-<ID>.scope`
//!   (`cri-containerd-`, `crio-`, `docker-`);
//! - kubelet, cgroupfs driver: `…/kubepods[/QOS]/pod<UID>/<ID>`;
//! - Docker: `/docker/<ID>` and `…/docker-<ID>.scope`; containerd, CRI-O and Podman scopes
//!   outside kubepods (`cri-containerd-`, `nerdctl-`, `crio-`, `libpod-`); and a last
//!   component of 64 hex digits under anything else (a runtime with the cgroupfs layout);
//! - a systemd unit: the last `.service` or `.scope` component, but not `init.scope`,
//!   `session-N.scope`, `user@N.service`, `run-…` transient units or CRI-O's `crio-conmon-`
//!   monitors, which name no workload.
//!
//! Of several lines (v1 has one per hierarchy), the most telling wins: a pod over a container
//! over a unit. Input is untrusted: nothing here panics or allocates more than the input.

/// The container runtime a cgroup path points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    Crio,
    Podman,
    /// A 64-hex-digit cgroup under an unknown parent.
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Podman => "podman",
            Runtime::Unknown => "container",
        }
    }
}

/// What a cgroup path says runs there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A Kubernetes pod: its UID (dashes restored) and the container, when the path goes
    /// that deep.
    Pod {
        uid: String,
        container: Option<String>,
    },
    Container {
        runtime: Runtime,
        id: String,
    },
    /// A systemd unit name (`nginx.service`).
    Unit(String),
}

impl Owner {
    /// How telling it is: a pod (3) over a container (2) over a unit (1).
    pub fn rank(&self) -> u8 {
        match self {
            Owner::Pod { .. } => 3,
            Owner::Container { .. } => 2,
            Owner::Unit(_) => 1,
        }
    }
}

/// The most telling owner among the lines of a `/proc/PID/cgroup` file.
pub fn owner_of_file(text: &str) -> Option<Owner> {
    let mut best: Option<Owner> = None;
    for line in text.lines() {
        let Some(o) = owner_of_line(line) else {
            continue;
        };
        if best.as_ref().is_none_or(|b| o.rank() > b.rank()) {
            best = Some(o);
        }
    }
    best
}

/// One line: `0::/path` (v2) or `4:memory:/path` (v1).
pub fn owner_of_line(line: &str) -> Option<Owner> {
    let mut parts = line.splitn(3, ':');
    let (_id, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
    owner_of_path(path)
}

/// Longest container id or pod UID taken from a path.
const MAX_ID: usize = 128;

/// One cgroup path.
pub fn owner_of_path(path: &str) -> Option<Owner> {
    let path = path.trim_end().trim_end_matches(" (deleted)");
    if !path.starts_with('/') {
        return None;
    }
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if let Some(pod) = pod(&comps) {
        return Some(pod);
    }
    if let Some(c) = container(&comps) {
        return Some(c);
    }
    unit(&comps).map(|u| Owner::Unit(u.to_string()))
}

fn pod(comps: &[&str]) -> Option<Owner> {
    for (i, c) in comps.iter().enumerate() {
        let uid = if let Some(slice) = c.strip_suffix(".slice") {
            // systemd driver: kubepods-burstable-pod<uid>.slice, kubepods-pod<uid>.slice
            if !slice.starts_with("kubepods") {
                continue;
            }
            let Some(at) = slice.rfind("-pod") else {
                continue;
            };
            let uid = &slice[at + 4..];
            if !valid_uid(uid, '_') {
                continue;
            }
            uid.replace('_', "-")
        } else if let Some(uid) = c.strip_prefix("pod") {
            // cgroupfs driver: kubepods/<qos>/pod<uid>, under a kubepods ancestor
            if !comps[..i].contains(&"kubepods") || !valid_uid(uid, '-') {
                continue;
            }
            uid.to_string()
        } else {
            continue;
        };
        let container = comps.get(i + 1).and_then(|n| container_id(n));
        return Some(Owner::Pod { uid, container });
    }
    None
}

/// A pod UID: a UUID, or a static pod's 32-hex-digit hash; `sep` is the separator the
/// driver writes (systemd turns the UUID's dashes into underscores).
fn valid_uid(uid: &str, sep: char) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_ID
        && uid.chars().all(|ch| ch.is_ascii_hexdigit() || ch == sep)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The container id in a pod's child cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope` (systemd driver) or the bare id (cgroupfs driver).
fn container_id(c: &str) -> Option<String> {
    let id = match c.strip_suffix(".scope") {
        Some(scope) => ["cri-containerd-", "crio-conmon-", "crio-", "docker-"]
            .iter()
            .find_map(|p| scope.strip_prefix(p))?,
        None => c,
    };
    valid_id(id).then(|| id.to_string())
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container(comps: &[&str]) -> Option<Owner> {
    // The deepest container wins (a container started inside another one).
    for (i, c) in comps.iter().enumerate().rev() {
        let scoped = c.strip_suffix(".scope").unwrap_or(c);
        let found = [
            ("docker-", Runtime::Docker),
            ("cri-containerd-", Runtime::Containerd),
            ("nerdctl-", Runtime::Containerd),
            ("crio-", Runtime::Crio),
            ("libpod-", Runtime::Podman),
        ]
        .iter()
        .find_map(|(p, rt)| Some((*rt, scoped.strip_prefix(p)?)))
        .filter(|(_, id)| valid_id(id) && !id.starts_with("conmon"));
        if let Some((runtime, id)) = found {
            return Some(Owner::Container {
                runtime,
                id: id.to_string(),
            });
        }
        if is_hex64(c) {
            let runtime = if i > 0 && comps[i - 1] == "docker" {
                Runtime::Docker
            } else {
                Runtime::Unknown
            };
            return Some(Owner::Container {
                runtime,
                id: c.to_string(),
            });
        }
    }
    None
}

fn unit<'a>(comps: &[&'a str]) -> Option<&'a str> {
    let last = comps
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))?;
    let useless = *last == "init.scope"
        || last.starts_with("session-")
        || last.starts_with("user@")
        || last.starts_with("run-")
        || last.starts_with("crio-conmon-");
    (!useless && last.len() <= 256).then_some(*last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6bd5a5-5c2a-4b0e-9d0e-6a1c2b3d4e5f";
    const UID_: &str = "0f6bd5a5_5c2a_4b0e_9d0e_6a1c2b3d4e5f";
    const CID: &str = "4c01db0b339c0a3f5ab8f36a4c5e0b3f9a1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn pod(container: Option<&str>) -> Option<Owner> {
        Some(Owner::Pod {
            uid: UID.into(),
            container: container.map(String::from),
        })
    }

    #[test]
    fn kubelet_systemd_driver_every_qos_and_runtime() {
        for qos in [
            "kubepods-burstable.slice/kubepods-burstable-",
            "kubepods-besteffort.slice/kubepods-besteffort-",
            "",
        ] {
            let slice = if qos.is_empty() {
                format!("/kubepods.slice/kubepods-pod{UID_}.slice")
            } else {
                format!("/kubepods.slice/{qos}pod{UID_}.slice")
            };
            for rt in ["cri-containerd", "crio", "docker"] {
                let path = format!("{slice}/{rt}-{CID}.scope");
                assert_eq!(owner_of_path(&path), pod(Some(CID)), "{path}");
            }
            // The pod's own cgroup (no container yet).
            assert_eq!(owner_of_path(&slice), pod(None), "{slice}");
        }
    }

    #[test]
    fn kubelet_cgroupfs_driver_every_qos() {
        for qos in ["/burstable", "/besteffort", ""] {
            let path = format!("/kubepods{qos}/pod{UID}/{CID}");
            assert_eq!(owner_of_path(&path), pod(Some(CID)), "{path}");
        }
        // Nested under a node-level cgroup (kind, or a kubelet in a container).
        let path = format!("/docker/{CID}/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(owner_of_path(&path), pod(Some(CID)));
        // A static pod's UID is a 32-digit hash.
        let hash = "3c1f7e0a9b2d4c6e8f0a1b2c3d4e5f60";
        assert_eq!(
            owner_of_path(&format!("/kubepods/burstable/pod{hash}/{CID}")),
            Some(Owner::Pod {
                uid: hash.into(),
                container: Some(CID.into())
            })
        );
        // "pod…" outside kubepods is not a pod.
        assert_eq!(owner_of_path(&format!("/system.slice/pod{UID}")), None);
    }

    #[test]
    fn v1_and_v2_lines() {
        let v2 = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(owner_of_file(&v2), pod(Some(CID)));
        // Hybrid: the pod shows in some controllers only; the unit elsewhere loses to it.
        let v1 = format!(
            "12:pids:/system.slice/containerd.service\n4:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/system.slice/containerd.service\n0::/\n"
        );
        assert_eq!(owner_of_file(&v1), pod(Some(CID)));
        let unit = "1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n";
        assert_eq!(
            owner_of_file(unit),
            Some(Owner::Unit("nginx.service".into()))
        );
        assert_eq!(owner_of_file("0::/\n"), None);
        // A removed cgroup (v2 says so).
        assert_eq!(
            owner_of_file("0::/system.slice/nginx.service (deleted)\n"),
            Some(Owner::Unit("nginx.service".into()))
        );
    }

    #[test]
    fn docker_and_other_runtimes() {
        let docker = Some(Owner::Container {
            runtime: Runtime::Docker,
            id: CID.into(),
        });
        assert_eq!(owner_of_path(&format!("/docker/{CID}")), docker);
        assert_eq!(
            owner_of_path(&format!("/system.slice/docker-{CID}.scope")),
            docker
        );
        assert_eq!(
            owner_of_path(&format!("/system.slice/cri-containerd-{CID}.scope")),
            Some(Owner::Container {
                runtime: Runtime::Containerd,
                id: CID.into()
            })
        );
        assert_eq!(
            owner_of_path(&format!("/machine.slice/libpod-{CID}.scope/container")),
            Some(Owner::Container {
                runtime: Runtime::Podman,
                id: CID.into()
            })
        );
        assert_eq!(
            owner_of_path(&format!("/default/{CID}")),
            Some(Owner::Container {
                runtime: Runtime::Unknown,
                id: CID.into()
            })
        );
        // The Docker daemon itself is a unit, not a container.
        assert_eq!(
            owner_of_path("/system.slice/docker.service"),
            Some(Owner::Unit("docker.service".into()))
        );
        // A conmon scope is CRI-O's monitor, not a container.
        assert_eq!(
            owner_of_path(&format!("/system.slice/crio-conmon-{CID}.scope")),
            None
        );
    }

    #[test]
    fn units_that_name_nothing_are_left_to_the_process() {
        for p in [
            "/init.scope",
            "/user.slice/user-0.slice/session-3.scope",
            "/user.slice/user-1000.slice/user@1000.service",
            "/user.slice/user-1000.slice/user@1000.service/init.scope",
            "/system.slice/run-u12.scope",
            "/",
            "/process_api/306f4f859aa519898219dff0f33d8ea4",
            "/system.slice",
        ] {
            assert_eq!(owner_of_path(p), None, "{p}");
        }
        assert_eq!(
            owner_of_path("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"),
            Some(Owner::Unit("foo.service".into()))
        );
        assert_eq!(
            owner_of_path("/system.slice/nginx.service/worker"),
            Some(Owner::Unit("nginx.service".into()))
        );
    }

    #[test]
    fn malformed_and_hostile_input_never_panics() {
        for s in [
            "",
            ":",
            "::",
            "0:",
            "0::",
            "0::relative/path",
            "x:y:/kubepods-pod.slice",
            "0::/kubepods.slice/kubepods-pod.slice",
            "0::/kubepods/pod",
            "0::/kubepods/pod/",
            "0::/kubepods.slice/kubepods-pod\u{0}\u{7f}.slice",
            "0::/kubepods.slice/kubepods-podé.slice",
            "0::/docker/",
            "0::/docker-.scope",
            "0:://///",
            "0::/\n\n\n",
            "\u{feff}0::/x.service",
            "0::/kubepods/podZZZ/abc",
            "0::/kubepods.slice/kubepods--pod-pod_.slice/docker-.scope",
        ] {
            let _ = owner_of_file(s);
        }
        let long = format!("0::/kubepods/pod{}/x", "a".repeat(100_000));
        assert_eq!(owner_of_file(&long), None);
        let deep = format!("0::{}", "/a".repeat(50_000));
        assert_eq!(owner_of_file(&deep), None);
        // Every prefix of a real line parses without panicking.
        let real = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope");
        for i in 0..real.len() {
            let _ = owner_of_file(&real[..i]);
        }
    }
}
