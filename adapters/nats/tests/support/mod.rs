//! A nats-server owned by a test: its own free port and JetStream directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tidings_core::testkit::ServerProcess;

/// A nats-server child process with JetStream, on a free loopback port.
pub struct Server {
    pub port: u16,
    conf: Option<PathBuf>,
    process: ServerProcess,
}

pub use tidings_core::testkit::free_port;

impl Server {
    /// Starts a server; `conf` is the text of a config file, if any.
    pub async fn start(conf: Option<&str>) -> Server {
        let process = ServerProcess::new("nats");
        let conf = conf.map(|text| {
            let path = process.dir().join("server.conf");
            std::fs::write(&path, text).expect("writing the config");
            path
        });
        let mut server = Server {
            port: free_port(),
            conf,
            process,
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
        .arg(self.process.dir().join("js"));
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        self.process
            .start(cmd, "install it with `apt-get install nats-server`");
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
        self.process.kill();
    }

    /// Kills the server and starts it again on the same port and directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
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
