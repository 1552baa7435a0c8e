//! A program a test runs as a child process: a plain Node.js peer of an
//! interop test, or the test binary itself as a service to signal; its
//! stdout read line by line, every wait bounded, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// A running child process.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    script: PathBuf,
}

impl ChildProcess {
    /// Starts `node script args...`. The script's directory must hold the
    /// `node_modules` that `npm ci` installs from its committed lock file.
    ///
    /// # Panics
    /// When Node.js or the installed packages are missing, with how to get them.
    pub fn node(script: impl AsRef<Path>, args: &[&str]) -> ChildProcess {
        let script = script.as_ref().to_path_buf();
        let dir = script.parent().unwrap_or(Path::new("."));
        assert!(
            dir.join("node_modules").is_dir(),
            "the Node.js peers' packages are not installed: run `npm ci --prefix {}` \
             (scripts/test.sh does)",
            dir.display()
        );
        let mut command = Command::new("node");
        command.arg(&script).args(args);
        Self::spawn(
            command,
            script,
            "install Node.js 20 (`apt-get install nodejs npm`)",
        )
    }

    /// Starts `program args...` with `envs` added to its environment.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn start(program: impl AsRef<Path>, args: &[&str], envs: &[(&str, &str)]) -> ChildProcess {
        let program = program.as_ref().to_path_buf();
        let mut command = Command::new(&program);
        command.args(args).envs(envs.iter().copied());
        Self::spawn(command, program, "check the path")
    }

    /// Starts `command`, which dies with the test process (see
    /// [`ServerProcess::start`](super::ServerProcess::start)).
    fn spawn(command: Command, script: PathBuf, hint: &str) -> ChildProcess {
        let mut command = super::server::dies_with_parent(command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); {hint}", script.display()));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        // A thread, not a task: the pipe is read with blocking reads.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProcess {
            child,
            lines,
            script,
        }
    }

    /// Sends SIGTERM (with the system's `kill`, to this child's PID only).
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Whether the child exited within `within`, and how.
    pub async fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next line, or `None` when the program ended first.
    ///
    /// # Panics
    /// When no line comes within `within`.
    pub async fn line(&mut self, within: Duration) -> Option<String> {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(line) => line,
            Err(_) => panic!(
                "{} printed nothing within {within:?}",
                self.script.display()
            ),
        }
    }

    /// Waits for a line that ends with `text` (a test harness prints the
    /// test's name before the test's own output on the same line), skipping
    /// others.
    ///
    /// # Panics
    /// When it does not come within `within` or the program ends first.
    pub async fn wait_for(&mut self, text: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.line(left).await {
                Some(line) if line.ends_with(text) => return,
                Some(_) => {}
                None => panic!("{} ended before printing `{text}`", self.script.display()),
            }
        }
    }

    /// Every line until the program exits, and whether it exited with 0.
    ///
    /// # Panics
    /// When it does not exit within `within`.
    pub async fn finish(mut self, within: Duration) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.line(left).await {
                Some(line) => lines.push(line),
                None => break,
            }
        }
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        (lines, ok)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
