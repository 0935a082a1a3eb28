//! The gRPC port's connections, each served from its first byte to its last on one core.
//!
//! With `grpc.serving_threads` set, tollgate serves the gRPC port on that many lanes (`null`: one
//! per core). A lane is a thread with a single-threaded tokio runtime of its own: a connection's
//! reads, its calls and its writes all run there, with no hand-offs between threads and no work
//! stealing, which cost a ShouldRateLimit 10–30% of its CPU (BENCHMARKS.md, "Per-core serving
//! threads"). A Check with quotas on SQLite costs about a quarter more on a lane, though: its quota
//! statement goes to the one SQLite writer, a task of the main runtime, and its answer comes
//! back, two wake-ups of another thread a Check. So the default is `0`: one lane, a task of the
//! main runtime, as before lanes. One accept loop hands each new connection to the lane with the fewest
//! open connections, ties in turn: Envoy opens one connection per worker, and the kernel's
//! `SO_REUSEPORT` hash would put a two-worker Envoy's two connections on one lane half the time.
//! With TLS the handshake runs on the lane too, so the connection's socket is the lane's from the
//! start.
//!
//! A socket belongs to the reactor of the runtime that opened it, and the database and Redis
//! connections a call opens on a lane are shared with every other lane and the main runtime. So
//! a lane lives until [`Lanes::close`], at the very end of the shutdown, not only until its own
//! connections end.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::grpc::coalesce::Coalesced;
use crate::telemetry::Metrics;
use crate::tls::GrpcTls;
use crate::tls::incoming::{MAX_HANDSHAKES, Port, handshake, next_connection};

/// The most lanes `grpc.serving_threads` may ask for.
pub const MAX_LANES: usize = 256;

/// Connections handed to a lane and not yet taken by it, at most; past it, accepting waits.
const HANDOFF_QUEUE: usize = 64;

