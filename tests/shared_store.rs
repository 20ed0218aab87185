//! The shared store (`[state] store = "redis"`, docs/fleet.md) with a real redis-server: several tokenproxy
//! replicas make one token call between them, a value that does not decrypt is never used (nor overwritten), and
//! requests keep working while Redis is down.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use support::redis::RedisServer;
use support::{eventually, tokenproxy_command, Client, FakeIdp, FakeUpstream, Proxy};

/// A key file with one random AES-256 key.
fn key_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let key: [u8; 32] = rand::random();
    std::fs::write(file.path(), base64::engine::general_purpose::STANDARD.encode(key) + "\n").unwrap();
    file
}

fn replica(
    idp: &FakeIdp,
    upstream: &FakeUpstream,
    redis: &RedisServer,
    keys: &std::path::Path,
    prefix: &str,
) -> String {
    replica_of(&idp.token_url(), upstream, redis, keys, prefix)
}

/// A replica's config with the token endpoint `token_url`.
fn replica_of(
    token_url: &str,
    upstream: &FakeUpstream,
    redis: &RedisServer,
    keys: &std::path::Path,
    prefix: &str,
) -> String {
    format!(
        "[state]\ndir = {dir:?}\nstore = \"redis\"\nredis_url = \"{url}\"\nencryption_key_file = {keys:?}\n\
         key_prefix = \"{prefix}\"\n\n\
         [providers.api]\ntoken_url = \"{token_url}\"\nclient_id = \"fleet\"\nclient_secret = \"s3cret-value\"\n\
         manual_refresh_interval = \"0s\"\n\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"{upstream}\"\nprovider = \"api\"\n",
        dir = tempfile::tempdir().unwrap().keep(),
        url = redis.url(),
        upstream = upstream.url(),
    )
}

/// Waits until `check` holds (up to 10 s).
async fn until(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually(what, Duration::from_secs(10), check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_make_one_token_call_for_500_cold_requests() {
    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    // The token call that the lease holder makes hangs until every replica has looked for the token.
    idp.close();
    let config = replica(&idp, &upstream, &redis, keys.path(), "five");
    let replicas = futures_util::future::join_all((0..5).map(|_| Proxy::start(&config))).await;
    idp.wait_calls(1).await;
    until("four replicas waiting on the lease", async || {
        let mut waits = 0.0;
        for replica in &replicas {
            waits += replica.metric("tokenproxy_store_lease_waits_total").await;
        }
        waits == 4.0
    })
    .await;
    let requests = (0..500).map(|n| {
        let url = replicas[n % 5].url(&format!("/cold/{n}"));
        async move { Client::new().get(&url).await }
    });
    let replies = tokio::spawn(futures_util::future::join_all(requests));
    idp.open();
    for reply in replies.await.unwrap() {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["token"], "tok-1");
    }
    assert_eq!(idp.calls(), 1, "one token call for five replicas");
    let stored = redis.keys("five:token:api:*");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let value = redis.get(&stored[0]).unwrap();
    assert!(!value.windows(5).any(|w| w == b"tok-1"), "the token is encrypted at rest");
    for replica in replicas {
        replica.stop().await;
    }
}

#[tokio::test]
async fn a_value_that_does_not_decrypt_is_never_used_nor_overwritten() {
    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "tamper");
    let first = Proxy::start(&config).await;
    first.wait_ready().await;
    let key = redis.keys("tamper:token:api:*").pop().expect("the shared token");
    let mut value = redis.get(&key).unwrap();
    let last = value.len() - 1;
    value[last] ^= 1;
    redis.set(&key, &value);

    // Another replica, and one with another key: neither can open it; each makes its own call and sends its own token.
    let other_keys = key_file();
    for keys in [keys.path(), other_keys.path()] {
        let replica = Proxy::start(&replica(&idp, &upstream, &redis, keys, "tamper")).await;
        replica.wait_ready().await;
        let reply = Client::new().get(&replica.url("/x")).await;
        assert_eq!(reply.status, 200);
        assert!(reply.json()["token"].as_str().unwrap().starts_with("tok-"), "{}", reply.text());
        assert_ne!(reply.json()["token"], "tok-1");
        assert_eq!(replica.metric("tokenproxy_store_operations_total{op=\"decrypt\",outcome=\"error\"}").await, 1.0);
        replica.stop().await;
    }
    assert_eq!(idp.calls(), 3);
    assert_eq!(redis.get(&key).unwrap(), value, "left as it was");
    first.stop().await;
}

