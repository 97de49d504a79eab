//! Per-request mutual exclusion and the version guard, shared by every replica through
//! Redis: at most one consumer upserts a given request at a time, and a version older than
//! the last applied one never overwrites it.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use uuid::Uuid;

/// Deleting a lock only if we still own it (it may have expired and been retaken).
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Remember the highest applied version (never move it backwards).
const RECORD_VERSION: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local proposed = tonumber(ARGV[1])
if proposed > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Versions are kept long enough to outlive any redelivery or replay.
const VERSION_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Clone)]
pub struct RequestGuards {
    redis: ConnectionManager,
    prefix: String,
    lock_ttl: Duration,
}

/// Proof of holding a request's lock; give it back with [`RequestGuards::release`].
#[derive(Debug)]
pub struct HeldLock {
    key: String,
    token: String,
}

impl RequestGuards {
    pub fn new(redis: ConnectionManager, prefix: &str, lock_ttl: Duration) -> Self {
        Self {
            redis,
            prefix: prefix.to_string(),
            lock_ttl,
        }
    }

    fn lock_key(&self, workspace: &str, request_id: u64) -> String {
        format!("{}:lock:{workspace}:{request_id}", self.prefix)
    }

    fn version_key(&self, workspace: &str, request_id: u64) -> String {
        format!("{}:version:{workspace}:{request_id}", self.prefix)
    }

    /// Takes the request's lock, polling for at most `wait`; `None` if another consumer
    /// kept it that long.
    pub async fn lock(
        &self,
        workspace: &str,
        request_id: u64,
        wait: Duration,
    ) -> redis::RedisResult<Option<HeldLock>> {
        self.take(self.lock_key(workspace, request_id), wait).await
    }

    /// A fleet-wide lock on any other named resource (e.g. a workspace's field list).
    pub async fn lock_named(
        &self,
        name: &str,
        wait: Duration,
    ) -> redis::RedisResult<Option<HeldLock>> {
        self.take(format!("{}:lock:{name}", self.prefix), wait)
            .await
    }

    async fn take(&self, key: String, wait: Duration) -> redis::RedisResult<Option<HeldLock>> {
        let token = Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(10);
        loop {
            let reply: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.lock_ttl.as_millis() as u64)
                .query_async(&mut self.redis.clone())
                .await?;
            if reply.is_some() {
                return Ok(Some(HeldLock { key, token }));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    pub async fn release(&self, lock: HeldLock) {
        let result: redis::RedisResult<i64> = Script::new(RELEASE)
            .key(&lock.key)
            .arg(&lock.token)
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Err(e) = result {
            // It expires on its own; the next holder waits at most the lock TTL.
            tracing::debug!(error = %e, "could not release request lock");
        }
    }

    pub async fn last_version(
        &self,
        workspace: &str,
        request_id: u64,
    ) -> redis::RedisResult<Option<u64>> {
        redis::cmd("GET")
            .arg(self.version_key(workspace, request_id))
            .query_async(&mut self.redis.clone())
            .await
    }

    pub async fn record_version(
        &self,
        workspace: &str,
        request_id: u64,
        version: u64,
    ) -> redis::RedisResult<()> {
        let _: i64 = Script::new(RECORD_VERSION)
            .key(self.version_key(workspace, request_id))
            .arg(version)
            .arg(VERSION_TTL.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }
}
