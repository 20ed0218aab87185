//! What each connection is doing, kept where its listener can see it: waiting for its first request, idle between
//! requests, reading a request head, serving requests, or carrying a tunnel.
//!
//! One rule decides when a connection that serves no request must go ([`Activity::deadline`], docs/configuration.md
//! "Idle connections and timeouts"): its first request head must be complete within `header_read_timeout` of the
//! accept; after a request, the next one's first byte must come within `keepalive_timeout`, and its whole head within
//! `header_read_timeout` of that byte. A connection with a request in flight, or a tunnel, has no such deadline. The
//! h1 transport applies the rule to its own waits; the listener applies it to hyper's connections (h2: GOAWAY
//! first) and, at `max_connections`, closes the connection idle the longest to make room for a new caller.
//!
//! Every connection's socket is wrapped in [`Tracked`], which holds the connection's [`Activity`] (and with it the
//! listener's connection permit) for as long as the socket is open: a tunnel that outlives its HTTP connection still
//! counts against `max_connections`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// The two timeouts of a connection that serves no request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the accept to the first complete request head; from a request's first byte to its complete head.
    pub header_read: Duration,
    /// From the end of a request to the first byte of the next (`keepalive_timeout`).
    pub keepalive: Duration,
}

impl Timeouts {
    /// How long a connection may wait for its next request's first byte: `header_read` before its first request
    /// (`served` false), `keepalive` after.
    pub fn idle(&self, served: bool) -> Duration {
        if served {
            self.keepalive
        } else {
            self.header_read
        }
    }
}

/// Milliseconds on a clock shared by every connection, read with one load: the listeners move it forward at each of
/// their housekeeping ticks (see [`advance_clock`]), so it may be a tick behind.
pub fn now_ms() -> u64 {
    CLOCK.load(Ordering::Relaxed)
}

static CLOCK: AtomicU64 = AtomicU64::new(0);

/// Sets the shared clock to the time elapsed since the process's first call (monotonic).
pub fn advance_clock() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let now = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64;
    CLOCK.fetch_max(now, Ordering::Relaxed);
    now
}

/// What one connection is doing; shared by its task, its socket ([`Tracked`]) and its listener ([`Registry`]).
#[derive(Debug)]
pub struct Activity {
    /// Requests (h2: streams) in flight.
    active: AtomicU32,
    /// When it last had no request in flight (its accept, before the first request), on [`now_ms`]'s clock.
    idle_since: AtomicU64,
    /// When the first byte of a request head came while it was idle (0: none since), for HTTP/1.1 on hyper.
    head_since: AtomicU64,
    /// It has had a request: `keepalive_timeout` applies between requests from now on.
    served: AtomicBool,
    /// It speaks h2 (bytes while idle are pings and settings, not a request head).
    h2: AtomicBool,
    /// Its socket carries a tunnel (an upgraded connection): never idle, never evicted.
    tunnel: AtomicBool,
    /// Hyper serves it: an expired deadline asks it to close ([`Activity::closing`]) before its socket is shut.
    hyper: AtomicBool,
    /// When it was asked to close (0: not yet).
    asked: AtomicU64,
    /// Asks hyper's connection to finish gracefully (h2: GOAWAY).
    close: Notify,
    /// The socket, while it is open: what an eviction shuts down (cleared before the socket is closed).
    fd: Mutex<Option<RawFd>>,
    /// The listener's permit for this connection, given back when the last holder lets go.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Activity {
    /// A connection accepted now, holding `permit`.
    pub fn new(permit: Option<OwnedSemaphorePermit>) -> Activity {
        Activity {
            active: AtomicU32::new(0),
            // The clock read, not the shared reading, which may be stale when no listener has ticked for a while.
            idle_since: AtomicU64::new(advance_clock()),
            head_since: AtomicU64::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            tunnel: AtomicBool::new(false),
            hyper: AtomicBool::new(false),
            asked: AtomicU64::new(0),
            close: Notify::new(),
            fd: Mutex::new(None),
            _permit: permit,
        }
    }

    /// A request head is complete: a request is in flight.
    #[inline]
    pub fn begin(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    /// A request was answered; the connection is idle when it was the last in flight.
    #[inline]
    pub fn end(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(now_ms(), Ordering::Relaxed);
            self.head_since.store(0, Ordering::Relaxed);
        }
    }

