//! The shim's configuration, from environment variables (see the crate
//! documentation for the list).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_memory::handoff::Role;

pub const ENV_ROLE: &str = "PAGESERVER_SHIM_ROLE";
pub const ENV_MEM_PATH: &str = "PAGESERVER_SHIM_MEM_PATH";
pub const ENV_SOCKET: &str = "PAGESERVER_SHIM_SOCKET";
pub const ENV_VM: &str = "PAGESERVER_SHIM_VM";
pub const ENV_CONNECT_TIMEOUT: &str = "PAGESERVER_SHIM_CONNECT_TIMEOUT";

pub const DEFAULT_VM: &str = "vm";
/// How long the shim retries connecting to an agent that is not listening yet.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{ENV_ROLE}={0:?} is neither \"source\" nor \"target\"")]
    BadRole(String),
    #[error("{ENV_ROLE} is set but {0} is not: the shim cannot know {1}")]
    Missing(&'static str, &'static str),
    #[error("{ENV_MEM_PATH}={path}: {source}")]
    MemPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{ENV_MEM_PATH}={0} is a directory: QEMU would create an unnamed temporary file in it; \
         give mem-path (and {ENV_MEM_PATH}) the path of a file"
    )]
    MemPathIsDirectory(PathBuf),
    #[error("{ENV_CONNECT_TIMEOUT}={0:?} is not a number of seconds")]
    BadTimeout(String),
    #[error("{0} is not valid UTF-8")]
    NotUnicode(&'static str),
}

/// What the shim was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub role: Role,
    /// The memory-backend-file path, made absolute and canonical (as far as
    /// it exists: QEMU may create the file after the shim is loaded).
    pub mem_path: PathBuf,
    /// The agent's hand-off socket.
    pub socket: PathBuf,
    pub vm: String,
    pub connect_timeout: Duration,
}

impl Config {
    /// Reads the process environment. `Ok(None)`: the role is unset (or
    /// empty), so the shim stays out of the way entirely.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// As [`Config::from_env`], with the variables given by `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Result<Option<Self>, ConfigError> {
        let text = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match get(name) {
                None => Ok(None),
                Some(value) if value.is_empty() => Ok(None),
                Some(value) => value.into_string().map(Some).map_err(|_| ConfigError::NotUnicode(name)),
            }
        };
        let role = match text(ENV_ROLE)?.as_deref() {
            None => return Ok(None),
            Some("source") => Role::Source,
            Some("target") => Role::Target,
            Some(other) => return Err(ConfigError::BadRole(other.to_owned())),
        };
        let non_empty = |name| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let mem_path = non_empty(ENV_MEM_PATH)
            .ok_or(ConfigError::Missing(ENV_MEM_PATH, "which memory-backend-file is the guest's memory"))?;
        let socket = non_empty(ENV_SOCKET)
            .ok_or(ConfigError::Missing(ENV_SOCKET, "where the agent listens for the hand-off"))?;
        let vm = text(ENV_VM)?.unwrap_or_else(|| DEFAULT_VM.to_owned());
        let connect_timeout = match text(ENV_CONNECT_TIMEOUT)? {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(secs) => secs
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or(ConfigError::BadTimeout(secs))?,
        };
        let mem_path = resolve_mem_path(&mem_path)?;
        Ok(Some(Self { role, mem_path, socket, vm, connect_timeout }))
    }
}

/// The canonical form of `path`, which may not exist yet (QEMU creates the
/// file when it is missing), or may be a magic link such as
/// `/proc/PID/fd/N` to a memfd (which canonicalises to a name that does not
/// exist; it is kept as given).
fn resolve_mem_path(path: &Path) -> Result<PathBuf, ConfigError> {
    let err = |source| ConfigError::MemPath { path: path.to_owned(), source };
    let absolute = std::path::absolute(path).map_err(err)?;
    let resolved = match std::fs::canonicalize(&absolute) {
        Ok(canonical) if canonical.exists() => canonical,
        Ok(_) => absolute,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
                return Err(err(e));
            };
            std::fs::canonicalize(parent).map_err(err)?.join(name)
        }
        Err(e) => return Err(err(e)),
    };
    if resolved.is_dir() {
        return Err(ConfigError::MemPathIsDirectory(resolved));
    }
    Ok(resolved)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<Config>, ConfigError> {
        let vars: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn unset_role_means_inactive() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&[(ENV_ROLE, ""), (ENV_SOCKET, "/x")]).unwrap(), None);
    }

    #[test]
    fn full_configuration() {
        let config = parse(&[
            (ENV_ROLE, "target"),
            (ENV_MEM_PATH, "/dev/shm/../shm/not-created-yet.ram"),
            (ENV_SOCKET, "/run/agent.sock"),
            (ENV_CONNECT_TIMEOUT, "0.5"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.role, Role::Target);
        assert_eq!(config.mem_path, PathBuf::from("/dev/shm/not-created-yet.ram"));
        assert_eq!(config.socket, PathBuf::from("/run/agent.sock"));
        assert_eq!(config.vm, DEFAULT_VM);
        assert_eq!(config.connect_timeout, Duration::from_millis(500));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let base = [(ENV_MEM_PATH, "/dev/shm/x.ram"), (ENV_SOCKET, "/run/a.sock")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            parse(&vars)
        };
        assert!(matches!(with(&[(ENV_ROLE, "sauce")]), Err(ConfigError::BadRole(r)) if r == "sauce"));
        assert!(matches!(
            with(&[(ENV_ROLE, "source"), (ENV_CONNECT_TIMEOUT, "soon")]),
            Err(ConfigError::BadTimeout(_))
        ));
        assert!(matches!(
            parse(&[(ENV_ROLE, "source"), (ENV_SOCKET, "/a")]),
            Err(ConfigError::Missing(ENV_MEM_PATH, _))
        ));
        assert!(matches!(
            parse(&[(ENV_ROLE, "source"), (ENV_MEM_PATH, "/dev/shm/x")]),
            Err(ConfigError::Missing(ENV_SOCKET, _))
        ));
        assert!(matches!(
            parse(&[(ENV_ROLE, "source"), (ENV_MEM_PATH, "/dev/shm"), (ENV_SOCKET, "/a")]),
            Err(ConfigError::MemPathIsDirectory(_))
        ));
        assert!(matches!(
            parse(&[(ENV_ROLE, "source"), (ENV_MEM_PATH, "/no/such/dir/x.ram"), (ENV_SOCKET, "/a")]),
            Err(ConfigError::MemPath { .. })
        ));
    }
}
