//! The fleet-wide, per-integration Vitally call budget, kept in Redis.
//!
//! GCRA (generic cell rate algorithm): one key per workspace holds the theoretical
//! arrival time (TAT) of the next call on the Redis server's clock, so replicas with
//! skewed clocks agree. A call is admitted when TAT − burst·interval ≤ now. A second key
//! marks the integration paused after Vitally answered 429; every replica honours it.
//!
//! `acquire` reserves a future slot in the same atomic step when it is close enough, so
//! waiting callers are spaced one interval apart instead of stampeding when the slot
//! opens. If Redis fails, each replica falls back to an in-process GCRA at a share of
//! the budget and never fails the caller.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{Script, aio::ConnectionManager};

use crate::metrics::VitallyMetrics;

/// Default fraction of the budget one replica uses on its own while Redis is down.
pub const DEFAULT_FALLBACK_SHARE: f64 = 0.25;
/// Longest a Redis round trip may take before the limiter falls back.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// While degraded, Redis is retried at most this often; other calls go local at once.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What the caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call Vitally now.
    Granted,
    /// Out of budget: the next slot opens after this long.
    Wait(Duration),
    /// Vitally answered 429; the integration is paused for (at least) this long.
    Paused(Duration),
}

/// Reserve a slot if it opens within `max_wait` (pure; shared by the Lua script's logic
/// and the in-process fallback). All times are microseconds on one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Slot reserved: the state becomes `new_tat`; the caller goes after `wait` µs.
    Reserve { new_tat: u64, wait: u64 },
    /// Too far away; nothing was reserved.
    Deny { wait: u64 },
}

/// GCRA parameters for a per-minute rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Emission interval, µs between calls at the steady rate.
    pub interval: u64,
    /// Calls admitted back to back from idle.
    pub burst: u64,
}

impl Gcra {
    /// A budget below one call a minute is treated as one call a minute.
    pub fn per_minute(calls: f64) -> Self {
        let calls = if calls.is_finite() {
            calls.max(1.0)
        } else {
            1.0
        };
        Gcra {
            interval: (60_000_000.0 / calls).ceil() as u64,
            // About one second's worth of calls: smooths jitter without a real spike.
            burst: ((calls / 60.0).floor() as u64).max(1),
        }
    }

    /// `start` is now, or the end of a pause if one is active (slots are never before it).
    pub fn decide(self, tat: u64, start: u64, now: u64, max_wait: u64) -> Decision {
        let new_tat = tat.max(start) + self.interval;
        // The burst never reaches into a pause: its end is a hard floor.
        let allow_at = new_tat
            .saturating_sub(self.burst * self.interval)
            .max(start);
        let wait = allow_at.saturating_sub(now);
        if wait <= max_wait {
            Decision::Reserve { new_tat, wait }
        } else {
            Decision::Deny { wait }
        }
    }
}

/// The same decision as [`Gcra::decide`], atomically on Redis' clock.
/// Returns {reserved 0|1, wait µs, paused 0|1}.
const ACQUIRE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local start = now
local paused = 0
local pttl = redis.call('PTTL', KEYS[2])
if pttl > 0 then
  start = now + pttl * 1000
  paused = 1
end
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if tat < start then tat = start end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at < start then allow_at = start end
local wait = allow_at - now
if wait < 0 then wait = 0 end
if wait <= max_wait then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  return {1, wait, paused}
end
return {0, wait, paused}
"#;

/// Pause for ARGV[1] ms unless a longer pause is already set.
const PAUSE_LUA: &str = r#"
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 1
"#;

/// Internal outcome of one decision, before sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Go after this long (zero, or the wait for a reserved slot).
    Go {
        after: Duration,
    },
    Wait(Duration),
    Paused(Duration),
}

#[derive(Debug, Default)]
struct LocalState {
    tat: u64,
    paused_until: u64,
}

struct Shared {
    prefix: String,
    fallback_share: f64,
    acquire: Script,
    pause: Script,
    /// Clock of the in-process fallback: µs since this instant.
    epoch: Instant,
    local: Mutex<HashMap<String, LocalState>>,
    degraded: AtomicBool,
    /// Fallback µs before which Redis is not retried while degraded.
    next_probe: AtomicU64,
    outages: AtomicU64,
}

