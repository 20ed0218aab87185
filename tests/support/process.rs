//! The real binary: the one way the tests run `tokenproxy run` ([`TokenProxyProcess`]) and its one-shot commands
//! ([`tokenproxy_command`], [`spawn_tokenproxy`]), and the child processes of the tests ([`ChildProcess`]: the
//! binary, the Node OpenID provider and upstream).
//!
//! Every child is killed (and reaped) when its handle drops; what it printed is kept and shown only when the test
//! fails. tokenproxy listens on port 0 of 127.0.0.1 and says where in its "tokenproxy listening" line, which the
//! harness reads (no port is picked ahead, so none can be taken meanwhile).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead};
use tokio::sync::oneshot;

use super::client::{Client, Reply};
use super::{metric_sample, toml_string, READY_WITHIN};

/// How long a child may take to say it is ready (its READY or listening line).
pub const START_WITHIN: Duration = Duration::from_secs(30);
/// How long tokenproxy may take to exit after a SIGTERM.
pub const EXIT_WITHIN: Duration = Duration::from_secs(30);

// ---- child processes ---------------------------------------------------------------------------

/// Output a child printed, kept to show when a test fails.
#[derive(Clone, Default)]
pub struct CapturedOutput(Arc<Mutex<Vec<(&'static str, String)>>>);

impl CapturedOutput {
    fn push_line(&self, stream: &'static str, line: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((stream, line.to_owned()));
    }

    /// Everything captured so far, each line marked with its stream (`[stdout] …`, `[stderr] …`).
    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|(stream, line)| format!("[{stream}] {line}\n")).collect()
    }

    /// Every line captured so far, as the child printed it (both streams).
    pub fn lines(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|(_, line)| format!("{line}\n")).collect()
    }

    /// The last `n` lines captured so far, marked with their stream.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Copies a child's stream into the buffer, line by line; the first line `ready` makes something of is told
    /// through its sender too.
    fn drain<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        stream: R,
        label: &'static str,
        ready: Option<(ParseReady, oneshot::Sender<String>)>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ready = ready;
            let mut reader = tokio::io::BufReader::new(stream);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                this.push_line(label, line);
                if let Some(said) = ready.as_ref().and_then(|(parse, _)| parse(line)) {
                    if let Some((_, tell)) = ready.take() {
                        let _ = tell.send(said);
                    }
                }
            }
        })
    }
}

/// What a child's ready line says (`None`: not that line).
pub type ParseReady = fn(&str) -> Option<String>;

/// Which of its streams a child says it is ready on, and how to read the line.
pub struct ReadyLine {
    pub stdout: bool,
    pub parse: ParseReady,
}

/// A child process that is killed when dropped; its output is printed if the test failed.
pub struct ChildProcess {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    output: CapturedOutput,
    drains: Vec<tokio::task::JoinHandle<()>>,
    ready: Option<oneshot::Receiver<String>>,
}

impl ChildProcess {
    /// Spawns `command` with stdin, stdout and stderr piped. stdin stays open as long as this handle lives (the Node
    /// children exit when it closes). What `ready` makes of its line is for [`ChildProcess::ready`].
    pub fn spawn(name: impl Into<String>, command: Command, ready: Option<ReadyLine>) -> ChildProcess {
        let name = name.into();
        let mut command = tokio::process::Command::from(command);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot spawn {name} ({command:?}): {e}"));
        let pid = child.id().expect("a running child has a pid");
        let output = CapturedOutput::default();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tell, told) = oneshot::channel();
        let (on_stdout, on_stderr) = match ready {
            Some(ReadyLine { stdout: true, parse }) => (Some((parse, tell)), None),
            Some(ReadyLine { stdout: false, parse }) => (None, Some((parse, tell))),
            None => (None, None),
        };
        let drains = vec![output.drain(stdout, "stdout", on_stdout), output.drain(stderr, "stderr", on_stderr)];
        ChildProcess { name, child, pid, output, drains, ready: Some(told) }
    }

    /// Waits for what the ready line said; `Err` with the exit status if the process exits first. Panics with the
    /// child's output if neither happens within [`START_WITHIN`].
    pub async fn ready(&mut self) -> Result<String, Option<ExitStatus>> {
        let told = self.ready.take().expect("a ready line to wait for");
        match tokio::time::timeout(START_WITHIN, told).await {
            Ok(Ok(said)) => Ok(said),
            // The stream closed without the line: the process is exiting.
            Ok(Err(_)) => Err(self.wait_exit_async(Duration::from_secs(5)).await),
            Err(_) => {
                panic!("{} did not say it was ready within {START_WITHIN:?}:\n{}", self.name, self.output.tail(80))
            }
        }
    }

    /// Waits up to `limit` for the process to exit; once it has, the whole of its output is captured.
    pub async fn wait_exit_async(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(limit, self.child.wait()).await.ok()?.ok()?;
        for drain in std::mem::take(&mut self.drains) {
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        Some(status)
    }

    /// Sends `signal` (`libc::SIGTERM`, `libc::SIGHUP`, …) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with the pid of a child we started (not reaped: this handle holds it) and a valid signal.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid);
    }

    /// The exit status, if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the process printed so far.
    pub fn output(&self) -> &CapturedOutput {
        &self.output
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("----- {} (pid {}) output, last 200 lines -----", self.name, self.pid);
            eprintln!("{}", self.output.tail(200));
            eprintln!("----- end of {} output -----", self.name);
        }
    }
}

