//! How much of Vitally's rate limit the fleet-wide limiter uses, and that it never
//! trips it: four independent clients (own HTTP client, own Redis connection, own
//! limiter) hammer one integration on the fake, first through the limiter, then
//! without it as a baseline.
//!
//! Run: `cargo bench -p vitally-client --bench budget`
//!
//! Vitally allows 1000 calls per 60 s sliding window. A 60 s run per phase is too long,
//! so the fake's window is scaled to 20 s with the same rate (333 calls ≈ 999/min),
//! and the limiter keeps its per-minute budget. GCRA admits at most
//! `burst + window × budget/60` in any window, and its burst is one second's worth
//! (budget/60), so in a 20 s window the budget must satisfy b/60 × 21 ≤ 333: 930/min
//! (≈ 93 % of the limit) fits with a few calls to spare. In production (60 s window)
//! the same rule allows up to ~983/min.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use fake_vitally::{CustomObjectSeed, FakeConfig, FakeVitally, Fixture, RunningFake};
use redis::{AsyncCommands, aio::ConnectionManager};
use secrecy::SecretString;
use thena_runtime::egress::AllowList;
use vitally_client::{
    client::{VitallyClient, VitallyHttp},
    error::ErrorClass,
    limiter::{Admission, RateLimiter},
    metrics::VitallyMetrics,
};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const WORKSPACE: &str = "TBENCH";
const OBJECT_ID: &str = "co-bench";
const FAKE_WINDOW: Duration = Duration::from_secs(20);
const FAKE_LIMIT: u32 = 333;
const BUDGET_PER_MIN: u32 = 930;
const LIMITED_RUN: Duration = Duration::from_secs(22);
const BASELINE_RUN: Duration = Duration::from_secs(3);
const CLIENTS: usize = 4;
/// In-flight calls per client, like a consumer's prefetch.
const WORKERS_PER_CLIENT: usize = 4;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

