#![allow(dead_code)]
//! A real `redis-server` for the shared-store tests, on a free loopback port, without persistence; stopped (and
//! killed if need be) when dropped. `scripts/test` installs Debian's redis-server when it is missing.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a redis-server may take to say it is ready.
const START_WITHIN: Duration = Duration::from_secs(10);

/// Spawns `command` (a `redis-server`, logging to stdout as it does without a log file) and waits until it logs a line
/// containing `ready`; panics, naming `what`, if it exits first or [`START_WITHIN`] passes. Its log keeps being read
/// (and dropped) until it exits, so that it never blocks on a full pipe.
fn spawn_until_logged(mut command: Command, ready: &'static str, what: &str) -> Child {
    command.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!("cannot start redis-server ({e}); install it (`apt-get install redis-server`, as scripts/test does)")
    });
    let log = child.stdout.take().expect("stdout is piped");
    let (tell, told) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tell = Some(tell);
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains(ready) {
                if let Some(tell) = tell.take() {
                    let _ = tell.send(());
                }
            }
        }
    });
    if told.recv_timeout(START_WITHIN).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not log `{ready}` within {START_WITHIN:?} (or exited)");
    }
    child
}

/// One redis-server process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Arguments added to the command line (`--replicaof`).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it is ready to accept connections.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a replica of `master` (for Sentinel tests).
    pub fn replica_of(master: &RedisServer) -> RedisServer {
        Self::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()])
    }

    fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut server = RedisServer { port, child: None, extra };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: there is no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra);
        let what = format!("redis-server on port {}", self.port);
        self.child = Some(spawn_until_logged(command, "Ready to accept connections", &what));
    }

    /// Runs one command on a fresh connection.
    pub fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        command(&self.url(), args)
    }

    /// The keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let client = redis::Client::open(self.url()).expect("client");
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2)).expect("connection");
        redis::cmd("KEYS").arg(pattern).query(&mut connection).expect("KEYS")
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let client = redis::Client::open(self.url()).expect("client");
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2)).expect("connection");
        redis::cmd("GET").arg(key).query(&mut connection).expect("GET")
    }

    /// Sets the raw value of `key` (keeping its expiry).
    pub fn set(&self, key: &str, value: &[u8]) {
        let client = redis::Client::open(self.url()).expect("client");
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2)).expect("connection");
        redis::cmd("SET").arg(key).arg(value).arg("KEEPTTL").query::<()>(&mut connection).expect("SET");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one command on a fresh connection to `url`.
fn command(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut connection)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// One Redis Sentinel (`redis-server CONFIG --sentinel`) monitoring a master as `mymaster`, quorum 1, declaring it
/// down after 500 ms; its config file (which Sentinel rewrites) lives in a temporary directory.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts one for `master` and waits until it monitors it.
    pub fn start(master: &RedisServer) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor mymaster 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds mymaster 500\nsentinel failover-timeout mymaster 5000\n",
                dir = dir.path().display(),
                master = master.port
            ),
        )
        .expect("sentinel config");
        let mut command = Command::new("redis-server");
        command.arg(&config).arg("--sentinel");
        // Sentinel says nothing of accepting connections: it listens before it starts monitoring, which it logs.
        let child = spawn_until_logged(command, "+monitor master mymaster", &format!("sentinel on port {port}"));
        Sentinel { port, child, _dir: dir }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command on a fresh connection.
    pub fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        command(&self.url(), args)
    }

    /// The port of the master it names now.
    pub fn master_port(&self) -> Option<u16> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2)).ok()?;
        let (_, port): (String, u16) =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("mymaster").query(&mut connection).ok()?;
        Some(port)
    }

    /// How many replicas of the master it knows.
    pub fn replicas(&self) -> usize {
        match self.command(&["SENTINEL", "replicas", "mymaster"]) {
            Ok(redis::Value::Array(replicas)) => replicas.len(),
            _ => 0,
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
