//! Failure drills in real time on loopback, with numbers printed for the record (docs/benchmarks.md, "Failure
//! drills"): an identity provider that flaps (up 3 s, down 3 s) under a steady 200 requests per second for two
//! whole token lifetimes. No request may fail: each refresh that meets the IdP down is retried before the token in
//! use runs out (the retry backoff is capped by the token's remaining usable time; tests/token_engine.rs proves
//! the cap on a paused clock).

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{basic_config, Client, FakeIdp, FakeUpstream, IdpMode, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_flapping_every_3_s_under_200_requests_per_second_fails_no_request() {
    const LIFETIME: u64 = 16;
    let idp = FakeIdp::start(LIFETIME).await;
    let upstream = FakeUpstream::start().await;
    // A 16 s token scaled down from an hour: with refresh_at = 0.5 the refresh starts with 4 s of usable time left
    // (an hour's token at the default 0.75 has 15 minutes), more than one down phase.
    let config = basic_config(&idp, &upstream).replace("[providers.api]\n", "[providers.api]\nrefresh_at = 0.5\n");
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;

    let running = Arc::new(AtomicBool::new(true));
    let flapping = {
        let running = Arc::clone(&running);
        let down =
            IdpMode::Fail { status: 503, body: "{\"error\":\"temporarily_unavailable\"}".into(), retry_after: None };
        let up = IdpMode::Issue { expires_in: LIFETIME };
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3));
            tick.tick().await;
            let mut is_up = true;
            while running.load(Ordering::SeqCst) {
                tick.tick().await;
                is_up = !is_up;
                idp.set_mode(if is_up { up.clone() } else { down.clone() });
            }
            idp
        }
    };
    let flapping = tokio::spawn(flapping);

    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = Client::new();
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    let mut requests = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(2 * LIFETIME);
    while tokio::time::Instant::now() < end {
        pace.tick().await;
        let (client, url, sent, failed) =
            (client.clone(), proxy.url("/api/drill"), Arc::clone(&sent), Arc::clone(&failed));
        requests.push(tokio::spawn(async move {
            let reply = client.get(&url).await;
            sent.fetch_add(1, Ordering::SeqCst);
            if reply.status != 200 {
                failed.fetch_add(1, Ordering::SeqCst);
                eprintln!("failed: {} {}", reply.status, reply.text());
            }
        }));
    }
    for request in requests {
        request.await.unwrap();
    }
    running.store(false, Ordering::SeqCst);
    let idp = flapping.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let errors = proxy.metric("tokenproxy_token_requests_total{outcome=\"error\",provider=\"api\"}").await;
    println!(
        "drill: IdP flapping 3 s up / 3 s down, {} s: {sent} requests sent, {failed} failed; {} token calls ({errors} failed)",
        2 * LIFETIME,
        idp.calls()
    );
    assert!(sent >= 2 * LIFETIME as usize * 150, "the load was about 200 requests per second: {sent}");
    assert_eq!(failed, 0, "no request failed while the IdP flapped");
    assert!(idp.calls() >= 3, "the token was refreshed across the drill: {} calls", idp.calls());
    proxy.stop().await;
}
