//! The real `keygate serve` binary as a child process, its log streamed to
//! the test so it can wait for lines (the bound address, a reload) instead
//! of sleeping.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `keygate serve -c CONFIG`, killed on drop.
pub struct Served {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    /// Starts the binary with `RUST_LOG=info` and the given extra variables.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Served {
        Self::start_logging(config, "info", env)
    }

    pub fn start_logging(config: &Path, log: &str, env: &[(&str, &str)]) -> Served {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
        command.args(["serve", "-c"]).arg(config);
        Self::spawn(command, log, env)
    }

    /// `keygate serve` with no `-c`: the config named by `KEYGATE_CONFIG`,
    /// as the systemd unit runs it.
    pub fn start_from_env(config: &Path, env: &[(&str, &str)]) -> Served {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
        command.arg("serve");
        let config = config.to_str().unwrap();
        let env: Vec<(&str, &str)> = env.iter().copied().chain([("KEYGATE_CONFIG", config)]).collect();
        Self::spawn(command, "info", &env)
    }

    fn spawn(mut command: Command, log: &str, env: &[(&str, &str)]) -> Served {
        command
            .env("RUST_LOG", log)
            .env_remove("KEYGATE_REDIS_URL")
            .env_remove("KEYGATE_CONFIG")
            // Only a test that binds its own NOTIFY_SOCKET gets notifications
            // (tests/systemd_notify.rs), never a service manager running the tests.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Served { child, lines, seen: Vec::new() }
    }

    /// Waits (up to 30 s) for a log line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with `{needle}`; log so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The `address=` of the first line containing `message`.
    pub fn address(&mut self, message: &str) -> String {
        let line = self.wait_for_line(message);
        line.split("address=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().to_owned()
    }

    /// The public listener's address.
    pub fn gateway_address(&mut self) -> String {
        self.address("keygate listening")
    }

    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status and whole log.
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        // The reader thread ends at EOF; collect what it sent.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one CLI run of the binary answered.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `keygate ARGS` (the binary, to its end) with `env` set and no
/// `KEYGATE_REDIS_URL` or `KEYGATE_CONFIG` from the test's environment, off
/// the runtime's workers (they may be serving a gateway meanwhile).
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command.args(args).env_remove("KEYGATE_REDIS_URL").env_remove("KEYGATE_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    CliRun { code: out.status.code().unwrap_or(-1), stdout: text(&out.stdout), stderr: text(&out.stderr) }
}

/// [`run_cli`] of `keygate ARGS -c CONFIG`.
pub async fn run_cli_with_config(config: &Path, args: &[&str]) -> CliRun {
    let config = config.to_str().unwrap();
    let args: Vec<&str> = args.iter().copied().chain(["-c", config]).collect();
    run_cli(&args, &[]).await
}
