//! Plain Node.js programs as peers of an interop test: started with `node`,
//! their stdout read line by line, every wait bounded, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// A running `node <script> <args...>`.
#[derive(Debug)]
pub struct NodePeer {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    script: PathBuf,
}

impl NodePeer {
    /// Starts `node script args...`. The script's directory must hold the
    /// `node_modules` that `npm ci` installs from its committed lock file.
    ///
    /// # Panics
    /// When Node.js or the installed packages are missing, with how to get them.
    pub fn start(script: impl AsRef<Path>, args: &[&str]) -> NodePeer {
        let script = script.as_ref().to_path_buf();
        let dir = script.parent().unwrap_or(Path::new("."));
        assert!(
            dir.join("node_modules").is_dir(),
            "the Node.js peers' packages are not installed: run `npm ci --prefix {}` \
             (scripts/test.sh does)",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(&script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}); install Node.js 20 (`apt-get install nodejs npm`)")
            });
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
        NodePeer {
            child,
            lines,
            script,
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

    /// Waits for a line equal to `text`, skipping others.
    ///
    /// # Panics
    /// When it does not come within `within` or the program ends first.
    pub async fn wait_for(&mut self, text: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.line(left).await {
                Some(line) if line == text => return,
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

impl Drop for NodePeer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
