//! Generated code of the `pageserver.v1` protocol, and its descriptor set for
//! gRPC server reflection. The protocol itself is documented in
//! `proto/pageserver.proto`.

pub mod bitmap;
pub mod heat;

/// Package `pageserver.v1`.
#[allow(clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("pageserver.v1");
}

/// Encoded `FileDescriptorSet` of `pageserver.proto`, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pageserver_descriptor.bin"));

/// Largest number of bytes one `PagesRequest` may ask for.
pub const MAX_REQUEST_BYTES: u64 = 2 << 20;

/// Largest gRPC message either side decodes (2 MiB pages plus framing).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Response header of every `PageServer` call: the serving agent's
/// incarnation (`Layout.incarnation`).
pub const INCARNATION_HEADER: &str = "pageserver-incarnation";

/// Response header of every `PageServer` call: the identity of the memory
/// served (`Layout.memory_id`).
pub const MEMORY_ID_HEADER: &str = "pageserver-memory-id";

/// A page as logs and error messages may show it: where it is and how long,
/// never its bytes (guest memory holds the guest's secrets). Every message
/// that carries pages shows them through this.
impl std::fmt::Debug for v1::Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("region", &self.region)
            .field("index", &self.index)
            .field("zero", &self.zero)
            .field("data", &format_args!("<{} bytes, not shown>", self.data.len()))
            .finish()
    }
}

impl v1::MigrationPhase {
    /// The phase as the agents' logs and the `phase` label of
    /// `pageserver_target_phase` name it ("precopy-converged").
    pub fn label(self) -> &'static str {
        use v1::MigrationPhase as P;
        match self {
            P::Unspecified => "unspecified",
            P::WaitingForHandoff => "waiting-for-handoff",
            P::Precopy => "precopy",
            P::PrecopyConverged => "precopy-converged",
            P::Postcopy => "postcopy",
            P::Complete => "complete",
            P::Failed => "failed",
        }
    }
}

impl v1::PageCounts {
    /// The counts by state, named as the `state` label of
    /// `pageserver_target_pages` names them.
    pub fn by_state(&self) -> [(&'static str, u64); 6] {
        [
            ("unknown", self.unknown),
            ("fresh", self.fresh),
            ("stale", self.stale),
            ("fetching_unknown", self.fetching_unknown),
            ("fetching_stale", self.fetching_stale),
            ("installed", self.installed),
        ]
    }
}

impl v1::FaultsBlocked {
    /// The counts by reason, named as the `reason` label of
    /// `pageserver_target_faults_blocked` names them.
    pub fn by_reason(&self) -> [(&'static str, u64); 6] {
        [
            ("outside_regions", self.outside_regions),
            ("install_failed", self.install_failed),
            ("source_refused", self.source_refused),
            ("fault_loop_stopped", self.fault_loop_stopped),
            ("migration_failed", self.migration_failed),
            ("source_unreachable", self.source_unreachable),
        ]
    }
}
