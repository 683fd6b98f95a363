//! The state of one source agent: the memory it serves once it has some, and
//! what it has served.
//!
//! An agent starts either with its memory (a memory file) or empty, waiting
//! for a VMM's hand-off. Memory is attached at most once; until then every
//! RPC is refused with UNAVAILABLE and the health service says NOT_SERVING.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

use crate::drain::Drain;
use crate::memory::{MemoryOrigin, SourceMemory};
use crate::metrics::RpcStats;

/// What the agent has served, for metrics ([`crate::metrics`]).
#[derive(Debug, Default)]
pub struct ServeCounters {
    /// Pages sent by GetPage and GetPages, zero pages included.
    pub pages_served: AtomicU64,
    /// Of those, pages sent as a zero flag without data.
    pub zero_pages_served: AtomicU64,
    /// Page data bytes sent (zero pages count 0).
    pub bytes_served: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("the agent already serves the memory of {existing}")]
pub struct AlreadyAttached {
    pub existing: MemoryOrigin,
}

/// One source agent.
#[derive(Debug)]
pub struct SourceAgent {
    vm: String,
    /// This agent process's life (`Layout.incarnation`): random, so that a
    /// restarted agent never reuses one.
    incarnation: String,
    /// Why there is no memory yet, for UNAVAILABLE statuses.
    waiting_reason: String,
    memory: OnceLock<Arc<SourceMemory>>,
    attached: watch::Sender<bool>,
    pub counters: ServeCounters,
    /// Latencies and refusals per RPC (shared with the server's
    /// [`RpcMetricsLayer`](crate::rpc_metrics::RpcMetricsLayer)).
    pub rpcs: Arc<RpcStats>,
    /// Cutting the streams still open when a stop's grace is over.
    pub drain: Drain,
}

impl SourceAgent {
    fn empty(vm: String, waiting_reason: String) -> Self {
        Self {
            vm,
            incarnation: new_incarnation(),
            waiting_reason,
            memory: OnceLock::new(),
            attached: watch::Sender::new(false),
            counters: ServeCounters::default(),
            rpcs: Arc::default(),
            drain: Drain::default(),
        }
    }

    /// An agent that waits for a VMM's hand-off on `socket`.
    pub fn waiting_for_handoff(vm: impl Into<String>, socket: &Path) -> Self {
        Self::empty(vm.into(), format!("waiting for the VMM hand-off on {}", socket.display()))
    }

    /// An agent serving `memory` from the start.
    pub fn with_memory(vm: impl Into<String>, memory: SourceMemory) -> Self {
        let agent = Self::empty(vm.into(), String::new());
        // A fresh agent has no memory yet, so this cannot fail.
        let _ = agent.attach(memory);
        agent
    }

    /// This agent's incarnation (`Layout.incarnation`).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// The VM's name, from the agent's configuration.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Attaches the memory to serve; only the first call succeeds.
    pub fn attach(&self, memory: SourceMemory) -> Result<Arc<SourceMemory>, AlreadyAttached> {
        let memory = Arc::new(memory);
        self.memory.set(memory.clone()).map_err(|_| AlreadyAttached {
            existing: self
                .memory
                .get()
                .map(|m| m.origin().clone())
                .unwrap_or(MemoryOrigin::Vmm { vm: String::new(), pid: 0 }),
        })?;
        self.attached.send_replace(true);
        Ok(memory)
    }

    /// The memory, once attached.
    pub fn memory(&self) -> Option<&Arc<SourceMemory>> {
        self.memory.get()
    }

    /// The memory, or why there is none yet.
    pub fn memory_or_reason(&self) -> Result<&Arc<SourceMemory>, &str> {
        self.memory.get().ok_or(self.waiting_reason.as_str())
    }

    /// Watches whether memory is attached (true once, forever).
    pub fn subscribe_attached(&self) -> watch::Receiver<bool> {
        self.attached.subscribe()
    }
}

/// A new incarnation: 128 random bits from the kernel, in hex (the time and
/// pid if the kernel has no randomness to give, which still differ from any
/// earlier agent's on this host).
fn new_incarnation() -> String {
    let mut bytes = [0u8; 16];
    match rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        Ok(16) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        _ => format!("{:x}-{:x}", std::process::id(), guest_memory::memfile::monotonic_ns()),
    }
}
