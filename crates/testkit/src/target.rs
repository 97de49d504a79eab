//! Local TCP targets that count the connections they accept: the proof that a refused
//! outbound call never left the process, and stand-ins for services that speak another
//! protocol (a Redis or RabbitMQ port) without touching the shared ones.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

/// A listener on `127.0.0.1:0` that counts accepted connections and answers each with
/// fixed bytes. Dropping it stops it.
pub struct TcpTarget {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpTarget {
    /// Reads what the client sends first (up to a moment of silence), answers `reply`
    /// and closes: an HTTP answer, a Redis error line, an AMQP protocol header.
    pub async fn answering(reply: &'static [u8]) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf))
                        .await;
                    let _ = socket.write_all(reply).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    /// An HTTP server answering every request with `status` and `body`.
    pub async fn http(status_line: &'static str, body: &'static str) -> std::io::Result<Self> {
        let reply = format!(
            "HTTP/1.1 {status_line}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        Self::answering(Box::leak(reply.into_boxed_str()).as_bytes()).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A local port nothing listens on (bound, then released).
pub async fn closed_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}
