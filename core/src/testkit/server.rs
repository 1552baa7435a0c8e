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
    /// The server is killed when the test process dies, even by SIGKILL
    /// (a CI timeout), which runs no `Drop`: it is started through
    /// util-linux's `setpriv --pdeathsig KILL` where that exists (Debian's
    /// essential `util-linux`), so no server outlives its test holding a
    /// port. The signal follows the thread that started the server: start
    /// it from the test's own thread (see [`dies_with_parent`]).
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn start(&mut self, command: Command, install: &str) {
        self.kill();
        let mut command = dies_with_parent(command);
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

/// `command` run through `setpriv --pdeathsig KILL`, which sets the
/// parent-death signal and `exec`s it (so the child's pid is the
/// server's): killed when the thread that starts it ends, which for a test
/// must be the test's own thread (not `tokio::spawn`, `spawn_blocking`, a
/// `std::thread`, or a static shared across tests). `command` itself where
/// `setpriv` is not installed or the program is not there (its start then
/// fails as it would have). Carries the program, arguments, environment
/// changes and working directory; not standard streams (set them on the
/// command returned), `env_clear`, `uid`/`gid`, process groups or
/// `pre_exec`. Written this way because setting the signal in
/// the child ourselves (`pre_exec` with `prctl`) would need `unsafe`.
pub fn dies_with_parent(command: Command) -> Command {
    const SETPRIV: &str = "/usr/bin/setpriv";
    // A program that is not there is left to fail as it is, so the
    // caller's panic says how to install it (`setpriv` would start and
    // then fail to run it).
    if !Path::new(SETPRIV).exists() || !installed(command.get_program()) {
        return command;
    }
    let mut wrapped = Command::new(SETPRIV);
    wrapped
        .args(["--pdeathsig", "KILL", "--"])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// Whether `program` names an executable file: as a path, or in a
/// directory of `PATH`.
fn installed(program: &std::ffi::OsStr) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let program = Path::new(program);
    if program.components().count() > 1 {
        return executable(program);
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    /// Run by the test below in a process of its own: starts a server
    /// (`sleep`), prints its pid and waits to be killed.
    #[test]
    #[ignore = "a helper process of `a_server_dies_with_its_test_process`"]
    fn server_process_helper() {
        if std::env::var_os("TIDINGS_SERVER_PROCESS_HELPER").is_none() {
            return;
        }
        let mut server = ServerProcess::new("helper");
        let mut sleep = Command::new("sleep");
        sleep.arg("120");
        server.start(sleep, "install coreutils");
        let pid = server.child.as_ref().map(Child::id).expect("started");
        // Removed here, as the helper is killed before its `Drop` runs:
        // the server only needs it to start.
        let _ = std::fs::remove_dir_all(server.dir());
        // `setpriv` sets the signal, then runs the server: killed before
        // that, this process would leave it running (in use, the window
        // is the moment after a start).
        let comm = Path::new("/proc").join(pid.to_string()).join("comm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("server-pid {pid}");
        std::thread::sleep(Duration::from_secs(120));
    }

    /// A missing program still fails at the start, with how to install it.
    #[test]
    #[should_panic(expected = "install the missing server")]
    fn a_missing_server_fails_with_its_install_hint() {
        assert!(installed(std::ffi::OsStr::new("sh")));
        assert!(installed(std::ffi::OsStr::new("/bin/sh")));
        assert!(!installed(std::ffi::OsStr::new("tidings-no-such-server")));
        let mut server = ServerProcess::new("missing");
        server.start(
            Command::new("tidings-no-such-server"),
            "install the missing server",
        );
    }

    /// A test process killed with SIGKILL (no `Drop` runs) takes its
    /// servers with it.
    #[test]
    fn a_server_dies_with_its_test_process() {
        assert!(
            Path::new("/usr/bin/setpriv").exists(),
            "setpriv is missing: install Debian's util-linux"
        );
        /// Kills the helper if the test fails before it does.
        struct Helper(Child);
        impl Drop for Helper {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut helper = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "testkit::server::tests::server_process_helper"])
            .args(["--ignored", "--nocapture", "--test-threads", "1"])
            .env("TIDINGS_SERVER_PROCESS_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the helper process");
        let stdout = helper.stdout.take().expect("piped");
        let mut helper = Helper(helper);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // After libtest's `test <name> ... ` on the same line.
                if let Some((_, pid)) = line.split_once("server-pid ") {
                    let _ = tx.send(pid.trim().to_owned());
                    return;
                }
            }
        });
        let pid = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the helper's server pid");
        let proc_dir = Path::new("/proc").join(&pid);
        assert!(proc_dir.exists(), "the server runs");
        helper.0.kill().expect("SIGKILL the helper");
        helper.0.wait().expect("reaped");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The server is the helper's child, now reparented: gone from /proc
        // once killed and reaped by init.
        while proc_dir.exists()
            && !std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z "))
        {
            assert!(
                Instant::now() < deadline,
                "the server {pid} outlived its test process by 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