/// Fleet-wide per-integration rate limiter. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    redis_timeout: Duration,
    metrics: Option<VitallyMetrics>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("prefix", &self.shared.prefix)
            .field("fallback_share", &self.shared.fallback_share)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Keys are `{key_prefix}:rl:{workspace}` and `…:paused`. `fallback_share` is the
    /// fraction of the budget this replica uses alone while Redis is unreachable.
    pub fn new(redis: ConnectionManager, key_prefix: &str, fallback_share: f64) -> Self {
        let fallback_share = if fallback_share.is_finite() && fallback_share > 0.0 {
            fallback_share.min(1.0)
        } else {
            DEFAULT_FALLBACK_SHARE
        };
        RateLimiter {
            redis,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            metrics: None,
            shared: Arc::new(Shared {
                prefix: key_prefix.to_string(),
                fallback_share,
                acquire: Script::new(ACQUIRE_LUA),
                pause: Script::new(PAUSE_LUA),
                epoch: Instant::now(),
                local: Mutex::new(HashMap::new()),
                degraded: AtomicBool::new(false),
                next_probe: AtomicU64::new(0),
                outages: AtomicU64::new(0),
            }),
        }
    }

    /// Counts waits (`limiter_waits`) and 429 pauses (`limiter_paused`) by workspace.
    pub fn with_metrics(mut self, metrics: VitallyMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long a Redis round trip may take before this call falls back (default 500 ms).
    pub fn with_redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// Whether the last Redis call failed (the limiter is running on its local share).
    pub fn is_degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Relaxed)
    }

    /// Redis outages seen (each counted once, when it began).
    pub fn redis_outages(&self) -> u64 {
        self.shared.outages.load(Ordering::Relaxed)
    }

    /// One attempt: `Granted` (a slot was taken), or how long until one opens.
    pub async fn try_acquire(&self, workspace: &str, budget_per_min: u32) -> Admission {
        let outcome = self.decide(workspace, budget_per_min, Duration::ZERO).await;
        self.count_wait(workspace, outcome);
        match outcome {
            Outcome::Go { .. } => Admission::Granted,
            Outcome::Wait(d) => Admission::Wait(d),
            Outcome::Paused(d) => Admission::Paused(d),
        }
    }

    /// Waits for a slot when it opens within `max_wait` (reserving it at once, so waiters
    /// queue fairly), else returns the `Wait`/`Paused` so the caller can defer the work
    /// instead of holding a consumer slot.
    pub async fn acquire(
        &self,
        workspace: &str,
        budget_per_min: u32,
        max_wait: Duration,
    ) -> Admission {
        self.acquire_as(workspace, workspace, budget_per_min, max_wait)
            .await
    }

    /// [`Self::acquire`] on the budget `key` (one per Vitally key: its fingerprint),
    /// counted in metrics under `workspace`.
    pub async fn acquire_as(
        &self,
        key: &str,
        workspace: &str,
        budget_per_min: u32,
        max_wait: Duration,
    ) -> Admission {
        let outcome = self.decide(key, budget_per_min, max_wait).await;
        self.count_wait(workspace, outcome);
        match outcome {
            Outcome::Go { after } => {
                if !after.is_zero() {
                    tokio::time::sleep(after).await;
                }
                Admission::Granted
            }
            Outcome::Wait(d) => Admission::Wait(d),
            Outcome::Paused(d) => Admission::Paused(d),
        }
    }

    /// Stops every replica calling Vitally for `workspace` for `for_` (Vitally's
    /// `RateLimit-Reset` after a 429). A shorter pause never cuts a longer one.
    pub async fn pause(&self, workspace: &str, for_: Duration) {
        self.pause_as(workspace, workspace, for_).await;
    }

    /// [`Self::pause`] of the budget `key`, counted under `workspace`.
    pub async fn pause_as(&self, key: &str, workspace: &str, for_: Duration) {
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Some(metrics) = &self.metrics {
            metrics.limiter_paused.with_label_values(&[workspace]).inc();
        }
        let workspace = key;
        {
            // Also locally, so the pause holds if Redis fails before it expires.
            let until = self.local_now().saturating_add(ms.saturating_mul(1000));
            let mut local = self.lock_local();
            let state = local.entry(workspace.to_string()).or_default();
            state.paused_until = state.paused_until.max(until);
        }
        if self.skip_redis() {
            return;
        }
        let key = self.pause_key(workspace);
        let mut conn = self.redis.clone();
        let mut call = self.shared.pause.key(&key);
        call.arg(ms);
        let fut = call.invoke_async::<i64>(&mut conn);
        let result = tokio::time::timeout(self.redis_timeout, fut).await;
        self.note_redis(
            result
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
        );
    }

    async fn decide(&self, workspace: &str, budget_per_min: u32, max_wait: Duration) -> Outcome {
        let max_wait_us = u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX);
        if !self.skip_redis() {
            let gcra = Gcra::per_minute(f64::from(budget_per_min));
            let mut conn = self.redis.clone();
            let rate_key = self.rate_key(workspace);
            let pause_key = self.pause_key(workspace);
            let mut call = self.shared.acquire.key(&rate_key);
            call.key(&pause_key)
                .arg(gcra.interval)
                .arg(gcra.burst)
                .arg(max_wait_us);
            let fut = call.invoke_async::<(u8, u64, u8)>(&mut conn);
            let result = tokio::time::timeout(self.redis_timeout, fut).await;
            let result = result
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Some((reserved, wait, paused)) = self.note_redis(result) {
                return outcome(reserved == 1, wait, paused == 1);
            }
        }
        self.decide_locally(workspace, budget_per_min, max_wait_us)
    }

    fn decide_locally(&self, workspace: &str, budget_per_min: u32, max_wait_us: u64) -> Outcome {
        let gcra = Gcra::per_minute(f64::from(budget_per_min) * self.shared.fallback_share);
        let now = self.local_now();
        let mut local = self.lock_local();
        let state = local.entry(workspace.to_string()).or_default();
        let paused = state.paused_until > now;
        let start = now.max(state.paused_until);
        match gcra.decide(state.tat, start, now, max_wait_us) {
            Decision::Reserve { new_tat, wait } => {
                state.tat = new_tat;
                outcome(true, wait, paused)
            }
            Decision::Deny { wait } => outcome(false, wait, paused),
        }
    }

    /// Records the result of a Redis call: logs an outage once, and its end.
    fn note_redis<T>(&self, result: Result<T, String>) -> Option<T> {
        let s = &self.shared;
        match result {
            Ok(v) => {
                if s.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(prefix = %s.prefix, "rate limiter: Redis is back, fleet-wide budget restored");
                }
                Some(v)
            }
            Err(error) => {
                let probe_at = self.local_now() + PROBE_INTERVAL.as_micros() as u64;
                s.next_probe.store(probe_at, Ordering::Relaxed);
                if !s.degraded.swap(true, Ordering::Relaxed) {
                    s.outages.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        prefix = %s.prefix,
                        %error,
                        share = s.fallback_share,
                        "rate limiter: Redis unavailable, using this replica's local share of the budget"
                    );
                }
                None
            }
        }
    }

    /// While degraded, only probe Redis once per interval so callers are not each held
    /// up by a dead connection.
    fn skip_redis(&self) -> bool {
        self.is_degraded() && self.local_now() < self.shared.next_probe.load(Ordering::Relaxed)
    }

    /// Counts every decision that did not let the call go at once.
    fn count_wait(&self, workspace: &str, outcome: Outcome) {
        let waited = match outcome {
            Outcome::Go { after } => !after.is_zero(),
            Outcome::Wait(_) | Outcome::Paused(_) => true,
        };
        if let (true, Some(metrics)) = (waited, &self.metrics) {
            metrics.limiter_waits.with_label_values(&[workspace]).inc();
        }
    }

    fn local_now(&self) -> u64 {
        u64::try_from(self.shared.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalState>> {
        // The map holds plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.shared
            .local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn rate_key(&self, workspace: &str) -> String {
        format!("{}:rl:{workspace}", self.shared.prefix)
    }

    fn pause_key(&self, workspace: &str) -> String {
        format!("{}:rl:{workspace}:paused", self.shared.prefix)
    }
}

fn outcome(reserved: bool, wait_us: u64, paused: bool) -> Outcome {
    let wait = Duration::from_micros(wait_us);
    match (reserved, paused) {
        (true, _) => Outcome::Go { after: wait },
        (false, true) => Outcome::Paused(wait),
        (false, false) => Outcome::Wait(wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    #[test]
    fn the_budget_sets_interval_and_a_one_second_burst() {
        assert_eq!(
            Gcra::per_minute(600.0),
            Gcra {
                interval: 100_000,
                burst: 10
            }
        );
        assert_eq!(
            Gcra::per_minute(30.0),
            Gcra {
                interval: 2 * SEC,
                burst: 1
            }
        );
        assert_eq!(
            Gcra::per_minute(0.0),
            Gcra {
                interval: 60 * SEC,
                burst: 1
            }
        );
    }

    #[test]
    fn an_idle_key_admits_the_burst_then_spaces_calls_by_the_interval() {
        let g = Gcra {
            interval: SEC,
            burst: 3,
        };
        let now = 100 * SEC;
        let mut tat = 0;
        for _ in 0..3 {
            match g.decide(tat, now, now, 0) {
                Decision::Reserve { new_tat, wait: 0 } => tat = new_tat,
                other => panic!("burst call denied: {other:?}"),
            }
        }
        assert_eq!(g.decide(tat, now, now, 0), Decision::Deny { wait: SEC });
        assert_eq!(
            g.decide(tat, now, now + SEC, 0),
            Decision::Reserve {
                new_tat: tat + SEC,
                wait: 0
            }
        );
    }

    #[test]
    fn a_reservation_within_max_wait_moves_the_tat_and_reports_the_wait() {
        let g = Gcra {
            interval: SEC,
            burst: 1,
        };
        let now = 10 * SEC;
        let Decision::Reserve { new_tat, wait: 0 } = g.decide(0, now, now, 0) else {
            panic!("first call denied")
        };
        assert_eq!(
            g.decide(new_tat, now, now, 2 * SEC),
            Decision::Reserve {
                new_tat: new_tat + SEC,
                wait: SEC
            }
        );
    }

    #[test]
    fn a_pause_pushes_the_first_slot_to_its_end() {
        let g = Gcra {
            interval: SEC,
            burst: 1,
        };
        let now = 10 * SEC;
        assert_eq!(
            g.decide(0, now + 5 * SEC, now, 0),
            Decision::Deny { wait: 5 * SEC }
        );
    }
}
