//! Shutdown: how the long-running tasks (listeners, refreshers, housekeeping) learn that tokenproxy is stopping.
//!
//! One `watch::channel(false)` per run: its sender says `true` (or is dropped) once, and every task holds a
//! [`Shutdown`] made from a clone of the receiver. A watch channel, not a broadcast one, so that a task that starts
//! or subscribes after the signal still sees it.

use tokio::sync::watch;

/// Listens for the shutdown signal (as mini-redis's `Shutdown`): [`Shutdown::recv`] completes once it is given,
/// [`Shutdown::is_shutdown`] tells whether it has been. Cloning it gives another listener of the same signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// A listener of the signal sent through `receiver`'s channel: `true`, or the sender dropped.
    pub fn new(receiver: watch::Receiver<bool>) -> Shutdown {
        Shutdown { receiver }
    }

    /// Whether the signal has been given.
    pub fn is_shutdown(&self) -> bool {
        *self.receiver.borrow() || self.receiver.has_changed().is_err()
    }

    /// Completes once the signal is given (at once if it already was). Cancel-safe: for `tokio::select!`.
    pub async fn recv(&mut self) {
        stopped(&mut self.receiver).await;
    }
}

impl From<watch::Receiver<bool>> for Shutdown {
    fn from(receiver: watch::Receiver<bool>) -> Shutdown {
        Shutdown::new(receiver)
    }
}

/// Completes once `shutdown` holds `true` (or its sender is gone): [`Shutdown::recv`] for the callers that still
/// hold the bare receiver (the listeners in `server.rs`).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped within this statement, so callers' futures stay `Send`.
    let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_signal_is_seen_by_every_listener_even_one_made_after_it() {
        let (stop, receiver) = watch::channel(false);
        let mut early = Shutdown::new(receiver.clone());
        assert!(!early.is_shutdown());
        let waiting = tokio::spawn(async move { early.recv().await });
        stop.send(true).unwrap();
        waiting.await.unwrap();
        let mut late = Shutdown::from(receiver);
        assert!(late.is_shutdown());
        late.recv().await;
    }

    #[tokio::test]
    async fn a_dropped_sender_is_a_shutdown() {
        let (stop, receiver) = watch::channel(false);
        let mut shutdown = Shutdown::new(receiver);
        drop(stop);
        assert!(shutdown.is_shutdown());
        shutdown.recv().await;
    }
}
