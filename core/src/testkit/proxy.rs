use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A TCP proxy in front of a broker that injects connection faults on command.
///
/// Point the client at [`addr`](FaultProxy::addr) instead of the broker; then
/// [`cut`](FaultProxy::cut) closes every open connection (as a broker crash or
/// a dropped network would), [`refuse`](FaultProxy::refuse) closes new
/// connections as they arrive, [`stall`](FaultProxy::stall) stops
/// forwarding bytes while keeping the sockets open, and
/// [`retarget`](FaultProxy::retarget) sends new connections elsewhere while
/// open ones stay (as a DNS name or a virtual address moved to a promoted
/// replica would).
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// use tidings_core::testkit::FaultProxy;
/// let proxy = FaultProxy::start("127.0.0.1:6379").await?;
/// let url = format!("redis://{}", proxy.addr());
/// // ... connect a client to `url`, then:
/// proxy.cut();
/// # Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    listener: tokio::task::JoinHandle<()>,
}

struct State {
    connections: Mutex<JoinSet<()>>,
    /// Where new connections go.
    target: Mutex<SocketAddr>,
    refuse: watch::Sender<bool>,
    stall: watch::Sender<bool>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: impl tokio::net::ToSocketAddrs) -> io::Result<FaultProxy> {
        let target = resolve(target).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            connections: Mutex::new(JoinSet::new()),
            target: Mutex::new(target),
            refuse: watch::channel(false).0,
            stall: watch::channel(false).0,
        });
        let accept_state = state.clone();
        let listener = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *accept_state.refuse.borrow() {
                    drop(client);
                    continue;
                }
                let stall = accept_state.stall.subscribe();
                let target = *accept_state
                    .target
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                accept_state.lock().spawn(forward(client, target, stall));
            }
        });
        Ok(FaultProxy {
            addr,
            state,
            listener,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection; new ones are accepted as before.
    pub fn cut(&self) {
        self.state.lock().abort_all();
    }

    /// While `true`, new connections are closed as soon as they are accepted.
    pub fn refuse(&self, refuse: bool) {
        self.state.refuse.send_replace(refuse);
    }

    /// While `true`, no bytes are forwarded in either direction; sockets stay open.
    pub fn stall(&self, stall: bool) {
        self.state.stall.send_replace(stall);
    }

    /// Forwards new connections to `target`; open ones stay with the old one.
    pub async fn retarget(&self, target: impl tokio::net::ToSocketAddrs) -> io::Result<()> {
        let target = resolve(target).await?;
        *self.state.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        Ok(())
    }
}

async fn resolve(target: impl tokio::net::ToSocketAddrs) -> io::Result<SocketAddr> {
    tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the target"))
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.state.lock().abort_all();
    }
}

async fn forward(client: TcpStream, target: SocketAddr, stall: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, stall.clone()) => {}
        _ = pump(server_read, client_write, stall) => {}
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut stall: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stall.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
