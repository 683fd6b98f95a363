//! Conversions between guest-memory types and `pageserver.v1` messages.
#![forbid(unsafe_code)]

use guest_memory::GuestLayout;
use pageserver_proto::v1 as pb;

use crate::memory::PageRangeError;

/// The regions of `layout` as `GetLayout` reports them.
pub fn regions_to_proto(layout: &GuestLayout) -> Vec<pb::Region> {
    layout
        .regions()
        .iter()
        .enumerate()
        .map(|(index, r)| pb::Region {
            index: index as u32,
            host_addr: r.base_host_virt_addr,
            size_bytes: r.size,
            file_offset: r.offset,
            page_size: r.page_size,
            page_count: r.size / r.page_size,
        })
        .collect()
}

/// The gRPC code for a page range that cannot be served.
pub fn page_range_code(error: &PageRangeError) -> tonic::Code {
    match error {
        PageRangeError::UnknownRegion { .. } => tonic::Code::NotFound,
        PageRangeError::OutOfRange { .. } | PageRangeError::PastEnd { .. } => tonic::Code::OutOfRange,
    }
}
