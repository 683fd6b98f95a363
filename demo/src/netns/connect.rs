//! Sockets the demo, in the root namespace, opens inside another: a thread
//! of its own enters the namespace (`setns`), creates and connects the
//! socket, and ends; the socket stays in the namespace it was created in,
//! and tokio drives it from any thread. Never a runtime thread: a thread
//! that entered a namespace would make every later socket of its tasks
//! there.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pageserver_tls::ClientTls;
use pageserver_tls::client::Dial;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Uri};

use super::{NetError, Side};

/// Longest wait for a TCP connection inside a namespace.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which step failed on the connecting thread.
enum Failed {
    Enter(io::Error),
    Connect(io::Error),
}

/// A TCP connection to `addr` made inside `side`'s namespace, for tokio: a
/// blocking-pool thread waits for [`connect_blocking_in`]'s own thread (the
/// pool thread itself never enters the namespace).
pub async fn connect_in(side: &Side, addr: SocketAddr) -> Result<TcpStream, NetError> {
    let connect_error = |source| NetError::Connect { namespace: side.namespace.clone(), addr, source };
    let inside = side.clone();
    let stream = tokio::task::spawn_blocking(move || connect_blocking_in(&inside, addr)).await.map_err(|_| {
        NetError::Enter { namespace: side.namespace.clone(), source: io::Error::other("the task died") }
    })??;
    stream.set_nonblocking(true).map_err(connect_error)?;
    TcpStream::from_std(stream).map_err(connect_error)
}

/// A blocking TCP connection to `addr` made inside `side`'s namespace
/// (`TCP_NODELAY`), by a thread of its own that enters the namespace and
/// ends; the calling thread stays where it is.
pub fn connect_blocking_in(side: &Side, addr: SocketAddr) -> Result<std::net::TcpStream, NetError> {
    let enter_error = |source| NetError::Enter { namespace: side.namespace.clone(), source };
    let path = side.namespace_path();
    let thread = std::thread::Builder::new()
        .name("netns-connect".to_owned())
        .spawn(move || connect_from_inside(&path, addr))
        .map_err(enter_error)?;
    match thread.join() {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(Failed::Enter(source))) => Err(enter_error(source)),
        Ok(Err(Failed::Connect(source))) => Err(NetError::Connect { namespace: side.namespace.clone(), addr, source }),
        Err(_) => Err(enter_error(io::Error::other("the connecting thread panicked"))),
    }
}

/// On a thread of its own, which it leaves in the namespace at `path`.
fn connect_from_inside(path: &Path, addr: SocketAddr) -> Result<std::net::TcpStream, Failed> {
    let namespace = std::fs::File::open(path).map_err(Failed::Enter)?;
    move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| Failed::Enter(e.into()))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(Failed::Connect)?;
    stream.set_nodelay(true).map_err(Failed::Connect)?;
    Ok(stream)
}

/// A gRPC channel to `addr` inside `side`'s namespace, over TLS with
/// `tls`: each connection tonic makes (the first and every reconnection)
/// is [`connect_in`]'s.
pub async fn channel_in(side: &Side, addr: SocketAddr, tls: Option<ClientTls>) -> Result<Channel, NetError> {
    let channel_error = |source| NetError::Channel { namespace: side.namespace.clone(), addr, source };
    let endpoint = pageserver_tls::endpoint(&format!("http://{addr}")).map_err(channel_error)?;
    let side = side.clone();
    let dial: Dial = Arc::new(move |_: Uri| {
        let side = side.clone();
        Box::pin(async move { connect_in(&side, addr).await.map_err(io::Error::other) })
    });
    endpoint.connect_with_connector(pageserver_tls::connector(tls, dial)).await.map_err(channel_error)
}