#[tokio::test]
async fn requests_keep_working_while_redis_is_down_and_sharing_resumes_when_it_is_back() {
    let mut redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "down");
    let (a, b) = (Proxy::start(&config).await, Proxy::start(&config).await);
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(idp.calls(), 1);

    redis.kill();
    for replica in [&a, &b] {
        assert_eq!(Client::new().get(&replica.url("/x")).await.status, 200, "the token in hand is used");
    }
    // A refresh while Redis is down: this replica's own call, and requests go on.
    let refresh = Client::new().post(&a.admin_url("/tokens/api/refresh"), "").await;
    assert!((200..300).contains(&refresh.status), "{}", refresh.text());
    idp.wait_calls(2).await;
    until("the refreshed token in use", async || Client::new().get(&a.url("/x")).await.json()["token"] == "tok-2")
        .await;
    assert!(a.metric("tokenproxy_store_fallbacks_total").await >= 1.0);
    // Said in /readyz (still ready: it made its own call) and in the gauge.
    let ready = Client::new().get(&a.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["providers"]["api"]["shared_store"], "unavailable", "{}", ready.text());
    let error = ready.json()["providers"]["api"]["shared_store_error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("makes its own token calls"), "{error}");
    assert_eq!(a.metric("tokenproxy_store_degraded{provider=\"api\"}").await, 1.0);
    let c = Proxy::start(&config).await;
    c.wait_ready().await;
    assert_eq!(Client::new().get(&c.url("/x")).await.status, 200, "a replica starting without Redis gets a token");

    // Redis is back (empty): the next refresh is shared again, and another replica's refresh takes it.
    redis.restart();
    let calls = idp.calls();
    assert!((200..300).contains(&Client::new().post(&a.admin_url("/tokens/api/refresh"), "").await.status));
    idp.wait_calls(calls + 1).await;
    until("the new token in Redis", async || !redis.keys("down:token:api:*").is_empty()).await;
    let shared = format!("tok-{}", calls + 1);
    assert!((200..300).contains(&Client::new().post(&b.admin_url("/tokens/api/refresh"), "").await.status));
    until("b on the shared token", async || Client::new().get(&b.url("/x")).await.json()["token"] == shared.as_str())
        .await;
    assert_eq!(idp.calls(), calls + 1, "b took the shared token instead of calling");
    let ready = Client::new().get(&a.admin_url("/readyz")).await.json();
    assert_eq!(ready["providers"]["api"]["shared_store"], "ok", "{ready}");
    assert_eq!(a.metric("tokenproxy_store_degraded{provider=\"api\"}").await, 0.0);
    for replica in [a, b, c] {
        replica.stop().await;
    }
}

