//! Cache-aside over Redis for Vitally lookups, shared by the whole fleet: TTLs, negative
//! entries for "not found", and single-flight so a cold key costs one Vitally call however
//! many replicas ask at once. A Redis error never fails an event: the lookup goes to
//! Vitally directly and the error is counted.

use std::{future::Future, time::Duration};

use redis::{AsyncCommands, aio::ConnectionManager};
use serde::{Serialize, de::DeserializeOwned};

use crate::metrics::SyncMetrics;

/// Stored for a cached "not found": distinct from any JSON value.
const NEGATIVE: &str = "\u{2205}";
/// How long a filler may hold the single-flight lock before others stop waiting.
const FILL_LOCK: Duration = Duration::from_secs(5);
/// How long a non-filler waits for the filler's value before fetching itself.
const FILL_WAIT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Cache {
    redis: ConnectionManager,
    prefix: String,
    metrics: SyncMetrics,
}

/// Lifetimes of one kind of entry.
#[derive(Debug, Clone, Copy)]
pub struct Ttl {
    pub found: Duration,
    pub not_found: Option<Duration>,
}

enum Lookup<T> {
    Hit(Option<T>),
    Miss,
}

/// What a waiter sees of another replica's fill.
enum Fill<T> {
    Done(Option<T>),
    Pending,
    Abandoned,
}

impl Cache {
    pub fn new(redis: ConnectionManager, prefix: &str, metrics: SyncMetrics) -> Self {
        Self {
            redis,
            prefix: prefix.to_string(),
            metrics,
        }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:cache:{kind}:{id}", self.prefix)
    }

    /// The cached value of `kind`/`id`, or `fetch`'s answer (then cached).
    pub async fn get_or_fetch<T, E, F, Fut>(
        &self,
        kind: &'static str,
        id: &str,
        ttl: Ttl,
        fetch: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let key = self.key(kind, id);
        match self.lookup::<T>(kind, &key).await {
            Lookup::Hit(value) => return Ok(value),
            Lookup::Miss => {}
        }
        let fill_lock = format!("{key}:fill");
        let mut filler = self.try_lock(&fill_lock).await;
        let deadline = tokio::time::Instant::now() + FILL_WAIT;
        // Someone else is asking Vitally right now: wait for their answer — or, if they
        // gave up (their call failed or had to wait for budget), ask in their place.
        while !filler && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match self.poll_fill::<T>(kind, &key, &fill_lock).await {
                Fill::Done(value) => return Ok(value),
                Fill::Pending => {}
                Fill::Abandoned => filler = self.try_lock(&fill_lock).await,
            }
        }
        self.metrics.cache(kind, "miss");
        let value = fetch().await;
        if let Ok(value) = &value {
            self.store(&key, value.as_ref(), ttl).await;
        }
        // Whatever the answer: a filler that failed must not keep others waiting.
        if filler {
            self.unlock(&fill_lock).await;
        }
        value
    }

    /// One look at a fill in progress: the value and the fill lock in one round trip.
    async fn poll_fill<T: DeserializeOwned>(
        &self,
        kind: &'static str,
        key: &str,
        fill_lock: &str,
    ) -> Fill<T> {
        let raw: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
            .arg(key)
            .arg(fill_lock)
            .query_async(&mut self.redis.clone())
            .await;
        match raw {
            Ok((value, lock)) => match self.decode(kind, value) {
                Lookup::Hit(value) => Fill::Done(value),
                Lookup::Miss if lock.is_some() => Fill::Pending,
                Lookup::Miss => Fill::Abandoned,
            },
            Err(e) => {
                self.redis_error("get", &e);
                Fill::Abandoned
            }
        }
    }

    /// Writes `value` (or a negative entry) for `kind`/`id`.
    pub async fn put<T: Serialize>(
        &self,
        kind: &'static str,
        id: &str,
        value: Option<&T>,
        ttl: Ttl,
    ) {
        let key = self.key(kind, id);
        self.store(&key, value, ttl).await;
    }

    /// The cached value of `kind`/`id` without asking anyone on a miss (`None`; a Redis
    /// error counts as a miss).
    pub async fn peek<T: DeserializeOwned>(&self, kind: &'static str, id: &str) -> Option<T> {
        match self.lookup::<T>(kind, &self.key(kind, id)).await {
            Lookup::Hit(value) => value,
            Lookup::Miss => None,
        }
    }

    pub async fn invalidate(&self, kind: &'static str, id: &str) {
        let key = self.key(kind, id);
        let result: redis::RedisResult<()> = self.redis.clone().del(&key).await;
        if let Err(e) = result {
            self.redis_error("invalidate", &e);
        }
    }

    async fn lookup<T: DeserializeOwned>(&self, kind: &'static str, key: &str) -> Lookup<T> {
        let raw: redis::RedisResult<Option<String>> = self.redis.clone().get(key).await;
        match raw {
            Ok(raw) => self.decode(kind, raw),
            Err(e) => {
                self.redis_error("get", &e);
                Lookup::Miss
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, kind: &'static str, raw: Option<String>) -> Lookup<T> {
        match raw {
            None => Lookup::Miss,
            Some(raw) if raw == NEGATIVE => {
                self.metrics.cache(kind, "negative_hit");
                Lookup::Hit(None)
            }
            Some(raw) => match serde_json::from_str(&raw) {
                Ok(value) => {
                    self.metrics.cache(kind, "hit");
                    Lookup::Hit(Some(value))
                }
                // An entry from an older shape: refetch and overwrite.
                Err(_) => Lookup::Miss,
            },
        }
    }

    async fn store<T: Serialize>(&self, key: &str, value: Option<&T>, ttl: Ttl) {
        let (raw, lifetime) = match value {
            Some(value) => match serde_json::to_string(value) {
                Ok(raw) => (raw, ttl.found),
                Err(_) => return,
            },
            None => match ttl.not_found {
                Some(lifetime) => (NEGATIVE.to_string(), lifetime),
                None => return,
            },
        };
        let millis = u64::try_from(lifetime.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let result: redis::RedisResult<()> = self.redis.clone().pset_ex(key, raw, millis).await;
        if let Err(e) = result {
            self.redis_error("set", &e);
        }
    }

    async fn try_lock(&self, key: &str) -> bool {
        let result: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(key)
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(FILL_LOCK.as_millis() as u64)
            .query_async(&mut self.redis.clone())
            .await;
        match result {
            Ok(reply) => reply.is_some(),
            Err(e) => {
                self.redis_error("lock", &e);
                // No Redis, no coordination: behave as the filler.
                true
            }
        }
    }

    async fn unlock(&self, key: &str) {
        let result: redis::RedisResult<()> = self.redis.clone().del(key).await;
        if let Err(e) = result {
            self.redis_error("unlock", &e);
        }
    }

    fn redis_error(&self, op: &'static str, error: &redis::RedisError) {
        self.metrics.redis_error(op);
        tracing::debug!(op, error = %error, "redis unavailable; going to the source");
    }
}
