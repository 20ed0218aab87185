#![allow(dead_code)]
//! A real `redis-server` for the shared-store tests, on a free loopback port, without persistence; stopped (and
//! killed if need be) when dropped. `scripts/test` installs Debian's redis-server when it is missing.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One redis-server process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut server = RedisServer { port, child: None };
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
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it (`apt-get install redis-server`, as scripts/test does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command(&["PING"]).is_err() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command on a fresh connection.
    pub fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut connection)
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