// ---- the tokenproxy binary ---------------------------------------------------------------------

/// `tokenproxy ARGS…` with nothing of the developer's shell that would change what it does: no `TOKENPROXY_*`
/// variable (the test's config alone decides), no `RUST_LOG` (the config's `[log] level` decides) and no
/// `TP_FAILPOINT`. The caller adds its own with `.env(…)`.
pub fn tokenproxy_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    command.args(args);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("TOKENPROXY_") || name == "RUST_LOG" || name == "TP_FAILPOINT" {
            command.env_remove(key);
        }
    }
    command
}

/// Spawns `tokenproxy ARGS…` in `dir` with `env` added (see [`tokenproxy_command`]) as a [`ChildProcess`] named
/// `name`, without waiting for anything: for the one-shot commands (`login`, `logout`, `token`, `check`) and for a
/// run expected to die early (at a failpoint).
pub fn spawn_tokenproxy(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
    let mut command = tokenproxy_command(args);
    command.current_dir(dir).envs(env.iter().copied());
    ChildProcess::spawn(name, command, None)
}

/// Writes `[server]`, `[admin]` (both on port 0 of 127.0.0.1), `[log]` and `[state]` (`dir/state`) followed by
/// `body` (the providers and routes) to `dir/tokenproxy.toml`, and returns its path.
pub fn write_proxy_config(dir: &Path, body: &str) -> PathBuf {
    let config_path = dir.join("tokenproxy.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"1s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [log]\nformat = \"pretty\"\nlevel = \"info,tokenproxy=debug\"\n\n\
         [state]\ndir = {}\n\n{body}",
        toml_string(&dir.join("state").to_string_lossy()),
    );
    std::fs::write(&config_path, &config).unwrap_or_else(|e| panic!("cannot write {config_path:?}: {e}"));
    config_path
}

/// The addresses in tokenproxy's "tokenproxy listening" line, as `PROXY ADMIN`, in the JSON or the pretty format.
fn listening_line(line: &str) -> Option<String> {
    let (proxy, admin) = match serde_json::from_str::<Value>(line) {
        Ok(entry) if entry["message"] == "tokenproxy listening" => {
            (entry["proxy"].as_str()?.to_owned(), entry["admin"].as_str()?.to_owned())
        }
        Ok(_) => return None,
        Err(_) if line.contains("tokenproxy listening") => {
            let field = |name: &str| {
                let at = line.find(name)? + name.len();
                line[at..].split_whitespace().next().map(str::to_owned)
            };
            (field(" proxy=")?, field(" admin=")?)
        }
        Err(_) => return None,
    };
    Some(format!("{proxy} {admin}"))
}

/// The real `tokenproxy run --config FILE` on loopback port 0, with its config in a directory (a temporary one it
/// owns, or one the test keeps across several runs).
pub struct TokenProxyProcess {
    process: ChildProcess,
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The config file it runs.
    pub config_path: PathBuf,
    /// When the process was spawned (for rate bounds on token calls).
    pub started_at: Instant,
    http: Client,
    _dir: Option<tempfile::TempDir>,
}

