//! A nats-server owned by a test: its own free port and JetStream directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server child process with JetStream, on a free loopback port.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    conf: Option<PathBuf>,
}

pub use tidings_core::testkit::free_port;

impl Server {
    /// Starts a server; `conf` is the text of a config file, if any.
    pub async fn start(conf: Option<&str>) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "tidings-nats-test-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("creating the JetStream directory");
        let conf = conf.map(|text| {
            let path = dir.join("server.conf");
            std::fs::write(&path, text).expect("writing the config");
            path
        });
        let mut server = Server {
            child: None,
            port: free_port(),
            dir,
            conf,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and directory; returns once it accepts connections.
    pub async fn spawn(&mut self) {
        let mut cmd = Command::new("nats-server");
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.dir.join("js"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run nats-server ({e}); install it with `apt-get install nats-server`")
        });
        self.child = Some(child);
        // Ready when it accepts connections (about 0.1 s); bounded.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not start within 15 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (SIGKILL: a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port and directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of `n` servers started by the test, routed to each other, with
/// clustered JetStream (`server_name` n0, n1, ...), and room for the
/// conformance suite's 1 MiB payload with its headers (`max_payload` 2 MiB).
pub async fn cluster(n: usize) -> Vec<Server> {
    let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for (i, port) in routes.iter().enumerate() {
        let others: Vec<String> = routes
            .iter()
            .filter(|p| *p != port)
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let conf = format!(
            "server_name: n{i}\nmax_payload: 2097152\ncluster {{\n  name: tidings\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
            others.join(", ")
        );
        nodes.push(Server::start(Some(&conf)).await);
    }
    nodes
}
