//! An agent's exit status: 0 after a graceful shutdown, 1 with the reason on
//! stderr otherwise. `main` returns [`exit_code`] of whatever ran the agent
//! (and decided, after the shell returned, whether the agent did its job).
#![forbid(unsafe_code)]

use std::error::Error;
use std::process::ExitCode;

/// Success, or `Error: ` and the error with its whole chain of causes on one
/// line of stderr (`a: b: c`), and failure.
pub fn exit_code<E: Into<Box<dyn Error + Send + Sync>>>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {}", describe(error.into().as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated. A cause that the message
/// already ends with (an error that prints its source itself) is not
/// repeated.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = error.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("serving")]
        Chained(#[source] std::io::Error),
        #[error("opening the file: {0}")]
        SaysItsCause(#[source] std::io::Error),
    }

    #[test]
    fn the_chain_is_one_line_without_repeats() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(describe(&Outer::Chained(io())), "serving: disk on fire");
        assert_eq!(describe(&Outer::SaysItsCause(io())), "opening the file: disk on fire");
        assert_eq!(exit_code(Ok::<(), Outer>(())), ExitCode::SUCCESS);
        assert_eq!(exit_code(Err(Outer::Chained(io()))), ExitCode::FAILURE);
    }
}