impl TokenProxyProcess {
    /// Writes the config ([`write_proxy_config`]) in `dir`, which it keeps until dropped, and runs it.
    pub async fn start(dir: tempfile::TempDir, body: &str) -> TokenProxyProcess {
        let mut proxy = Self::start_in(dir.path(), body, &[]).await;
        proxy._dir = Some(dir);
        proxy
    }

    /// As [`TokenProxyProcess::start`] in a directory the caller keeps (a later run can use the same config and
    /// state), with `env` added to tokenproxy's environment.
    pub async fn start_in(dir: &Path, body: &str, env: &[(&str, &str)]) -> TokenProxyProcess {
        Self::run(&write_proxy_config(dir, body), env).await
    }

    /// Runs `tokenproxy run --config CONFIG` (in the config's directory, with `env` added to a clean environment, see
    /// [`tokenproxy_command`]) and waits for its listening line: the config must listen on port 0 or a free port, and
    /// log at `info` for tokenproxy (the default). Panics with its output if it exits first.
    pub async fn run(config_path: &Path, env: &[(&str, &str)]) -> TokenProxyProcess {
        let config = config_path.to_string_lossy().into_owned();
        let mut command = tokenproxy_command(&["run", "--config", &config]);
        command.current_dir(config_path.parent().expect("the config is in a directory")).envs(env.iter().copied());
        let started_at = Instant::now();
        let ready = ReadyLine { stdout: false, parse: listening_line };
        let mut process = ChildProcess::spawn("tokenproxy", command, Some(ready));
        let said = match process.ready().await {
            Ok(said) => said,
            Err(status) => panic!(
                "tokenproxy exited at startup ({status:?}); config:\n{}\noutput:\n{}",
                std::fs::read_to_string(config_path).unwrap_or_default(),
                process.output.tail(80)
            ),
        };
        let (addr, admin) = said.split_once(' ').expect("two addresses");
        TokenProxyProcess {
            process,
            addr: addr.parse().expect("the proxy address"),
            admin: admin.parse().expect("the admin address"),
            config_path: config_path.to_owned(),
            started_at,
            http: Client::new(),
            _dir: None,
        }
    }

    /// `http://proxy{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://admin{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends `signal` (`libc::SIGHUP`, …).
    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// SIGTERM, then waits (up to [`EXIT_WITHIN`]) for the exit and returns its status; [`TokenProxyProcess::logs`]
    /// then holds everything it logged.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.signal(libc::SIGTERM);
        self.wait_exit(EXIT_WITHIN).await
    }

    /// Waits up to `limit` for the process to exit by itself; panics with its output if it does not.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match self.process.wait_exit_async(limit).await {
            Some(status) => status,
            None => panic!("tokenproxy did not exit within {limit:?}:\n{}", self.process.output.tail(60)),
        }
    }

    /// A metric's value from `/metrics`: the sum of the samples of `name_and_labels` (a name, or a name with its
    /// labels as printed, e.g. `tokenproxy_replays_total{outcome="success",route="api"}`), 0 when absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        self.metric_sample(name_and_labels).await.unwrap_or(0.0)
    }

    /// As [`TokenProxyProcess::metric`], `None` when no sample has that name and labels.
    pub async fn metric_sample(&self, name_and_labels: &str) -> Option<f64> {
        metric_sample(&self.admin_get("/metrics").await.text(), name_and_labels)
    }

    /// Waits until `/readyz` answers 200 (panics after [`READY_WITHIN`]), and returns its body.
    pub async fn wait_ready(&self) -> Value {
        super::wait_ready(&self.http, &self.admin_url("/readyz")).await
    }

    /// A request to the proxy listener; `path_and_query` starts with `/`.
    pub async fn request(&self, method: Method, path_and_query: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
        let url = self.url(path_and_query);
        self.http
            .try_send(method, &url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}", self.process.output.tail(40)))
    }

    /// `GET` on the proxy listener.
    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.request(Method::GET, path_and_query, &[], Bytes::new()).await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        self.http.get(&self.admin_url(path)).await
    }

    /// `POST` (empty body) on the admin listener.
    pub async fn admin_post(&self, path: &str) -> Reply {
        self.http.post(&self.admin_url(path), Bytes::new()).await
    }

    /// Everything tokenproxy printed so far, line by line as printed (its log is on stderr).
    pub fn logs(&self) -> String {
        self.process.output.lines()
    }

    /// The child process.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}
