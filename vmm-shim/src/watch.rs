//! Deciding, for each mapping QEMU creates, whether it is the guest's memory,
//! and refusing what the shim cannot honour.
//!
//! The watched file is recognised by identity (device and inode of
//! `PAGESERVER_SHIM_MEM_PATH`, compared with an `fstat` of the mapped
//! descriptor), not by remembering which descriptors were opened on its
//! path: that needs no interposition of `open*`, and survives `dup`, `close`
//! and descriptor reuse, relative paths and symlinks.
//!
//! States: idle → handing off → handed off. The first `MAP_SHARED` mapping
//! of the watched file moves idle → handing off; any other mapping of that
//! file, whenever it comes, ends the process: a second mapping would not be
//! tracked, and a private one would not even be the file the agent serves.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use guest_memory::handoff::Role;
use guest_memory::layout::RegionLayout;

use crate::cmdline::{self, Refusal};
use crate::config::{Config, ConfigError};
use crate::handoff::{self, HandoffFailure, Kept, Region};
use crate::sys;

/// Prefix of every line the shim writes to stderr.
pub const PREFIX: &str = "pageserver-vmm-shim";

/// A successful mmap, as the interposer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    pub addr: u64,
    pub len: u64,
    pub flags: i32,
    pub fd: i32,
    pub offset: i64,
}

impl Mapping {
    fn is_shared(&self) -> bool {
        matches!(self.flags & libc::MAP_TYPE, libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE)
    }
}

#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("refusing to run: {0}")]
    Refused(#[from] Refusal),
    #[error("cannot read /proc/self/cmdline to check QEMU's options: {0}")]
    Cmdline(#[source] std::io::Error),
    #[error(
        "guest memory {path} mapped at {addr:#x}+{len:#x} without MAP_SHARED: guest writes would not reach the \
         file the agent maps — use share=on on the memory backend"
    )]
    Private { path: String, addr: u64, len: u64 },
    #[error(
        "guest memory {path} mapped a second time, at {addr:#x}+{len:#x} (offset {offset:#x}); only the first \
         mapping ({first}) was handed to the agent, so guest accesses through this one would not be tracked"
    )]
    SecondMapping { path: String, addr: u64, len: u64, offset: i64, first: String },
    #[error("cannot hand guest memory {path} ({addr:#x}+{len:#x}) to the {role} agent: {source}")]
    Handoff {
        path: String,
        addr: u64,
        len: u64,
        role: &'static str,
        #[source]
        source: HandoffFailure,
    },
}

/// Prints why, then ends the process: a VM whose memory is not tracked must
/// not run.
fn die(fatal: Fatal) -> ! {
    eprintln!("{PREFIX}: {fatal}");
    sys::exit_now(1)
}

const IDLE: u8 = 0;
const HANDING_OFF: u8 = 1;
const HANDED_OFF: u8 = 2;

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
static STATE: AtomicU8 = AtomicU8::new(IDLE);
/// The region handed off (for messages about later mappings).
static HANDED: OnceLock<RegionLayout> = OnceLock::new();
/// Kept for the life of the process: see [`Kept`].
static KEPT: OnceLock<Kept> = OnceLock::new();

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// The configuration, read once (at load time); `None` if the shim is off.
fn config() -> Option<&'static Config> {
    CONFIG
        .get_or_init(|| {
            let config = Config::from_env().unwrap_or_else(|e| die(e.into()))?;
            let args = cmdline::own_args().unwrap_or_else(|e| die(Fatal::Cmdline(e)));
            cmdline::check(&args).unwrap_or_else(|e| die(e.into()));
            Some(config)
        })
        .as_ref()
}

/// The library was loaded: check the configuration and QEMU's options now,
/// before QEMU does anything.
pub fn on_load() {
    config();
}

/// Called after every successful file mapping.
pub fn after_mmap(mapping: Mapping) {
    let Some(config) = config() else { return };
    let Ok(mapped) = sys::fstat(mapping.fd) else { return };
    let Ok(watched) = std::fs::metadata(&config.mem_path) else { return };
    if (mapped.dev, mapped.ino) != (watched.dev(), watched.ino()) {
        return;
    }
    let path = config.mem_path.display().to_string();
    if !mapping.is_shared() {
        die(Fatal::Private { path, addr: mapping.addr, len: mapping.len });
    }
    if STATE.compare_exchange(IDLE, HANDING_OFF, Ordering::AcqRel, Ordering::Acquire).is_err() {
        let first = match HANDED.get() {
            Some(r) => format!("{:#x}+{:#x}", r.base_host_virt_addr, r.size),
            None => "still being handed off".to_owned(),
        };
        die(Fatal::SecondMapping { path, addr: mapping.addr, len: mapping.len, offset: mapping.offset, first });
    }
    let layout = RegionLayout {
        base_host_virt_addr: mapping.addr,
        size: mapping.len,
        offset: mapping.offset as u64,
        page_size: mapped.blksize,
    };
    let role = role_name(config.role);
    let kept = handoff::hand_off(config, Region { fd: mapping.fd, layout }).unwrap_or_else(|source| {
        die(Fatal::Handoff { path: path.clone(), addr: mapping.addr, len: mapping.len, role, source })
    });
    let _ = HANDED.set(layout);
    let _ = KEPT.set(kept);
    STATE.store(HANDED_OFF, Ordering::Release);
    eprintln!(
        "{PREFIX}: guest memory handed to the {role} agent on {}: vm {:?}, {path} mapped at {:#x}, size {} bytes \
         ({} MiB), offset {:#x}, page size {} bytes",
        config.socket.display(),
        config.vm,
        layout.base_host_virt_addr,
        layout.size,
        layout.size >> 20,
        layout.offset,
        layout.page_size,
    );
}