thread_local! {
    /// The lane this thread serves, on a lane's thread.
    static LANE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The lane whose thread this is: `None` off the lanes' threads (and so always with
/// `grpc.serving_threads: 0`). What a lane opens for itself (its Redis connection) stays on it.
pub fn current_lane() -> Option<usize> {
    LANE.with(|lane| lane.get())
}

/// How long a lane's runtime may take to end its tasks once the lanes close.
const EXIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one lane's connections until the gRPC port stops (the router's
/// `serve_with_incoming_shutdown`); called once per lane, on the lane.
pub type Serve = Arc<dyn Fn(Connections) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// The gRPC port's lanes, from [`Lanes::start`] to [`Lanes::close`] (or drop).
pub struct Lanes {
    /// Where the accept loop hands connections; moved into it by [`Lanes::accept`].
    lanes: Vec<Lane>,
    /// Each lane's server's result, in the order they end.
    ended: mpsc::Receiver<anyhow::Result<()>>,
    /// Lanes whose server has not ended.
    running: usize,
    /// Whether TLS handshakes need a turn (bounded across lanes).
    tls: bool,
    /// Cancelled: every lane's server is dropped (its connections' tasks run on until exit).
    force: CancellationToken,
    /// Cancelled: the lanes' runtimes end, and with them every task still on them.
    exit: CancellationToken,
    /// One per lane thread: it has ended.
    threads: Vec<oneshot::Receiver<()>>,
    accept: Option<JoinHandle<()>>,
}

struct Lane {
    handoffs: mpsc::Sender<Handoff>,
    /// Connections handed to this lane and not yet closed.
    open: Arc<AtomicUsize>,
}

/// An accepted connection on its way to its lane.
struct Handoff {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    open: Open,
    /// With TLS: the connection's turn among [`MAX_HANDSHAKES`], until its handshake ends.
    handshake: Option<OwnedSemaphorePermit>,
}

/// Counts a connection among its lane's open ones until it is dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lanes {
    /// Starts `threads` lanes (`0`: one on the current runtime), each running `serve` on the
    /// connections it will be handed, behind `tls` when set. They serve nothing until
    /// [`Lanes::accept`]. `metrics` shows each lane's open connections and counts refused
    /// handshakes.
    pub fn start(
        threads: usize,
        serve: Serve,
        tls: Option<Arc<GrpcTls>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Lanes> {
        let count = threads.clamp(1, MAX_LANES);
        let (report, ended) = mpsc::channel(count);
        let mut lanes = Lanes {
            lanes: Vec::with_capacity(count),
            ended,
            running: 0,
            tls: tls.is_some(),
            force: CancellationToken::new(),
            exit: CancellationToken::new(),
            threads: Vec::new(),
            accept: None,
        };
        for i in 0..count {
            let (handoffs, received) = mpsc::channel(HANDOFF_QUEUE);
            let (report, force) = (report.clone(), lanes.force.clone());
            let served = lane(received, serve.clone(), tls.clone(), metrics.clone());
            let lane = async move {
                tokio::select! {
                    r = served => {
                        let _ = report.send(r).await;
                    }
                    _ = force.cancelled() => {}
                }
            };
            if threads == 0 {
                tokio::spawn(lane);
            } else {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let exit = lanes.exit.clone();
                let (ended, thread) = oneshot::channel();
                std::thread::Builder::new()
                    .name(format!("tollgate-grpc-{i}"))
                    .spawn(move || {
                        LANE.with(|lane| lane.set(Some(i)));
                        runtime.block_on(async {
                            lane.await;
                            exit.cancelled().await;
                        });
                        runtime.shutdown_timeout(EXIT_TIMEOUT);
                        let _ = ended.send(());
                    })?;
                lanes.threads.push(thread);
            }
            lanes.lanes.push(Lane {
                handoffs,
                open: Arc::new(AtomicUsize::new(0)),
            });
            lanes.running += 1;
        }
        // An App's metrics are its own; should they be shared, the first lanes are shown.
        let _ = metrics
            .grpc_connections
            .set(lanes.lanes.iter().map(|l| l.open.clone()).collect());
        Ok(lanes)
    }

    /// Hands `listener`'s connections to the lanes until `stop`.
    pub fn accept(&mut self, listener: TcpListener, stop: CancellationToken) {
        let lanes = std::mem::take(&mut self.lanes);
        let handshakes = self.tls.then(|| Arc::new(Semaphore::new(MAX_HANDSHAKES)));
        self.accept = Some(tokio::spawn(accept(listener, lanes, handshakes, stop)));
    }

    /// What the first lane's server to end ended with; pending while they all serve. Before
    /// the port is stopped, any end is a failure.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        match self.ended.recv().await {
            Some(r) => {
                self.running -= 1;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Whether every lane's server ends (its connections drained) within `deadline`.
    pub async fn finished(&mut self, deadline: Duration) -> bool {
        let all = async {
            while self.running > 0 {
                match self.ended.recv().await {
                    Some(Err(e)) => tracing::error!(error = %e, "a gRPC lane's server failed"),
                    Some(Ok(())) => {}
                    None => return,
                }
                self.running -= 1;
            }
        };
        tokio::time::timeout(deadline, all).await.is_ok()
    }

    /// Drops every lane's server; calls in flight keep running until [`Lanes::close`].
    pub fn abort(&self) {
        self.force.cancel();
    }

    /// Ends the lanes' runtimes (every task still on them), waiting a moment for each thread.
    /// Last in the shutdown: the database and Redis may have sockets on a lane's reactor.
    pub async fn close(mut self) {
        self.force.cancel();
        self.exit.cancel();
        for thread in std::mem::take(&mut self.threads) {
            let _ = tokio::time::timeout(EXIT_TIMEOUT * 2, thread).await;
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.force.cancel();
        self.exit.cancel();
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

/// The lane `index` of `open` (connections open per lane) a new connection goes to: the first
/// with the fewest, looking from `start` on, so that ties are taken in turn.
fn pick(open: &[usize], start: usize) -> usize {
    let n = open.len();
    (0..n)
        .map(|i| (start + i) % n)
        .min_by_key(|&i| open[i])
        .unwrap_or(0)
}

async fn accept(
    listener: TcpListener,
    lanes: Vec<Lane>,
    handshakes: Option<Arc<Semaphore>>,
    stop: CancellationToken,
) {
    let mut next = 0;
    loop {
        let handshake = match &handshakes {
            None => None,
            Some(turns) => tokio::select! {
                _ = stop.cancelled() => return,
                turn = turns.clone().acquire_owned() => Some(turn.expect("never closed")),
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = next_connection(&listener, "gRPC port") => accepted,
        };
        let _ = tcp.set_nodelay(true);
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "gRPC port: connection not handed to a lane");
                continue;
            }
        };
        let open: Vec<usize> = lanes
            .iter()
            .map(|l| l.open.load(Ordering::Relaxed))
            .collect();
        let chosen = pick(&open, next);
        next = chosen + 1;
        let lane = &lanes[chosen];
        lane.open.fetch_add(1, Ordering::Relaxed);
        let handoff = Handoff {
            tcp,
            peer,
            open: Open(lane.open.clone()),
            handshake,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            sent = lane.handoffs.send(handoff) => if sent.is_err() {
                // The lane's server has ended, which the shutdown hears of.
                return;
            },
        }
    }
}

/// One lane: its connections registered with the runtime it runs on (and with TLS handshaken
/// there), served by `serve`.
async fn lane(
    mut handoffs: mpsc::Receiver<Handoff>,
    serve: Serve,
    tls: Option<Arc<GrpcTls>>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let (ready, connections) = mpsc::channel(MAX_HANDSHAKES);
    let feed = tokio::spawn(async move {
        while let Some(Handoff {
            tcp,
            peer,
            open,
            handshake: turn,
        }) = handoffs.recv().await
        {
            let tcp = match TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "gRPC port: connection not registered");
                    continue;
                }
            };
            match &tls {
                None => {
                    let conn = Conn {
                        io: Io::Plain(tcp),
                        _open: open,
                    };
                    if ready.send(Coalesced::new(conn)).await.is_err() {
                        return;
                    }
                }
                Some(certs) => {
                    let (certs, metrics, ready) = (certs.clone(), metrics.clone(), ready.clone());
                    tokio::spawn(async move {
                        let _turn = turn;
                        if let Some(tls) = handshake(Port::Grpc, &certs, &metrics, tcp, peer).await
                        {
                            let conn = Conn {
                                io: Io::Tls(Box::new(tls)),
                                _open: open,
                            };
                            let _ = ready.send(Coalesced::new(conn)).await;
                        }
                    });
                }
            }
        }
    });
    let served = serve(Connections(connections)).await;
    feed.abort();
    served
}

/// A lane's connections, ready to serve (handshaken, with TLS), as its server takes them.
pub struct Connections(mpsc::Receiver<Coalesced<Conn>>);

impl Stream for Connections {
    type Item = Result<Coalesced<Conn>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

/// A connection a lane serves, plaintext or TLS.
pub struct Conn {
    io: Io,
    _open: Open,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.io {
            Io::Plain(tcp) => tcp.connect_info(),
            Io::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_lane_with_fewest_open_ties_in_turn() {
        assert_eq!(pick(&[3, 1, 2], 0), 1);
        assert_eq!(pick(&[0, 0], 0), 0);
        assert_eq!(pick(&[0, 0], 1), 1);
        assert_eq!(pick(&[0, 0], 2), 0);
        assert_eq!(pick(&[1, 0, 0], 0), 1);
        assert_eq!(pick(&[1, 0, 0], 2), 2);
        assert_eq!(pick(&[5], 7), 0);
        // Handing out in turn: each pick's lane is counted before the next one.
        let mut open = [0usize; 3];
        let mut next = 0;
        let mut order = Vec::new();
        for _ in 0..6 {
            let i = pick(&open, next);
            open[i] += 1;
            next = i + 1;
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }
}
