//! What hyper reads of an HTTP/1.1 connection, held to the h1 transport's verdicts.
//!
//! hyper is more lenient than tokenproxy's own parser in ways another hop could read differently: it takes a request
//! with both `Content-Length` and `Transfer-Encoding` (reading chunks and closing afterwards) and header lines ended
//! by a bare LF. So what hyper reads of an HTTP/1.1 connection comes through [`Vetted`], which finds each request
//! head, judges it by the one rule of [`super::request_body`] (and the bare-LF rule), and follows its body's framing
//! to the next head. A head the rule refuses never reaches hyper: hyper reads instead a head it answers `400` itself,
//! then the end of the connection, so both transports answer such a request 400 and close. An h2 connection, an
//! upgrade, and anything the vetting cannot follow are passed through as they are from there on (hyper then decides
//! alone, as it would have).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunked::{ChunkedScanner, Scan};
use super::framing::FramingFields;
use super::{has_bare_lf, request_body, RequestBody};

/// What hyper reads instead of a refused head: a head with an invalid `Content-Length`, which hyper answers `400 Bad
/// Request` before closing the connection.
const REFUSED: &[u8] = b"GET / HTTP/1.1\r\ncontent-length: refused\r\n\r\n";

/// A head larger than this is passed to hyper unvetted (hyper refuses heads beyond its own limit, about 400 KiB).
const MAX_VETTED_HEAD: usize = 512 * 1024;

/// Where the vetting is in the byte stream.
#[derive(Debug)]
enum State {
    /// At the start of a request head.
    Head,
    /// In a body of this many more bytes.
    Body(u64),
    /// In a chunked body.
    Chunked(ChunkedScanner),
    /// Passing everything through from here on.
    Open,
    /// A head was refused: hyper reads [`REFUSED`] from this offset, then the end.
    Refused(usize),
}

/// An HTTP/1.1 connection as hyper reads it: see the module docs.
pub struct Vetted<I> {
    io: I,
    state: State,
    /// Bytes read from `io` and not yet given to hyper.
    pending: BytesMut,
    /// How many bytes at the front of `pending` are vetted and may be given.
    vetted: usize,
}

impl<I> Vetted<I> {
    /// `io`, vetted from the start of a request head.
    pub fn new(io: I) -> Vetted<I> {
        Vetted { io, state: State::Head, pending: BytesMut::new(), vetted: 0 }
    }

    /// Vets what can be vetted of `pending`; `false` when more bytes are needed.
    fn advance(&mut self) -> bool {
        let unvetted = self.pending.len() - self.vetted;
        match &mut self.state {
            State::Open => {
                self.vetted = self.pending.len();
                unvetted > 0
            }
            State::Refused(_) => true,
            State::Body(left) => {
                if unvetted == 0 {
                    return false;
                }
                let take = usize::try_from(*left).map_or(unvetted, |left| left.min(unvetted));
                self.vetted += take;
                *left -= take as u64;
                if *left == 0 {
                    self.state = State::Head;
                }
                true
            }
            State::Chunked(scanner) => {
                if unvetted == 0 {
                    return false;
                }
                match scanner.scan(&self.pending[self.vetted..]) {
                    Ok(Scan::More) => self.vetted = self.pending.len(),
                    Ok(Scan::Done(n)) => {
                        self.vetted += n;
                        self.state = State::Head;
                    }
                    // hyper's own decoder refuses it too, and the connection ends there.
                    Err(_) => self.state = State::Open,
                }
                true
            }
            State::Head => {
                if unvetted == 0 {
                    return false;
                }
                match vet_head(&self.pending[self.vetted..]) {
                    Head::Partial if unvetted < MAX_VETTED_HEAD => false,
                    Head::Partial | Head::Unknown => {
                        self.state = State::Open;
                        true
                    }
                    Head::Refused(reason) => {
                        tracing::debug!("refused a request: {reason}");
                        // Nothing of it, or after it, reaches hyper.
                        self.pending.truncate(self.vetted);
                        self.state = State::Refused(0);
                        true
                    }
                    Head::Request { len, body, upgrade } => {
                        self.vetted += len;
                        self.state = match body {
                            // What follows an upgrade request may be the tunnel's bytes.
                            _ if upgrade => State::Open,
                            RequestBody::Length(None | Some(0)) => State::Head,
                            RequestBody::Length(Some(n)) => State::Body(n),
                            RequestBody::Chunked => State::Chunked(ChunkedScanner::new()),
                        };
                        true
                    }
                }
            }
        }
    }
}

