//! Test harness shared by every crate's integration tests and the benchmarks.
//!
//! Each test gets its own [`TestEnv`]: a unique RabbitMQ name prefix and Redis key
//! prefix, so tests run in parallel against the real local services and leave nothing
//! behind (cleanup runs on drop, even when the test panics). Waiting is always for a
//! condition with a deadline ([`wait_until`]), never a fixed sleep.

pub mod proxy;
pub mod target;

use std::{future::Future, time::Duration};

use redis::AsyncCommands;
use secrecy::SecretString;
use thena_broker::Topology;

/// The local services (the same defaults as the binary's configuration).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thena_vitally".into())
}

/// A fresh 32-byte key (base64) for encrypting integration records in tests.
pub const TEST_INTEGRATIONS_KEY: &str = "dGVzdC1rZXktdGhhdC1pcy0zMi1ieXRlcy1sb25nISE=";

/// One test's private corner of RabbitMQ and Redis.
pub struct TestEnv {
    /// Exchange/queue prefix (`NAME_PREFIX`).
    pub prefix: String,
    /// Redis key prefix (`REDIS_PREFIX`).
    pub redis_prefix: String,
    /// PostgreSQL schema (`DATABASE_SCHEMA`), dropped at cleanup.
    pub schema: String,
    pub topology: Topology,
    cleaned: bool,
}

impl TestEnv {
    /// Tiny delay tiers so retries and deferrals take well under a second.
    pub fn new() -> Self {
        Self::with_tiers(vec![
            Duration::from_millis(100),
            Duration::from_millis(250),
            Duration::from_millis(500),
        ])
    }

    pub fn with_tiers(tiers: Vec<Duration>) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{}", &id[..12]);
        Self {
            topology: Topology::new(prefix.clone())
                .with_delay_tiers(tiers)
                .with_delivery_limit(3),
            redis_prefix: prefix.clone(),
            schema: prefix.replace('-', "_"),
            prefix,
            cleaned: false,
        }
    }

    pub fn amqp_url(&self) -> SecretString {
        SecretString::from(amqp_url())
    }

    pub fn redis_url(&self) -> SecretString {
        SecretString::from(redis_url())
    }

    pub fn database_url(&self) -> SecretString {
        SecretString::from(database_url())
    }

    /// This test's database handle (migrated).
    pub async fn db(&self) -> thena_store::Db {
        thena_store::Db::connect(&self.database_url(), &self.schema)
            .await
            .expect("PostgreSQL (DATABASE_URL)")
    }

    /// Environment-style overrides for `Config::defaults_with`, pointing at this env.
    pub fn config_overrides(&self) -> Vec<(&'static str, String)> {
        let tiers = self
            .topology
            .delay_tiers
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("NAME_PREFIX", self.prefix.clone()),
            ("REDIS_PREFIX", self.redis_prefix.clone()),
            ("DATABASE_URL", database_url()),
            ("DATABASE_SCHEMA", self.schema.clone()),
            ("HEALTH_PROBE_INTERVAL", "300ms".into()),
            ("INTEGRATIONS_KEY", TEST_INTEGRATIONS_KEY.to_string()),
            ("RETRY_TIERS", tiers),
            ("DELIVERY_LIMIT", self.topology.delivery_limit.to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("HTTP_ADDR", "127.0.0.1:0".into()),
            ("SHUTDOWN_GRACE", "5s".into()),
            ("INTEGRATION_REFRESH", "200ms".into()),
            // A killed consumer's locks free themselves within seconds, not a minute;
            // one event's work (3/4 of it) still holds the budget wait and one call.
            ("REQUEST_LOCK_TTL", "8s".into()),
            ("VITALLY_TIMEOUT", "5s".into()),
        ]
    }

    /// A channel on a fresh connection, with the topology declared.
    pub async fn channel(&self) -> anyhow::Result<lapin::Channel> {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        Ok(channel)
    }

    /// Messages ready in `queue` (passive declare).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        let _ = connection.close(200, "done".into()).await;
        Ok(declared.message_count())
    }

    /// Deletes this test's queues, exchanges, Redis keys and PostgreSQL schema.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        cleanup(
            self.topology.clone(),
            self.redis_prefix.clone(),
            self.schema.clone(),
        )
        .await;
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A panicking test still cleans up: on a thread with its own runtime, since
        // Drop cannot be async and may run inside (or outside) a Tokio runtime.
        let topology = self.topology.clone();
        let prefix = self.redis_prefix.clone();
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup(topology, prefix, schema));
            }
        })
        .join();
    }
}

async fn cleanup(topology: Topology, redis_prefix: String, schema: String) {
    if let Ok(connection) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
    {
        if let Ok(channel) = connection.create_channel().await
            && let Err(e) = topology.delete(&channel).await
        {
            tracing::warn!(error = %e, "test cleanup: deleting the topology failed");
        }
        let _ = connection.close(200, "cleanup".into()).await;
    }
    if let Err(e) = delete_redis_prefix(&redis_url(), &redis_prefix).await {
        tracing::warn!(error = %e, "test cleanup: deleting Redis keys failed");
    }
    let dropped = match thena_store::Db::new(&SecretString::from(database_url()), &schema) {
        Ok(db) => db.drop_schema().await,
        Err(e) => Err(e),
    };
    if let Err(e) = dropped {
        tracing::warn!(error = %e, "test cleanup: dropping the PostgreSQL schema failed");
    }
}

/// Deletes every Redis key under `prefix:`.
pub async fn delete_redis_prefix(url: &str, prefix: &str) -> redis::RedisResult<usize> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}:*");
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<'_, String> = conn.scan_match(&pattern).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    for chunk in keys.chunks(500) {
        let _: () = conn.del(chunk).await?;
    }
    Ok(keys.len())
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
