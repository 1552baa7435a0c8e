//! A broker or database server a test runs as its own process (a node of a
//! cluster, a server to kill and restart), with a data directory of its
//! own that outlives restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A server process the test owns, and its data directory.
///
/// [`kill`](Self::kill) is a crash (SIGKILL); the directory stays, so the
/// server can be started again from its own data. When dropped, the
/// process is killed and the directory removed — kept (and named on
/// stderr) when the test is failing, for a look at the server's logs.
#[derive(Debug)]
pub struct ServerProcess {
    dir: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// A fresh data directory under the system's temporary directory
    /// (`tk-<name>-<random>`); no process yet.
    ///
    /// # Panics
    /// When the directory cannot be created.
    pub fn new(name: &str) -> ServerProcess {
        let dir = std::env::temp_dir().join(super::unique(name));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", dir.display()));
        ServerProcess { dir, child: None }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `command` (output discarded) as the server, killing a
    /// previous one first. `install` says how to get the program when it
    /// cannot be run.
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn start(&mut self, mut command: Command, install: &str) {
        self.kill();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} failed ({e}); {install}",
                    command.get_program().to_string_lossy()
                )
            });
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL (a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "kept {} (the failed test's server) for a look",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