struct Row {
    phase: &'static str,
    calls: u64,
    ok: u64,
    rejected: u64,
    fake_429: u64,
    /// The phase's run time: every counted call started inside it.
    run: Duration,
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let baseline_auth = format!("Basic {}", STANDARD.encode("bench-baseline-key:"));
    let fake = FakeVitally::spawn(FakeConfig {
        auth_headers: vec![fake_vitally::default_auth_header(), baseline_auth.clone()],
        rate_limit: FAKE_LIMIT,
        window: FAKE_WINDOW,
    })
    .await?;
    fake.seed(Fixture {
        custom_objects: vec![CustomObjectSeed {
            id: Some(OBJECT_ID.into()),
            name: "Thena Requests".into(),
            ..CustomObjectSeed::default()
        }],
        ..Fixture::default()
    })
    .map_err(anyhow::Error::msg)?;

    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let allowed = AllowList::vitally()
        .with(&fake.base_url())
        .map_err(anyhow::Error::msg)?;
    let new_http = || {
        VitallyHttp::new(
            Duration::from_secs(5),
            allowed.clone(),
            VitallyMetrics::unregistered(),
        )
    };
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let http = new_http()?;
        let client = http.client(
            &fake.base_url(),
            SecretString::from(fake.auth_header()),
            WORKSPACE,
        );
        let redis = ConnectionManager::new(redis::Client::open(REDIS_URL)?).await?;
        clients.push((client, RateLimiter::new(redis, &prefix, 0.25)));
    }

    fake.reset_calls();
    let limited = hammer(&fake, "with limiter", &clients, LIMITED_RUN, true).await;

    let baseline_clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let http = new_http()?;
            let client = http.client(
                &fake.base_url(),
                SecretString::from(baseline_auth.clone()),
                WORKSPACE,
            );
            Ok((client, clients[0].1.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    fake.reset_calls();
    let baseline = hammer(
        &fake,
        "without limiter",
        &baseline_clients,
        BASELINE_RUN,
        false,
    )
    .await;

    print_table(&[(limited, u64::from(BUDGET_PER_MIN / 60)), (baseline, 0)]);
    cleanup(&prefix).await?;
    fake.shutdown().await;
    Ok(())
}

/// Every client runs its workers for `run`; with `limited`, each call first takes a
/// slot (waiting up to 2 s) and a 429 pauses the integration fleet-wide.
async fn hammer(
    fake: &RunningFake,
    phase: &'static str,
    clients: &[(VitallyClient, RateLimiter)],
    run: Duration,
    limited: bool,
) -> Row {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (client, limiter) in clients {
        for _ in 0..WORKERS_PER_CLIENT {
            let (client, limiter, tally) = (client.clone(), limiter.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                let mut n: u64 = 0;
                while start.elapsed() < run {
                    if limited {
                        match limiter
                            .acquire(WORKSPACE, BUDGET_PER_MIN, Duration::from_secs(2))
                            .await
                        {
                            Admission::Granted => {}
                            Admission::Wait(d) | Admission::Paused(d) => {
                                // A consumer would defer the event; here, just try later.
                                tokio::time::sleep(d.min(Duration::from_millis(200))).await;
                                continue;
                            }
                        }
                        if start.elapsed() >= run {
                            break;
                        }
                    }
                    n += 1;
                    match client
                        .find_instance(OBJECT_ID, &format!("thena:{WORKSPACE}:{n}"))
                        .await
                    {
                        Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => match e.class() {
                            ErrorClass::RateLimited { reset } => {
                                if limited {
                                    limiter.pause(WORKSPACE, reset).await;
                                }
                                tally.limited.fetch_add(1, Ordering::Relaxed)
                            }
                            ErrorClass::Transient | ErrorClass::Permanent => {
                                tally.other.fetch_add(1, Ordering::Relaxed)
                            }
                        },
                    };
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let calls = fake.calls();
    let other = tally.other.load(Ordering::Relaxed);
    if other > 0 {
        eprintln!("{phase}: {other} calls failed for reasons other than 429");
    }
    Row {
        phase,
        calls: calls.total,
        ok: tally.ok.load(Ordering::Relaxed),
        rejected: tally.limited.load(Ordering::Relaxed),
        fake_429: calls.status(429),
        run,
    }
}

fn print_table(rows: &[(Row, u64)]) {
    let limit_per_min = f64::from(FAKE_LIMIT) * 60.0 / FAKE_WINDOW.as_secs_f64();
    println!();
    println!(
        "fake limit {FAKE_LIMIT}/{}s (≈{limit_per_min:.0}/min) · fleet budget {BUDGET_PER_MIN}/min · \
         {CLIENTS} clients × {WORKERS_PER_CLIENT} in flight",
        FAKE_WINDOW.as_secs()
    );
    println!(
        "| phase           | run   | calls  | 2xx   | 429 (fake) | 2xx/min | steady/min | of budget | of limit |"
    );
    println!(
        "|-----------------|-------|--------|-------|------------|---------|------------|-----------|----------|"
    );
    for (r, burst) in rows {
        let minutes = r.run.as_secs_f64() / 60.0;
        let per_min = r.ok as f64 / minutes;
        let steady = r.ok.saturating_sub(*burst) as f64 / minutes;
        println!(
            "| {:<15} | {:>4.1}s | {:>6} | {:>5} | {:>10} | {:>7.0} | {:>10.0} | {:>8.1}% | {:>7.1}% |",
            r.phase,
            r.run.as_secs_f64(),
            r.calls,
            r.ok,
            r.fake_429,
            per_min,
            steady,
            steady / f64::from(BUDGET_PER_MIN) * 100.0,
            steady / limit_per_min * 100.0,
        );
        if r.rejected != r.fake_429 {
            println!(
                "  (clients saw {} × 429, the fake counted {})",
                r.rejected, r.fake_429
            );
        }
    }
    println!(
        "steady/min leaves out the limiter's one-off burst of {} calls from idle; the \
         baseline's rate is what the fake let through before answering 429.",
        BUDGET_PER_MIN / 60
    );
    println!();
}

async fn cleanup(prefix: &str) -> anyhow::Result<()> {
    let mut conn = ConnectionManager::new(redis::Client::open(REDIS_URL)?).await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: () = conn.del(keys).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
