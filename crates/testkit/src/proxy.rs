//! A TCP forwarder to put between a role and a shared service (RabbitMQ, Redis), so a
//! test can make the service "restart" for its own clients only: [`TcpProxy::cut`] drops
//! every connection through the proxy and refuses new ones, [`TcpProxy::restore`] listens
//! again on the same port. The real service and every other test's connections are
//! untouched, so chaos tests can run in parallel with the rest of the suite.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};

/// How long `restore` keeps trying to bind the old port (it may linger briefly).
const REBIND_DEADLINE: Duration = Duration::from_secs(5);

/// Forwards `127.0.0.1:<port>` to a target `host:port`. Dropping it stops forwarding.
pub struct TcpProxy {
    addr: SocketAddr,
    target: String,
    accepted: Arc<AtomicUsize>,
    /// Milliseconds every forwarded chunk waits (a slow network), 0 for none.
    latency_ms: Arc<AtomicU64>,
    running: Mutex<Option<Running>>,
}

/// One listening period, between a start/restore and the next cut.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards every connection to `target`
    /// (`host:port`, resolved on each connection).
    pub async fn start(target: impl Into<String>) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = TcpProxy {
            addr: listener.local_addr()?,
            target: target.into(),
            accepted: Arc::default(),
            latency_ms: Arc::default(),
            running: Mutex::new(None),
        };
        proxy.listen(listener);
        Ok(proxy)
    }

    /// The address clients connect to; the same across cuts and restores.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its `host:port` replaced by the proxy's, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/%2f` → `amqp://guest:guest@127.0.0.1:40123/%2f`.
    /// `None` if `url` has no `scheme://` authority.
    pub fn url_via(&self, url: &str) -> Option<String> {
        let (scheme, rest) = url.split_once("://")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let userinfo = authority
            .rsplit_once('@')
            .map(|(userinfo, _)| format!("{userinfo}@"))
            .unwrap_or_default();
        Some(format!("{scheme}://{userinfo}{}{path}", self.addr))
    }

    /// Connections accepted so far, across every listening period.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Like a slow network: from now on every chunk forwarded, either way, on every
    /// connection, waits `latency` first (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(
            u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Whether the proxy is currently listening.
    pub fn is_up(&self) -> bool {
        self.slot().is_some()
    }

    /// Like the service dying: stops listening (new connections are refused) and resets
    /// every live connection, so both the clients and the service see the peer vanish.
    /// Returns once all of them are closed. A no-op if already cut.
    pub async fn cut(&self) {
        let running = self.slot().take();
        if let Some(Running { stop, task }) = running {
            let _ = stop.send(());
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "proxy task ended abnormally");
            }
        }
    }

    /// Like the service coming back: listens again on the same port. A no-op if up.
    pub async fn restore(&self) -> io::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < REBIND_DEADLINE => {
                    tracing::debug!(error = %e, addr = %self.addr, "rebinding the proxy port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.listen(listener);
        Ok(())
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        // A panic elsewhere cannot leave this state half-written: recover it.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn listen(&self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(
            listener,
            self.target.clone(),
            self.accepted.clone(),
            self.latency_ms.clone(),
            stopped,
        ));
        *self.slot() = Some(Running { stop, task });
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(Running { task, .. }) = self.slot().take() {
            // Aborting drops the listener and the connection set, which aborts every pipe.
            task.abort();
        }
    }
}

/// Accepts until told to stop, then resets every connection it forwarded.
async fn serve(
    listener: TcpListener,
    target: String,
    accepted: Arc<AtomicUsize>,
    latency_ms: Arc<AtomicU64>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut pipes = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            incoming = listener.accept() => match incoming {
                Ok((client, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    pipes.spawn(pipe(client, target.clone(), latency_ms.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "proxy accept failed"),
            },
            // Reap finished pipes so the set does not grow with every connection.
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
    drop(listener);
    // Aborting a pipe drops both of its sockets; with zero linger that is a reset.
    pipes.shutdown().await;
}

async fn pipe(client: TcpStream, target: String, latency_ms: Arc<AtomicU64>) {
    let server = match TcpStream::connect(&target).await {
        Ok(server) => server,
        Err(e) => {
            tracing::debug!(error = %e, %target, "proxy cannot reach its target");
            return;
        }
    };
    for stream in [&client, &server] {
        // RST rather than FIN when cut: the abrupt end a crashed service gives.
        let _ = stream.set_zero_linger();
        let _ = stream.set_nodelay(true);
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending ends the connection.
    tokio::select! {
        _ = forward(client_read, server_write, &latency_ms) => {}
        _ = forward(server_read, client_write, &latency_ms) => {}
    }
}

/// Copies one direction, each chunk after the current latency.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency_ms: &AtomicU64,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let latency = latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(stream)
    }

    #[tokio::test]
    async fn a_cut_drops_live_connections_and_refuses_new_ones_until_restored() {
        let proxy = TcpProxy::start(echo_server().await.to_string())
            .await
            .unwrap();
        let mut live = round_trip(proxy.addr()).await.unwrap();

        proxy.cut().await;
        let mut buf = [0u8; 1];
        let read = live.read(&mut buf).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the live connection ended: {read:?}"
        );
        assert!(
            TcpStream::connect(proxy.addr()).await.is_err(),
            "refused while cut"
        );
        assert!(!proxy.is_up());

        let port = proxy.addr().port();
        proxy.restore().await.unwrap();
        assert_eq!(proxy.addr().port(), port);
        round_trip(proxy.addr()).await.unwrap();
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn a_latency_delays_every_chunk() {
        let proxy = TcpProxy::start(echo_server().await.to_string())
            .await
            .unwrap();
        proxy.set_latency(Duration::from_millis(150));
        let started = tokio::time::Instant::now();
        round_trip(proxy.addr()).await.unwrap();
        // There and back: two chunks, each held up.
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_url_is_pointed_at_the_proxy_keeping_credentials_and_path() {
        let proxy = TcpProxy::start("127.0.0.1:5672").await.unwrap();
        let port = proxy.addr().port();
        assert_eq!(
            proxy
                .url_via("amqp://guest:guest@127.0.0.1:5672/%2f")
                .unwrap(),
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        );
        assert_eq!(
            proxy.url_via("redis://127.0.0.1:6379").unwrap(),
            format!("redis://127.0.0.1:{port}")
        );
        assert_eq!(proxy.url_via("not a url"), None);
    }
}
