//! Waiting for a condition that no signal announces: the one polling helper of the tests. Where the code under test
//! or a fake can signal (a `Notify`, a `watch`, a channel, a child's output line), await that instead.

use std::fmt::{Debug, Display};
use std::time::Duration;

/// How often [`eventually`] looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a probe of [`eventually`] answers: `true`/`false`, `Some(value)`/`None`, or `Ok(value)`/`Err(what it saw)`
/// (the last `Err` is named in the failure message).
pub trait Probe {
    /// What [`eventually`] returns once the condition holds.
    type Value;
    /// `Ok` when the condition holds; `Err`, with what was seen if the probe says, when not yet.
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Probe for bool {
    type Value = ();
    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Debug> Probe for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(format!("{seen:?}")))
    }
}

/// Runs `probe` every [`POLL_INTERVAL`] until its answer holds, and returns the answer's value; panics after
/// `within` naming `what` was awaited (and the last thing the probe saw, if it said). A probe still running at the
/// deadline is cancelled.
pub async fn eventually<P: Probe>(what: impl Display, within: Duration, mut probe: impl AsyncFnMut() -> P) -> P::Value {
    let mut last_seen = None;
    let polling = async {
        loop {
            match probe().await.check() {
                Ok(value) => return value,
                Err(seen) => last_seen = seen.or(last_seen.take()),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    match tokio::time::timeout(within, polling).await {
        Ok(value) => value,
        Err(_) => match last_seen {
            Some(seen) => panic!("timed out after {within:?} waiting for {what}; last seen: {seen}"),
            None => panic!("timed out after {within:?} waiting for {what}"),
        },
    }
}