    /// The connection speaks h2.
    pub fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// The connection's socket now carries a tunnel: no deadline, no eviction.
    pub fn set_tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }

    /// Hyper serves the connection from now on.
    pub fn set_hyper(&self) {
        self.hyper.store(true, Ordering::Relaxed);
    }

    /// Whether it carries a tunnel.
    pub fn is_tunnel(&self) -> bool {
        self.tunnel.load(Ordering::Relaxed)
    }

    /// Whether it has had a request.
    pub fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// Bytes came from the peer: while idle, the first of them starts a request head (HTTP/1.1 only).
    #[inline]
    fn bytes_came(&self) {
        if self.active.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// The rule: when, on [`now_ms`]'s clock, the connection must go if no request begins; `None` while a request is
    /// in flight or it carries a tunnel.
    pub fn deadline(&self, timeouts: &Timeouts) -> Option<u64> {
        if self.active.load(Ordering::Relaxed) > 0 || self.is_tunnel() {
            return None;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        if !self.served() {
            return Some(idle_since + ms(timeouts.header_read));
        }
        match self.head_since.load(Ordering::Relaxed) {
            0 => Some(idle_since + ms(timeouts.keepalive)),
            _ if self.h2.load(Ordering::Relaxed) => Some(idle_since + ms(timeouts.keepalive)),
            head => Some(head + ms(timeouts.header_read)),
        }
    }

    /// Completes when the listener asks this connection to finish gracefully: a hyper connection past its deadline,
    /// or any connection at shutdown ([`Activity::ask_to_close`]). An ask made before the wait is not lost.
    pub fn closing(&self) -> tokio::sync::futures::Notified<'_> {
        self.close.notified()
    }

    /// Asks the connection to finish what is in flight and close (its next, or current, [`Activity::closing`]
    /// completes).
    pub fn ask_to_close(&self) {
        self.close.notify_one();
    }

    /// Whether it may be evicted now, and since when it has been idle.
    fn idle(&self) -> Option<u64> {
        (self.active.load(Ordering::Relaxed) == 0 && !self.is_tunnel()).then(|| self.idle_since.load(Ordering::Relaxed))
    }

    /// Shuts the socket down (both ways): the connection's task sees its end and finishes. Nothing if it is closed.
    pub fn shut(&self) {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: `fd` is this connection's open socket: `Tracked` clears it under this lock before closing it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// A connection's socket, holding its [`Activity`] for as long as it is open.
pub struct Tracked<S: AsRawFd> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsRawFd> Tracked<S> {
    /// `io`, now known to `activity` (which an eviction uses to shut it).
    pub fn new(io: S, activity: Arc<Activity>) -> Tracked<S> {
        *activity.fd.lock().unwrap_or_else(|e| e.into_inner()) = Some(io.as_raw_fd());
        Tracked { io, activity }
    }

    /// The connection's activity.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl<S: AsRawFd> Drop for Tracked<S> {
    fn drop(&mut self) {
        // Before the socket closes (its field is dropped after this), so its number is never shut once reused.
        *self.activity.fd.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl<S: AsRawFd + AsyncRead + Unpin> AsyncRead for Tracked<S> {
    #[inline]
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsRawFd + AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    #[inline]
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    #[inline]
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

/// Notes the bytes a hyper HTTP/1.1 connection reads while idle: the first of them starts its next head's
/// `header_read_timeout` ([`Activity::deadline`]).
pub struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    /// `io`, whose reads `activity` notes.
    pub fn new(io: I, activity: Arc<Activity>) -> Watched<I> {
        Watched { io, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_came();
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
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

/// How a connection served by a handler's own HTTP/1.1 driver (`server::Handler::serve_h1`; kept here, below both the listener and the proxy) ended.
pub enum Ended<I> {
    /// The connection is over (closed by either side, timed out, or shut down).
    Closed,
    /// The rest of the connection is hyper's: `buffered` holds the bytes already read from it.
    Handoff {
        /// The connection.
        io: I,
        /// What was read and not served, to be read again first.
        buffered: bytes::Bytes,
    },
}

/// The connections of one listener.
#[derive(Default)]
pub struct Registry {
    connections: Mutex<Vec<Weak<Activity>>>,
}

/// What one housekeeping pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Connections open.
    pub open: usize,
    /// Of them, tunnels.
    pub tunnels: usize,
    /// Connections closed (or asked to close) because their deadline passed.
    pub expired: usize,
}

/// How long a hyper connection asked to close gracefully has before its socket is shut.
const GRACE: u64 = 1_000;

impl Registry {
    /// Adds a connection.
    pub fn add(&self, activity: &Arc<Activity>) {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(activity));
    }

    /// Closes the connection idle the longest (one that has not finished its first head counts as idle), if any
    /// is idle; says whether one was.
    pub fn evict_longest_idle(&self) -> bool {
        let longest = {
            let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            connections
                .iter()
                .filter_map(Weak::upgrade)
                .filter_map(|activity| Some((activity.idle()?, activity)))
                .min_by_key(|(since, _)| *since)
                .map(|(_, activity)| activity)
        };
        match longest {
            Some(activity) => {
                activity.shut();
                true
            }
            None => false,
        }
    }

    /// One housekeeping pass at `now` (on [`now_ms`]'s clock): forgets closed connections, and applies the rule of
    /// [`Activity::deadline`] to hyper's (the h1 transport applies it to its own): asks one past its deadline
    /// to close gracefully (h2: GOAWAY), and shuts its socket if it has not within a second.
    pub fn sweep(&self, now: u64, timeouts: &Timeouts) -> Swept {
        let mut swept = Swept::default();
        let mut expired = Vec::new();
        {
            let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            connections.retain(|weak| {
                let Some(activity) = weak.upgrade() else { return false };
                swept.open += 1;
                swept.tunnels += usize::from(activity.is_tunnel());
                if activity.hyper.load(Ordering::Relaxed)
                    && activity.deadline(timeouts).is_some_and(|deadline| deadline <= now)
                {
                    expired.push(activity);
                }
                true
            });
        }
        for activity in expired {
            swept.expired += 1;
            match activity.asked.load(Ordering::Relaxed) {
                0 => {
                    activity.asked.store(now.max(1), Ordering::Relaxed);
                    activity.ask_to_close();
                }
                asked if now >= asked + GRACE => activity.shut(),
                _ => {}
            }
        }
        swept
    }

    /// At shutdown: shuts the sockets of the connections with no request in flight, and of the tunnels (which are
    /// not drained); connections with requests in flight finish them, and every connection is asked to close
    /// ([`Activity::ask_to_close`]: one that turns idle after this pass closes then, not after its idle timeout).
    pub fn shut_idle_and_tunnels(&self) {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for activity in connections.iter().filter_map(Weak::upgrade) {
            activity.ask_to_close();
            if activity.is_tunnel() || activity.idle().is_some() {
                activity.shut();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts { header_read: Duration::from_secs(10), keepalive: Duration::from_secs(60) };

    #[test]
    fn the_first_head_then_the_idle_wait_then_the_next_head_each_have_their_deadline() {
        let activity = Activity::new(None);
        let accepted = activity.idle_since.load(Ordering::Relaxed);
        assert_eq!(activity.deadline(&T), Some(accepted + 10_000), "the first head: header_read from the accept");
        activity.bytes_came();
        assert_eq!(activity.deadline(&T), Some(accepted + 10_000), "bytes of the first head change nothing");
        activity.begin();
        assert_eq!(activity.deadline(&T), None, "a request in flight");
        activity.begin();
        activity.end();
        assert_eq!(activity.deadline(&T), None, "h2: one stream still open");
        activity.end();
        let idle = activity.idle_since.load(Ordering::Relaxed);
        assert_eq!(activity.deadline(&T), Some(idle + 60_000), "idle: keepalive");
        CLOCK.fetch_max(idle + 5_000, Ordering::Relaxed);
        activity.bytes_came();
        let head = activity.head_since.load(Ordering::Relaxed);
        assert!(head >= idle + 5_000);
        assert_eq!(activity.deadline(&T), Some(head + 10_000), "a head begun: header_read from its first byte");
        activity.set_h2();
        assert_eq!(activity.deadline(&T), Some(idle + 60_000), "h2 bytes while idle are not a head");
        activity.set_tunnel();
        assert_eq!(activity.deadline(&T), None, "a tunnel has no idle deadline here");
    }

    #[test]
    fn eviction_takes_the_longest_idle_connection_never_a_busy_one_or_a_tunnel() {
        let registry = Registry::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sockets = Vec::new();
        let mut activities = Vec::new();
        for since in [300, 100, 50, 200] {
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            let activity = Arc::new(Activity::new(None));
            activity.idle_since.store(since, Ordering::Relaxed);
            let tracked = Tracked::new(server, Arc::clone(&activity));
            registry.add(&activity);
            sockets.push((client, tracked));
            activities.push(activity);
        }
        activities[2].begin(); // idle since 50, but busy now
        activities[1].set_tunnel(); // idle since 100, but a tunnel
        assert!(registry.evict_longest_idle());
        // The one idle since 200 was shut: its peer reads the end.
        use std::io::Read;
        let mut byte = [0u8; 1];
        assert_eq!(sockets[3].0.read(&mut byte).unwrap(), 0, "the longest idle one was closed");
        for i in [0, 1, 2] {
            sockets[i].0.set_nonblocking(true).unwrap();
            assert!(sockets[i].0.read(&mut byte).is_err(), "connection {i} is still open");
        }
        // A registry without idle connections evicts none.
        drop((sockets.remove(3), activities.remove(3)));
        activities[0].begin();
        assert!(!registry.evict_longest_idle());
    }

    #[test]
    fn at_shutdown_every_connection_is_asked_to_close_and_one_busy_then_sees_it_when_it_next_waits() {
        let registry = Registry::default();
        let busy = Arc::new(Activity::new(None));
        let quiet = Arc::new(Activity::new(None));
        registry.add(&busy);
        assert!(futures_util::FutureExt::now_or_never(busy.closing()).is_none(), "nobody asked yet");
        busy.begin();
        registry.shut_idle_and_tunnels();
        busy.end();
        // The ask came while the request was in flight, before the connection waited: it is not lost.
        assert!(futures_util::FutureExt::now_or_never(busy.closing()).is_some());
        assert!(futures_util::FutureExt::now_or_never(quiet.closing()).is_none(), "only the listener's connections");
    }
}
