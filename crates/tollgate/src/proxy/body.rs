//! Response bodies: the boxed body type every response uses, and [`MeteredBody`], which
//! forwards the upstream's bytes as they come while metering them, and reports the call's
//! outcome exactly once — at the end of the stream, or when the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// How the body ended, as the meter saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The upstream finished the body.
    Complete,
    /// The upstream body failed (connection cut, timeout).
    UpstreamError,
    /// Dropped before the end: the client went away.
    ClientGone,
    /// The upstream sent nothing for `server.upstream_idle_timeout`: tollgate ends the
    /// body.
    UpstreamIdle,
}

/// What to do with one chunk.
pub enum Step {
    /// Forward these bytes (usually the chunk itself) and go on.
    Forward(Bytes),
    /// Forward these bytes and end the body here (the meter has settled already).
    Last(Bytes),
}

/// Something that looks at each data chunk on its way to the client and may rewrite it.
pub trait ChunkMeter: Send + 'static {
    fn on_chunk(&mut self, chunk: Bytes) -> Step;
    /// Called exactly once; returns bytes still held back, to forward last.
    fn on_end(&mut self, end: BodyEnd) -> Bytes;
    /// Whether `on_chunk` only ever returns its input unchanged (keeps Content-Length).
    fn passthrough(&self) -> bool;
}

pin_project_lite::pin_project! {
    pub struct MeteredBody<B: Body, M: ChunkMeter> {
        #[pin]
        inner: B,
        meter: Option<M>,
        passthrough: bool,
        finished: bool,
        // A passthrough meter reads each chunk after it was handed on (on the next
        // poll), so metering never delays bytes to the client.
        unmetered: Option<Bytes>,
        idle: Option<IdleTimer>,
    }

    impl<B: Body, M: ChunkMeter> PinnedDrop for MeteredBody<B, M> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut m) = this.meter.take() {
                if let Some(b) = this.unmetered.take() {
                    let _ = m.on_chunk(b);
                }
                // A body with a known length is not polled past its last byte: dropped
                // then, it was delivered whole, not abandoned.
                let end = if this.inner.as_ref().get_ref().is_end_stream() {
                    BodyEnd::Complete
                } else {
                    BodyEnd::ClientGone
                };
                let _ = m.on_end(end);
            }
        }
    }
}

impl<B: Body, M: ChunkMeter> MeteredBody<B, M> {
    pub fn new(inner: B, meter: M) -> Self {
        let passthrough = meter.passthrough();
        Self {
            inner,
            meter: Some(meter),
            passthrough,
            finished: false,
            unmetered: None,
            idle: None,
        }
    }

    /// End the body when the upstream sends nothing for `after` while tollgate waits on
    /// it (time the client spends not reading does not count). `clean_end`: finish the
    /// body normally after the meter's closing bytes (streams); else fail it, so a
    /// truncated JSON body is never mistaken for a whole one.
    pub fn with_idle_timeout(mut self, after: Duration, clean_end: bool) -> Self {
        self.idle = Some(IdleTimer {
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
            waiting: false,
            clean_end,
        });
        self
    }
}

/// The upstream-silence timer of a [`MeteredBody`].
struct IdleTimer {
    after: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Armed since the last frame went out: the time counts only while waiting.
    waiting: bool,
    clean_end: bool,
}

impl<B, M> Body for MeteredBody<B, M>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    M: ChunkMeter,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        if let (Some(b), Some(m)) = (this.unmetered.take(), this.meter.as_mut()) {
            // Passthrough: the output is the input, already forwarded.
            let _ = m.on_chunk(b);
        }
        if let Some(idle) = this.idle.as_mut() {
            if !idle.waiting {
                idle.waiting = true;
                let deadline = tokio::time::Instant::now() + idle.after;
                idle.sleep.as_mut().reset(deadline);
            }
        }
        loop {
            return match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    let Some(idle) = this.idle.as_mut() else {
                        return Poll::Pending;
                    };
                    if idle.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *this.finished = true;
                    let rest = match this.meter.take() {
                        Some(mut m) => m.on_end(BodyEnd::UpstreamIdle),
                        None => Bytes::new(),
                    };
                    if !idle.clean_end {
                        return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream sent nothing within server.upstream_idle_timeout",
                        )))));
                    }
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    }
                }
                Poll::Ready(None) => {
                    *this.finished = true;
                    let rest = match this.meter.take() {
                        Some(mut m) => m.on_end(BodyEnd::Complete),
                        None => Bytes::new(),
                    };
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.finished = true;
                    if let Some(mut m) = this.meter.take() {
                        let _ = m.on_end(BodyEnd::UpstreamError);
                    }
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(idle) = this.idle.as_mut() {
                            idle.waiting = false;
                        }
                        if *this.passthrough && this.meter.is_some() {
                            *this.unmetered = Some(data.clone());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        let step = match this.meter.as_mut() {
                            None => Step::Forward(data),
                            Some(m) => m.on_chunk(data),
                        };
                        let out = match step {
                            Step::Forward(b) => b,
                            Step::Last(b) => {
                                // Ended by the meter (stream cutoff): drop the upstream
                                // body with us, which closes its connection.
                                *this.finished = true;
                                this.meter.take();
                                if b.is_empty() {
                                    return Poll::Ready(None);
                                }
                                return Poll::Ready(Some(Ok(Frame::data(b))));
                            }
                        };
                        if out.is_empty() {
                            // Everything held back (or stripped): poll on.
                            continue;
                        }
                        Poll::Ready(Some(Ok(Frame::data(out))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never report the end early: the meter must see `None` to settle.
        false
    }

    fn size_hint(&self) -> SizeHint {
        if self.passthrough {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// A body that holds `G` (e.g. a concurrency slot) until it is finished or dropped.
pub struct Held<G> {
    inner: ProxyBody,
    _guard: G,
}

impl<G> Held<G> {
    pub fn new(inner: ProxyBody, guard: G) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for Held<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
