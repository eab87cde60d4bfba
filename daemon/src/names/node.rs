//! The node's own files that naming reads: `/proc/PID/cgroup` and `comm`, the kubelet's pod
//! log directories, Docker's container configs. Every read is bounded; every name read is
//! untrusted (callers pass it through `clean`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Most bytes read from a cgroup or comm file (a cgroup file is a few hundred bytes).
pub const MAX_SMALL_FILE: usize = 64 * 1024;
/// Most bytes of a Docker `config.v2.json` read looking for `"Name"` (usually a few KiB; it
/// comes after `Config` and `NetworkSettings`, so the first 64 KiB may not reach it).
pub const MAX_DOCKER_CONFIG: usize = 256 * 1024;
/// Most pod log directories listed (a node runs at most a few hundred pods).
pub const MAX_POD_DIRS: usize = 10_000;

/// At most `max` bytes of a file, as text (invalid UTF-8 replaced).
pub fn read_bounded(path: &Path, max: usize) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(max.min(4096));
    f.take(max as u64).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A pod as its log directory names it: `<namespace>_<name>_<uid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDir {
    pub namespace: String,
    pub name: String,
}

/// Parses a kubelet pod log directory name. Namespaces and pod names cannot hold `_`
/// (they are DNS labels and subdomains), so the split is unambiguous; anything else is
/// refused.
pub fn parse_pod_dir(dir: &str) -> Option<(String, PodDir)> {
    let mut parts = dir.splitn(3, '_');
    let (ns, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || name.is_empty() || uid.is_empty() || uid.contains('_') {
        return None;
    }
    Some((
        uid.to_string(),
        PodDir {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
    ))
}

/// Pod UID → namespace and name, from one listing of the kubelet's pod log root.
pub fn pod_dirs(root: &Path) -> HashMap<String, PodDir> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten().take(MAX_POD_DIRS) {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((uid, p)) = parse_pod_dir(name) {
            out.insert(uid, p);
        }
    }
    out
}

/// The value of the top-level `"Name"` key of a JSON object, read without parsing the
/// rest (values are skipped, strings honour escapes). `None` if the text ends first or is
/// not an object. Never panics; linear in the input.
pub fn json_top_level_name(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return None,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let (key, next) = json_string(b, i)?;
        i = skip_ws(b, next);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        if key == "Name" {
            return (b.get(i) == Some(&b'"'))
                .then(|| json_string(b, i).map(|(s, _)| s))
                .flatten();
        }
        i = skip_value(b, i)?;
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// A JSON string starting at `b[i] == '"'`: its value and the index after it.
fn json_string(b: &[u8], i: usize) -> Option<(String, usize)> {
    let mut out = Vec::new();
    let mut j = i + 1;
    loop {
        match *b.get(j)? {
            b'"' => return Some((String::from_utf8_lossy(&out).into_owned(), j + 1)),
            b'\\' => {
                let e = *b.get(j + 1)?;
                match e {
                    b'n' | b't' | b'r' | b'b' | b'f' => out.push(b' '),
                    b'u' => {
                        let hex = std::str::from_utf8(b.get(j + 2..j + 6)?).ok()?;
                        let c = u32::from_str_radix(hex, 16).ok()?;
                        let mut tmp = [0u8; 4];
                        let ch = char::from_u32(c).unwrap_or('\u{fffd}');
                        out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                        j += 4;
                    }
                    other => out.push(other),
                }
                j += 2;
            }
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
}

/// Skips one JSON value starting at `i`; returns the index after it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while !matches!(b.get(j), None | Some(b',' | b'}' | b']')) {
                j += 1;
            }
            Some(j)
        }
    }
}

fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match *b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// Docker's name for a container (`docker run --name`), without its leading `/`.
pub fn docker_name(containers: &Path, id: &str) -> Option<String> {
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let text = read_bounded(
        &containers.join(id).join("config.v2.json"),
        MAX_DOCKER_CONFIG,
    )?;
    let name = json_top_level_name(&text)?;
    let name = name.strip_prefix('/').unwrap_or(&name);
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_split_on_underscores() {
        assert_eq!(
            parse_pod_dir(
                "kube-system_coredns-5d78c9869d-abcde_0f6bd5a5-5c2a-4b0e-9d0e-6a1c2b3d4e5f"
            ),
            Some((
                "0f6bd5a5-5c2a-4b0e-9d0e-6a1c2b3d4e5f".into(),
                PodDir {
                    namespace: "kube-system".into(),
                    name: "coredns-5d78c9869d-abcde".into()
                }
            ))
        );
        for bad in ["", "a", "a_b", "_b_c", "a__c", "a_b_", "a_b_c_d"] {
            assert_eq!(parse_pod_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_docker_name_is_found_after_large_values() {
        let big = "x".repeat(10_000);
        let text = format!(
            r#"{{"StreamConfig":{{}},"State":{{"Running":true,"Pid":42}},"ID":"abc","Args":["a\"}}","b"],"Config":{{"Env":["A={big}"],"Labels":{{"Name":"not this"}}}},"Name":"/web-1","Driver":"overlay2"}}"#
        );
        assert_eq!(json_top_level_name(&text).as_deref(), Some("/web-1"));
        assert_eq!(
            json_top_level_name(r#"{"Name":"a\u00e9\nb"}"#).as_deref(),
            Some("aé b")
        );
        // Cut before the name, not an object, or the name not a string: nothing.
        for bad in [
            &text[..200],
            "[]",
            "",
            "{",
            r#"{"Name":5}"#,
            r#"{"a":"#,
            "{\"a\":\"\\",
        ] {
            assert_eq!(json_top_level_name(bad), None, "{bad}");
        }
        // Hostile nesting is linear and bounded.
        let deep = format!("{{\"a\":{}", "[".repeat(200_000));
        assert_eq!(json_top_level_name(&deep), None);
        for i in 0..text.len().min(400) {
            let _ = json_top_level_name(&text[..i]);
        }
    }
}
