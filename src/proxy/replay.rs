//! A request body that keeps what it streams (up to a cap) so the request can be replayed after a 401.
//!
//! [`ReplayBody`] forwards the caller's body frame by frame to the upstream, keeping a clone of each data frame
//! (a `Bytes` clone: a reference count, no copy) and the trailers. When the body ends within the cap, the kept frames
//! are handed to the [`Replay`] handle; if it grows past the cap, fails, or is dropped before its end (the upstream
//! answered without reading it all), the handle learns that the request cannot be replayed. A body whose declared
//! length exceeds the cap is never buffered at all.
//!
//! Compared with linkerd's `ReplayBody`, a replay here needs the whole body to have been read by the first attempt;
//! in exchange the first attempt owns the inner body outright and no state is shared while it streams.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

/// What the first attempt kept: every data frame and the trailers.
#[derive(Debug, Default)]
struct Kept {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

pin_project_lite::pin_project! {
    /// The first attempt's body: the caller's body, kept as it streams (see the module docs).
    pub struct ReplayBody<B> {
        #[pin]
        inner: B,
        // `None` once the outcome was reported or buffering was abandoned.
        kept: Option<Kept>,
        cap: usize,
        tx: Option<oneshot::Sender<Kept>>,
    }

    impl<B> PinnedDrop for ReplayBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropping the sender tells the handle the body was not read to its end: not replayable.
            let _ = this.project().tx.take();
        }
    }
}

/// The handle that yields a replay of the body once the first attempt is done with it.
#[derive(Debug)]
pub struct Replay {
    state: ReplayState,
}

#[derive(Debug)]
enum ReplayState {
    /// Never replayable.
    Never,
    /// An empty body: replayable at once, without a channel (most requests: GET, HEAD, DELETE).
    Empty,
    /// Told by the first attempt's body when it is done with it.
    Pending(oneshot::Receiver<Kept>),
}

impl<B: Body<Data = Bytes>> ReplayBody<B> {
    /// Wraps `inner`, keeping up to `cap` bytes for a replay.
    pub fn new(inner: B, cap: usize) -> (ReplayBody<B>, Replay) {
        let declared_too_large = inner.size_hint().lower() > cap as u64;
        if declared_too_large {
            return (ReplayBody { inner, kept: None, cap, tx: None }, Replay { state: ReplayState::Never });
        }
        if inner.is_end_stream() {
            // An empty body may never be polled: it is complete already, and there is nothing to keep.
            return (ReplayBody { inner, kept: None, cap, tx: None }, Replay { state: ReplayState::Empty });
        }
        let (tx, rx) = oneshot::channel();
        (
            ReplayBody { inner, kept: Some(Kept::default()), cap, tx: Some(tx) },
            Replay { state: ReplayState::Pending(rx) },
        )
    }
}

impl Replay {
    /// A handle for a body that will never be replayable.
    pub fn none() -> Replay {
        Replay { state: ReplayState::Never }
    }

    /// Waits until the first attempt's body ended (a replay body), outgrew the cap, failed or was dropped (`None`).
    pub async fn replay(self) -> Option<BufferedBody> {
        let kept = match self.state {
            ReplayState::Never => return None,
            ReplayState::Empty => Kept::default(),
            ReplayState::Pending(rx) => rx.await.ok()?,
        };
        Some(BufferedBody { chunks: kept.chunks.into(), len: kept.len, trailers: kept.trailers })
    }
}

