//! Fuzzing the hand-off message parser (`handoff::parse_message`) with
//! proptest: arbitrary bytes, and JSON shaped like a message with extreme
//! numbers, mutated. It must never panic, and whatever it accepts must be a
//! layout the agents can rely on (regions page-aligned, non-overlapping in
//! both address space and file, no end past `u64::MAX`, the descriptors the
//! role needs, as many as were attached).
//!
//! `cargo test` runs a short smoke (1000 cases per property); a long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p guest-memory --test
//! fuzz_handoff -- --nocapture` (each property prints its count and time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use guest_memory::handoff::{FdKind, HandoffError, HandoffMessage, MAX_MESSAGE_BYTES, Role, parse_message};
use guest_memory::{GuestLayout, RegionLayout};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// 1000 cases, or `PROPTEST_CASES`.
fn config() -> Config {
    let config = Config::default();
    let config = Config { failure_persistence: None, ..config };
    if std::env::var_os("PROPTEST_CASES").is_some() { config } else { Config { cases: 1000, ..config } }
}

/// Runs `property` on `strategy`'s values; reports how many ran, and how long.
fn fuzz<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(config());
    let cases = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        cases.fetch_add(1, Ordering::Relaxed);
        property(value)
    });
    eprintln!("{name}: {} cases in {:.1?}", cases.into_inner(), started.elapsed());
    if let Err(error) = result {
        panic!("{name}: {error}");
    }
}

/// What every accepted message must be.
fn check_accepted(
    accepted: Result<(HandoffMessage, GuestLayout), HandoffError>,
    attached: usize,
    role: Role,
) -> Result<(), TestCaseError> {
    let Ok((message, layout)) = accepted else { return Ok(()) };
    prop_assert_eq!(message.role, role);
    prop_assert_eq!(message.fds.len(), attached);
    let mut named = message.fds.clone();
    named.sort_by_key(|kind| *kind as u8);
    let mut needed = role.fds().to_vec();
    needed.sort_by_key(|kind| *kind as u8);
    prop_assert_eq!(named, needed);
    prop_assert_eq!(layout.regions(), &message.regions[..]);
    let page_size = layout.page_size();
    prop_assert!(page_size == 4096 || page_size == 2 << 20);
    let mut pages = 0u64;
    for (i, r) in layout.regions().iter().enumerate() {
        prop_assert!(r.size > 0 && r.page_size == page_size);
        for value in [r.size, r.offset, r.base_host_virt_addr] {
            prop_assert_eq!(value % page_size, 0);
        }
        let end = r.base_host_virt_addr.checked_add(r.size);
        prop_assert!(end.is_some() && r.offset.checked_add(r.size).is_some());
        for o in &layout.regions()[..i] {
            prop_assert!(
                r.base_host_virt_addr >= o.base_host_virt_addr + o.size || o.base_host_virt_addr >= end.unwrap_or(0)
            );
            prop_assert!(r.offset >= o.offset + o.size || o.offset >= r.offset + r.size);
        }
        prop_assert!(layout.file_len() >= r.offset + r.size);
        pages += r.size / page_size;
    }
    prop_assert_eq!(layout.total_pages(), pages);
    Ok(())
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Source), Just(Role::Target)]
}

#[test]
fn arbitrary_bytes() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        // Mostly JSON punctuation, so the parser gets past the first byte.
        proptest::collection::vec(proptest::sample::select(b"{}[]\":,0123456789 -.eE\n\\tfnrulsaxv".to_vec()), 0..512),
    ];
    fuzz("parse_message on arbitrary bytes", (bytes, 0usize..10, role()), |(bytes, attached, role)| {
        check_accepted(parse_message(&bytes, attached, role), attached, role)
    });
}

/// Numbers where the checks have their edges.
fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(4096),
        Just(2 << 20),
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(u64::MAX - (2 << 20) + 1),
        Just(1 << 63),
        (0u64..64).prop_map(|pages| pages * 4096),
        (0u64..8).prop_map(|pages| pages * (2 << 20)),
        any::<u64>(),
    ]
}

fn region() -> impl Strategy<Value = Value> {
    (extreme_u64(), extreme_u64(), extreme_u64(), prop_oneof![Just(4096u64), Just(2 << 20), extreme_u64()]).prop_map(
        |(base, size, offset, page_size)| {
            json!({ "base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page_size })
        },
    )
}

fn fd_kind() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("memory")),
        Just(json!("uffd")),
        Just(json!("pagemap")),
        Just(json!("other")),
        Just(json!(7))
    ]
}

