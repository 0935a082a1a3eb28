//! The TLS ports' connections: accepted, each handshaken in a task of its own (a slow or silent
//! client holds up no one else, and gives up after [`HANDSHAKE_TIMEOUT`]), with the
//! configuration served when its handshake starts. Only connections whose handshake
//! succeeded reach the server behind; a refused one is closed without an answer and counted.
//! [`handshaken`] feeds the admin port; the gRPC port's serving lanes call [`handshake`] on the
//! thread that serves the connection (`grpc::serving`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::GrpcTls;
use crate::telemetry::{Counter, Metrics};

/// The longest a client may take to complete its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at most, per port; past it, accepting waits for one to end.
pub(crate) const MAX_HANDSHAKES: usize = 256;

/// Which port a connection came to: the configuration it is handshaken with, the counter of
/// refused handshakes, the name logs give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Grpc,
    Admin,
}

impl Port {
    fn server_config(self, tls: &GrpcTls) -> Arc<ServerConfig> {
        match self {
            Port::Grpc => tls.server_config(),
            Port::Admin => tls.admin_server_config(),
        }
    }

    fn failures(self, metrics: &Metrics) -> &Counter {
        match self {
            Port::Grpc => &metrics.grpc_tls_handshake_failures,
            Port::Admin => &metrics.admin_tls_handshake_failures,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Port::Grpc => "gRPC port",
            Port::Admin => "admin port",
        }
    }
}

/// The connections to `port` on `listener` whose TLS handshake succeeded, with the peer's
/// address, until `stop` (then the channel closes).
pub(crate) fn handshaken(
    listener: TcpListener,
    port: Port,
    tls: Arc<GrpcTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (ready, connections) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(accept(listener, port, tls, metrics, stop, ready));
    connections
}

async fn accept(
    listener: TcpListener,
    port: Port,
    tls: Arc<GrpcTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let name = port.name();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = handshakes.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ready.closed() => return,
            accepted = next_connection(&listener, name) => accepted,
        };
        let _ = tcp.set_nodelay(true);
        let (tls, ready, metrics) = (tls.clone(), ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(conn) = handshake(port, &tls, &metrics, tcp, peer).await {
                let _ = ready.send((conn, peer)).await;
            }
        });
    }
}

/// The next connection `listener` accepts. A failed accept (out of file descriptors, a
/// connection reset before it was taken) leaves the listener fine: it is logged, and the next
/// one is tried a moment later.
pub(crate) async fn next_connection(listener: &TcpListener, name: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, "{name}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `tcp`'s TLS handshake with the configuration `port` serves now, or `None` (counted and
/// logged) when it fails or takes longer than [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn handshake(
    port: Port,
    tls: &GrpcTls,
    metrics: &Metrics,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let name = port.name();
    let acceptor = TlsAcceptor::from(port.server_config(tls));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            port.failures(metrics).inc();
            tracing::debug!(%peer, error = %e, "{name}: TLS handshake refused");
            None
        }
        Err(_) => {
            port.failures(metrics).inc();
            tracing::debug!(%peer, "{name}: TLS handshake not done within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}
