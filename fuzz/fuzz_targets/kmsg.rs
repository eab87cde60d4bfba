//! One /dev/kmsg read through the kernel-log path, as the daemon's kmsg thread does it: the
//! bytes made text (lossily, as the daemon does), `kmsg::parse_record`, then `kmsg::classify`
//! of the record's text.
//!
//! Beyond "no panic":
//! - a record's level is below 8, its text is the rest of its first line (no newline), and
//!   continuation lines (` KEY=value`) after it change nothing;
//! - classification ignores surrounding whitespace and is anchored at the start of the text (a
//!   table-full message quoted inside another line does not count);
//! - a netns or a suppressed count it reports is written in the text.
#![no_main]

use ctwatch_parse::kmsg::{classify, parse_record, KmsgKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    if let Some(r) = parse_record(&raw) {
        assert!(r.prio < 8);
        assert!(!r.text.contains('\n'));
        assert!(raw.lines().next().unwrap().ends_with(r.text), "{r:?}");
        if raw.ends_with('\n') {
            let more = format!("{raw} SUBSYSTEM=net\n DEVICE=+net:eth0\n");
            assert_eq!(parse_record(&more), Some(r.clone()));
        }
    }
    // Any text, not only well-formed records' (the daemon classifies only those).
    let text = match parse_record(&raw) {
        Some(r) => r.text.to_string(),
        None => raw.to_string(),
    };
    let kind = classify(&text);
    assert_eq!(classify(&format!(" \t{text} \n")), kind);
    assert_eq!(classify(&format!("x{}", text.trim_start())), None);
    match kind {
        Some(KmsgKind::TableFull { netns: Some(n) }) | Some(KmsgKind::Suppressed(n)) => {
            assert!(text.contains(&n.to_string()), "{kind:?} from {text:?}")
        }
        _ => {}
    }
});