impl<B: Body<Data = Bytes>> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(kept) = this.kept.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        if kept.len + data.len() > *this.cap {
                            // Too large to keep: stop buffering and tell the handle now.
                            *this.kept = None;
                            *this.tx = None;
                        } else {
                            kept.len += data.len();
                            kept.chunks.push(data.clone());
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        kept.trailers = Some(trailers.clone());
                    }
                }
            }
            Some(Err(_)) => {
                *this.kept = None;
                *this.tx = None;
            }
            None => {}
        }
        let ended = frame.is_none() || this.inner.is_end_stream();
        if ended {
            if let (Some(kept), Some(tx)) = (this.kept.take(), this.tx.take()) {
                let _ = tx.send(kept);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A replay of a kept body: its data frames, then its trailers.
#[derive(Debug)]
pub struct BufferedBody {
    chunks: VecDeque<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
}

impl BufferedBody {
    /// A body with nothing in it.
    pub fn empty() -> BufferedBody {
        BufferedBody { chunks: VecDeque::new(), len: 0, trailers: None }
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            this.len -= chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;

    fn stream(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> StreamBody<Frames> {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn collect<B: Body<Data = Bytes>>(body: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B::Error: std::fmt::Debug,
    {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn replays_the_body_after_it_was_read() {
        let frames = vec![Ok(Frame::data(Bytes::from("hello "))), Ok(Frame::data(Bytes::from("world")))];
        let (body, replay) = ReplayBody::new(stream(frames), 64);
        assert_eq!(collect(body).await.0, b"hello world");
        let again = replay.replay().await.expect("replayable");
        assert_eq!(again.size_hint().exact(), Some(11));
        assert_eq!(collect(again).await.0, b"hello world");
    }

    #[tokio::test]
    async fn replays_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![Ok(Frame::data(Bytes::from("x"))), Ok(Frame::trailers(trailers.clone()))];
        let (body, replay) = ReplayBody::new(stream(frames), 64);
        assert_eq!(collect(body).await, (b"x".to_vec(), Some(trailers.clone())));
        assert_eq!(collect(replay.replay().await.unwrap()).await, (b"x".to_vec(), Some(trailers)));
    }

    #[tokio::test]
    async fn empty_body_is_replayable_without_being_polled() {
        let (body, replay) = ReplayBody::new(Full::new(Bytes::new()), 64);
        let again = replay.replay().await.expect("replayable");
        assert!(again.is_end_stream());
        drop(body);
    }

    #[tokio::test]
    async fn body_over_the_cap_is_not_replayable_but_streams_whole() {
        let frames = vec![Ok(Frame::data(Bytes::from(vec![1u8; 40]))), Ok(Frame::data(Bytes::from(vec![2u8; 40])))];
        let (body, replay) = ReplayBody::new(stream(frames), 64);
        assert_eq!(collect(body).await.0.len(), 80);
        assert!(replay.replay().await.is_none());
    }

    #[tokio::test]
    async fn exactly_the_cap_is_replayable() {
        let (body, replay) = ReplayBody::new(Full::new(Bytes::from(vec![7u8; 64])), 64);
        assert_eq!(collect(body).await.0.len(), 64);
        assert_eq!(collect(replay.replay().await.unwrap()).await.0, vec![7u8; 64]);
    }

    #[tokio::test]
    async fn declared_length_over_the_cap_is_never_buffered() {
        let (body, replay) = ReplayBody::new(Full::new(Bytes::from(vec![0u8; 65])), 64);
        assert!(body.kept.is_none());
        assert!(replay.replay().await.is_none());
        assert_eq!(collect(body).await.0.len(), 65);
    }

    #[tokio::test]
    async fn dropped_before_the_end_is_not_replayable() {
        let frames = vec![Ok(Frame::data(Bytes::from("partial"))), Ok(Frame::data(Bytes::from("rest")))];
        let (mut body, replay) = ReplayBody::new(stream(frames), 64);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        drop(body);
        assert!(replay.replay().await.is_none());
    }

    #[tokio::test]
    async fn an_error_makes_it_not_replayable_and_is_passed_on() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from("a"))), Err("connection reset".into())];
        let (body, replay) = ReplayBody::new(stream(frames), 64);
        assert!(body.collect().await.is_err());
        assert!(replay.replay().await.is_none());
    }

    #[tokio::test]
    async fn size_hint_is_passed_through() {
        let (body, _replay) = ReplayBody::new(Full::new(Bytes::from("abc")), 64);
        assert_eq!(body.size_hint().exact(), Some(3));
    }
}
