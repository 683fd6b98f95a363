//! [`ClientTls`]: the TLS side of a client of an agent (the target agent
//! dialling its source, an orchestrator steering a migration). It presents
//! its own certificate and checks that the server's chains to `--tls-ca`
//! and is valid for the name dialled (`https://NAME:PORT`).
//!
//! [`connector`] makes tonic's connections: each one (the first and every
//! reconnection) is dialled by the caller's function and secured with the
//! certificates in use at that moment, so a rotation reaches the next
//! reconnection without touching the connections already made.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::TlsError;
use crate::files::{LoadedTls, TlsFiles};
use crate::reloading::{Reload, Reloading};
use crate::{ALPN_H2, provider};

/// A client's certificate and the CA the servers it dials must chain to.
#[derive(Debug, Clone)]
pub struct ClientTls(Arc<Reloading<ClientConfig>>);

fn build(files: &TlsFiles, loaded: &LoadedTls) -> Result<ClientConfig, TlsError> {
    let identity = |source| TlsError::Identity { cert: files.cert.clone(), key: files.key.clone(), source };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_root_certificates(loaded.roots.clone())
        .with_client_auth_cert(loaded.chain.clone(), loaded.key.clone_key())
        .map_err(identity)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

impl ClientTls {
    /// Reads the files: an error names the one that is wrong.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(Reloading::load("client", files, build)?)))
    }

    /// The handshake over `io` with the server that must be `name`.
    pub async fn connect<IO>(&self, io: IO, name: ServerName<'static>) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        TlsConnector::from(self.0.current()).connect(name, io).await
    }

    /// For [`crate::watch`].
    pub fn reloading(&self) -> Arc<dyn Reload> {
        self.0.clone()
    }
}

/// The name a server dialled at `uri` must prove: the URI's host, a DNS
/// name or an IP address (`[::1]` without its brackets).
pub fn server_name(uri: &Uri) -> Result<ServerName<'static>, TlsError> {
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|source| TlsError::ServerName { name: host.to_owned(), source })
}

/// A client's connection, in the clear or secured.
#[derive(Debug)]
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Dials the TCP connection for a URI (e.g. inside a network namespace).
pub type Dial = Arc<dyn Fn(Uri) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync>;

/// Dials `HOST:PORT` of the URI (port 443 for https, 80 for http if none),
/// with `TCP_NODELAY`.
pub fn dial_tcp() -> Dial {
    Arc::new(|uri: Uri| {
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    })
}

/// tonic's endpoint for `url` (`https://NAME:PORT` or `http://HOST:PORT`),
/// its connections to be made by [`connector`]. tonic refuses an https
/// URL unless it does the TLS itself, with a configuration fixed for the
/// channel's life; here the connector does it, with the certificates in
/// use at each connection, so tonic is given the same address as http
/// (the scheme only fills HTTP/2's `:scheme`, which no gRPC server checks).
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let url = match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_owned(),
    };
    tonic::transport::Endpoint::from_shared(url)
}

/// Dials `address` (`HOST:PORT`) whatever the URI's host: the name the
/// server's certificate must be valid for stays the URI's (a name that
/// need not resolve, as when the certificate names a service).
pub fn dial_address(address: &str) -> Dial {
    let address = address.to_owned();
    Arc::new(move |_: Uri| {
        let address = address.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    })
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<ClientStream>>> + Send>>;

/// tonic's connector (`Endpoint::connect_with_connector`): `dial`, then
/// with `tls` a handshake that checks the server is the URI's host.
pub fn connector(
    tls: Option<ClientTls>,
    dial: Dial,
) -> impl tower::Service<Uri, Response = TokioIo<ClientStream>, Error = io::Error, Future = Connecting>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| -> Connecting {
        let tls = tls.clone();
        let dial = dial.clone();
        Box::pin(async move {
            let tcp = dial(uri.clone()).await?;
            let stream = match tls {
                None => ClientStream::Plain(tcp),
                Some(tls) => {
                    let name = server_name(&uri).map_err(io::Error::other)?;
                    ClientStream::Tls(Box::new(tls.connect(tcp, name).await?))
                }
            };
            Ok(TokioIo::new(stream))
        })
    })
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
}