/// A message with any of its fields extreme, missing, mistyped or extra.
fn message() -> impl Strategy<Value = Value> {
    let version = prop_oneof![Just(json!(1)), Just(json!(0)), Just(json!(u32::MAX)), Just(json!(-1)), Just(json!("1"))];
    let role = prop_oneof![Just(json!("source")), Just(json!("target")), Just(json!("Source")), Just(json!(null))];
    let pid =
        prop_oneof![Just(json!(0)), Just(json!(u32::MAX)), Just(json!(u64::MAX)), any::<u32>().prop_map(|p| json!(p))];
    (
        version,
        role,
        ".{0,8}",
        pid,
        proptest::collection::vec(region(), 0..5),
        proptest::collection::vec(fd_kind(), 0..5),
        0u8..8,
    )
        .prop_map(|(version, role, vm, pid, regions, fds, damage)| {
            let mut message = json!({
                "version": version, "role": role, "vm": vm, "pid": pid, "regions": regions, "fds": fds,
            });
            if let Some(fields) = message.as_object_mut() {
                match damage {
                    0 => drop(fields.remove("regions")),
                    1 => drop(fields.insert("extra".into(), json!(true))),
                    2 => drop(fields.insert("regions".into(), json!({ "not": "a list" }))),
                    _ => {}
                }
            }
            message
        })
}

/// A well-formed message for `role` (its descriptors in some order) over
/// regions of pages, some of which may overlap: accepted unless they do.
fn plausible_message() -> impl Strategy<Value = (Value, Role)> {
    let regions = proptest::collection::vec((0u64..32, 1u64..8, 0u64..32), 1..6);
    (role(), regions, any::<bool>(), any::<bool>()).prop_map(|(role, regions, huge, reverse)| {
        let page = if huge { 2u64 << 20 } else { 4096 };
        let regions: Vec<RegionLayout> = regions
            .into_iter()
            .map(|(base, pages, offset)| RegionLayout {
                base_host_virt_addr: (1 << 30) + base * page,
                size: pages * page,
                offset: offset * page,
                page_size: page,
            })
            .collect();
        let mut fds: Vec<FdKind> = role.fds().to_vec();
        if reverse {
            fds.reverse();
        }
        let message = HandoffMessage {
            version: 1,
            role,
            vm: "vm".into(),
            pid: 1,
            regions,
            fds,
            previous_handoffs: 0,
            checkpoint: None,
        };
        (serde_json::to_value(message).unwrap_or(Value::Null), role)
    })
}

/// The message's line, possibly cut, with bytes flipped or without its
/// newline.
fn received(message: &Value, cut: usize, flip: Option<(usize, u8)>, newline: bool) -> Vec<u8> {
    let mut bytes = message.to_string().into_bytes();
    if cut > 0 {
        bytes.truncate(bytes.len().saturating_sub(cut));
    }
    if let Some((at, value)) = flip.filter(|_| !bytes.is_empty()) {
        let at = at % bytes.len();
        bytes[at] = value;
    }
    if newline {
        bytes.push(b'\n');
    }
    bytes
}

#[test]
fn message_shaped_json() {
    let damage = (
        prop_oneof![3 => Just(0usize), 1 => 1usize..40],
        proptest::option::weighted(0.2, (any::<usize>(), any::<u8>())),
        prop_oneof![9 => Just(true), 1 => Just(false)],
    );
    let strategy = (message(), damage, 0usize..6, role());
    fuzz("parse_message on message-shaped JSON", strategy, |(message, (cut, flip, newline), attached, role)| {
        let bytes = received(&message, cut, flip, newline);
        check_accepted(parse_message(&bytes, attached, role), attached, role)
    });
}

#[test]
fn plausible_messages() {
    fuzz("parse_message on plausible messages", plausible_message(), |(message, role)| {
        let bytes = received(&message, 0, None, true);
        let attached = role.fds().len();
        let parsed = parse_message(&bytes, attached, role);
        let regions: Vec<RegionLayout> = serde_json::from_value(message["regions"].clone()).unwrap_or_default();
        // Accepted exactly when the regions make a valid layout.
        prop_assert_eq!(parsed.is_ok(), GuestLayout::new(regions).is_ok(), "{:?}", parsed.as_ref().err());
        check_accepted(parsed, attached, role)
    });
}

#[test]
fn limit_and_newline() {
    let role = Role::Source;
    let over = vec![b' '; MAX_MESSAGE_BYTES];
    assert!(matches!(parse_message(&over, 3, role), Err(HandoffError::TooLarge)));
    let mut late = vec![b' '; MAX_MESSAGE_BYTES];
    late.push(b'\n');
    assert!(matches!(parse_message(&late, 3, role), Err(HandoffError::TooLarge)), "a newline past the limit");
    assert!(matches!(parse_message(b"{}", 3, role), Err(HandoffError::Unterminated { len: 2 })));
    assert!(matches!(parse_message(b"", 0, role), Err(HandoffError::Unterminated { len: 0 })));
}
