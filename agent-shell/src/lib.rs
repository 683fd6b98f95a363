//! The shell both agent binaries run in: everything around their gRPC
//! services that the source and the target agent do alike.
//!
//! A binary's `main` parses its flags, calls [`init_logging`], sets up its
//! agent and its metrics, binds with [`AgentShell::bind`] and hands its gRPC
//! server to [`AgentShell::run`]. That prints the
//! `{"event":"listening","grpc":"ADDR","metrics":"ADDR"}` line on stdout,
//! serves `/metrics`, runs the gRPC server until SIGTERM or SIGINT, and stops
//! the metrics server only once the gRPC server has finished its calls (a
//! last scrape still sees them). It returns after that graceful shutdown, so
//! `main` can still decide its exit status (the target agent fails when its
//! migration did) and return it with [`exit_code`].
//!
//! # Layout
//!
//! - [`logging`]: logs to stderr, filtered by `RUST_LOG` (default `info`);
//! - `listening`: the `listening` event on stdout;
//! - [`shutdown`]: the SIGTERM / SIGINT future;
//! - [`shell`]: [`AgentShell`], binding both listeners and the lifecycle
//!   above;
//! - `metrics_server`: the `/metrics` server, started and stopped;
//! - [`grpc`]: a gRPC router already carrying health and reflection (v1 and
//!   v1alpha), the health reporter the agent drives, and serving the router
//!   until a graceful shutdown, under the server's limits;
//! - [`limits`]: those limits as flags (`--grpc-*`, `--metrics-max-connections`),
//!   [`GrpcLimits`], flattened into both agents' flags;
//! - [`connections`]: the accept loop: the connection cap, idle connections
//!   closed, connections cut;
//! - [`rpc_limit`]: the RPCs under way, one more refused with
//!   RESOURCE_EXHAUSTED;
//! - [`limit_metrics`]: every refusal counted;
//! - `rate_limited`: refusals logged at most every 10 s;
//! - [`fd_limit`]: the soft descriptor limit raised to the hard one at start;
//! - [`security`]: the TLS flags (`--tls-cert`, `--tls-key`, `--tls-ca`,
//!   `--plaintext`, `--control-allow-name`) and what they resolve to;
//! - `tls_incoming`: the TLS handshakes of a gRPC port's connections;
//! - [`control_access`]: who may call the control RPCs (the orchestrator's
//!   certificate names, or loopback peers without TLS);
//! - [`handoff_socket`]: the hand-off socket's binding policy, the same for
//!   both agents (a path that is not a socket, or a socket in use, is
//!   refused; a stale socket is replaced; mode 0600, or 0660 and chowned to
//!   the `--handoff-group`; removed when dropped);
//! - [`handoff_group`]: the group the hand-off socket may be shared with
//!   (`--handoff-group`: then mode 0660);
//! - [`handoff_peers`]: who may hand memory over, the allow-list of peer
//!   uids checked on every hand-off connection (`--handoff-allow-uid`);
//! - [`exit`]: the exit status, and the reason on stderr;
//! - [`duration`]: durations on the command line (`250ms`, `30s`);
//! - [`size`]: sizes on the command line (`16MiB`);
//! - [`error`]: what can go wrong in all of these;
//! - `sys`: the one `unsafe` call (glibc's mmap threshold, so that freed
//!   page buffers go back to the kernel). Every other file forbids `unsafe`.

pub mod connections;
pub mod control_access;
pub mod duration;
pub mod error;
pub mod exit;
pub mod fd_limit;
pub mod grpc;
pub mod handoff_group;
pub mod handoff_peers;
pub mod handoff_socket;
pub mod health_port;
pub mod limit_metrics;
pub mod limits;
mod listening;
pub mod logging;
mod metrics_server;
mod rate_limited;
pub mod rpc_limit;
pub mod security;
pub mod shell;
pub mod shutdown;
pub mod size;
mod sys;
mod tls_incoming;

pub use connections::{ConnectionState, OpenConnections};
pub use control_access::ControlAccess;
pub use duration::parse_duration;
pub use error::{HandoffGroupError, HandoffSocketError, PeerAllowListError, PeerRefused, ServeError, ShellError};
pub use exit::exit_code;
pub use grpc::{ServerLimits, grpc_router, serve_router, set_health};
pub use handoff_group::{HandoffGroup, HandoffGroupArg};
pub use handoff_peers::{PeerAllowList, PeerCredentials};
pub use handoff_socket::{HANDOFF_READ_TIMEOUT, HandoffSocket};
pub use limits::GrpcLimits;
pub use logging::init_logging;
pub use rpc_limit::ConnectionHandle;
pub use security::{GrpcSecurity, SecurityArgs, SecurityError};
pub use shell::{AgentShell, Shutdown};
pub use shutdown::shutdown_signal;
pub use size::parse_bytes;
