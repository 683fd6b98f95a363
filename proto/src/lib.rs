//! Generated code of the `pageserver.v1` protocol, and its descriptor set for
//! gRPC server reflection. The protocol itself is documented in
//! `proto/pageserver.proto`.

pub mod bitmap;

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
