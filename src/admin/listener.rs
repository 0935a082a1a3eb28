//! The admin port's connections, and who is at the other end of each: [`AdminPeer`], the
//! address and the SANs of the client certificate its TLS handshake verified, which the router
//! reads as connection info (`ConnectInfo<AdminPeer>`) to authenticate each request.
//!
//! Plaintext (no `grpc_tls`), the port is a bare [`TcpListener`]. With `grpc_tls`, it speaks TLS
//! only: [`TlsListener`] hands axum the connections whose handshake succeeded, handshaken apart
//! from each other and with the certificate served at the moment (renewals included), as the
//! gRPC port's are.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;
use crate::tls::GrpcTls;
use crate::tls::incoming::{Port, handshaken};

/// Who is at the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// The URI and DNS SANs of the client certificate the handshake verified (chained to
    /// `grpc_tls.client_ca_file`); empty over plaintext or without a certificate.
    pub client_sans: Arc<[String]>,
}

impl Connected<IncomingStream<'_, TcpListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        AdminPeer {
            addr: *stream.remote_addr(),
            client_sans: Arc::new([]),
        }
    }
}

/// The admin port over TLS: the connections whose handshake succeeded.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Handshakes the connections of `listener` with `tls`'s admin configuration until `stop`.
    pub(crate) fn new(
        listener: TcpListener,
        tls: Arc<GrpcTls>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            connections: handshaken(listener, Port::Admin, tls, metrics, stop),
            local,
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Some((conn, addr)) = self.connections.recv().await else {
            // Stopped: no more connections; the server's graceful shutdown ends it.
            return std::future::pending().await;
        };
        let client_sans = conn
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(crate::tls::subject_alt_names)
            .unwrap_or_default();
        let peer = AdminPeer {
            addr,
            client_sans: client_sans.into(),
        };
        (conn, peer)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AdminPeer {
            addr: self.local,
            client_sans: Arc::new([]),
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
