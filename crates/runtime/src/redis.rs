//! One way to open Redis for every role: a self-healing `ConnectionManager` with short timeouts, so a
//! Redis outage turns into quick errors the callers degrade on, never hung events.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

pub async fn connect(url: &SecretString) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url.expose_secret())?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

/// Deletes every key matching `pattern` (SCAN, then DEL in chunks); returns how many.
pub async fn delete_matching(
    conn: &mut ConnectionManager,
    pattern: &str,
) -> redis::RedisResult<usize> {
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(conn, pattern).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    for chunk in keys.chunks(500) {
        let _: () = redis::AsyncCommands::del(conn, chunk).await?;
    }
    Ok(keys.len())
}
