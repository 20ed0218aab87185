//! A refresh-token session shared by three tokenproxy replicas through Redis (docs/fleet.md), against the real
//! OpenID provider (npm `oidc-provider`, see `tests/idp/README.md`), whose refresh tokens rotate at every use and
//! whose reuse detection revokes the whole grant when a rotated refresh token is presented again. Only the replica
//! holding the lease redeems the refresh token; each rotation goes to Redis (compare-and-swap on its version) before
//! its access token is used; the other replicas take the new access token from Redis.
//!
//! Needs `node` >= 20, `npm` and `redis-server` on PATH (`scripts/test` installs redis-server).

mod support;

use std::time::Duration;

use base64::Engine as _;
use hyper::StatusCode;
use support::oidc::{IdpProcess, UpstreamProcess, ROTATE_CLIENT};
use support::redis::RedisServer;
use support::{eventually, spawn_tokenproxy, toml_string, TokenProxyProcess};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_rotating_session_without_a_single_reuse() {
    let Fleet { idp, redis, replicas, _upstream, _dirs, .. } = Fleet::start(2, (0.75, "3s"), "fleet").await;

    // Requests on every replica all along, until the session has rotated 20 times.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut requests = 0;
    while idp.refresh_stats().await.ok < 20 {
        assert!(tokio::time::Instant::now() < deadline, "20 rotations did not happen: {:?}", idp.refresh_stats().await);
        for replica in &replicas {
            let reply = replica.get("/api/orders").await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            requests += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = idp.refresh_stats().await;
    println!(
        "3 replicas, one session: {} rotations, {} invalid_grant, {} reused, {requests} requests all 200",
        stats.ok, stats.invalid_grant, stats.reused
    );
    assert_eq!((stats.invalid_grant, stats.reused, stats.unknown, stats.other_error), (0, 0, 0, 0), "{stats:?}");
    // Each rotation was made by one replica: the others took its access token from Redis.
    let mut shared = 0;
    for replica in &replicas {
        let tokens = replica.admin_get("/tokens").await.json();
        shared += u64::from(tokens["providers"]["session"]["source"] == "shared store");
    }
    println!("replicas on a token another one obtained, at the end: {shared} of 3");
    assert!(shared >= 1, "the other replicas take the lease holder's token instead of calling");
    assert!(redis.keys("fleet:session:session:*").len() == 1, "the session is in Redis");
    for mut replica in replicas {
        replica.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_killed_mid_call_leaves_the_session_to_another_replica() {
    // A lease outlives its holder by the provider's `timeout` + 1 s (no second replica may redeem while the first
    // might still): 10-second tokens refreshed at half their life leave room for that gap.
    let Fleet { idp, redis, mut replicas, _upstream, _dirs, .. } = Fleet::start(10, (0.5, "1s"), "killed").await;
    let rotations = idp.refresh_stats().await.ok;
    // The next refresh call is held at the provider; its maker (the lease holder, named in the lease) is killed.
    idp.delay_next(1, 2500).await;
    let holder = eventually("a refresh to take the lease", Duration::from_secs(30), async || {
        let leases = redis.keys("killed:token:session:*:lease");
        let fence = leases.first().and_then(|lease| match redis.command(&["GET", lease]) {
            Ok(redis::Value::BulkString(bytes)) => String::from_utf8(bytes).ok(),
            _ => None,
        });
        fence.and_then(|fence| fence.split(':').next()?.parse::<u32>().ok())
    })
    .await;
    let index = replicas.iter_mut().position(|r| r.process().pid() == holder).expect("the holder is a replica");
    let killed = replicas.remove(index);
    killed.signal(libc::SIGKILL);
    // Another replica takes over once the lease expires; the session goes on rotating, with no reuse. Requests that
    // needed a token while nobody could redeem (the lease outlives its dead holder) may get 503 on a loaded machine:
    // counted, not asserted; after the takeover every request is answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut requests, mut unavailable) = (0, 0);
    while idp.refresh_stats().await.ok < rotations + 3 {
        assert!(tokio::time::Instant::now() < deadline, "the session stopped: {:?}", idp.refresh_stats().await);
        for replica in &replicas {
            let reply = replica.get("/api/orders").await;
            requests += 1;
            match reply.status {
                200 => {}
                503 => unavailable += 1,
                other => panic!("{other}: {}", reply.text()),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for replica in &replicas {
        assert_eq!(replica.get("/api/orders").await.status, StatusCode::OK, "after the takeover");
    }
    println!("requests to the two survivors meanwhile: {requests}, {unavailable} answered 503");
    let stats = idp.refresh_stats().await;
    let dropped = idp.stats().await["dropped"].as_u64();
    println!(
        "lease holder (pid {holder}) killed mid-call: {} rotations after it, {} invalid_grant, {} reused, held call dropped: {dropped:?}",
        stats.ok - rotations,
        stats.invalid_grant,
        stats.reused
    );
    assert_eq!(dropped, Some(1), "the killed holder's call never reached the provider");
    assert_eq!((stats.invalid_grant, stats.reused), (0, 0), "{stats:?}");
    for mut replica in replicas {
        replica.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_from_one_replica_ends_the_session_for_all_of_them() {
    let Fleet { idp, redis, replicas, _upstream, _dirs, env } = Fleet::start(2, (0.75, "3s"), "logout").await;
    eventually("three rotations", Duration::from_secs(60), async || {
        let stats = idp.refresh_stats().await;
        if stats.ok >= 3 {
            Ok(())
        } else {
            Err(stats)
        }
    })
    .await;
    // `tokenproxy logout` where one replica runs (as `kubectl exec` would), with its config and environment.
    let dir = replicas[0].config_path.parent().unwrap().to_owned();
    let config = replicas[0].config_path.to_string_lossy().into_owned();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut logout = spawn_tokenproxy("tokenproxy logout", &dir, &["logout", "session", "--config", &config], &env);
    let status = logout.wait_exit_async(READY_TIMEOUT).await.expect("tokenproxy logout exits");
    assert!(status.success(), "tokenproxy logout: {status}\n{}", logout.output().text());
    assert!(logout.output().text().contains("ended in the shared store"), "{}", logout.output().text());
    assert!(idp.stats().await["revocation"]["ok"].as_u64() >= Some(1), "revoked at the provider");
    assert!(redis.keys("logout:token:session:*").iter().all(|k| k.ends_with(":lease")), "shared token deleted");
    // Every replica learns it at its next refresh (2-second tokens) and stops, without redeeming anything.
    eventually("every replica to learn of the logout", Duration::from_secs(30), async || {
        for replica in &replicas {
            let tokens = replica.admin_get("/tokens").await.json();
            let error = tokens["providers"]["session"]["last_error"].as_str().unwrap_or_default().to_owned();
            if !error.contains("tokenproxy logout") {
                return Err(tokens);
            }
        }
        Ok(())
    })
    .await;
    let stats = idp.refresh_stats().await;
    println!(
        "logout across 3 replicas: {} rotations before, {} invalid_grant, {} reused",
        stats.ok, stats.invalid_grant, stats.reused
    );
    assert_eq!((stats.invalid_grant, stats.reused, stats.unknown), (0, 0, 0), "{stats:?}");
    for mut replica in replicas {
        replica.terminate().await;
    }
}

/// Three replicas sharing one session of tp-rotate through one Redis (key prefix `prefix`), ready; the provider
/// issues `ttl`-second access tokens; `timing` is the provider's (`refresh_at`, `timeout`).
struct Fleet {
    idp: IdpProcess,
    redis: RedisServer,
    replicas: Vec<TokenProxyProcess>,
    _upstream: UpstreamProcess,
    _dirs: Vec<tempfile::TempDir>,
    /// The replicas' `TOKENPROXY_STATE__*` variables.
    env: Vec<(&'static str, String)>,
}

impl Fleet {
    async fn start(ttl: u64, timing: (f64, &str), prefix: &str) -> Fleet {
        let idp = IdpProcess::start(ttl).await;
        let upstream = UpstreamProcess::start(&idp).await;
        let redis = RedisServer::start();
        let work = tempfile::tempdir().unwrap();
        let seed_file = work.path().join("seed");
        std::fs::write(&seed_file, idp.seed_refresh_token().await.refresh_token).unwrap();
        let keys = work.path().join("keys");
        std::fs::write(&keys, base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())).unwrap();
        let body = session_body(&idp, &upstream, &seed_file, timing).await;
        let (url, keys) = (redis.url(), keys.to_string_lossy().into_owned());
        let env = vec![
            ("TOKENPROXY_STATE__STORE", "redis".to_owned()),
            ("TOKENPROXY_STATE__REDIS_URL", url),
            ("TOKENPROXY_STATE__ENCRYPTION_KEY_FILE", keys),
            ("TOKENPROXY_STATE__KEY_PREFIX", prefix.to_owned()),
        ];
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut dirs = vec![work];
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            replicas.push(TokenProxyProcess::start_in(dir.path(), &body, &pairs).await);
            dirs.push(dir);
        }
        for replica in &replicas {
            replica.wait_ready().await;
        }
        Fleet { idp, redis, replicas, _upstream: upstream, _dirs: dirs, env }
    }
}

/// `[providers.session]` on tp-rotate with the seed in `seed_file`, and `/api` → the upstream.
async fn session_body(
    idp: &IdpProcess,
    upstream: &UpstreamProcess,
    seed_file: &std::path::Path,
    (refresh_at, timeout): (f64, &str),
) -> String {
    format!(
        "[providers.session]\ntoken_url = {token_url}\ngrant = \"refresh_token\"\nclient_id = {client_id}\n\
         client_secret = {client_secret}\nrevocation_endpoint = {revocation}\nrefresh_token_file = {seed}\nrefresh_at = {refresh_at}\nexpiry_skew = \"1s\"\n\
         timeout = \"{timeout}\"\n\n\
         [[routes]]\nprefix = \"/api\"\nupstream = {upstream}\nstrip_prefix = true\nprovider = \"session\"\n",
        token_url = toml_string(&idp.token_endpoint().await),
        revocation = toml_string(idp.discovery().await["revocation_endpoint"].as_str().expect("revocation_endpoint")),
        client_id = toml_string(ROTATE_CLIENT.0),
        client_secret = toml_string(ROTATE_CLIENT.1),
        seed = toml_string(&seed_file.to_string_lossy()),
        upstream = toml_string(&upstream.url),
    )
}