/// The verdict on the head at the start of `input`.
enum Head {
    /// More bytes are needed.
    Partial,
    /// Not an HTTP/1.x request head this can judge (h2's preface, a line `httparse` refuses): hyper decides.
    Unknown,
    /// A head HTTP/1.1 forbids.
    Refused(String),
    /// A head of `len` bytes, its body's framing, and whether it asks for an upgrade (or is a CONNECT).
    Request { len: usize, body: RequestBody, upgrade: bool },
}

fn vet_head(input: &[u8]) -> Head {
    let mut headers = super::uninit_headers();
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(input, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Unknown,
    };
    if has_bare_lf(&input[..len]) {
        return Head::Refused("a header line ends in a bare LF".into());
    }
    let mut framing = FramingFields::default();
    let mut hosts = 0;
    let mut upgrade = request.method == Some("CONNECT");
    for header in request.headers.iter() {
        framing.add(header.name.as_bytes(), header.value);
        hosts += usize::from(header.name.eq_ignore_ascii_case("host"));
        // hyper hands the connection over after a response to a request with `Upgrade` (HTTP/1.1).
        upgrade |= header.name.eq_ignore_ascii_case("upgrade");
    }
    match request_body(&framing, hosts) {
        Ok(body) => Head::Request { len, body, upgrade },
        Err(reason) => Head::Refused(reason),
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Vetted<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let State::Refused(at) = &mut this.state {
                let n = (REFUSED.len() - *at).min(buf.remaining());
                buf.put_slice(&REFUSED[*at..*at + n]);
                *at += n;
                return Poll::Ready(Ok(()));
            }
            if this.vetted > 0 {
                let n = this.vetted.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.vetted -= n;
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Open) && this.pending.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if this.advance() {
                continue;
            }
            this.pending.reserve(8 * 1024);
            let mut read = ReadBuf::uninit(this.pending.spare_capacity_mut());
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        // The end: what was read and not vetted goes to hyper as it is (an incomplete head or body,
                        // which hyper treats as such), then the end.
                        this.vetted = this.pending.len();
                        this.state = State::Open;
                        if this.vetted == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // SAFETY: `n` bytes of the spare capacity were just initialised by the read.
                    unsafe { this.pending.set_len(this.pending.len() + n) };
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Vetted<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What hyper would read of `input`.
    async fn read_through(input: &[u8]) -> Vec<u8> {
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        peer.write_all(input).await.unwrap();
        drop(peer);
        let mut out = Vec::new();
        Vetted::new(io).read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn good_requests_pass_whole_bodies_included() {
        let input = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nHost: a\r\n\
                      Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(read_through(input).await, input);
    }

    #[tokio::test]
    async fn a_refused_head_never_reaches_hyper_nor_does_anything_after_it() {
        for refused in [
            &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let first = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
            let out = read_through(&[&first[..], refused].concat()).await;
            assert_eq!(out, [&first[..], REFUSED].concat(), "{}", refused.escape_ascii());
        }
    }

    #[tokio::test]
    async fn h2_and_upgrades_pass_through_as_they_are() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        assert_eq!(read_through(preface).await, preface);
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05Host:\n\n";
        assert_eq!(read_through(upgrade).await, upgrade);
    }
}
