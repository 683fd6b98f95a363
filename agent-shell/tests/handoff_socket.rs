//! The hand-off socket's binding policy, on real files and sockets.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use pageserver_agent_shell::{HandoffSocket, HandoffSocketError};

#[test]
fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("handoff.sock");
    std::fs::write(&file, b"precious").expect("write");
    let error = HandoffSocket::bind(&file, None).expect_err("a regular file");
    assert!(matches!(error, HandoffSocketError::NotASocket { .. }), "{error:?}");
    assert_eq!(error.to_string(), format!("{} exists and is not a socket; refusing to replace it", file.display()));
    assert_eq!(std::fs::read(&file).expect("still there"), b"precious");

    let directory = dir.path().join("a-directory");
    std::fs::create_dir(&directory).expect("mkdir");
    let error = HandoffSocket::bind(&directory, None).expect_err("a directory");
    assert!(matches!(error, HandoffSocketError::NotASocket { .. }), "{error:?}");

    // A link is not a socket either, even one to a live socket, or to nothing.
    let target = HandoffSocket::bind(dir.path().join("real.sock"), None).expect("bind");
    for (name, to) in [("link.sock", target.path().to_owned()), ("dangling.sock", dir.path().join("nothing"))] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(&to, &link).expect("symlink");
        let error = HandoffSocket::bind(&link, None).expect_err("a symbolic link");
        assert!(matches!(error, HandoffSocketError::NotASocket { .. }), "{name}: {error:?}");
        assert!(std::fs::symlink_metadata(&link).expect("link kept").file_type().is_symlink());
    }
}

#[test]
fn a_socket_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handoff.sock");
    let first = HandoffSocket::bind(&path, None).expect("first bind");
    let error = HandoffSocket::bind(&path, None).expect_err("a second agent on the same socket");
    assert!(matches!(error, HandoffSocketError::InUse { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!("{} is in use: another process (an agent?) listens on it; refusing to take it over", path.display())
    );
    let io_error = std::io::Error::from(error);
    assert_eq!(io_error.kind(), std::io::ErrorKind::AddrInUse);
    // The first one still has its socket and still answers.
    let _client = UnixStream::connect(&path).expect("the first socket still listens");
    drop(first.try_clone_listener().expect("clone").accept().expect("accept"));

    // Someone else's listener, not a HandoffSocket, counts the same.
    let other = dir.path().join("other.sock");
    let _listener = UnixListener::bind(&other).expect("bind");
    let error = HandoffSocket::bind(&other, None).expect_err("in use");
    assert!(matches!(error, HandoffSocketError::InUse { .. }), "{error:?}");
}

#[test]
fn a_stale_socket_is_replaced_and_the_new_one_is_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handoff.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(std::fs::symlink_metadata(&path).expect("stale socket").file_type().is_socket());
    UnixStream::connect(&path).expect_err("nothing listens on a stale socket");

    let socket = HandoffSocket::bind(&path, None).expect("a stale socket is replaced");
    assert_eq!(socket.path(), path);
    let meta = std::fs::symlink_metadata(&path).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut client = UnixStream::connect(&path).expect("connect");
    let (mut server, _) = socket.try_clone_listener().expect("clone").accept().expect("accept");
    std::io::Write::write_all(&mut client, b"hi").expect("write");
    let mut got = [0u8; 2];
    server.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"hi");
}

#[test]
fn dropping_removes_the_socket_but_not_a_replacement() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handoff.sock");
    drop(HandoffSocket::bind(&path, None).expect("bind"));
    assert!(!path.exists() && std::fs::symlink_metadata(&path).is_err(), "the socket file is gone");

    // Someone replaced the file after we bound it: it is theirs to remove.
    let socket = HandoffSocket::bind(&path, None).expect("bind again");
    std::fs::remove_file(&path).expect("remove");
    std::fs::write(&path, b"theirs").expect("write");
    drop(socket);
    assert_eq!(std::fs::read(&path).expect("kept"), b"theirs");
}

#[tokio::test]
async fn the_async_listener_accepts_on_the_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handoff.sock");
    let socket = HandoffSocket::bind(&path, None).expect("bind");
    let listener = socket.async_listener().expect("async listener");
    let connect = tokio::task::spawn_blocking(move || UnixStream::connect(&path).expect("connect"));
    let (_stream, _) = listener.accept().await.expect("accept");
    drop(connect.await.expect("client"));
}
