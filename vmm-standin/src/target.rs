//! The target role: the VM as it resumes on the target node.
//!
//! The memory starts empty (every page a hole) and is registered for MINOR
//! and MISSING faults, then handed to the target agent, which fills it. From
//! the hand-off on, the mapping is touched only when a command says so: every
//! first access blocks until the agent resolves its fault.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use guest_memory::handoff::Role;

use crate::config::StandinConfig;
use crate::error::{VmmError, io_context};
use crate::guest::{GuestRunStats, TargetGuest};

use crate::protocol::{Command, EventSink, StandinEvent, command_loop};
use crate::ram::{GuestRam, describe_fds, guest_userfaultfd, hand_off};
use crate::verify::{Scope, VerifyOutcome};

pub(crate) fn run(config: &StandinConfig, commands: impl BufRead, events: &Arc<EventSink>) -> Result<(), VmmError> {
    let ram =
        GuestRam::create(&format!("{}-target", config.vm), config.memory_bytes, config.page_size(), config.hugetlb)?;
    let uffd = guest_userfaultfd(Role::Target, &ram)?;
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(io_context("opening /proc/self/pagemap"))?;
    // The hand-off connection stays open while the VM lives (its EOF tells
    // the agent that the VMM is gone); a new agent gets the memory again.
    let _link = hand_off(config, Role::Target, &ram, &[&ram.memfd, &uffd, &pagemap], events)?;
    eprintln!(
        "vmm-standin[target]: hand-off to {} accepted ({})",
        config.handoff_socket.display(),
        describe_fds(Role::Target)
    );

    let guest = Arc::new(TargetGuest::new(ram, uffd, config));
    events.emit(&StandinEvent::Ready {
        pid: std::process::id(),
        page_size: guest.ram().page_size,
        total_pages: guest.ram().total_pages,
        zero_pages: Vec::new(),
        tracking: None,
    });

    command_loop(commands, events, |command| match command {
        Command::Resume => {
            let announce = || events.emit(&StandinEvent::Resumed);
            let guest_events = events.clone();
            let report = move |stats: GuestRunStats| {
                let GuestRunStats { first_access_done_ns, accesses, pages_written, pages_touched } = stats;
                guest_events.emit(&StandinEvent::GuestDone {
                    first_access_done_ns,
                    accesses,
                    pages_written,
                    pages_touched,
                });
            };
            guest.resume(Duration::from_millis(config.run_ms), announce, report).map_err(|e| e.to_string())
        }
        Command::Touch(pages) => {
            pages.iter().try_for_each(|&page| guest.ram().check_page(page))?;
            guest.touch(&pages);
            events.emit(&StandinEvent::Touched { first_access_done_ns: guest.first_access_done_ns() });
            Ok(())
        }
        Command::TouchSpread { first, count } => {
            guest.ram().check_range(first, count)?;
            let nanos = guest.touch_spread(first, count);
            events.emit(&StandinEvent::TouchedSpread { pages: count, nanos });
            Ok(())
        }
        Command::TouchShared(pages) => {
            pages.iter().try_for_each(|&page| guest.ram().check_page(page))?;
            let nanos = guest.touch_shared(&pages);
            events.emit(&StandinEvent::TouchedSpread { pages: pages.len() as u64, nanos });
            Ok(())
        }
        Command::Discard(pages) => {
            pages.iter().try_for_each(|&page| guest.ram().check_page(page))?;
            guest.discard(&pages).map_err(|e| e.to_string())?;
            events.emit(&StandinEvent::Discarded { pages: pages.len() as u64 });
            Ok(())
        }
        Command::Verify(path) => {
            let VerifyOutcome { compared_pages, hole_pages, mismatched_pages, first_mismatches } =
                guest.verify(&path, Scope::EveryPage).map_err(|e| e.to_string())?;
            events.emit(&StandinEvent::Verified {
                verified_pages: compared_pages + hole_pages,
                hole_pages,
                mismatched_pages,
                first_mismatches,
            });
            Ok(())
        }
        Command::VerifyMapped(path) => {
            let VerifyOutcome { compared_pages, mismatched_pages, first_mismatches, .. } =
                guest.verify(&path, Scope::MappedPages).map_err(|e| e.to_string())?;
            events.emit(&StandinEvent::VerifiedMapped {
                mapped_pages: compared_pages,
                mismatched_pages,
                first_mismatches,
            });
            Ok(())
        }
        Command::Write(_) | Command::WriteRange { .. } | Command::Pause => {
            Err("write, write-range and pause are source-role commands".to_owned())
        }
        Command::Quit => Ok(()),
    })
    // The vCPUs may still run, or be blocked for ever in faults nobody
    // resolves: they are not joined. The guest thread keeps the memory and
    // its registration; the process's exit ends them all.
}
