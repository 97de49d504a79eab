//! Change notifications over PostgreSQL `LISTEN/NOTIFY`: a writer calls [`notify`] inside
//! its transaction (delivered on commit, never for a rolled-back change); a reader gets
//! each payload from [`listen`], and [`Notice::Resync`] whenever it (re)connects, because
//! notifications sent while it was away are lost and every cached value may be stale.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::{Db, DbError, GenericClient};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// One changed key (e.g. a workspace id).
    Changed(String),
    /// Listening (again): anything may have changed meanwhile.
    Resync,
}

/// The channel of `topic` in this deployment's schema.
pub fn channel(db: &Db, topic: &str) -> String {
    format!("{}.{topic}", db.schema())
}

/// Announces a change; inside a transaction it is sent on commit.
pub async fn notify(
    client: &impl GenericClient,
    channel: &str,
    payload: &str,
) -> Result<(), DbError> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await?;
    Ok(())
}

/// Listens on `channel` until `shutdown`, reconnecting (1 s, doubling to 30 s) after any
/// loss. The receiver sees `Resync` after every (re)connect.
pub fn listen(db: &Db, channel: String, shutdown: CancellationToken) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(1024);
    let config = db.pg_config().clone();
    tokio::spawn(async move {
        let mut pause = Duration::from_secs(1);
        while !shutdown.is_cancelled() {
            match listen_once(&config, &channel, &tx, &shutdown).await {
                Ok(()) => pause = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, channel, retry_in = ?pause, "change notifications lost; reconnecting");
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    });
    rx
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    tx: &mpsc::Sender<Notice>,
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            let stop = message.is_err();
            if messages_tx.send(message).is_err() || stop {
                break;
            }
        }
    });
    let quoted = channel.replace('"', "\"\"");
    client
        .batch_execute(&format!("LISTEN \"{quoted}\""))
        .await?;
    if tx.send(Notice::Resync).await.is_err() {
        driver.abort();
        return Ok(());
    }
    let result = loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            message = messages.recv() => message,
        };
        match message {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if tx
                    .send(Notice::Changed(n.payload().to_owned()))
                    .await
                    .is_err()
                {
                    break Ok(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break Err(e),
            // The connection ended without an error (server shut down).
            None => break client.simple_query("SELECT 1").await.map(|_| ()),
        }
    };
    driver.abort();
    result
}
