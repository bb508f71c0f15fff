//! Response bodies: a whole buffer, or a server-sent-event script played out over time.
//!
//! A script is `head` events (sent at once), then `tokens` generated lazily one by one,
//! each preceded by the per-token delay, then `tail` events. Tokens are rendered when
//! polled, so a long stream costs no memory up front and a dropped body stops the work.
//! The delay is kept on a fixed schedule (deadline += per-token) so timer slack does not
//! accumulate over long streams.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::{Instant, Sleep};

/// The body type of every simulator response.
pub type SimBody = BoxBody<Bytes, Infallible>;

/// A body holding `bytes` in one frame (with an exact size hint, so a content-length).
pub(crate) fn full(bytes: impl Into<Bytes>) -> SimBody {
    Full::new(bytes.into()).boxed()
}

/// Renders the SSE event of generated token number `index` (0-based).
pub(crate) type TokenRenderer = Box<dyn Fn(u64) -> Bytes + Send + Sync>;

/// What a streamed response will send.
pub(crate) struct SseScript {
    pub head: VecDeque<Bytes>,
    pub tokens: u64,
    pub render: TokenRenderer,
    pub tail: VecDeque<Bytes>,
}

/// Plays an [`SseScript`], sleeping `per_token` before each token event.
pub(crate) struct TimedBody {
    script: SseScript,
    next_token: u64,
    per_token: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// After the script: stay silent forever instead of ending (`stall-stream`).
    stall: bool,
}

impl TimedBody {
    pub(crate) fn new(script: SseScript, per_token: Duration) -> Self {
        TimedBody {
            script,
            next_token: 0,
            per_token,
            sleep: None,
            stall: false,
        }
    }

    /// Never end after the script: the body stays open and sends nothing more.
    pub(crate) fn stalled(mut self) -> Self {
        self.stall = true;
        self
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(event) = this.script.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        if this.next_token < this.script.tokens {
            if !this.per_token.is_zero() {
                let per_token = this.per_token;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(per_token)));
                ready!(sleep.as_mut().poll(cx));
                let next = sleep.deadline() + per_token;
                // Keep the schedule, but never try to catch up with a burst after a stall.
                let next = next.max(Instant::now());
                sleep.as_mut().reset(next);
            }
            let event = (this.script.render)(this.next_token);
            this.next_token += 1;
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        match this.script.tail.pop_front() {
            Some(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
            // Nothing will ever wake this body again: it ends when it is dropped.
            None if this.stall => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.stall
            && self.script.head.is_empty()
            && self.next_token >= self.script.tokens
            && self.script.tail.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(tokens: u64) -> SseScript {
        SseScript {
            head: VecDeque::from([Bytes::from_static(b"h\n")]),
            tokens,
            render: Box::new(|i| Bytes::from(format!("t{i}\n"))),
            tail: VecDeque::from([Bytes::from_static(b"end\n")]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn plays_head_tokens_tail_on_schedule() {
        let start = Instant::now();
        let body = TimedBody::new(script(3), Duration::from_millis(10));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"h\nt0\nt1\nt2\nend\n");
        assert_eq!(start.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test]
    async fn zero_delay_and_zero_tokens() {
        let body = TimedBody::new(script(0), Duration::ZERO);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"h\nend\n");
    }
}
