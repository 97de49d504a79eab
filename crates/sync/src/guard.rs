//! Per-request mutual exclusion and the version guard, shared by every replica: at most
//! one consumer upserts a given request at a time, and a version older than the last
//! applied one never overwrites it.
//!
//! Locks live in Redis; versions live in PostgreSQL with Redis as their hot copy. Losing
//! Redis's data (a restart without persistence, an eviction, a failover) must not let
//! two consumers work on one request: the locks held at that moment vanish with it. So
//! every lock is taken only while the fleet's *epoch* key exists; when it is gone and
//! this is not the deployment's first start, the fleet waits out one lock lifetime — by
//! then every event that held a vanished lock has finished or been cut off — before it
//! takes locks again.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use thena_store::{Db, DbError};
use uuid::Uuid;

/// Take the lock only while the epoch exists (`-1` when it is gone).
const LOCK: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

/// Re-establishes a lost epoch: at once on the deployment's first start (ARGV[2] = 1),
/// otherwise after one lock lifetime (ARGV[1] ms) counted from the first consumer that
/// noticed. Returns the milliseconds still to wait (0 = the epoch is back).
const RESTORE_EPOCH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function restore()
  redis.call('SET', KEYS[1], now)
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[2] == '1' then return restore() end
local ends = redis.call('GET', KEYS[2])
if not ends then
  redis.call('SET', KEYS[2], now + tonumber(ARGV[1]))
  return tonumber(ARGV[1])
end
local left = tonumber(ends) - now
if left <= 0 then return restore() end
return left
"#;

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
    db: Db,
    prefix: String,
    lock_ttl: Duration,
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    Redis(redis::RedisError),
    /// Redis lost its data; no lock until every vanished one has run out.
    Quarantine(Duration),
}

impl From<redis::RedisError> for LockError {
    fn from(error: redis::RedisError) -> Self {
        LockError::Redis(error)
    }
}

/// Why the version guard could not answer.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Db(#[from] DbError),
}

/// Proof of holding a request's lock; give it back with [`RequestGuards::release`].
#[derive(Debug)]
pub struct HeldLock {
    key: String,
    token: String,
}

impl RequestGuards {
    pub fn new(redis: ConnectionManager, db: Db, prefix: &str, lock_ttl: Duration) -> Self {
        Self {
            redis,
            db,
            prefix: prefix.to_string(),
            lock_ttl,
        }
    }

    /// `true` when Redis answers (for `/readyz`).
    pub async fn ping(&self) -> bool {
        redis::cmd("PING")
            .query_async::<String>(&mut self.redis.clone())
            .await
            .is_ok()
    }

    fn epoch_keys(&self) -> (String, String) {
        (
            format!("{}:epoch", self.prefix),
            format!("{}:epoch:quarantine", self.prefix),
        )
    }

    /// At start: on the deployment's first start an empty Redis is expected, so the
    /// epoch is set at once; otherwise a missing epoch means Redis lost its data.
    pub async fn start(&self, first_start: bool) -> Result<(), LockError> {
        match self.restore_epoch(first_start).await? {
            Duration::ZERO => Ok(()),
            wait => {
                tracing::warn!(
                    ?wait,
                    "Redis lost its data (no fleet epoch): request locks resume after one lock lifetime"
                );
                Ok(())
            }
        }
    }

    async fn restore_epoch(&self, first_start: bool) -> Result<Duration, LockError> {
        let (epoch, quarantine) = self.epoch_keys();
        let left: i64 = Script::new(RESTORE_EPOCH)
            .key(epoch)
            .key(quarantine)
            .arg(self.lock_ttl.as_millis() as u64)
            .arg(if first_start { "1" } else { "0" })
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(Duration::from_millis(left.max(0) as u64))
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
    ) -> Result<Option<HeldLock>, LockError> {
        self.take(self.lock_key(workspace, request_id), wait).await
    }

    /// A fleet-wide lock on any other named resource (e.g. a workspace's field list).
    pub async fn lock_named(
        &self,
        name: &str,
        wait: Duration,
    ) -> Result<Option<HeldLock>, LockError> {
        self.take(format!("{}:lock:{name}", self.prefix), wait)
            .await
    }

    async fn take(&self, key: String, wait: Duration) -> Result<Option<HeldLock>, LockError> {
        let token = Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(10);
        let (epoch, _) = self.epoch_keys();
        loop {
            let taken: i64 = Script::new(LOCK)
                .key(&key)
                .key(&epoch)
                .arg(&token)
                .arg(self.lock_ttl.as_millis() as u64)
                .invoke_async(&mut self.redis.clone())
                .await?;
            match taken {
                1 => return Ok(Some(HeldLock { key, token })),
                -1 => match self.restore_epoch(false).await? {
                    Duration::ZERO => continue,
                    left => return Err(LockError::Quarantine(left)),
                },
                _ => {}
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

    /// The newest version Vitally has: Redis's copy, else PostgreSQL's record (which then
    /// warms Redis again).
    pub async fn last_version(
        &self,
        workspace: &str,
        request_id: u64,
    ) -> Result<Option<u64>, VersionError> {
        let cached: Option<u64> = redis::cmd("GET")
            .arg(self.version_key(workspace, request_id))
            .query_async(&mut self.redis.clone())
            .await?;
        if cached.is_some() {
            return Ok(cached);
        }
        let durable = self.db.synced_version(workspace, request_id).await?;
        if let Some(version) = durable {
            self.cache_version(workspace, request_id, version).await?;
        }
        Ok(durable)
    }

    /// Records that Vitally has `version`: the hot copy first, then durably. Either
    /// failing fails the event, which is retried and re-applied, so the record ends at
    /// what Vitally has. The order matters: had PostgreSQL taken the version and Redis
    /// not, Redis would keep an *older* copy and let an older version win.
    pub async fn record_version(
        &self,
        workspace: &str,
        request_id: u64,
        version: u64,
    ) -> Result<(), VersionError> {
        self.cache_version(workspace, request_id, version).await?;
        self.db
            .record_synced(workspace, request_id, version)
            .await?;
        Ok(())
    }

    async fn cache_version(
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
