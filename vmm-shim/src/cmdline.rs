//! QEMU options the shim cannot honour, found in `/proc/self/cmdline`.
//!
//! Both make the kernel fault in (or map) every page of guest memory at
//! start-up:
//! - `prealloc=on` on a memory backend, or `-mem-prealloc`: QEMU touches
//!   every page right after mapping it, i.e. right after the hand-off;
//! - `-overcommit mem-lock=on`: `mlockall(MCL_FUTURE)` makes the kernel
//!   populate the guest-memory mapping inside `mmap` itself, before the
//!   shim can register it with userfaultfd.
#![forbid(unsafe_code)]

use std::io;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "`{0}` faults every page in at start-up (target: before the agent can serve it, so QEMU would block \
         on every page of guest memory; source: it writes every page, so dirty tracking starts with all of \
         memory dirty and no hole stays a hole) — remove it"
    )]
    Prealloc(String),
    #[error(
        "`-overcommit {0}` locks guest memory, so the kernel maps every page while QEMU maps it, before \
         userfaultfd is registered (target: the guest would read pages no agent ever checked; source: every \
         page is populated) — remove mem-lock=on"
    )]
    MemLock(String),
}

/// The process's own arguments (argv\[0\] included).
pub fn own_args() -> io::Result<Vec<String>> {
    let raw = std::fs::read("/proc/self/cmdline")?;
    Ok(raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// QEMU's spellings of "true" for a boolean option.
fn is_true(value: &str) -> bool {
    matches!(value, "on" | "yes" | "true" | "y")
}

/// True if the QemuOpts-style `arg` (`type,key=value,...`) turns `key` on
/// (`key=on`, or a bare `key`), or the JSON-style one (`{"key": true}`) does.
fn sets_option(arg: &str, key: &str) -> bool {
    if arg.trim_start().starts_with('{') {
        let needle = format!("\"{key}\"");
        return arg.match_indices(&needle).any(|(at, _)| {
            let rest = arg[at + needle.len()..].trim_start();
            rest.strip_prefix(':').is_some_and(|v| v.trim_start().starts_with("true"))
        });
    }
    // A bare `key` means `key=on`, except first (where it is the implied
    // key's value, e.g. the type of an -object).
    arg.split(',').enumerate().any(|(i, part)| match part.split_once('=') {
        Some((k, v)) => k == key && is_true(v),
        None => i > 0 && part == key,
    })
}

/// Checks QEMU's arguments (`args[0]` is the program).
pub fn check(args: &[String]) -> Result<(), Refusal> {
    let mut args = args.iter().skip(1).map(String::as_str).peekable();
    while let Some(arg) = args.next() {
        // QEMU accepts options with one dash or two.
        let option = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'));
        match option {
            Some("mem-prealloc") => return Err(Refusal::Prealloc(arg.to_owned())),
            Some("overcommit") => {
                if let Some(value) = args.peek()
                    && sets_option(value, "mem-lock")
                {
                    return Err(Refusal::MemLock((*value).to_owned()));
                }
            }
            _ => {}
        }
        if option.is_none() && sets_option(arg, "prealloc") {
            return Err(Refusal::Prealloc(arg.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu(args: &[&str]) -> Result<(), Refusal> {
        let mut all = vec!["qemu-system-x86_64".to_owned()];
        all.extend(args.iter().map(|a| a.to_string()));
        check(&all)
    }

    #[test]
    fn accepts_ordinary_command_lines() {
        assert_eq!(
            qemu(&[
                "-m",
                "128M",
                "-object",
                "memory-backend-file,id=mem0,size=128M,mem-path=/dev/shm/x,share=on,prealloc=off,prealloc-threads=4",
                "-machine",
                "pc,memory-backend=mem0",
                "-overcommit",
                "mem-lock=off,cpu-pm=on",
            ]),
            Ok(())
        );
        assert_eq!(qemu(&["-object", r#"{"qom-type":"memory-backend-file","prealloc":false}"#]), Ok(()));
        // A file name that merely contains the word is not an option.
        assert_eq!(qemu(&["-drive", "file=/var/lib/prealloc=on.img"]), Ok(()));
        assert_eq!(qemu(&["-name", "prealloc"]), Ok(()));
    }

    #[test]
    fn refuses_prealloc() {
        for arg in ["memory-backend-file,id=m,prealloc=on,share=on", "memory-backend-memfd,prealloc=yes", "x,prealloc"]
        {
            assert!(matches!(qemu(&["-object", arg]), Err(Refusal::Prealloc(a)) if a == arg), "{arg}");
        }
        let json = r#"{"qom-type": "memory-backend-file", "prealloc" : true}"#;
        assert!(matches!(qemu(&["-object", json]), Err(Refusal::Prealloc(_))));
        assert!(matches!(qemu(&["-mem-prealloc"]), Err(Refusal::Prealloc(_))));
        assert!(matches!(qemu(&["--mem-prealloc"]), Err(Refusal::Prealloc(_))));
        let message = qemu(&["-object", "memory-backend-file,prealloc=on"]).expect_err("refused").to_string();
        assert!(message.contains("prealloc=on") && message.contains("remove it"), "{message}");
    }

    #[test]
    fn refuses_mem_lock() {
        assert!(matches!(qemu(&["-overcommit", "mem-lock=on"]), Err(Refusal::MemLock(_))));
        assert!(matches!(qemu(&["--overcommit", "cpu-pm=off,mem-lock=on"]), Err(Refusal::MemLock(_))));
        assert_eq!(qemu(&["-overcommit"]), Ok(()));
    }
}
