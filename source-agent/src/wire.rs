//! Conversions between guest-memory types and `pageserver.v1` messages.
#![forbid(unsafe_code)]

use guest_memory::GuestLayout;
use pageserver_proto::v1 as pb;

use crate::memory::{PageRangeError, ReadError};

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

/// The gRPC code for pages that could not be read: a range error's code, or
/// DATA_LOSS when the layout has the pages but the file no longer holds them
/// (it shrank) or cannot be read.
pub fn read_error_code(error: &ReadError) -> tonic::Code {
    match error {
        ReadError::Range(range) => page_range_code(range),
        ReadError::ShortRead { .. } | ReadError::Io { .. } => tonic::Code::DataLoss,
    }
}
