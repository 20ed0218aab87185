//! The token engine on a paused tokio clock: proactive refresh timing, single flight, generations, outages and
//! backoff, with a fake fetcher in place of the IdP (no sockets, so the paused clock is exact).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tokenproxy::metrics::Metrics;
use tokenproxy::token::{RefreshScheduler, Timing, TokenError, TokenFetcher, TokenResponse, TokenSlot, TokenSource};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

/// What the fake IdP does on each call.
#[derive(Clone, Copy)]
enum Answer {
    Token {
        lifetime: u64,
    },
    Transient,
    Permanent,
    /// The connection could not be made: nothing reached the IdP.
    Unreachable,
    /// The connection broke after the request was sent: the IdP may have rotated.
    Interrupted,
}

struct FakeFetcher {
    answer: Mutex<Answer>,
    calls: AtomicUsize,
    /// The number of calls, for tests to await.
    calls_seen: watch::Sender<usize>,
    times: Mutex<Vec<Instant>>,
    /// Each call takes a permit first: tests hold calls by keeping the semaphore empty.
    gate: Semaphore,
}

impl FakeFetcher {
    fn new(answer: Answer) -> Arc<FakeFetcher> {
        Arc::new(FakeFetcher {
            answer: Mutex::new(answer),
            calls: AtomicUsize::new(0),
            calls_seen: watch::Sender::new(0),
            times: Mutex::new(Vec::new()),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

impl TokenFetcher for FakeFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<TokenResponse, TokenError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.calls_seen.send_replace(n);
            self.times.lock().unwrap().push(Instant::now());
            self.gate.acquire().await.expect("gate").forget();
            match *self.answer.lock().unwrap() {
                Answer::Token { lifetime } => Ok(TokenResponse::new(
                    HeaderValue::from_str(&format!("tok-{n}")).unwrap(),
                    Duration::from_secs(lifetime),
                )),
                Answer::Transient => Err(TokenError::Status { status: 503, retry_after: None }),
                Answer::Permanent => {
                    Err(TokenError::Rejected { status: 401, error: "invalid_client".into(), description: None })
                }
                Answer::Unreachable => Err(TokenError::Connect("connection refused".into())),
                Answer::Interrupted => Err(TokenError::Interrupted("connection reset".into())),
            }
        })
    }
}

struct Engine {
    slot: Arc<TokenSlot>,
    fetcher: Arc<FakeFetcher>,
    metrics: Metrics,
    _stop: watch::Sender<bool>,
}

fn start(answer: Answer, refresh_at: f64, skew: u64) -> Engine {
    start_with(answer, refresh_at, skew, false)
}

/// An engine whose slot holds its token back during refresh calls when `wait` (`during_refresh = "wait"`).
fn start_with(answer: Answer, refresh_at: f64, skew: u64, wait: bool) -> Engine {
    let metrics = Metrics::new();
    let slot = TokenSlot::new("p", metrics.provider("p"), Duration::from_secs(10)).waiting_during_refresh(wait);
    let slot = Arc::new(slot);
    let fetcher = FakeFetcher::new(answer);
    let timing = Timing { refresh_at, expiry_skew: Duration::from_secs(skew), min_interval: Duration::from_secs(1) };
    let scheduler = RefreshScheduler::new(Arc::clone(&slot), fetcher.clone() as Arc<dyn TokenFetcher>, timing, true);
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(scheduler.run(stopped));
    Engine { slot, fetcher, metrics, _stop: stop }
}