/// A TCP relay to `target` that holds every chunk the client sends for `delay`: a Redis that answers slowly.
async fn slow_relay(target: u16, delay: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_slow_redis_costs_requests_nothing() {
    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let relay = slow_relay(redis.port, Duration::from_secs(2)).await;
    let config = replica(&idp, &upstream, &redis, keys.path(), "slow")
        .replace(&redis.url(), &format!("redis://127.0.0.1:{relay}"))
        .replace("[providers.api]", "redis_timeout = \"100ms\"\n\n[providers.api]");
    let proxy = Proxy::start(&config).await;
    proxy.wait_ready().await;
    for n in 0..20 {
        let reply = Client::new().get(&proxy.url(&format!("/x/{n}"))).await;
        assert_eq!((reply.status, reply.json()["token"].as_str()), (200, Some("tok-1")));
    }
    assert_eq!(idp.calls(), 1);
    assert!(proxy.metric("tokenproxy_store_fallbacks_total").await >= 1.0);
    let tokens = Client::new().get(&proxy.admin_url("/tokens")).await.json();
    assert_eq!(tokens["providers"]["api"]["source"], "own call");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_refresh_once_per_token_lifetime_between_them() {
    let redis = RedisServer::start();
    // Two-second tokens refreshed at 90 % of their life (minus up to 10 % jitter).
    let (idp, upstream, keys) = (FakeIdp::start(2).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "refresh")
        .replace("manual_refresh_interval", "expiry_skew = \"1ms\"\nrefresh_at = 0.9\nmanual_refresh_interval");
    let replicas = futures_util::future::join_all((0..5).map(|_| Proxy::start(&config))).await;
    let lifetimes = 5;
    let started = tokio::time::Instant::now();
    // Requests all along: every one gets a token that is still usable.
    while started.elapsed() < Duration::from_secs(2 * lifetimes) {
        for replica in &replicas {
            assert_eq!(Client::new().get(&replica.url("/x")).await.status, 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = idp.calls();
    // One call per refresh cycle for the whole fleet (a cycle is 80-90 % of a lifetime), plus the first: about 7
    // (10 leaves room for a slow machine). Each replica on its own would make about 7, 35 in all.
    println!("token calls for 5 replicas over {lifetimes} lifetimes: {calls}");
    assert!(calls <= 10, "{calls} token calls");
    for replica in replicas {
        replica.stop().await;
    }
}

/// A token call that answers `tok-N` (N: the calls so far), five-minute tokens, and counts.
struct Counting(std::sync::atomic::AtomicUsize);

impl tokenproxy::token::TokenFetcher for Counting {
    fn fetch(
        &self,
    ) -> futures_util::future::BoxFuture<'_, Result<tokenproxy::token::TokenResponse, tokenproxy::token::TokenError>>
    {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let token = http::HeaderValue::from_str(&format!("tok-{n}")).unwrap();
        Box::pin(async move { Ok(tokenproxy::token::TokenResponse::new(token, Duration::from_secs(300))) })
    }
}

#[tokio::test]
async fn a_cold_replica_takes_the_shared_token_with_one_read() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokenproxy::token::shared::{SharedFetcher, SharedStore, StoreHealth};
    use tokenproxy::token::TokenFetcher as _;

    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let toml = replica(&idp, &upstream, &redis, keys.path(), "cold");
    let config = tokenproxy::config::Config::from_toml_str(&toml, "cold.toml").unwrap();
    let metrics = tokenproxy::metrics::Metrics::new();
    let store = Arc::new(SharedStore::new(config.state.shared.as_ref().unwrap(), metrics.store()));
    let inner = Arc::new(Counting(AtomicUsize::new(0)));
    let provider = &config.providers["api"];
    let health = Arc::new(StoreHealth::new(provider, &metrics.store()));
    SharedFetcher::new(inner.clone(), Arc::clone(&store), provider, Arc::clone(&health))
        .fetch_after(None)
        .await
        .unwrap();
    // Each cold start: a new replica's fetcher (its own connection), one read.
    let mut took = Vec::new();
    for _ in 0..200 {
        let fetcher = SharedFetcher::new(inner.clone(), Arc::clone(&store), provider, Arc::clone(&health));
        let start = std::time::Instant::now();
        let response = fetcher.fetch_after(None).await.unwrap();
        took.push(start.elapsed());
        assert!(response.shared && response.access_token.expose() == "tok-1");
    }
    assert_eq!(inner.0.load(Ordering::SeqCst), 1, "one token call, 200 reads");
    took.sort();
    println!(
        "shared token read (GET + decrypt) on a cold replica, 200 reads: p50 {:?}, p99 {:?}",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
}

/// A TCP relay to `target` that holds the first chunk naming a lease (`…:lease`) until `go` is notified, after
/// notifying `held`: a replica stopped between its look for the shared token and its taking of the lease.
async fn lease_gate(target: u16, held: Arc<tokio::sync::Notify>, go: Arc<tokio::sync::Notify>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (held, go, gated) = (Arc::clone(&held), Arc::clone(&go), Arc::clone(&gated));
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    let names_lease = buffer[..n].windows(6).any(|w| w == b":lease");
                    if names_lease && !gated.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        held.notify_one();
                        go.notified().await;
                    }
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Replica `b` looks for the shared token and finds none; before it takes the lease, replica `a` takes it, makes the
/// call, shares the token and releases the lease. `b` then takes the free lease: it uses `a`'s token, no second call.
/// (Two replicas started together once made two calls this way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_takes_the_lease_after_anothers_call_uses_that_token() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokenproxy::token::shared::{SharedFetcher, SharedStore, StoreHealth};
    use tokenproxy::token::TokenFetcher as _;

    let redis = RedisServer::start();
    let (held, go) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let gate = lease_gate(redis.port, Arc::clone(&held), Arc::clone(&go)).await;
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let toml = replica(&idp, &upstream, &redis, keys.path(), "race");
    let config = tokenproxy::config::Config::from_toml_str(&toml, "race.toml").unwrap();
    let gated = tokenproxy::config::Config::from_toml_str(
        &toml.replace(&redis.url(), &format!("redis://127.0.0.1:{gate}")),
        "race.toml",
    )
    .unwrap();
    let metrics = tokenproxy::metrics::Metrics::new();
    let inner = Arc::new(Counting(AtomicUsize::new(0)));
    let fetcher = |config: &tokenproxy::config::Config| {
        let provider = &config.providers["api"];
        let store = Arc::new(SharedStore::new(config.state.shared.as_ref().unwrap(), metrics.store()));
        let health = Arc::new(StoreHealth::new(provider, &metrics.store()));
        SharedFetcher::new(inner.clone(), store, provider, health)
    };
    let (a, b) = (fetcher(&config), fetcher(&gated));
    let b = tokio::spawn(async move { b.fetch_after(None).await.map(|r| (r.shared, r.access_token)) });
    held.notified().await;
    let first = a.fetch_after(None).await.unwrap();
    assert_eq!(first.access_token.expose(), "tok-1");
    go.notify_one();
    let (shared, token) = b.await.unwrap().unwrap();
    assert_eq!(inner.0.load(Ordering::SeqCst), 1, "one token call for the two");
    assert!(shared && token.expose() == "tok-1", "b took a's token");
    assert!(redis.keys("race:token:api:*:lease").is_empty(), "b released the lease it took");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_sees_no_failure_while_redis_dies_and_comes_back() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "steady");
    let replicas = Arc::new(vec![Proxy::start(&config).await, Proxy::start(&config).await]);
    for replica in replicas.iter() {
        replica.wait_ready().await;
    }
    let (stop, sent, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic: Vec<_> = (0..4)
        .map(|worker| {
            let (replicas, stop, sent, failed) = (replicas.clone(), stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                let client = Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let reply = client.get(&replicas[worker % 2].url("/steady")).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if reply.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let refresh_both = async || {
        for replica in replicas.iter() {
            let answer = Client::new().post(&replica.admin_url("/tokens/api/refresh"), "").await;
            assert!((200..300).contains(&answer.status), "{}", answer.text());
        }
    };
    until("traffic", async || sent.load(Ordering::Relaxed) > 200).await;
    redis.kill();
    refresh_both().await;
    let before = sent.load(Ordering::Relaxed);
    until("traffic while Redis is down", async || sent.load(Ordering::Relaxed) > before + 200).await;
    redis.restart();
    refresh_both().await;
    let before = sent.load(Ordering::Relaxed);
    until("traffic after Redis came back", async || sent.load(Ordering::Relaxed) > before + 200).await;
    stop.store(true, Ordering::Relaxed);
    for task in traffic {
        task.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("steady traffic through a Redis outage: {sent} requests, {failed} failed");
    assert_eq!(failed, 0);
    if let Ok(replicas) = Arc::try_unwrap(replicas) {
        for replica in replicas {
            replica.stop().await;
        }
    }
}

#[tokio::test]
async fn a_session_redis_lost_is_seeded_again_from_the_newest_copy_without_a_reuse() {
    let mut redis = RedisServer::start();
    let idp = support::session_idp::SessionIdp::start(300, "rt-0").await;
    let (upstream, keys) = (FakeUpstream::start().await, key_file());
    // Each replica with its own state.dir, as in a fleet.
    let config = || {
        replica_of(&idp.token_url(), &upstream, &redis, keys.path(), "reseed").replace(
            "manual_refresh_interval = \"0s\"",
            "grant = \"refresh_token\"\nrefresh_token = \"rt-0\"\nmanual_refresh_interval = \"0s\"",
        )
    };
    let (a, b) = (Proxy::start(&config()).await, Proxy::start(&config()).await);
    a.wait_ready().await;
    b.wait_ready().await;
    let refresh = async |replica: &Proxy| {
        let answer = Client::new().post(&replica.admin_url("/tokens/api/refresh"), "").await;
        assert!((200..300).contains(&answer.status), "{}", answer.text());
    };
    // Rotations by both replicas, the last one by `a`; `b` takes a's token after it (and a's session copy with it).
    for replica in [&a, &b, &b, &a, &a, &b] {
        refresh(replica).await;
    }
    let before = idp.stats();
    // Redis restarts empty: `b` seeds it again from its copy, which is the newest although `b` did not rotate last.
    redis.kill();
    redis.restart();
    refresh(&b).await;
    refresh(&a).await;
    refresh(&a).await;
    let after = idp.stats();
    println!("session across a Redis restart: {before} -> {after}");
    assert_eq!((after["reused"].as_u64(), after["invalid_grant"].as_u64()), (Some(0), Some(0)), "{after}");
    assert!(after["refreshes"].as_u64() > before["refreshes"].as_u64(), "{after}");
    for replica in [&a, &b] {
        assert_eq!(Client::new().get(&replica.url("/x")).await.status, 200);
    }
    a.stop().await;
    b.stop().await;
}

/// Runs `tokenproxy ARGS --config CONFIG` (login, logout) and returns its stderr, asserting it succeeded.
async fn command(args: &[&str], config: &std::path::Path) -> String {
    let output =
        tokio::process::Command::from(tokenproxy_command(args)).arg("--config").arg(config).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "tokenproxy {args:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_logout_reach_every_replica_and_a_replica_with_another_key_is_not_ready() {
    let mut redis = RedisServer::start();
    let idp = support::session_idp::SessionIdp::start(300, "rt-unused").await;
    let (upstream, keys) = (FakeUpstream::start().await, key_file());
    // No seed: the session comes from `tokenproxy login`, run where no replica runs (its own state.dir).
    let config = |keys: &std::path::Path| {
        replica_of(&idp.token_url(), &upstream, &redis, keys, "cli")
            .replace(&format!("token_url = \"{}\"", idp.token_url()), &format!("issuer = \"{}\"", idp.issuer()))
            .replace("manual_refresh_interval = \"0s\"", "grant = \"refresh_token\"\nmanual_refresh_interval = \"0s\"")
    };
    let work = tempfile::tempdir().unwrap();
    let cli_config = work.path().join("tokenproxy.toml");
    std::fs::write(&cli_config, config(keys.path())).unwrap();
    let said = command(&["login", "api"], &cli_config).await;
    assert!(said.contains("in the shared store, for every replica"), "{said}");

    // Two replicas with empty state directories redeem the session the login put in Redis, one rotation at a time.
    let (a, b) = (Proxy::start(&config(keys.path())).await, Proxy::start(&config(keys.path())).await);
    a.wait_ready().await;
    b.wait_ready().await;
    let refresh = async |replica: &Proxy| Client::new().post(&replica.admin_url("/tokens/api/refresh"), "").await;
    for replica in [&a, &b, &a] {
        let answer = refresh(replica).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!((idp.stats()["reused"].as_u64(), idp.stats()["invalid_grant"].as_u64()), (Some(0), Some(0)));

    // `tokenproxy token` where the login ran: the fleet's token, without redeeming the login's refresh token (long
    // spent by the replicas: redeeming it would be a reuse, which ends the session at such IdPs).
    let refreshes = idp.stats()["refreshes"].as_u64();
    let output = tokio::process::Command::from(tokenproxy_command(&["token", "api", "--config"]))
        .arg(&cli_config)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert_eq!(printed, Client::new().get(&a.url("/x")).await.json()["token"].as_str().unwrap(), "the fleet's token");
    assert_eq!(idp.stats()["refreshes"].as_u64(), refreshes, "nothing redeemed");
    assert_eq!(idp.stats()["reused"].as_u64(), Some(0));

    // A replica whose encryption key is not the fleet's: not ready, says why, and leaves the session alone.
    let session_key = redis.keys("cli:session:api:*").pop().expect("the shared session");
    let before = redis.command(&["HGETALL", &session_key]).unwrap();
    let other_keys = key_file();
    let stranger = Proxy::start(&config(other_keys.path())).await;
    until("the stranger's /readyz", async || {
        Client::new().get(&stranger.admin_url("/readyz")).await.json()["providers"]["api"]["shared_store"]
            == "undecryptable"
    })
    .await;
    let ready = Client::new().get(&stranger.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.json()["providers"]["api"]["ready"], false, "{}", ready.text());
    assert_eq!(stranger.metric("tokenproxy_store_degraded{provider=\"api\"}").await, 1.0);
    assert_eq!(redis.command(&["HGETALL", &session_key]).unwrap(), before, "not overwritten");
    stranger.stop().await;

    // `tokenproxy logout`: the fleet's refresh token revoked, the session marked ended in Redis, its token deleted.
    let refreshes = idp.stats()["refreshes"].as_u64().unwrap();
    let live = idp.stats()["valid"].clone();
    let said = command(&["logout", "api"], &cli_config).await;
    assert!(said.contains("ended in the shared store"), "{said}");
    assert!(idp.stats()["revoked"].as_array().unwrap().contains(&live), "{}", idp.stats());
    assert!(redis.keys("cli:token:api:*").iter().all(|k| k.ends_with(":lease")), "the shared token is deleted");
    for replica in [&a, &b] {
        let answer = refresh(replica).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
        assert!(answer.text().contains("tokenproxy logout"), "{}", answer.text());
    }
    // Their own copies went with it: a Redis restarted empty is not seeded again from them.
    redis.kill();
    redis.restart();
    for replica in [&a, &b] {
        let answer = refresh(replica).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
        assert!(answer.text().contains("no refresh token"), "{}", answer.text());
    }
    assert_eq!(idp.stats()["refreshes"].as_u64().unwrap(), refreshes, "nothing redeemed after the logout");

    // A new login: every replica on it at its next refresh, no reuse.
    command(&["login", "api"], &cli_config).await;
    for replica in [&a, &b] {
        let answer = refresh(replica).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let stats = idp.stats();
    assert_eq!((stats["reused"].as_u64(), stats["invalid_grant"].as_u64()), (Some(0), Some(0)), "{stats}");
    assert!(stats["refreshes"].as_u64().unwrap() > refreshes, "{stats}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_on_five_replicas_is_replaced_by_one_call() {
    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "refused");
    let replicas = futures_util::future::join_all((0..5).map(|_| Proxy::start(&config))).await;
    for replica in &replicas {
        replica.wait_ready().await;
    }
    assert_eq!(idp.calls(), 1);
    // The upstream revokes the fleet's token: every replica sees 401s for it at once.
    upstream.revoke("tok-1");
    let requests = (0..100).map(|n| {
        let url = replicas[n % 5].url(&format!("/refused/{n}"));
        async move { Client::new().get(&url).await }
    });
    for reply in futures_util::future::join_all(requests).await {
        assert_eq!(reply.status, 200, "replayed with the new token: {}", reply.text());
        assert_eq!(reply.json()["token"], "tok-2");
    }
    let mut unauthorized = 0.0;
    for replica in &replicas {
        unauthorized +=
            replica.metric("tokenproxy_token_refreshes_total{provider=\"api\",reason=\"unauthorized\"}").await;
    }
    println!("one refused token on 5 replicas: {unauthorized} refreshes asked for, {} token call", idp.calls() - 1);
    assert_eq!(unauthorized, 5.0, "each replica asked once (its 401 budget)");
    assert_eq!(idp.calls(), 2, "one token call for the five");
    for replica in replicas {
        replica.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_redis_sentinel_sharing_follows_a_failover() {
    let mut master = RedisServer::start();
    let standby = RedisServer::replica_of(&master);
    let sentinel = support::redis::Sentinel::start(&master);
    until("the sentinel knows the replica", async || sentinel.replicas() == 1).await;
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &master, keys.path(), "sentinel").replace(
        &format!("redis_url = \"{}\"", master.url()),
        // A first connection asks the sentinel, then checks the master's role: more round trips than one command.
        &format!(
            "redis_sentinels = [\"{}\"]\nredis_sentinel_master = \"mymaster\"\nredis_timeout = \"1s\"",
            sentinel.url()
        ),
    );
    assert!(config.contains("redis_sentinels"), "{config}");
    let (a, b) = (Proxy::start(&config).await, Proxy::start(&config).await);
    a.wait_ready().await;
    b.wait_ready().await;
    let fallbacks =
        a.metric("tokenproxy_store_fallbacks_total").await + b.metric("tokenproxy_store_fallbacks_total").await;
    assert_eq!(
        idp.calls(),
        1,
        "one call for two replicas, through the master the sentinel named ({fallbacks} fallbacks)"
    );
    assert_eq!(master.keys("sentinel:token:api:*").len(), 1);

    // The master dies; the sentinel promotes the replica. Requests go on with the tokens in hand.
    master.kill();
    until("the failover", async || sentinel.master_port() == Some(standby.port)).await;
    for proxy in [&a, &b] {
        assert_eq!(Client::new().get(&proxy.url("/x")).await.status, 200);
    }
    // A refresh on `a` goes to the new master (its connection to the old one failed: it asks the sentinel again),
    // and `b`'s refresh takes that token without a call.
    let calls = idp.calls();
    until("a refresh shared through the new master", async || {
        let refreshed = Client::new().post(&a.admin_url("/tokens/api/refresh"), "").await.status == 200;
        let ready = Client::new().get(&a.admin_url("/readyz")).await.json();
        let shared = ready["providers"]["api"]["shared_store"] == "ok";
        refreshed && shared && !standby.keys("sentinel:token:api:*").is_empty()
    })
    .await;
    let token = Client::new().get(&a.url("/x")).await.json()["token"].clone();
    let after_a = idp.calls();
    assert!((200..300).contains(&Client::new().post(&b.admin_url("/tokens/api/refresh"), "").await.status));
    assert_eq!(Client::new().get(&b.url("/x")).await.json()["token"], token, "b took a's token");
    assert_eq!(idp.calls(), after_a, "without a call");
    println!(
        "through a Sentinel failover: a's refreshes until its store answered again made {} token calls, b's none",
        after_a - calls
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_session_whose_store_cannot_be_set_up_is_not_redeemed_beside_the_fleet() {
    let redis = RedisServer::start();
    let idp = support::session_idp::SessionIdp::start(300, "rt-0").await;
    let (upstream, keys) = (FakeUpstream::start().await, key_file());
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "redis-password\n").unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        replica_of(&idp.token_url(), &upstream, &redis, keys.path(), "setup").replace(
            "manual_refresh_interval = \"0s\"",
            "grant = \"refresh_token\"\nrefresh_token = \"rt-0\"\nmanual_refresh_interval = \"0s\"",
        )
    )
    .replace("[providers.api]", &format!("redis_password_file = {:?}\n\n[providers.api]", password.path()));
    let config = tokenproxy::config::Config::from_toml_str(&toml, "setup.toml").unwrap();
    // The password file is gone by the time the store is set up (a Secret being rotated, say).
    drop(password);
    let replica = Proxy::start_config(config).await;
    until("the first token call's outcome", async || {
        let tokens = Client::new().get(&replica.admin_url("/tokens")).await.json();
        tokens["providers"]["api"]["state"] != "expired"
    })
    .await;
    // Without the store, the session's refresh token is not redeemed by this replica alone: the fleet may hold it.
    assert_eq!(idp.stats()["refreshes"], 0, "{}", idp.stats());
    let ready = Client::new().get(&replica.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["providers"]["api"]["shared_store"], "unavailable", "{}", ready.text());
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_token_calls_is_the_fleets_budget_not_each_replicas() {
    let redis = RedisServer::start();
    let (idp, upstream, keys) = (FakeIdp::start(300).await, FakeUpstream::start().await, key_file());
    let config = replica(&idp, &upstream, &redis, keys.path(), "budget").replace(
        "manual_refresh_interval = \"0s\"\n",
        "manual_refresh_interval = \"0s\"\nmin_refresh_interval = \"0s\"\nmax_token_calls = \"4/h\"\n",
    );
    let (a, b) = (Proxy::start(&config).await, Proxy::start(&config).await);
    a.wait_ready().await;
    b.wait_ready().await;
    // Forced refreshes on both replicas, alternately: the fleet's budget is 4 calls this hour, whoever makes them.
    for n in 0..8 {
        let replica = if n % 2 == 0 { &a } else { &b };
        let _ = Client::new().post(&replica.admin_url("/tokens/api/refresh"), bytes::Bytes::new()).await;
    }
    assert_eq!(idp.calls(), 4, "four calls in the fleet's window, then none");
    let refused = a.metric("tokenproxy_token_budget_exhausted_total").await
        + b.metric("tokenproxy_token_budget_exhausted_total").await;
    assert!(refused >= 1.0, "{refused} calls refused by the budget");
    // The token in hand is still served.
    assert_eq!(Client::new().get(&a.url("/x")).await.status, 200);
    a.stop().await;
    b.stop().await;
}
