//! Consumer benchmarks over the real RabbitMQ and Redis and the fake Vitally:
//! `cargo bench --bench fleet`. Prints a table and writes `target/bench/fleet.json`.
//!
//! - raw lapin consume-and-ack (the baseline) vs the consumer's events/s, cold and warm;
//! - events/s against a Vitally that answers after 100 ms, as concurrency grows;
//! - Vitally calls per event, cold and warm;
//! - noisy neighbour: workspace B's event age while workspace A floods 10× its budget;
//! - coalescing: writes and drain time for 100 requests × 10 changes that arrive while
//!   their integration is out of budget;
//! - backfill: 2,000 historical requests imported while live traffic flows: the time
//!   against its budget share's ideal, and the live events' age meanwhile.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::time::{Duration, Instant};

use fake_vitally::{FakeConfig, Fault, FaultKind};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::{Value, json};
use support::Fleet;
use thena_events::sample;
use thena_testkit::{TestEnv, wait_until};

const EMAIL: Option<&str> = Some("alice@acme.com");

fn unthrottled_fake() -> FakeConfig {
    FakeConfig {
        rate_limit: 10_000_000,
        ..FakeConfig::default()
    }
}

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

fn row(name: impl Into<String>, value: f64, unit: &'static str, note: impl Into<String>) -> Row {
    Row {
        name: name.into(),
        value,
        unit,
        note: note.into(),
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Raw lapin: publish `n` persistent messages, then consume and ack them (prefetch 64).
async fn raw_lapin_consume(n: usize) -> f64 {
    let env = TestEnv::new();
    let channel = env.channel().await.expect("channel");
    let queue = format!("{}.raw", env.prefix);
    channel
        .queue_declare(
            queue.clone().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = serde_json::to_vec(&sample::event("T-RAW", 1, 1, EMAIL)).unwrap();
    for _ in 0..n {
        channel
            .basic_publish(
                "".into(),
                queue.clone().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.clone().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.unwrap().unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    env.cleanup().await;
    rate
}

/// Connects `count` workspaces with the full 1000/min budget each, so the per-integration
/// limiter is not what is measured.
async fn connect_workspaces(fleet: &Fleet, count: usize) -> Vec<String> {
    let mut workspaces = Vec::new();
    for i in 0..count {
        let ws = format!("T-BENCH{i:03}");
        fleet.connect(&ws, |_| {}).await;
        workspaces.push(ws);
    }
    workspaces
}

/// Publishes version `version` of `per_ws` requests in each workspace, then starts the
/// consumer and times until all of them settled. Returns events/s.
async fn timed_batch(
    fleet: &mut Fleet,
    workspaces: &[String],
    per_ws: u64,
    version: u64,
    settled_before: u64,
) -> f64 {
    timed_batch_as(fleet, workspaces, per_ws, version, settled_before, true).await
}

async fn timed_batch_as(
    fleet: &mut Fleet,
    workspaces: &[String],
    per_ws: u64,
    version: u64,
    settled_before: u64,
    ledger: bool,
) -> f64 {
    for ws in workspaces {
        for id in 0..per_ws {
            fleet
                .publish(&sample::event(ws, 1 + id, version, EMAIL))
                .await;
        }
    }
    let n = workspaces.len() as u64 * per_ws;
    let start = Instant::now();
    if ledger {
        fleet.spawn_consumer().await;
    } else {
        fleet.spawn_consumer_without_ledger().await;
    }
    fleet
        .wait_settled_within(settled_before + n, Duration::from_secs(120))
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    fleet.take_consumer().stop().await;
    rate
}

async fn throughput(rows: &mut Vec<Row>, baseline: f64) {
    let mut fleet = Fleet::start_with(
        unthrottled_fake(),
        &[("CONSUMER_CONCURRENCY", "64"), ("CONSUMER_PREFETCH", "128")],
    )
    .await;
    // 100 workspaces × 10 requests: 20 cold calls per integration fit its burst, so this
    // measures the consumer, not the per-integration budget (a separate row shows that).
    let workspaces = connect_workspaces(&fleet, 100).await;
    let per_ws = 10;
    let cold = timed_batch(&mut fleet, &workspaces, per_ws, 1, 0).await;
    let cold_deferred = fleet.count("deferred", None);
    let warm = timed_batch(
        &mut fleet,
        &workspaces,
        per_ws,
        2,
        workspaces.len() as u64 * per_ws,
    )
    .await;
    rows.push(row(
        "consumer, zero-latency Vitally, cold (create)",
        cold,
        "events/s",
        format!(
            "{:.3} × raw lapin; {} deferred for budget",
            cold / baseline,
            cold_deferred
        ),
    ));
    rows.push(row(
        "consumer, zero-latency Vitally, warm (update)",
        warm,
        "events/s",
        format!("{:.3} × raw lapin", warm / baseline),
    ));
    // The ledger's cost on the warm path: with and without it, interleaved (A B A B A B)
    // after one untimed warm-up each, median of three.
    let mut with_ledger = Vec::new();
    let mut without = Vec::new();
    let mut settled = 2 * workspaces.len() as u64 * per_ws;
    let mut version = 3;
    for round in 0..4 {
        for ledger in [true, false] {
            let rate =
                timed_batch_as(&mut fleet, &workspaces, per_ws, version, settled, ledger).await;
            settled += workspaces.len() as u64 * per_ws;
            version += 1;
            if round > 0 {
                if ledger {
                    &mut with_ledger
                } else {
                    &mut without
                }
                .push(rate);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (with_ledger, without) = (median(&mut with_ledger), median(&mut without));
    rows.push(row(
        "consumer, warm, request ledger on (median of 3)",
        with_ledger,
        "events/s",
        format!(
            "{:.3} × ledger off ({without:.0} events/s), interleaved",
            with_ledger / without
        ),
    ));
    rows.push(row(
        "process RSS after the zero-latency runs",
        rss_mib(),
        "MiB",
        "fake + consumer + harness in one process",
    ));
    fleet.stop().await;
}

async fn latency_scaling(rows: &mut Vec<Row>) {
    for concurrency in [1usize, 8, 32, 64] {
        let c = concurrency.to_string();
        let mut fleet = Fleet::start_with(
            unthrottled_fake(),
            &[("CONSUMER_CONCURRENCY", &c), ("CONSUMER_PREFETCH", "128")],
        )
        .await;
        let workspaces = connect_workspaces(&fleet, 20).await;
        let per_ws = (concurrency as u64 * 4 / 20).max(2);
        // Create first (untimed), then time warm updates: one 100 ms call each.
        timed_batch(&mut fleet, &workspaces, per_ws, 1, 0).await;
        fleet.fake.inject(Fault::NextN {
            method: None,
            path_prefix: "/resources".into(),
            count: 1_000_000,
            kind: FaultKind::Latency(Duration::from_millis(100)),
        });
        let rate = timed_batch(
            &mut fleet,
            &workspaces,
            per_ws,
            2,
            workspaces.len() as u64 * per_ws,
        )
        .await;
        let ideal = concurrency as f64 * 10.0;
        rows.push(row(
            format!("consumer, Vitally +100 ms, concurrency {concurrency}"),
            rate,
            "events/s",
            format!(
                "{:.0}% of the {ideal:.0}/s a 100 ms call allows",
                100.0 * rate / ideal
            ),
        ));
        fleet.stop().await;
    }
}

/// Producer API → RabbitMQ → two consumers → fake Vitally, in one process: event age at a
/// steady rate well below saturation, then events/s with the API fed as fast as it takes.
async fn end_to_end(rows: &mut Vec<Row>, baseline: f64) {
    let mut fleet = Fleet::start_with(
        unthrottled_fake(),
        &[
            ("PRODUCER_TOKEN", "bench-token-0000001"),
            ("CONSUMER_CONCURRENCY", "64"),
        ],
    )
    .await;
    let workspaces = connect_workspaces(&fleet, 100).await;
    let registry = prometheus::Registry::new();
    let state = thena_producer::from_config(&fleet.config, &registry, Default::default())
        .await
        .expect("producer");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let producer = tokio::spawn(thena_producer::run(listener, state, stop.clone()));
    fleet.spawn_consumer().await;
    fleet.spawn_consumer().await;
    let token = secrecy::SecretString::from("bench-token-0000001");

    // Steady: 100 events/s for 10 s, one per request, spread over the workspaces.
    let steady: Vec<_> = (0..1_000u64)
        .map(|i| sample::event(&workspaces[(i % 100) as usize], 1 + i / 100, 1, EMAIL))
        .collect();
    // The events were built up front; the emitter sends event i at start + i × 10 ms, so
    // age is measured from that moment, not from the (earlier) occurred_at.
    let emit_start = chrono::Utc::now();
    let report = thena_producer::emit::emit_http(&api, &token, &steady, 100, 1)
        .await
        .unwrap();
    assert_eq!(report.accepted, 1_000);
    fleet
        .wait_settled_within(1_000, Duration::from_secs(60))
        .await;
    let mut ages: Vec<f64> = steady
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let instance = &fleet.instances_for(&e.workspace_id, e.request.id)[0];
            let sent = emit_start + chrono::Duration::milliseconds(10 * i as i64);
            (instance.created_at - sent).num_milliseconds() as f64 / 1000.0
        })
        .collect();
    ages.sort_by(f64::total_cmp);
    let pct = |p: f64| ages[((ages.len() as f64 - 1.0) * p).round() as usize];
    rows.push(row(
        "end to end at a steady 100 events/s: p50 event age",
        pct(0.5),
        "s",
        "producer API → RabbitMQ → 2 consumers → Vitally 2xx",
    ));
    rows.push(row(
        "end to end at a steady 100 events/s: p99 event age",
        pct(0.99),
        "s",
        "1000 new requests over 100 workspaces",
    ));

    // Saturated: updates of the same requests, posted in batches of 50 as fast as accepted.
    let burst: Vec<_> = steady
        .iter()
        .map(|e| sample::event(&e.workspace_id, e.request.id, 2, EMAIL))
        .collect();
    let start = Instant::now();
    let report = thena_producer::emit::emit_http(&api, &token, &burst, 0, 50)
        .await
        .unwrap();
    assert_eq!(report.accepted, 1_000);
    fleet
        .wait_settled_within(2_000, Duration::from_secs(60))
        .await;
    let rate = 1_000.0 / start.elapsed().as_secs_f64();
    rows.push(row(
        "end to end, API fed as fast as it accepts (updates)",
        rate,
        "events/s",
        format!(
            "{:.3} × raw lapin consume; ingest and consume share the 2 cores",
            rate / baseline
        ),
    ));
    rows.push(row(
        "process RSS after the end-to-end runs",
        rss_mib(),
        "MiB",
        "producer + 2 consumers + fake + harness",
    ));
    stop.cancel();
    let _ = producer.await;
    fleet.stop().await;
}

async fn calls_per_event(rows: &mut Vec<Row>) {
    let mut fleet = Fleet::start().await;
    fleet.connect(support::WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.fake.reset_calls();
    fleet
        .publish(&sample::event(support::WS, 1, 1, EMAIL))
        .await;
    fleet.wait_settled(1).await;
    let cold = fleet.fake.calls();
    fleet.fake.reset_calls();
    fleet
        .publish(&sample::event(support::WS, 1, 2, EMAIL))
        .await;
    fleet.wait_settled(2).await;
    let warm = fleet.fake.calls();
    fleet.fake.reset_calls();
    fleet
        .publish(&sample::event(support::WS, 2, 1, EMAIL))
        .await;
    fleet.wait_settled(3).await;
    let new_request = fleet.fake.calls();
    rows.push(row(
        "Vitally calls, first event (cold caches)",
        cold.total as f64,
        "calls",
        format!("{:?}", cold.by_route.keys().collect::<Vec<_>>()),
    ));
    rows.push(row(
        "Vitally calls, next request of a known requestor",
        new_request.total as f64,
        "calls",
        "user lookup cached",
    ));
    rows.push(row(
        "Vitally calls, update of a known request (warm)",
        warm.total as f64,
        "calls",
        "the instance PUT only",
    ));
    fleet.stop().await;
}

async fn noisy_neighbour(rows: &mut Vec<Row>) {
    // Production-like delay tiers: a deferred event really waits, as it would in a fleet.
    let env = TestEnv::with_tiers(vec![
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(30),
    ]);
    let mut fleet =
        Fleet::start_in(env, unthrottled_fake(), &[("CONSUMER_CONCURRENCY", "16")]).await;
    fleet
        .connect("T-FLOOD", |r| r.rate_budget_per_min = 60)
        .await;
    fleet
        .connect("T-QUIET", |r| r.rate_budget_per_min = 600)
        .await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let seconds = 10u64;
    let quiet_per_sec = 3u64;
    let flood_per_sec = 10u64; // 10 × its 1/s budget
    let start = Instant::now();
    let mut quiet_ids = Vec::new();
    for tick in 0..seconds * 10 {
        for i in 0..flood_per_sec / 10 {
            fleet
                .publish(&sample::event("T-FLOOD", 10_000 + tick * 10 + i, 1, EMAIL))
                .await;
        }
        if tick % (10 / quiet_per_sec).max(1) == 0 {
            let id = 20_000 + tick;
            fleet.publish(&sample::event("T-QUIET", id, 1, EMAIL)).await;
            quiet_ids.push(id);
        }
        let next = start + Duration::from_millis(100 * (tick + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    wait_until(
        "the quiet workspace's events",
        Duration::from_secs(60),
        || async {
            quiet_ids
                .iter()
                .all(|id| fleet.instances_for("T-QUIET", *id).len() == 1)
                .then_some(())
        },
    )
    .await;
    let mut ages: Vec<f64> = quiet_ids
        .iter()
        .map(|id| {
            let instance = &fleet.instances_for("T-QUIET", *id)[0];
            let occurred = fleet.published_at("T-QUIET", *id);
            (instance.created_at - occurred).num_milliseconds() as f64 / 1000.0
        })
        .collect();
    ages.sort_by(f64::total_cmp);
    let pct = |p: f64| ages[((ages.len() as f64 - 1.0) * p).round() as usize];
    let flood_synced = fleet
        .fake
        .instances()
        .iter()
        .filter(|i| i.external_id.starts_with("thena:T-FLOOD:"))
        .count();
    let flood_sent = (seconds * flood_per_sec) as usize;
    rows.push(row(
        "noisy neighbour: quiet workspace p50 event age",
        pct(0.5),
        "s",
        format!("{} events at {quiet_per_sec}/s", ages.len()),
    ));
    rows.push(row(
        "noisy neighbour: quiet workspace p99 event age",
        pct(0.99),
        "s",
        "target < 5 s",
    ));
    rows.push(row(
        "noisy neighbour: flooding workspace synced meanwhile",
        flood_synced as f64,
        "events",
        format!("of {flood_sent} sent at 10× its 60/min budget; the rest deferred, not lost"),
    ));
    fleet.stop().await;
}

/// Coalescing under budget: 100 known requests × 10 changes each arrive while their
/// integration is out of budget (a 429 paused it). One write per request is the physical
/// limit; the drain's ideal is one write per budget slot from the end of the pause.
async fn coalescing(rows: &mut Vec<Row>) {
    use support::{WS, versioned, wait_all_at};
    use vitally_client::{
        limiter::RateLimiter,
        provision::{self, Toggles},
    };
    // Production's tier shape: waiting events hop a few times, on time.
    let env = TestEnv::with_tiers(vec![
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(30),
    ]);
    let mut fleet = Fleet::start_in(env, unthrottled_fake(), &[]).await;
    let integration = fleet.connect(WS, |r| r.rate_budget_per_min = 1000).await;
    fleet.spawn_consumer().await;
    let ids: Vec<u64> = (1..=100).collect();
    // Every request exists in Vitally first: each later write is one call.
    for id in &ids {
        fleet.publish(&versioned(WS, *id, 1)).await;
    }
    wait_all_at(&fleet, &ids, 1, Duration::from_secs(120)).await;
    let budget = 300u32;
    provision::set_toggles(
        &fleet.store,
        WS,
        Toggles {
            rate_budget_per_min: Some(budget),
            ..Toggles::default()
        },
        "bench",
    )
    .await
    .expect("budget set");
    fleet.fake.reset_calls();
    let redis = thena_runtime::redis::connect(&fleet.env.redis_url())
        .await
        .expect("redis");
    let pause = Duration::from_secs(10);
    RateLimiter::new(redis, &fleet.env.redis_prefix, 0.25)
        .pause_as(integration.budget_key(), WS, pause)
        .await;
    let pause_end = chrono::Utc::now() + chrono::Duration::from_std(pause).unwrap();
    let sent = Instant::now();
    for version in 2..=11 {
        for id in &ids {
            fleet.publish(&versioned(WS, *id, version)).await;
        }
    }
    let sending = sent.elapsed();
    wait_all_at(&fleet, &ids, 11, Duration::from_secs(180)).await;
    let calls = fleet.fake.calls();
    let writes = calls.route("POST /resources/customObjects/:id/instances")
        + calls.route("PUT /resources/customObjects/:id/instances/:id");
    let last_write = fleet
        .fake
        .instances()
        .iter()
        .map(|i| i.updated_at)
        .max()
        .expect("instances");
    let drain = (last_write - pause_end).num_milliseconds() as f64 / 1000.0;
    let ideal = ids.len() as f64 * 60.0 / f64::from(budget);
    rows.push(row(
        "coalescing: instance writes for 100 requests × 10 changes",
        writes as f64,
        "writes",
        format!(
            "sent in {:.1} s during a {} s 429 pause; target ≤ 110 (one per change: 1000)",
            sending.as_secs_f64(),
            pause.as_secs()
        ),
    ));
    rows.push(row(
        "coalescing: drain after the pause, every request at its latest version",
        drain,
        "s",
        format!(
            "{:.2} × the ideal {ideal:.1} s (100 writes at {budget}/min); target ≤ 1.1",
            drain / ideal
        ),
    ));
    fleet.stop().await;
}

/// Backfill: `requests` historical requests imported while live traffic flows. The
/// backfill may use BACKFILL_BUDGET_SHARE (default 30 %) of the integration's budget, and
/// only what live events leave idle; its ideal time is its calls at that share.
async fn backfill(rows: &mut Vec<Row>, requests: u64) {
    use support::WS;
    let env = TestEnv::with_tiers(vec![
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(30),
    ]);
    let mut fleet = Fleet::start_in(env, unthrottled_fake(), &[]).await;
    let budget = 1000u32;
    let share = fleet.config.consumer.backfill_budget_share;
    fleet.connect(WS, |r| r.rate_budget_per_min = budget).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    // Warm the requestor's lookup, so every request costs the same two calls (search,
    // create) live or backfilled.
    fleet.publish(&sample::event(WS, 1, 1, EMAIL)).await;
    fleet.wait_settled(1).await;
    let export: Vec<thena_events::RequestChanged> = (0..requests)
        .map(|i| {
            let mut event = sample::event(WS, 100_000 + i, 1, EMAIL);
            event.request.created_at = chrono::Utc::now() - chrono::Duration::days(60);
            event
        })
        .collect();
    let text = export
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let parsed = thena_producer::backfill::read_export(WS, text.as_bytes(), &Default::default());
    fleet.fake.reset_calls();
    let started = Instant::now();
    let job = thena_producer::backfill::run(
        fleet.store.db(),
        &fleet.publisher,
        WS,
        "bench",
        "bench",
        &parsed,
        |_| {},
    )
    .await
    .expect("backfill published")
    .job;
    // Live traffic meanwhile: a new request every 500 ms until the backfill is done.
    let mut live = Vec::new();
    let db = fleet.store.db().clone();
    let done_at = loop {
        let id = 200_000 + live.len() as u64;
        fleet.publish(&sample::event(WS, id, 1, EMAIL)).await;
        live.push(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let progress = thena_store::backfill::progress(&db, WS, &job.id)
            .await
            .expect("progress")
            .expect("the job");
        if progress.is_done() {
            break started.elapsed();
        }
    };
    wait_until("the live requests", Duration::from_secs(60), || async {
        live.iter()
            .all(|id| fleet.instances_for(WS, *id).len() == 1)
            .then_some(())
    })
    .await;
    let mut ages: Vec<f64> = live
        .iter()
        .map(|id| {
            let instance = &fleet.instances_for(WS, *id)[0];
            (instance.created_at - fleet.published_at(WS, *id)).num_milliseconds() as f64 / 1000.0
        })
        .collect();
    ages.sort_by(f64::total_cmp);
    let p99 = ages[((ages.len() as f64 - 1.0) * 0.99).round() as usize];
    let calls = fleet.fake.calls().total;
    // Each live request made two calls (its requestor was known); the rest are the backfill's.
    let backfill_calls = calls.saturating_sub(2 * live.len() as u64);
    let rate = f64::from(budget) * share / 60.0;
    let ideal = backfill_calls as f64 / rate;
    let took = done_at.as_secs_f64();
    rows.push(row(
        format!("backfill: {requests} historical requests, done in"),
        took,
        "s",
        format!(
            "{:.2} × the ideal {ideal:.0} s ({backfill_calls} calls at {:.0} % of {budget}/min); target ≤ 1.2",
            took / ideal,
            share * 100.0
        ),
    ));
    rows.push(row(
        "backfill: live requests' p99 event age meanwhile",
        p99,
        "s",
        format!("{} live requests at 2/s; target < 2 s", live.len()),
    ));
    fleet.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut rows = Vec::new();
    // `-- throughput` runs the baseline and the throughput rows; `-- coalescing` and
    // `-- backfill [N]` only theirs; no argument runs everything.
    let only = |name: &str| std::env::args().any(|a| a == name);
    let backfill_requests = std::env::args()
        .skip_while(|a| a != "backfill")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    if only("backfill") {
        backfill(&mut rows, backfill_requests).await;
    } else if !only("coalescing") {
        let baseline = raw_lapin_consume(2_000).await;
        rows.push(row(
            "raw lapin consume + ack (baseline)",
            baseline,
            "msgs/s",
            "same broker, same run",
        ));
        throughput(&mut rows, baseline).await;
        if !only("throughput") {
            end_to_end(&mut rows, baseline).await;
            calls_per_event(&mut rows).await;
            latency_scaling(&mut rows).await;
            noisy_neighbour(&mut rows).await;
        }
    }
    if !only("throughput") && !only("backfill") {
        coalescing(&mut rows).await;
    }
    if !only("throughput") && !only("coalescing") && !only("backfill") {
        backfill(&mut rows, backfill_requests).await;
    }

    println!("\n{:<58} {:>10} {:<9} note", "measure", "value", "unit");
    println!("{}", "-".repeat(110));
    for r in &rows {
        println!("{:<58} {:>10.2} {:<9} {}", r.name, r.value, r.unit, r.note);
    }
    let json: Value = json!({
        "machine": format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        "rows": rows.iter().map(|r| json!({"measure": r.name, "value": r.value, "unit": r.unit, "note": r.note})).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("fleet.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("\nwrote target/bench/fleet.json");
}
