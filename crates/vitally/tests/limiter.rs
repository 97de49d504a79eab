//! The fleet-wide limiter against the real Redis: several replicas (separate
//! connections) share one budget and one pause; a dead Redis degrades, never fails.

use std::time::{Duration, Instant};

use redis::{
    AsyncCommands,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use vitally_client::{
    limiter::{Admission, RateLimiter},
    metrics::VitallyMetrics,
};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn unique_prefix() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

async fn connect() -> ConnectionManager {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    ConnectionManager::new(client)
        .await
        .expect("connect to local Redis")
}

/// `n` limiters with their own connections, sharing `prefix` (one per replica).
async fn replicas(n: usize, prefix: &str) -> Vec<RateLimiter> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(RateLimiter::new(connect().await, prefix, 0.25));
    }
    out
}

async fn cleanup(prefix: &str) {
    let mut conn = connect().await;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.expect("del");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Runs `limiter` with try_acquire for `window` from `start`, honouring each Wait,
/// and returns how many calls were granted inside the window.
async fn hammer(
    limiter: RateLimiter,
    ws: String,
    budget: u32,
    start: Instant,
    window: Duration,
) -> u32 {
    let mut granted = 0;
    while start.elapsed() < window {
        match limiter.try_acquire(&ws, budget).await {
            Admission::Granted => {
                if start.elapsed() < window {
                    granted += 1;
                }
            }
            Admission::Wait(d) | Admission::Paused(d) => {
                tokio::time::sleep(d.min(Duration::from_millis(20))).await;
            }
        }
    }
    granted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_sharing_an_integration_stay_within_the_gcra_bound() {
    let prefix = unique_prefix();
    let limiters = replicas(4, &prefix).await;
    // 600/min: one call per 100 ms, a burst of 10.
    let (budget, window) = (600, Duration::from_secs(2));
    let start = Instant::now();
    let tasks: Vec<_> = limiters
        .iter()
        .map(|l| tokio::spawn(hammer(l.clone(), "W1".into(), budget, start, window)))
        .collect();
    let mut per_replica = Vec::new();
    for t in tasks {
        per_replica.push(t.await.expect("task"));
    }
    let total: u32 = per_replica.iter().sum();
    // GCRA bound: burst + window / interval (+1 for the slot at the window's edge).
    let bound = 10 + 20 + 1;
    assert!(
        total <= bound,
        "granted {total} > {bound} ({per_replica:?})"
    );
    assert!(
        total >= 20,
        "granted only {total}: the budget is not being used ({per_replica:?})"
    );
    assert!(
        per_replica.iter().filter(|&&n| n > 0).count() >= 2,
        "one replica starved the rest: {per_replica:?}"
    );
    assert!(limiters.iter().all(|l| !l.is_degraded()));
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_replicas_get_spaced_slots_with_acquire() {
    let prefix = unique_prefix();
    let limiters = replicas(4, &prefix).await;
    // 1200/min: one call per 50 ms, a burst of 20; 40 calls need ≥ (40 - 20) × 50 ms.
    let start = Instant::now();
    let tasks: Vec<_> = limiters
        .iter()
        .map(|l| {
            let l = l.clone();
            tokio::spawn(async move {
                let mut granted = Vec::new();
                for _ in 0..10 {
                    match l.acquire("W1", 1200, Duration::from_secs(5)).await {
                        Admission::Granted => granted.push(start.elapsed()),
                        other => panic!("expected a slot within 5 s, got {other:?}"),
                    }
                }
                granted
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("task"));
    }
    times.sort();
    assert_eq!(times.len(), 40);
    let last = *times.last().expect("40 grants");
    assert!(
        last >= Duration::from_millis(950),
        "40 calls at 1200/min finished in {last:?}"
    );
    assert!(
        last < Duration::from_millis(2500),
        "reservations wasted budget: {last:?}"
    );
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pause_blocks_every_replica_until_it_expires_then_calls_flow() {
    let prefix = unique_prefix();
    let limiters = replicas(4, &prefix).await;
    let metrics = VitallyMetrics::unregistered();
    let first = limiters[0].clone().with_metrics(metrics.clone());
    let pause = Duration::from_millis(800);
    let paused_at = Instant::now();
    first.pause("W1", pause).await;
    // A shorter pause (a later 429 with a nearer reset) does not cut the longer one.
    limiters[1].pause("W1", Duration::from_millis(50)).await;
    assert_eq!(metrics.limiter_paused.with_label_values(&["W1"]).get(), 1);

    for l in &limiters {
        match l.try_acquire("W1", 60_000).await {
            Admission::Paused(d) => assert!(
                d > Duration::from_millis(500) && d <= pause,
                "paused for {d:?}"
            ),
            other => panic!("expected Paused, got {other:?}"),
        }
    }
    // Other integrations keep flowing.
    assert_eq!(
        limiters[2].try_acquire("W2", 60_000).await,
        Admission::Granted
    );
    // A caller that cannot wait that long is told to defer, at once.
    let asked = Instant::now();
    assert!(matches!(
        first
            .acquire("W1", 60_000, Duration::from_millis(100))
            .await,
        Admission::Paused(_)
    ));
    assert!(asked.elapsed() < Duration::from_millis(100));

    // Every replica polls until one is granted; none may be before the pause ends.
    let deadline = paused_at + Duration::from_secs(3);
    let granted_at = 'poll: loop {
        assert!(
            Instant::now() < deadline,
            "still paused 3 s after an 800 ms pause"
        );
        for l in &limiters {
            if l.try_acquire("W1", 60_000).await == Admission::Granted {
                break 'poll paused_at.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        granted_at >= pause - Duration::from_millis(5),
        "granted during the pause: {granted_at:?}"
    );
    // Flowing again for every replica.
    for l in &limiters {
        assert_eq!(
            l.acquire("W1", 60_000, Duration::from_millis(200)).await,
            Admission::Granted
        );
    }
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_can_outwait_the_pause_gets_the_first_slot_after_it() {
    let prefix = unique_prefix();
    let limiter = replicas(1, &prefix).await.remove(0);
    let start = Instant::now();
    limiter.pause("W1", Duration::from_millis(300)).await;
    assert_eq!(
        limiter.acquire("W1", 600, Duration::from_secs(1)).await,
        Admission::Granted
    );
    assert!(
        start.elapsed() >= Duration::from_millis(295),
        "granted after {:?}",
        start.elapsed()
    );
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_values_are_the_time_to_the_next_slot() {
    let prefix = unique_prefix();
    let metrics = VitallyMetrics::unregistered();
    let limiter = replicas(1, &prefix)
        .await
        .remove(0)
        .with_metrics(metrics.clone());
    // 60/min: one call a second, no burst beyond one.
    assert_eq!(limiter.try_acquire("W1", 60).await, Admission::Granted);
    let Admission::Wait(first) = limiter.try_acquire("W1", 60).await else {
        panic!("second call inside the interval was not told to wait")
    };
    assert!(
        first > Duration::from_millis(900) && first <= Duration::from_secs(1),
        "wait {first:?}"
    );

    // Too long for the caller: returned at once, nothing reserved.
    let asked = Instant::now();
    let Admission::Wait(again) = limiter.acquire("W1", 60, Duration::from_millis(100)).await else {
        panic!("expected Wait")
    };
    assert!(asked.elapsed() < Duration::from_millis(100) && again <= first);

    // Long enough: reserved, slept, granted; the next slot is a full interval later.
    let asked = Instant::now();
    assert_eq!(
        limiter.acquire("W1", 60, Duration::from_secs(2)).await,
        Admission::Granted
    );
    assert!(
        asked.elapsed() >= again - Duration::from_millis(50),
        "granted early: {:?}",
        asked.elapsed()
    );
    let Admission::Wait(next) = limiter.try_acquire("W1", 60).await else {
        panic!("expected Wait after the reserved slot")
    };
    assert!(
        next > Duration::from_millis(900) && next <= Duration::from_secs(1),
        "next wait {next:?}"
    );
    assert_eq!(metrics.limiter_waits.with_label_values(&["W1"]).get(), 4);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_degrades_to_the_local_share_without_error() {
    let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(Duration::from_millis(200)));
    let conn = ConnectionManager::new_lazy_with_config(client, config).expect("lazy manager");
    let limiter = RateLimiter::new(conn, &unique_prefix(), 0.25);

    // 600/min fleet-wide, a quarter alone: 150/min = one per 400 ms, a burst of 2.
    let start = Instant::now();
    let window = Duration::from_millis(1200);
    let mut granted = 0;
    while start.elapsed() < window {
        match limiter.try_acquire("W1", 600).await {
            Admission::Granted => granted += u32::from(start.elapsed() < window),
            Admission::Wait(d) => {
                assert!(d <= Duration::from_millis(400), "local wait {d:?}");
                tokio::time::sleep(d.min(Duration::from_millis(20))).await;
            }
            Admission::Paused(d) => panic!("not paused, got Paused({d:?})"),
        }
    }
    assert!(
        (3..=6).contains(&granted),
        "granted {granted} in 1.2 s at 150/min with a burst of 2"
    );
    assert!(limiter.is_degraded());
    assert_eq!(
        limiter.redis_outages(),
        1,
        "one outage, logged and counted once"
    );

    // A 429 pause still holds on this replica.
    limiter.pause("W2", Duration::from_millis(300)).await;
    assert!(matches!(
        limiter.try_acquire("W2", 600).await,
        Admission::Paused(_)
    ));
}

#[tokio::test]
async fn out_of_budget_requests_queue_in_order_and_the_events_of_one_request_share_a_place() {
    use vitally_client::limiter::{Turn, TurnFor};
    let prefix = unique_prefix();
    let limiter = RateLimiter::new(connect().await, &prefix, 0.25);
    let ws = "T-QUEUE";
    // 180/min: a slot every 333 ms, a burst of 3 — spent at once.
    let budget = 180;
    for _ in 0..3 {
        assert_eq!(
            limiter.acquire(ws, budget, Duration::ZERO).await,
            Admission::Granted
        );
    }
    let horizon = Duration::from_secs(60);
    let turn_for = |request: &str, event: &str| TurnFor {
        request: format!("{ws}:{request}"),
        holder: event.into(),
    };
    let take = |t: TurnFor, calls: u32| {
        let limiter = limiter.clone();
        async move {
            limiter
                .take_turn(ws, ws, budget, Duration::ZERO, horizon, calls, &t)
                .await
        }
    };
    let Turn::Queued {
        wait: a_wait,
        holder: true,
    } = take(turn_for("1", "e1"), 1).await
    else {
        panic!("request 1 took no place")
    };
    // A newer event of the same request waits for the same place, not a new one.
    let Turn::Queued {
        wait: a2_wait,
        holder: false,
    } = take(turn_for("1", "e2"), 1).await
    else {
        panic!("the second event of request 1 did not share its place")
    };
    assert!(a2_wait <= a_wait, "{a2_wait:?} vs {a_wait:?}");
    // Request 2's event needs three calls: its place pays for all three.
    let Turn::Queued {
        wait: b_wait,
        holder: true,
    } = take(turn_for("2", "e3"), 3).await
    else {
        panic!("request 2 took no place")
    };
    assert!(
        b_wait > a_wait,
        "request 2 ({b_wait:?}) queued behind request 1 ({a_wait:?})"
    );
    // Request 3 queues behind request 2 (whose three calls go back to back within the
    // burst, the GCRA's own allowance).
    let Turn::Queued { wait: c_wait, .. } = take(turn_for("3", "e4"), 1).await else {
        panic!("request 3 took no place")
    };
    assert!(
        c_wait > b_wait,
        "request 3 ({c_wait:?}) queued behind request 2 ({b_wait:?})"
    );

    // When its place comes, any event of the request goes, with the calls paid for.
    let due = |t: TurnFor| {
        let limiter = limiter.clone();
        async move {
            limiter
                .take_turn(ws, ws, budget, Duration::from_secs(3), horizon, 1, &t)
                .await
        }
    };
    assert_eq!(due(turn_for("1", "e2")).await, Turn::Go { prepaid: 0 });
    assert_eq!(due(turn_for("2", "e3")).await, Turn::Go { prepaid: 2 });
    cleanup(&prefix).await;
}
