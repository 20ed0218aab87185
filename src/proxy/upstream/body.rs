//! The body of a request sent upstream through hyper: the caller's (streamed, perhaps kept for a replay) or a replay,
//! with the caller's own failures told apart from the upstream's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::replay::{BufferedBody, ReplayBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error of the caller's request body (malformed chunked coding, a connection that ended early): the caller's
/// fault, answered 400, not an upstream failure.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: {0}")]
pub struct CallerBodyError(#[source] pub hyper::Error);

pin_project_lite::pin_project! {
    /// The body of a request sent upstream.
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        /// The caller's body, streamed as is.
        Plain { #[pin] body: Incoming, waiting: Option<CallerWait> },
        /// The caller's body, streamed and kept for a replay.
        Kept { #[pin] body: ReplayBody<Incoming>, waiting: Option<CallerWait> },
        /// A replay of a kept body.
        Replay { #[pin] body: BufferedBody },
    }
}

/// Whether the upstream round trip is waiting for more of the caller's body: set while the body is asked for a frame
/// that has not come, so that a timeout can blame the right side (408 for the caller, 504 for the upstream).
#[derive(Debug, Clone, Default)]
pub struct CallerWait(Arc<AtomicBool>);

impl CallerWait {
    /// A tracker for a caller's body, unless the body is already complete (then there is nothing to wait for).
    pub fn for_body(body: &Incoming) -> Option<CallerWait> {
        (!body.is_end_stream()).then(CallerWait::default)
    }

    /// Whether the last request for the caller's body's next frame is still unanswered.
    pub fn waiting(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn track<T>(&self, poll: &Poll<T>) {
        self.0.store(poll.is_pending(), Ordering::Relaxed);
    }
}

impl UpstreamBody {
    /// An empty body (a bodiless request sent once more).
    pub fn empty() -> UpstreamBody {
        UpstreamBody::Replay { body: BufferedBody::empty() }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamBodyProj::Plain { body, waiting } => {
                let poll = body.poll_frame(cx);
                if let Some(waiting) = waiting {
                    waiting.track(&poll);
                }
                poll.map_err(|e| CallerBodyError(e).into())
            }
            UpstreamBodyProj::Kept { body, waiting } => {
                let poll = body.poll_frame(cx);
                if let Some(waiting) = waiting {
                    waiting.track(&poll);
                }
                poll.map_err(|e| CallerBodyError(e).into())
            }
            UpstreamBodyProj::Replay { body } => body.poll_frame(cx).map_err(|e| CallerBodyError(e).into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain { body, .. } => body.is_end_stream(),
            UpstreamBody::Kept { body, .. } => body.is_end_stream(),
            UpstreamBody::Replay { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain { body, .. } => body.size_hint(),
            UpstreamBody::Kept { body, .. } => body.size_hint(),
            UpstreamBody::Replay { body } => body.size_hint(),
        }
    }
}
