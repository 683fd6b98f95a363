//! Fencing: a page is installed only from this migration's source, read
//! while the source VM was paused.
//!
//! # Which source
//!
//! The first `GetLayout` names the source: its VM, its layout, and the
//! identity of the memory it serves (`memory_id`: the same for every agent
//! the same VMM hands the same memory to, different for any other VM). Every
//! later connection, and every stream on it, must name the same memory in its
//! response headers; anything else (another VM's agent on the same address, a
//! proxy that drops the headers) is [`SourceError::WrongSource`]: nothing it
//! sent is used, and the caller treats the source as unreachable (it retries
//! until the source-unreachable deadline, then fails the migration).
//!
//! The serving agent's *incarnation* may change: a source agent that dies
//! and is started again on the same VMM serves the same memory, but its dirty
//! epochs start over. [`SourceFence::check_headers`] notices the new
//! incarnation (`source_restarts`); epochs from the old one mean nothing to
//! it, so a bitmap is then asked for since epoch 0, and every page not yet
//! known fresh becomes stale (see `transfer::precopy` and `agent`).
//!
//! # Paused
//!
//! After the switchover every request says `require_paused`, and every reply
//! carries the source's pause epoch, read before and after its pages were
//! read. A reply with pause epoch 0 ([`SourceError::NotPaused`]) was read
//! from a running VM and is never installed. Within one incarnation, the
//! first pause epoch seen after the switchover is the fence: a later reply or
//! final bitmap with another one means the source VM ran again after
//! switchover ([`SourceError::PauseChanged`]): pages already installed may be
//! stale, so the migration fails at once. Across a source-agent restart the
//! fence proves that the VM is paused now; that it did not run while no agent
//! watched rests on the VMM (a VMM that resumes a VM whose memory went to a
//! target has split it in two, which no agent can undo).
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use pageserver_proto::v1::Layout;
use pageserver_proto::{INCARNATION_HEADER, MEMORY_ID_HEADER};
use tonic::metadata::MetadataMap;

use crate::source::SourceError;
use crate::stats::TargetStats;

/// The incarnation a response came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation(pub String);

/// An epoch of one source incarnation (0 means "every page").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEpoch {
    pub incarnation: Incarnation,
    pub epoch: u64,
}

#[derive(Debug)]
struct FenceState {
    /// The newest incarnation seen.
    incarnation: Incarnation,
    /// The pause epoch of that incarnation that post-copy replies must
    /// carry, once one was seen.
    pause_epoch: Option<u64>,
}

/// This migration's source, as its first `GetLayout` named it.
#[derive(Debug)]
pub struct SourceFence {
    vm: String,
    memory_id: String,
    state: Mutex<FenceState>,
    stats: Arc<TargetStats>,
}

impl SourceFence {
    /// Learns the source from the migration's first `GetLayout`.
    pub fn learn(layout: &Layout, stats: Arc<TargetStats>) -> Result<Self, SourceError> {
        if layout.memory_id.is_empty() || layout.incarnation.is_empty() {
            return Err(SourceError::WrongSource(
                "the source names no memory id or incarnation (a source agent too old for fencing)".into(),
            ));
        }
        tracing::info!(
            vm = %layout.vm,
            memory_id = %layout.memory_id,
            incarnation = %layout.incarnation,
            "this migration's source"
        );
        Ok(Self {
            vm: layout.vm.clone(),
            memory_id: layout.memory_id.clone(),
            state: Mutex::new(FenceState { incarnation: Incarnation(layout.incarnation.clone()), pause_epoch: None }),
            stats,
        })
    }

    fn lock(&self) -> MutexGuard<'_, FenceState> {
        // Every update leaves the state whole, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The memory this migration reads (`Layout.memory_id`).
    pub fn memory_id(&self) -> &str {
        &self.memory_id
    }

    /// The newest incarnation seen.
    pub fn incarnation(&self) -> Incarnation {
        self.lock().incarnation.clone()
    }

    /// Checks a reconnection's `GetLayout`: same VM, same memory.
    pub fn check_layout(&self, layout: &Layout) -> Result<Incarnation, SourceError> {
        if layout.vm != self.vm {
            return Err(SourceError::WrongSource(format!(
                "it serves VM {:?}, this migration's source is VM {:?}",
                layout.vm, self.vm
            )));
        }
        self.check_identity(Some(&layout.memory_id), Some(&layout.incarnation))
    }

    /// Checks a response's identity headers; returns the incarnation it
    /// came from (noting a new one as a source restart).
    pub fn check_headers(&self, headers: &MetadataMap) -> Result<Incarnation, SourceError> {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        self.check_identity(header(MEMORY_ID_HEADER), header(INCARNATION_HEADER))
    }

    fn check_identity(&self, memory_id: Option<&str>, incarnation: Option<&str>) -> Result<Incarnation, SourceError> {
        let (Some(memory_id), Some(incarnation)) = (memory_id, incarnation) else {
            return Err(SourceError::WrongSource(format!(
                "the response names no memory id or incarnation ({MEMORY_ID_HEADER}, {INCARNATION_HEADER})"
            )));
        };
        if memory_id != self.memory_id {
            self.stats.source_replies_refused.fetch_add(1, Ordering::Relaxed);
            return Err(SourceError::WrongSource(format!(
                "it serves memory {memory_id:?}, not this migration's memory {:?}",
                self.memory_id
            )));
        }
        let mut state = self.lock();
        if state.incarnation.0 != incarnation {
            tracing::warn!(
                old = %state.incarnation.0,
                new = %incarnation,
                "the source agent was restarted: its dirty history is lost, so every page not yet known fresh is \
                 treated as stale"
            );
            state.incarnation = Incarnation(incarnation.to_owned());
            state.pause_epoch = None;
            self.stats.source_restarts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(state.incarnation.clone())
    }

    /// Checks that a post-copy reply (or final bitmap) from `incarnation`
    /// was read while the source was paused, at the same pause as the others.
    pub fn check_paused(&self, incarnation: &Incarnation, pause_epoch: u64, what: &str) -> Result<(), SourceError> {
        if pause_epoch == 0 {
            self.stats.source_replies_refused.fetch_add(1, Ordering::Relaxed);
            return Err(SourceError::NotPaused(what.to_owned()));
        }
        let mut state = self.lock();
        if state.incarnation != *incarnation {
            // From an incarnation that has since been replaced: its streams
            // are dead; this reply is one the old agent sent before dying,
            // read while it was paused at its own pause, which is all we can
            // know of it.
            return Ok(());
        }
        match state.pause_epoch {
            None => {
                state.pause_epoch = Some(pause_epoch);
                Ok(())
            }
            Some(fenced) if fenced == pause_epoch => Ok(()),
            Some(fenced) => Err(SourceError::PauseChanged { fenced, got: pause_epoch, what: what.to_owned() }),
        }
    }
}
