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
/// How long a place in the queue outlives its time if no event of its request comes.
const TICKET_GRACE: Duration = Duration::from_secs(60);
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

/// The identity of one request's place in its integration's queue for budget: the
/// request (`{workspace}:{id}`) and the event asking (its id), so the event that took
/// the place is told it holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnFor {
    pub request: String,
    pub holder: String,
}

/// The answer to an event's first call under [`RateLimiter::take_turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Call Vitally now; `prepaid` more calls of this event were already paid for.
    Go { prepaid: u32 },
    /// The request has its place in the queue: its budget opens after `wait`. `holder`:
    /// this event took the place (it should come back on time); otherwise another event
    /// of the same request did, and this one may come back after that one's write.
    Queued { wait: Duration, holder: bool },
    /// Out of budget beyond the queue's horizon (or Redis is unreachable): nothing
    /// reserved; try again after `wait`.
    Wait(Duration),
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

/// A request's place in the queue for budget, as stored (`"{at} {calls} {holder}"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// When its calls may start (µs, Redis clock).
    pub at: u64,
    /// Calls paid for, back to back from `at`.
    pub calls: u64,
    /// The event that took the place.
    pub holder: String,
}

/// What [`turn`] decided, and the state it leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TurnDecision {
    /// Go after `wait` µs with `prepaid` more calls (the ticket, if any, is used up).
    Go {
        new_tat: Option<u64>,
        wait: u64,
        prepaid: u64,
    },
    /// Wait `wait` µs for the ticket (`new` when this call just took it).
    Queued {
        new_tat: Option<u64>,
        new: Option<Ticket>,
        wait: u64,
        holder: bool,
    },
    /// Beyond the horizon: nothing reserved.
    Deny { wait: u64 },
}

/// The first call of an event that queues for budget instead of being refused (pure;
/// the Lua script below is its twin). A request that already has a ticket uses it once
/// it is due, or waits for it; otherwise the call goes now if a slot opens within
/// `max_wait`, else the request takes the next place in the queue, paying for every call
/// its event is expected to need (`calls`, at most one burst) so that event can make
/// them back to back when its turn comes. Places are never reserved beyond `horizon`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn turn(
    gcra: Gcra,
    ticket: Option<&Ticket>,
    tat: u64,
    start: u64,
    now: u64,
    max_wait: u64,
    horizon: u64,
    calls: u64,
    holder: &str,
) -> TurnDecision {
    if let Some(ticket) = ticket {
        // A pause (429) that began after the place was taken still holds.
        let wait = ticket.at.max(start).saturating_sub(now);
        return if wait <= max_wait {
            TurnDecision::Go {
                new_tat: None,
                wait,
                prepaid: ticket.calls.saturating_sub(1),
            }
        } else {
            TurnDecision::Queued {
                new_tat: None,
                new: None,
                wait,
                holder: ticket.holder == holder,
            }
        };
    }
    if let Decision::Reserve { new_tat, wait } = gcra.decide(tat, start, now, max_wait) {
        return TurnDecision::Go {
            new_tat: Some(new_tat),
            wait,
            prepaid: 0,
        };
    }
    let calls = calls.clamp(1, gcra.burst);
    let new_tat = tat.max(start) + calls * gcra.interval;
    let at = new_tat
        .saturating_sub(gcra.burst * gcra.interval)
        .max(start);
    let wait = at.saturating_sub(now);
    if wait > horizon {
        return TurnDecision::Deny { wait };
    }
    TurnDecision::Queued {
        new_tat: Some(new_tat),
        new: Some(Ticket {
            at,
            calls,
            holder: holder.to_string(),
        }),
        wait,
        holder: true,
    }
}

/// The same decision as [`Gcra::decide`], atomically on Redis' clock; a reserved call
/// is also counted in its minute (KEYS[3], read by the console as budget use).
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
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], 180000)
  return {1, wait, paused}
end
return {0, wait, paused}
"#;

/// [`turn`] atomically on Redis' clock. KEYS: rate, paused, ticket, and the minute's
/// count of reserved calls (budget use, read by the console).
/// Returns {1 go | 2 queued | 0 denied, wait µs, prepaid calls | holder 0/1}.
const TURN_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local holder = ARGV[5]
local grace_ms = tonumber(ARGV[6])
local start = now
local pttl = redis.call('PTTL', KEYS[2])
if pttl > 0 then start = now + pttl * 1000 end
local ticket = redis.call('GET', KEYS[3])
if ticket then
  local at, calls, taker = string.match(ticket, '^(%d+) (%d+) (.*)$')
  at = tonumber(at)
  if at < start then at = start end
  local wait = at - now
  if wait < 0 then wait = 0 end
  if wait <= max_wait then
    redis.call('DEL', KEYS[3])
    return {1, wait, tonumber(calls) - 1}
  end
  if taker == holder then return {2, wait, 1} end
  return {2, wait, 0}
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
  redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], 180000)
  return {1, wait, 0}