#[tokio::test(start_paused = true)]
async fn proactive_refresh_is_jittered_and_always_before_the_token_stops_being_usable() {
    let engine = start(Answer::Token { lifetime: 100 }, 0.75, 30);
    let first = engine.slot.obtain(None).await.expect("startup token");
    assert_eq!(first.generation, 1);
    // Walk ten lifetimes in 250 ms steps: a usable token is there at every step.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1000) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(engine.slot.current().is_some(), "no usable token at {:?}", started.elapsed());
    }
    let times = engine.fetcher.times.lock().unwrap().clone();
    // L = 100 s, skew = min(30, 25) = 25 s: usable for 75 s; refresh at min(75, 75 − 5 s lead) − up to 10 s of jitter.
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 12, "refreshes: {gaps:?}");
    for gap in &gaps {
        assert!(*gap >= Duration::from_secs(60) && *gap <= Duration::from_secs(70), "refresh gap {gap:?}");
    }
    let distinct: std::collections::HashSet<_> = gaps.iter().map(|g| g.as_millis()).collect();
    assert!(distinct.len() > 1, "refreshes are jittered, not in lockstep: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn five_hundred_waiters_share_one_token_call() {
    let engine = start(Answer::Token { lifetime: 300 }, 0.75, 30);
    engine.fetcher.gate.forget_permits(Semaphore::MAX_PERMITS);
    let waiters: Vec<_> = (0..500)
        .map(|_| {
            let slot = Arc::clone(&engine.slot);
            tokio::spawn(async move { slot.obtain(None).await.map(|t| t.generation) })
        })
        .collect();
    tokio::task::yield_now().await;
    engine.fetcher.gate.add_permits(1);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().expect("token"), 1);
    }
    assert_eq!(engine.fetcher.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_401_storm_on_one_generation_causes_one_refresh() {
    let engine = start(Answer::Token { lifetime: 300 }, 0.75, 30);
    let first = engine.slot.obtain(None).await.unwrap();
    let storm: Vec<_> = (0..100)
        .map(|_| {
            let slot = Arc::clone(&engine.slot);
            let generation = first.generation;
            tokio::spawn(
                async move { TokenSource::obtain(slot.as_ref(), Some(generation)).await.map(|t| t.generation) },
            )
        })
        .collect();
    for request in storm {
        assert_eq!(request.await.unwrap().unwrap(), 2);
    }
    assert_eq!(engine.fetcher.calls(), 2);
    // A late 401 for the old generation does not refresh again: the newer token is returned at once.
    assert_eq!(engine.slot.obtain(Some(1)).await.unwrap().generation, 2);
    assert_eq!(engine.fetcher.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_idp_outage_is_ridden_out_on_the_valid_token() {
    let engine = start(Answer::Token { lifetime: 600 }, 0.5, 30);
    engine.slot.obtain(None).await.unwrap();
    engine.fetcher.set(Answer::Transient);
    // Refresh is due at 270–300 s; the token is usable until 570 s. Retries back off but the token stays in use.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(560) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(engine.slot.current().expect("still usable").generation, 1);
    }
    let retries = engine.fetcher.calls() - 1;
    assert!((3..=40).contains(&retries), "backed-off retries during the outage: {retries}");
    // The IdP comes back: the next retry installs a new token before the old one is unusable... or soon after.
    engine.fetcher.set(Answer::Token { lifetime: 600 });
    tokio::time::sleep(Duration::from_secs(310)).await;
    assert!(engine.slot.current().expect("recovered").generation >= 2);
}

#[tokio::test(start_paused = true)]
async fn an_outage_that_ends_before_the_token_runs_out_never_leaves_requests_without_one() {
    // L = 600 s, skew = min(30, 150) = 30 s: usable until 570 s; the refresh is due at 270–300 s. The IdP is down
    // from then until 565 s: about 25 failures, enough for an uncapped backoff to wait minutes past the end.
    for run in 0..5 {
        let engine = start(Answer::Token { lifetime: 600 }, 0.5, 30);
        let started = Instant::now();
        engine.slot.obtain(None).await.unwrap();
        engine.fetcher.set(Answer::Unreachable);
        while started.elapsed() < Duration::from_secs(565) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        engine.fetcher.set(Answer::Token { lifetime: 600 });
        while started.elapsed() < Duration::from_secs(900) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(engine.slot.current().is_some(), "run {run}: no usable token at {:?}", started.elapsed());
        }
        let times = engine.fetcher.times.lock().unwrap().clone();
        let retries: Vec<u64> = times.iter().map(|t| (*t - started).as_millis() as u64).collect();
        let during: Vec<&u64> = retries.iter().filter(|ms| (550_000..570_000).contains(*ms)).collect();
        assert!(during.len() >= 2, "run {run}: retries grow denser before the end: {retries:?}");
        assert!(retries.len() <= 60, "run {run}: the outage did not turn into a retry storm: {} calls", retries.len());
    }
}

#[tokio::test(start_paused = true)]
async fn transient_errors_retry_in_seconds_permanent_ones_in_minutes() {
    let transient = start(Answer::Transient, 0.75, 30);
    let permanent = start(Answer::Permanent, 0.75, 30);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let t = transient.fetcher.calls();
    let p = permanent.fetcher.calls();
    assert!(t >= 5, "transient errors are retried with a backoff from 1 s: {t} calls in 60 s");
    assert!(p <= 2, "invalid_client is not retried in a loop: {p} calls in 60 s");
    let status = permanent.slot.status();
    assert!(status.permanent_failure);
    assert!(status.last_error.unwrap().contains("invalid_client"));
    // A request during the backoff fails fast, with a Retry-After, and makes no call.
    let before = permanent.fetcher.calls();
    let err = permanent.slot.obtain(None).await.unwrap_err();
    assert!(err.retry_after.is_some());
    assert_eq!(permanent.fetcher.calls(), before);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_token_waits_at_most_the_provider_timeout() {
    let engine = start(Answer::Token { lifetime: 300 }, 0.75, 30);
    engine.fetcher.gate.forget_permits(Semaphore::MAX_PERMITS);
    let started = Instant::now();
    let err = engine.slot.obtain(None).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(10), "waited exactly the provider's timeout");
    assert!(err.reason.contains("did not answer"), "{}", err.reason);
}

/// Starts a refresh of generation 1 and returns once its call is in flight, held at the gate.
async fn hold_a_refresh(engine: &Engine) {
    assert_eq!(engine.slot.obtain(None).await.unwrap().generation, 1);
    engine.fetcher.gate.forget_permits(Semaphore::MAX_PERMITS);
    engine.slot.request_refresh();
    // (Virtual time: the call waits out min_refresh_interval after the first one.)
    let _ = engine.fetcher.calls_seen.subscribe().wait_for(|calls| *calls >= 2).await;
}

/// The `count` of a histogram in the metrics text.
fn histogram_count(metrics: &Metrics, name: &str) -> u64 {
    let text = metrics.encode();
    let prefix = format!("{name}_count{{provider=\"p\"}} ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line[prefix.len()..].parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn while_a_refresh_is_in_flight_requests_wait_for_its_token_instead_of_sending_the_old_one() {
    let engine = start_with(Answer::Token { lifetime: 300 }, 0.75, 30, true);
    hold_a_refresh(&engine).await;
    assert!(engine.slot.current().is_none(), "the old token is held back once the refresh call is sent");
    assert!(engine.slot.serving(), "a rotation in flight does not make the provider unready");
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let slot = Arc::clone(&engine.slot);
            tokio::spawn(async move { slot.obtain(None).await.map(|t| t.generation) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    engine.fetcher.gate.add_permits(1);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().expect("token"), 2, "every waiter gets the new token");
    }
    assert_eq!(engine.fetcher.calls(), 2, "the waiters joined the call in flight");
    assert_eq!(histogram_count(&engine.metrics, "tokenproxy_refresh_wait_seconds"), 20);
    let text = engine.metrics.encode();
    let sum = text.lines().find(|l| l.starts_with("tokenproxy_refresh_wait_seconds_sum")).unwrap();
    let sum: f64 = sum.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((sum - 20.0 * 0.150).abs() < 1e-6, "each waited the 150 ms the call took: sum {sum}");
}

#[tokio::test(start_paused = true)]
async fn with_use_current_the_old_token_is_sent_during_the_refresh() {
    let engine = start_with(Answer::Token { lifetime: 300 }, 0.75, 30, false);
    hold_a_refresh(&engine).await;
    assert_eq!(engine.slot.obtain(None).await.unwrap().generation, 1);
    engine.fetcher.gate.add_permits(1);
    while engine.slot.current().unwrap().generation == 1 {
        tokio::task::yield_now().await;
    }
    assert_eq!(histogram_count(&engine.metrics, "tokenproxy_refresh_wait_seconds"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_the_idp_never_saw_or_refused_gives_the_old_token_back() {
    for failure in [Answer::Unreachable, Answer::Transient, Answer::Permanent] {
        let engine = start_with(Answer::Token { lifetime: 300 }, 0.75, 30, true);
        hold_a_refresh(&engine).await;
        engine.fetcher.set(failure);
        let waiter = {
            let slot = Arc::clone(&engine.slot);
            tokio::spawn(async move { slot.obtain(None).await.map(|t| t.generation) })
        };
        tokio::task::yield_now().await;
        engine.fetcher.gate.add_permits(1);
        // The waiter is answered by the failed call; the next request gets the old token, still usable.
        let _ = waiter.await.unwrap();
        assert_eq!(engine.slot.obtain(None).await.expect("old token back").generation, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_whose_outcome_is_unknown_never_sends_the_old_token_again() {
    let engine = start_with(Answer::Token { lifetime: 300 }, 0.75, 30, true);
    hold_a_refresh(&engine).await;
    engine.fetcher.set(Answer::Interrupted);
    engine.fetcher.gate.add_permits(Semaphore::MAX_PERMITS - 1);
    while engine.slot.status().last_error.is_none() {
        tokio::task::yield_now().await;
    }
    let err = engine.slot.obtain(None).await.expect_err("the old token may be revoked: not sent");
    assert!(!engine.slot.serving(), "no token can be sent: not ready");
    assert!(err.reason.contains("connection reset"), "{}", err.reason);
    // The retry (after its backoff) succeeds and brings generation 2; generation 1 is never handed out again.
    engine.fetcher.set(Answer::Token { lifetime: 300 });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(engine.slot.obtain(None).await.unwrap().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn tokens_that_expire_at_once_are_fetched_at_most_once_per_min_refresh_interval() {
    // An IdP answering a lifetime of nothing: without the floor, the refresher would call it again at once, forever.
    let engine = start(Answer::Token { lifetime: 0 }, 0.75, 30);
    let started = Instant::now();
    // Requests keep asking for a token meanwhile (each wait ends in the provider's timeout: none is ever usable).
    let asking = {
        let slot = Arc::clone(&engine.slot);
        tokio::spawn(async move {
            loop {
                let _ = slot.obtain(None).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    asking.abort();
    let times = engine.fetcher.times.lock().unwrap().clone();
    assert!(times.len() <= 11, "{} calls in 10 s", times.len());
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(1), "calls {:?} apart", pair[1] - pair[0]);
    }
    assert!(times.len() >= 9, "it kept trying: {} calls", times.len());
    assert!(times[0] >= started);
}
