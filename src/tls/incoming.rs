//! The gRPC port's connections over TLS: accepted, each handshaken in a task of its own (a slow
//! or silent client holds up no one else, and gives up after [`HANDSHAKE_TIMEOUT`]), with the
//! configuration served at the moment it was accepted. Only connections whose handshake
//! succeeded reach the gRPC server; a refused one is closed without an answer and counted.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::GrpcTls;
use crate::telemetry::Metrics;

/// The longest a client may take to complete its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at most; past it, accepting waits for one to end.
const MAX_HANDSHAKES: usize = 256;

/// The connections of `listener` whose TLS handshake succeeded, until `stop`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<GrpcTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (ready, connections) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(accept(listener, tls, metrics, stop, ready));
    futures_util::stream::unfold(connections, |mut connections| async move {
        let conn = connections.recv().await?;
        Some((Ok(conn), connections))
    })
}

async fn accept(
    listener: TcpListener,
    tls: Arc<GrpcTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    ready: mpsc::Sender<TlsStream<TcpStream>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = handshakes.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, a connection reset before it was accepted: the
                    // listener is fine, so wait a moment and go on.
                    tracing::warn!(error = %e, "gRPC port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.server_config());
        let (ready, metrics) = (ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(conn)) => {
                    let _ = ready.send(conn).await;
                }
                Ok(Err(e)) => {
                    metrics.grpc_tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "gRPC port: TLS handshake refused");
                }
                Err(_) => {
                    metrics.grpc_tls_handshake_failures.inc();
                    tracing::debug!(%peer, "gRPC port: TLS handshake not done within {HANDSHAKE_TIMEOUT:?}");
                }
            }
        });
    }
}
