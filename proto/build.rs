//! Compiles `proto/pageserver.proto` with protox (pure Rust, no protoc) and
//! writes the descriptor set that the agents serve over gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/pageserver.proto");
    let files = protox::compile(["pageserver.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("pageserver_descriptor.bin"), files.encode_to_vec())?;
    // `Page`'s Debug is written by hand (src/lib.rs): it never shows the bytes.
    tonic_prost_build::configure()
        .bytes(".pageserver.v1.Page.data")
        .skip_debug([".pageserver.v1.Page"])
        .compile_fds(files)?;
    Ok(())
}
