//! Running `ip`, `tc` and `nft` to completion, with what they said on
//! stderr in the error.

use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};

/// A tool that could not be run, or failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("running `{command}` (scripts/setup installs iproute2 and nftables): {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
}

/// Runs `program args`; its stdout on success.
pub fn run(program: &str, args: &[&str]) -> Result<String, ToolError> {
    run_with_input(program, args, None)
}

/// Runs `program args` with `input` on its stdin (`nft -f -`).
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String, ToolError> {
    let command = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let spawn_error = |source| ToolError::Spawn { command: command.clone(), source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A tool that exits early closes its stdin: its status says why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(ToolError::Failed { command, status: output.status, stderr });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
