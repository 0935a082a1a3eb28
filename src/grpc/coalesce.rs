//! Fewer writes per answer on the gRPC port.
//!
//! hyper's HTTP/2 connection task writes what it has as soon as it is woken, and each answer's
//! task wakes it: with many streams in flight on a connection (Envoy opens one per worker), each
//! answer went out in a `writev` of its own, 0.84 of them per ShouldRateLimit under the bench's
//! load. [`Coalesced`] makes the connection yield once before each write, to the back of the
//! runtime's queue, so the answers whose tasks are ready by then join the same write. The cost is
//! one extra poll of the connection task per write and no timer: nothing waits for anything that
//! is not already runnable, and the connection is woken before it yields, so it never stalls.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection whose writes first let the runtime's other ready tasks run (see the module).
pub struct Coalesced<T> {
    inner: T,
    /// The connection has yielded since its last write.
    yielded: bool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Coalesced {
            inner,
            yielded: false,
        }
    }

    /// `Pending` once before each write (woken at once, so it runs again after the tasks
    /// already queued); then `Ready` for the write itself.
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            Poll::Ready(())
        } else {
            self.yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn wrote<R>(&mut self, done: Poll<R>) -> Poll<R> {
        if done.is_ready() {
            self.yielded = false;
        }
        done
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.turn(cx));
        let done = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(done)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.turn(cx));
        let done = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(done)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Each write yields once, waking its task first (so it cannot stall), then writes.
    #[test]
    fn a_write_yields_once_and_wakes_itself_first() {
        let (a, _b) = tokio::io::duplex(64);
        let mut c = Coalesced::new(a);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = count.clone().into();
        let mut cx = Context::from_waker(&waker);
        let first = Pin::new(&mut c).poll_write(&mut cx, b"abc");
        assert!(first.is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let second = Pin::new(&mut c).poll_write(&mut cx, b"abc");
        assert!(matches!(second, Poll::Ready(Ok(3))));
        // The next write yields again.
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"d").is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    /// Everything written arrives, in order, also through a full pipe (writes that wait for room).
    #[tokio::test]
    async fn everything_written_arrives_in_order() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut c = Coalesced::new(a);
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(37) {
                c.write_all(chunk).await.unwrap();
            }
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