end
local calls = tonumber(ARGV[7])
if calls > burst then calls = burst end
if calls < 1 then calls = 1 end
new_tat = tat + calls * interval
allow_at = new_tat - burst * interval
if allow_at < start then allow_at = start end
wait = allow_at - now
if wait < 0 then wait = 0 end
if wait > horizon then return {0, wait, 0} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
redis.call('SET', KEYS[3], string.format('%.0f %.0f %s', allow_at, calls, holder), 'PX', math.ceil(wait / 1000) + grace_ms)
redis.call('INCRBY', KEYS[4], calls)
redis.call('PEXPIRE', KEYS[4], 180000)
return {2, wait, 1}
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
    /// Places in the queue by request (see [`turn`]).
    tickets: HashMap<String, Ticket>,
}

struct Shared {
    prefix: String,
    fallback_share: f64,
    acquire: Script,
    turn: Script,
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
                turn: Script::new(TURN_LUA),
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

    /// A call of an event of request `turn` that queues for budget rather than being
    /// refused: goes now (sleeping up to `max_wait`), or answers when the request's place
    /// in the integration's queue comes (taking one if it has none, at most `horizon`
    /// ahead, paying for `calls` calls so its event can make them back to back then).
    /// Under pressure every request waits its turn in order, and all the events of one
    /// request share one place: the first to come back when it is due makes the
    /// (coalesced) write; the others then find it applied and cost nothing. While Redis
    /// is unreachable the queue is this replica's own, on its local share.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_turn(
        &self,
        key: &str,
        workspace: &str,
        budget_per_min: u32,
        max_wait: Duration,
        horizon: Duration,
        calls: u32,
        turn: &TurnFor,
    ) -> Turn {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let max_wait_us = micros(max_wait);
        let decided = if self.skip_redis() {
            None
        } else {
            let gcra = Gcra::per_minute(f64::from(budget_per_min));
            let mut conn = self.redis.clone();
            let mut call = self.shared.turn.key(self.rate_key(key));
            call.key(self.pause_key(key))
                .key(self.turn_key(key, &turn.request))
                .key(self.used_key(key, unix_minute(0)))
                .arg(gcra.interval)
                .arg(gcra.burst)
                .arg(max_wait_us)
                .arg(micros(horizon))
                .arg(&turn.holder)
                .arg(TICKET_GRACE.as_millis() as u64)
                .arg(calls.max(1));
            let fut = call.invoke_async::<(u8, u64, u64)>(&mut conn);
            let result = tokio::time::timeout(self.redis_timeout, fut).await;
            self.note_redis(
                result
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
            )
        };
        let (code, wait_us, extra) = match decided {
            Some(answer) => answer,
            None => self.turn_locally(
                key,
                budget_per_min,
                max_wait_us,
                micros(horizon),
                u64::from(calls),
                turn,
            ),
        };
        let wait = Duration::from_micros(wait_us);
        if let (false, Some(metrics)) = (code == 1 && wait.is_zero(), &self.metrics) {
            metrics.limiter_waits.with_label_values(&[workspace]).inc();
        }
        match code {
            1 => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Turn::Go {
                    prepaid: u32::try_from(extra).unwrap_or(u32::MAX),
                }
            }
            2 => Turn::Queued {
                wait,
                holder: extra == 1,
            },
            _ => Turn::Wait(wait),
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
                .key(self.used_key(workspace, unix_minute(0)))
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

    /// [`turn`] on this replica's share while Redis is unreachable; answers like the
    /// script: (code, wait µs, prepaid | holder).
    fn turn_locally(
        &self,
        key: &str,
        budget_per_min: u32,
        max_wait_us: u64,
        horizon_us: u64,
        calls: u64,
        turn_for: &TurnFor,
    ) -> (u8, u64, u64) {
        let gcra = Gcra::per_minute(f64::from(budget_per_min) * self.shared.fallback_share);
        let now = self.local_now();
        let mut local = self.lock_local();
        let state = local.entry(key.to_string()).or_default();
        state
            .tickets
            .retain(|_, t| t.at + TICKET_GRACE.as_micros() as u64 > now);
        let start = now.max(state.paused_until);
        let decision = turn(
            gcra,
            state.tickets.get(&turn_for.request),
            state.tat,
            start,
            now,
            max_wait_us,
            horizon_us,
            calls,
            &turn_for.holder,
        );
        match decision {
            TurnDecision::Go {
                new_tat,
                wait,
                prepaid,
            } => {
                state.tat = new_tat.unwrap_or(state.tat);
                state.tickets.remove(&turn_for.request);
                (1, wait, prepaid)
            }
            TurnDecision::Queued {
                new_tat,
                new,
                wait,
                holder,
            } => {
                state.tat = new_tat.unwrap_or(state.tat);
                if let Some(ticket) = new {
                    state.tickets.insert(turn_for.request.clone(), ticket);
                }
                (2, wait, u64::from(holder))
            }
            TurnDecision::Deny { wait } => (0, wait, 0),
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

    /// A request's place in the integration's queue for budget.
    fn turn_key(&self, key: &str, request: &str) -> String {
        format!("{}:rl:{key}:turn:{request}", self.shared.prefix)
    }

    fn used_key(&self, workspace: &str, minute: u64) -> String {
        format!("{}:rl:{workspace}:used:{minute}", self.shared.prefix)
    }

    /// How much of the budget `key` used: calls admitted fleet-wide in the last whole
    /// minute and so far in this one, and the 429 pause left. `None` when Redis does not
    /// answer (the figures are as losable as Redis).
    pub async fn usage(&self, key: &str) -> Option<Usage> {
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.get(self.used_key(key, unix_minute(1)))
            .get(self.used_key(key, unix_minute(0)))
            .pttl(self.pause_key(key));
        let fut = pipe.query_async::<(Option<u64>, Option<u64>, i64)>(&mut conn);
        match tokio::time::timeout(self.redis_timeout, fut).await {
            Ok(Ok((last, this, pause_ms))) => Some(Usage {
                last_minute: last.unwrap_or(0),
                this_minute: this.unwrap_or(0),
                paused_for: u64::try_from(pause_ms)
                    .ok()
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis),
            }),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

/// Budget use of one Vitally key, fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub last_minute: u64,
    pub this_minute: u64,
    /// Left of a pause after Vitally answered 429.
    pub paused_for: Option<Duration>,
}

/// The wall-clock minute `back` minutes ago, as a counter key's suffix.
fn unix_minute(back: u64) -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs / 60).saturating_sub(back)
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

    fn gcra_3_per_sec() -> Gcra {
        Gcra {
            interval: SEC / 3,
            burst: 3,
        }
    }

    fn ticket(at: u64, calls: u64, holder: &str) -> Ticket {
        Ticket {
            at,
            calls,
            holder: holder.into(),
        }
    }

    #[test]
    fn with_budget_at_hand_the_first_call_goes_and_takes_no_place() {
        let now = 100 * SEC;
        assert_eq!(
            turn(gcra_3_per_sec(), None, 0, now, now, 0, 60 * SEC, 1, "e1"),
            TurnDecision::Go {
                new_tat: Some(now + SEC / 3),
                wait: 0,
                prepaid: 0
            }
        );
    }

    #[test]
    fn out_of_budget_a_request_takes_the_next_place_paying_for_the_calls_it_needs() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        // The burst is spent: the next slot is 1 s away.
        let tat = now + SEC + g.interval * 2;
        let TurnDecision::Queued {
            new_tat: Some(new_tat),
            new: Some(place),
            wait,
            holder: true,
        } = turn(g, None, tat, now, now, 0, 60 * SEC, 2, "e1")
        else {
            panic!("no place taken")
        };
        assert_eq!(new_tat, tat + 2 * g.interval, "two calls paid for");
        assert_eq!(place, ticket(now + wait, 2, "e1"));
        // Its two calls start where they fit the burst, back to back.
        assert_eq!(place.at, new_tat - g.burst * g.interval);
        // The next request queues behind it.
        let TurnDecision::Queued {
            new: Some(next), ..
        } = turn(g, None, new_tat, now, now, 0, 60 * SEC, 1, "e2")
        else {
            panic!("no place taken")
        };
        assert_eq!(next.at, place.at + g.interval);
    }

    #[test]
    fn the_calls_paid_for_never_exceed_one_burst() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        let tat = now + 10 * SEC;
        let TurnDecision::Queued {
            new: Some(place), ..
        } = turn(g, None, tat, now, now, 0, 60 * SEC, 50, "e1")
        else {
            panic!("no place taken")
        };
        assert_eq!(place.calls, 3);
    }

    #[test]
    fn a_place_beyond_the_horizon_is_not_taken() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        let tat = now + 120 * SEC;
        assert!(matches!(
            turn(g, None, tat, now, now, 0, 60 * SEC, 1, "e1"),
            TurnDecision::Deny { wait } if wait > 60 * SEC
        ));
    }

    #[test]
    fn events_of_a_request_with_a_place_wait_for_it_and_only_its_taker_is_the_holder() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        let place = ticket(now + 5 * SEC, 1, "e1");
        for (event, holder) in [("e1", true), ("e2", false)] {
            assert_eq!(
                turn(g, Some(&place), 0, now, now, SEC / 2, 60 * SEC, 1, event),
                TurnDecision::Queued {
                    new_tat: None,
                    new: None,
                    wait: 5 * SEC,
                    holder
                }
            );
        }
    }

    #[test]
    fn a_due_place_goes_with_its_prepaid_calls_whichever_event_comes() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        let place = ticket(now + SEC / 4, 3, "e1");
        assert_eq!(
            turn(g, Some(&place), 0, now, now, SEC / 2, 60 * SEC, 1, "e9"),
            TurnDecision::Go {
                new_tat: None,
                wait: SEC / 4,
                prepaid: 2
            }
        );
    }

    #[test]
    fn a_pause_that_began_after_the_place_was_taken_still_holds() {
        let g = gcra_3_per_sec();
        let now = 100 * SEC;
        let place = ticket(now, 1, "e1");
        assert!(matches!(
            turn(g, Some(&place), 0, now + 7 * SEC, now, SEC / 2, 60 * SEC, 1, "e1"),
            TurnDecision::Queued { wait, .. } if wait == 7 * SEC
        ));
    }
}
