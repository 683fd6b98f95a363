//! The target role: the VM as it resumes on the target node.
//!
//! The memory starts empty (every page a hole) and is registered for MINOR
//! and MISSING faults, then handed to the target agent, which fills it. From
//! the hand-off on, the mapping is touched only when a command says so: every
//! first access blocks until the agent resolves its fault.

use std::io::BufRead;
use std::os::fd::AsFd;
use std::time::Duration;

use guest_memory::handoff::Role;
use guest_memory::sys::{Userfaultfd, uffd_flags};

use super::guest::TargetGuest;
use super::protocol::{Command, EventSink, StandinEvent};
use super::ram::{GuestRam, describe_fds, hand_off};
use super::{StandinConfig, VmmError, check_page, command_loop, io_context};

pub(crate) fn run(config: &StandinConfig, commands: impl BufRead, events: &EventSink) -> Result<(), VmmError> {
    let ram =
        GuestRam::create(&format!("{}-target", config.vm), config.memory_bytes, config.page_size(), config.hugetlb)?;
    let uffd = Userfaultfd::new(false).map_err(io_context("creating the userfaultfd"))?;
    let features = if config.hugetlb {
        uffd_flags::FEATURE_MINOR_HUGETLBFS | uffd_flags::FEATURE_MISSING_HUGETLBFS
    } else {
        uffd_flags::FEATURE_MINOR_SHMEM | uffd_flags::FEATURE_MISSING_SHMEM
    };
    uffd.api(features)?;
    uffd.register(ram.map.addr(), ram.size(), uffd_flags::MODE_MINOR | uffd_flags::MODE_MISSING)?;
    let stream = hand_off(&config.handoff_socket, Role::Target, &config.vm, &ram, &[ram.memfd.as_fd(), uffd.as_fd()])?;
    eprintln!(
        "vmm-standin[target]: hand-off to {} accepted ({})",
        config.handoff_socket.display(),
        describe_fds(Role::Target)
    );

    let guest = TargetGuest::new(ram, config);
    let total_pages = guest.ram().total_pages;
    events.emit(&StandinEvent::Ready {
        pid: std::process::id(),
        page_size: guest.ram().page_size,
        total_pages,
        zero_pages: Vec::new(),
    });

    command_loop(commands, events, |command| match command {
        Command::Resume => {
            let stats = guest.run(Duration::from_millis(config.run_ms));
            events.emit(&StandinEvent::GuestDone {
                first_access_done_ns: guest.first_access_done_ns(),
                accesses: stats.accesses,
                pages_written: stats.pages_written,
            });
            Ok(())
        }
        Command::Touch(pages) => {
            pages.iter().try_for_each(|&page| check_page(page, total_pages))?;
            guest.touch(&pages);
            events.emit(&StandinEvent::Touched { first_access_done_ns: guest.first_access_done_ns() });
            Ok(())
        }
        Command::Verify(path) => {
            let outcome = guest.verify(&path).map_err(|e| e.to_string())?;
            events.emit(&StandinEvent::Verified {
                verified_pages: outcome.verified_pages,
                mismatched_pages: outcome.mismatched_pages,
                first_mismatches: outcome.first_mismatches,
            });
            Ok(())
        }
        Command::Write(_) | Command::Pause => Err("write and pause are source-role commands".to_owned()),
        Command::Quit => Ok(()),
    })?;
    // The hand-off connection stays open while the VM lives (its EOF tells
    // the agent that the VMM is gone). The uffd must outlive every access: without it, faults would be
    // resolved by the kernel alone (zeros or stale pre-copy content).
    drop((stream, uffd));
    Ok(())
}
