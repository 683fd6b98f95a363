//! The descriptor limit, raised at start: every connection is a
//! descriptor, and an agent that runs out of them cannot accept its own
//! target, answer `/metrics`, or open a file. The soft limit (often 1024) is
//! raised to the hard one, which the administrator set; the connection caps
//! (`--grpc-max-connections`, `--metrics-max-connections`) then keep the
//! agent well below it.
#![forbid(unsafe_code)]

use rustix::process::{Resource, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit
/// now in force (`None`: unlimited or unknown). A failure is logged, not
/// fatal: the agent runs with what it has.
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let before = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(?before, now = ?limit.current, "raised the soft descriptor limit"),
            Err(error) => {
                tracing::warn!(%error, ?before, "could not raise the soft descriptor limit to the hard one");
                return before;
            }
        }
    }
    limit.current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let now = raise_fd_limit();
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(now, limit.current);
        assert_eq!(limit.current, limit.maximum);
    }
}
