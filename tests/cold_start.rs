//! 10,000 concurrent requests on a cold start: exactly one token call, every request answered, and the proxy's
//! memory back within twice its idle size afterwards. Runs the real binary with two worker threads.

mod support;

use std::time::Duration;

use support::{eventually, Client, FakeIdp, FakeUpstream, TokenProxyProcess};

const REQUESTS: usize = 10_000;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// 10,000 connections on each side need more descriptors than the usual soft limit.
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max.max(wanted) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                let soft = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_requests_on_a_cold_start_make_one_token_call() {
    raise_fd_limit(65_536);
    let idp = FakeIdp::start(300).await;
    idp.close();
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworker_threads = 2\nrequest_timeout = \"60s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\naccess = false\n{}",
        support::basic_config(&idp, &upstream)
    )
    .replace("client_secret = \"s3cret-value\"", "client_secret = \"s3cret-value\"\ntimeout = \"60s\"");
    std::fs::write(&path, config).unwrap();
    let mut proxy = TokenProxyProcess::run(&path, &[("RUST_LOG", "warn,tokenproxy=info")]).await;
    let pid = proxy.process().pid();
    idp.wait_calls(1).await;
    let idle = rss_kib(pid);

    // Each request may wait as long as all of them take to arrive (below), then for the token.
    let client = Client::new().with_timeout(Duration::from_secs(180));
    let url = proxy.url("/api/cold");
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.get(&url).await.status })
        })
        .collect();
    eventually("every request to wait on the one token call", Duration::from_secs(120), async || {
        let waiters = proxy.metric("tokenproxy_singleflight_waiters_total{provider=\"api\"}").await;
        if waiters >= REQUESTS as f64 {
            Ok(())
        } else {
            Err(format!("{waiters} waiting"))
        }
    })
    .await;
    let peak = rss_kib(pid);
    idp.open();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(idp.calls(), 1, "exactly one token call for {REQUESTS} concurrent requests");
    drop(client);

    // Memory comes back once the connections are gone.
    println!("cold start: {REQUESTS} requests, 1 token call; RSS idle {idle} KiB, peak {peak} KiB");
    let after = eventually(format!("RSS back within 2x idle ({idle} KiB)"), Duration::from_secs(30), async || {
        let now = rss_kib(pid);
        if now <= 2 * idle {
            Ok(now)
        } else {
            Err(format!("{now} KiB"))
        }
    })
    .await;
    println!("cold start: RSS after {after} KiB");
}
