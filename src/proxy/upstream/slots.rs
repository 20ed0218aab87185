//! The places of one upstream connection pool: at most `max_upstream_connections` requests in flight to it at once.
//!
//! A place is taken and given back on every request, so the common case is one compare-and-swap and one subtraction
//! on a counter (a tokio `Semaphore` locks its waiter list on every release); only a request that finds no place
//! waits, on a `Notify` that a place given back wakes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The places of one pool.
#[derive(Debug)]
pub struct Slots {
    limit: usize,
    taken: AtomicUsize,
    /// Requests waiting for a place.
    waiting: AtomicUsize,
    freed: Notify,
}

/// A place, given back when dropped.
#[derive(Debug)]
pub struct Place<'a>(&'a Slots);

/// A place that can travel with a response body, given back when dropped.
#[derive(Debug)]
pub struct OwnedPlace(Arc<Slots>);

impl Slots {
    /// `limit` places.
    pub fn new(limit: usize) -> Slots {
        Slots { limit, taken: AtomicUsize::new(0), waiting: AtomicUsize::new(0), freed: Notify::new() }
    }

    /// The number of places.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Places free now.
    pub fn available(&self) -> usize {
        self.limit.saturating_sub(self.taken.load(Ordering::Relaxed))
    }

    #[inline]
    fn try_take(&self) -> bool {
        let mut taken = self.taken.load(Ordering::Relaxed);
        loop {
            if taken >= self.limit {
                return false;
            }
            match self.taken.compare_exchange_weak(taken, taken + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => taken = now,
            }
        }
    }

    /// A place now, if one is free.
    #[inline]
    pub fn try_place(&self) -> Option<Place<'_>> {
        // (`then`, not `then_some`: a place made and dropped when none was taken would give one back.)
        self.try_take().then(|| Place(self))
    }

    /// A place, when one is free (cancel-safe: dropping the future takes none).
    pub async fn place(&self) -> Place<'_> {
        self.wait().await;
        Place(self)
    }

    /// An owned place now, if one is free.
    #[inline]
    pub fn try_owned(self: &Arc<Self>) -> Option<OwnedPlace> {
        self.try_take().then(|| OwnedPlace(Arc::clone(self)))
    }

    /// An owned place, when one is free.
    pub async fn owned(self: &Arc<Self>) -> OwnedPlace {
        self.wait().await;
        OwnedPlace(Arc::clone(self))
    }

    /// Waits until a place is taken for the caller.
    async fn wait(&self) {
        if self.try_take() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the check: a place given back after it wakes this waiter.
            freed.as_mut().enable();
            if self.try_take() {
                return;
            }
            freed.await;
        }
    }

    #[inline]
    fn give_back(&self) {
        self.taken.fetch_sub(1, Ordering::Release);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }
}

/// A waiter, counted until it stops waiting (a place taken, or the wait dropped).
struct Waiting<'a>(&'a Slots);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        // A wake-up this waiter received and did not use goes to the next one.
        if self.0.available() > 0 {
            self.0.freed.notify_one();
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

impl Drop for OwnedPlace {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn places_are_bounded_and_a_waiter_gets_the_one_given_back() {
        let slots = Arc::new(Slots::new(2));
        let (a, b) = (slots.try_owned().unwrap(), slots.try_place().unwrap());
        assert!(slots.try_place().is_none());
        let waiter = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.owned().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let c = waiter.await.unwrap();
        assert_eq!(slots.available(), 0);
        drop((b, c));
        assert_eq!(slots.available(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_wait_takes_no_place_and_wakes_nobody_for_nothing() {
        let slots = Slots::new(1);
        let held = slots.try_place().unwrap();
        assert!(tokio::time::timeout(std::time::Duration::from_millis(10), slots.place()).await.is_err());
        assert_eq!(slots.waiting.load(Ordering::SeqCst), 0);
        drop(held);
        assert_eq!(slots.available(), 1);
        let _again = slots.place().await;
        assert_eq!(slots.available(), 0);
    }
}
