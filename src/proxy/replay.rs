//! A request body that keeps what it streams (up to a cap) so the request can be replayed after a 401.
//!
//! [`ReplayBody`] forwards the caller's body frame by frame to the upstream, keeping a clone of each data frame
//! (a `Bytes` clone: a reference count, no copy) and the trailers. When the body ends within the cap, the kept frames
//! are handed to the [`Replay`] handle. When the first attempt is dropped before the body's end (the upstream answered,
//! or refused the request, without reading it all), the handle gets the kept frames *and the rest of the caller's
//! body*, unread: a replay sends the one, then streams the other. If the body grows past the cap or fails, the handle
//! learns that the request cannot be replayed. A body whose declared length exceeds the cap is never buffered at all.
//!
//! Compared with linkerd's `ReplayBody`, the first attempt owns the inner body outright and no state is shared while
//! it streams; the handle takes the inner body over only once the first attempt is gone.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

/// What the first attempt kept: every data frame and the trailers; and the rest of the body when the first attempt
/// was dropped before its end.
#[derive(Debug)]
struct Kept<B> {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    rest: Option<B>,
}

impl<B> Default for Kept<B> {
    fn default() -> Self {
        Kept { chunks: Vec::new(), len: 0, trailers: None, rest: None }
    }
}

pin_project_lite::pin_project! {
    /// The first attempt's body: the caller's body, kept as it streams (see the module docs).
    pub struct ReplayBody<B> {
        // Always `Some` while the body is used; taken by the drop that hands it to the handle.
        inner: Option<B>,
        // `None` once the outcome was reported or buffering was abandoned.
        kept: Option<Kept<B>>,
        cap: usize,
        tx: Option<oneshot::Sender<Kept<B>>>,
    }

    impl<B> PinnedDrop for ReplayBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its end while still kept: the handle gets what was read and the rest, unread.
            let this = this.project();
            if let (Some(mut kept), Some(tx)) = (this.kept.take(), this.tx.take()) {
                kept.rest = this.inner.take();
                let _ = tx.send(kept);
            }
        }
    }
}

/// The handle that yields a replay of the body once the first attempt is done with it.
#[derive(Debug)]
pub struct Replay<B = hyper::body::Incoming> {
    state: ReplayState<B>,
}

#[derive(Debug)]
enum ReplayState<B> {
    /// Never replayable.
    Never,
    /// An empty body: replayable at once, without a channel (most requests: GET, HEAD, DELETE).
    Empty,
    /// Told by the first attempt's body when it is done with it.
    Pending(oneshot::Receiver<Kept<B>>),
    /// Kept already (a body sent once more keeps its copy for a replay after a 401).
    Ready(BufferedBody<B>),
}

impl<B: Body<Data = Bytes> + Unpin> ReplayBody<B> {
    /// Wraps `inner`, keeping up to `cap` bytes for a replay.
    pub fn new(inner: B, cap: usize) -> (ReplayBody<B>, Replay<B>) {
        let declared_too_large = inner.size_hint().lower() > cap as u64;
        if declared_too_large {
            return (
                ReplayBody { inner: Some(inner), kept: None, cap, tx: None },
                Replay { state: ReplayState::Never },
            );
        }
        if inner.is_end_stream() {
            // An empty body may never be polled: it is complete already, and there is nothing to keep.
            return (
                ReplayBody { inner: Some(inner), kept: None, cap, tx: None },
                Replay { state: ReplayState::Empty },
            );
        }
        let (tx, rx) = oneshot::channel();
        (
            ReplayBody { inner: Some(inner), kept: Some(Kept::default()), cap, tx: Some(tx) },
            Replay { state: ReplayState::Pending(rx) },
        )
    }
}

impl<B> Replay<B> {
    /// A handle for a body that will never be replayable.
    pub fn none() -> Replay<B> {
        Replay { state: ReplayState::Never }
    }

    /// A handle for a body kept already.
    pub fn ready(body: BufferedBody<B>) -> Replay<B> {
        Replay { state: ReplayState::Ready(body) }
    }

    /// Waits until the first attempt is done with the body: the replay when it ended or was dropped (then with the
    /// rest of the body to stream), `None` when it outgrew the cap or failed.
    pub async fn replay(self) -> Option<BufferedBody<B>> {
        let kept = match self.state {
            ReplayState::Never => return None,
            ReplayState::Empty => Kept::default(),
            ReplayState::Pending(rx) => rx.await.ok()?,
            ReplayState::Ready(body) => return Some(body),
        };
        Some(BufferedBody { chunks: kept.chunks.into(), len: kept.len, trailers: kept.trailers, rest: kept.rest })
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let inner = this.inner.as_mut().expect("the body is taken only when dropped");
        let frame = match Pin::new(&mut *inner).poll_frame(cx) {
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
        let ended = frame.is_none() || inner.is_end_stream();
        if ended {
            if let (Some(kept), Some(tx)) = (this.kept.take(), this.tx.take()) {
                let _ = tx.send(kept);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

/// A replay of a kept body: its data frames, then the rest of the caller's body when the first attempt did not read
/// it all, else the trailers.
#[derive(Debug)]
pub struct BufferedBody<B = hyper::body::Incoming> {
    chunks: VecDeque<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    rest: Option<B>,
}

impl<B> BufferedBody<B> {
    /// A body with nothing in it.
    pub fn empty() -> BufferedBody<B> {
        BufferedBody { chunks: VecDeque::new(), len: 0, trailers: None, rest: None }
    }

    /// A copy sharing the frames (reference counts), when the body is all kept (no rest still to be read).
    pub fn try_clone(&self) -> Option<BufferedBody<B>> {
        self.rest.is_none().then(|| BufferedBody {
            chunks: self.chunks.clone(),
            len: self.len,
            trailers: self.trailers.clone(),
            rest: None,
        })
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for BufferedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            this.len -= chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = this.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let Some(rest) = &self.rest else { return SizeHint::with_exact(self.len as u64) };
        let rest = rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.len as u64);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.len as u64);
        }
        hint
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
    async fn dropped_before_the_end_replays_what_was_read_then_the_rest() {
        let frames = vec![Ok(Frame::data(Bytes::from("partial "))), Ok(Frame::data(Bytes::from("rest")))];
        let (mut body, replay) = ReplayBody::new(stream(frames), 64);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial ");
        drop(body);
        let again = replay.replay().await.expect("replayable");
        assert!(again.try_clone().is_none(), "a body with a rest to read cannot be copied");
        assert_eq!(collect(again).await.0, b"partial rest");
    }

    #[tokio::test]
    async fn dropped_before_being_read_replays_the_whole_body() {
        // An h2 upstream refusing the stream before hyper read the body (GOAWAY): the replay is the body, untouched.
        let (body, replay) = ReplayBody::new(Full::new(Bytes::from("untouched")), 64);
        drop(body);
        let again = replay.replay().await.expect("replayable");
        assert_eq!(again.size_hint().exact(), Some(9));
        assert_eq!(collect(again).await.0, b"untouched");
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
