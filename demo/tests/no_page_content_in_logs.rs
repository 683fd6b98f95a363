//! No page content in any log line or error message, at any level: the real
//! `pageserver-demo` binary migrates a guest whose every data page starts
//! with a marker (`--guest-marker`), with `RUST_LOG=trace` for itself, both
//! agents and both stand-ins, and every byte of the target's memory is
//! compared with the source's at pause time. Then the children's logs
//! (`--log-dir`) and the demo's own stdout and stderr are searched for the
//! marker's first bytes written as text, as hex (lower and upper case, with
//! or without spaces), as base64 (standard and URL-safe, at each of the
//! three alignments it can have in a longer buffer) and as a Rust `Debug`
//! list of bytes (`[80, 83, ...]`, `[50, 53, ...]` in hex): none may appear.
//!
//! Needs root (userfaultfd) and the workspace's binaries (`scripts/test`).

mod common;
mod demo_process;

use common::assert_every_byte_verified;
use demo_process::DemoDir;

/// What the source guest writes at the start of each data page.
const MARKER: &str = "PSMARK-9d41c7e2-page-content-must-not-be-logged";
/// How much of it is searched for: a dump of a page's first bytes is
/// caught as well as one of the whole page.
const SEARCHED: usize = 16;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (i, &b)| word | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(BASE64[(word >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// Every way `bytes` could show up in a log, each named.
fn encodings(bytes: &[u8]) -> Vec<(String, String)> {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        ("text".to_owned(), String::from_utf8_lossy(bytes).into_owned()),
        ("hex".to_owned(), hex.concat()),
        ("HEX".to_owned(), hex.concat().to_uppercase()),
        ("spaced hex".to_owned(), hex.join(" ")),
        ("SPACED HEX".to_owned(), hex.join(" ").to_uppercase()),
    ];
    // Debug lists of bytes (`{:?}`, `{:x?}`, `{:X?}`), open-ended.
    for (form, list) in [
        ("Debug bytes", format!("{:?}", &bytes[..8])),
        ("Debug hex bytes", format!("{:x?}", &bytes[..8])),
        ("Debug HEX bytes", format!("{:X?}", &bytes[..8])),
    ] {
        forms.push((form.to_owned(), list.trim_end_matches(']').to_owned()));
    }
    // Base64 of a buffer holding `bytes` after 0, 1 or 2 other bytes: the
    // characters that depend on `bytes` alone.
    for shift in 0..3 {
        let mut buffer = vec![0u8; shift];
        buffer.extend_from_slice(bytes);
        let encoded = base64(&buffer);
        let first = (shift * 8).div_ceil(6);
        let last = (buffer.len() * 8) / 6;
        let stable = &encoded[first..last];
        forms.push((format!("base64 (+{shift})"), stable.to_owned()));
        forms.push((format!("base64url (+{shift})"), stable.replace('+', "-").replace('/', "_")));
    }
    forms
}

#[test]
fn the_base64_encoder_is_right() {
    assert_eq!(base64(b"Man"), "TWFu");
    assert_eq!(base64(b"Ma"), "TWE");
    assert_eq!(base64(b"hello world"), "aGVsbG8gd29ybGQ");
}

#[test]
fn a_traced_migration_logs_no_page_content() {
    let dir = DemoDir::new("no-page-content", None);
    let output = dir
        .demo(&["--memory", "8M", "--run-ms", "300", "--vcpus", "2", "--dirty-rate", "2000", "--guest-marker", MARKER])
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running the demo");
    let report = dir.report(&output);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_every_byte_verified(&report);

    let mut texts = vec![
        ("the demo's stdout".to_owned(), String::from_utf8_lossy(&output.stdout).into_owned()),
        ("the demo's stderr".to_owned(), String::from_utf8_lossy(&output.stderr).into_owned()),
    ];
    for entry in std::fs::read_dir(dir.logs()).expect("the logs").flatten() {
        let text = std::fs::read(entry.path()).expect("a log");
        texts.push((entry.file_name().to_string_lossy().into_owned(), String::from_utf8_lossy(&text).into_owned()));
    }
    let names: Vec<&str> = texts.iter().map(|(name, _)| name.as_str()).collect();
    for log in ["source-agent.log", "target-agent.log", "vmm-standin-source.log", "vmm-standin-target.log"] {
        assert!(names.contains(&log), "{log} missing: {names:?}");
    }
    for agent in ["source-agent.log", "target-agent.log"] {
        let (_, text) = texts.iter().find(|(name, _)| name == agent).expect("the agent's log");
        assert!(text.contains(" TRACE "), "{agent} was not traced:\n{text}");
    }
    let forms = encodings(&MARKER.as_bytes()[..SEARCHED]);
    for (name, text) in &texts {
        for (form, needle) in &forms {
            if let Some(at) = text.find(needle.as_str()) {
                let line = text[..at].rsplit('\n').next().unwrap_or_default().to_owned() + &text[at..];
                let line = line.lines().next().unwrap_or_default();
                panic!("{name} holds page content ({form} {needle:?}): {line}");
            }
        }
    }
}
