//! The parked set at size: 5,000 parked messages (and 5,000 already replayed, 10,000
//! ledger rows beside them), every page the CLI, the admin API and the console ask for,
//! against the baseline of the same run — browsing 5,000 messages in RabbitMQ, as `dlq
//! list` did before the parked set moved to PostgreSQL — and a replay against bare
//! publishes with confirms. `cargo bench -p thena-replayer --bench parked_set`.
//!
//! Each page is timed as a handler does the work: the library call (PostgreSQL round
//! trips included) and the JSON of its answer. Rounds interleave every query; figures are
//! medians and p95 over all rounds.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{StreamExt, stream};
use lapin::{BasicProperties, types::AMQPValue};
use serde::Serialize;
use thena_broker::{Broker, Failure, FailureClass, Topology, WORKSPACE_HEADER};
use thena_events::RequestChanged;
use thena_replayer::{
    dlq::{Dlq, DlqFilter, DlqQueue, ReplayOptions, transit},
    parked::Parked,
};
use thena_store::{
    dead_letters::DeadLetters,
    ledger::{Entry, Ledger},
};
use thena_testkit::TestEnv;

const PARKED: usize = 5_000;
const REPLAYED: usize = 5_000;
const LEDGER_ROWS: u64 = 10_000;
const WORKSPACES: usize = 20;
const REASONS: [&str; 5] = [
    "vitally_400",
    "vitally_404",
    "no_integration",
    "too_old",
    "delivery_limit",
];
const ROUNDS: usize = 40;
const BASELINE_ROUNDS: usize = 3;
const REPLAY_BATCH: usize = 500;
/// The console's budget for a whole page.
const PAGE_BUDGET: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let broker = Broker::connect(env.amqp_url(), "parked-set-bench", env.topology.clone()).await?;
    let db = env.db().await;
    let store = DeadLetters::new(db.clone());
    let dlq = Dlq::new(db.clone());

    eprintln!("filling: {PARKED} parked, {REPLAYED} replayed, {LEDGER_ROWS} ledger rows…");
    let events = fill(&store, &env.topology).await?;
    fill_ledger(&db).await?;
    // The "before" picture: the same messages waiting in a queue, browsed.
    publish_dead(&broker, &events).await?;
    let ids = dlq
        .list(&DlqFilter::default(), None, 1000)
        .await?
        .dead_letters;
    // Parked ids are consecutive (the replayed ones come first): 4,000 rows in.
    let deep = Some(ids[0].id + 3_999);
    let one = &ids[123];
    let event_id = one.event_id.clone().unwrap_or_default();
    let filters = Filters::new(one);

    let mut timings: Vec<(&str, Vec<Duration>)> = Vec::new();
    let mut record =
        |name: &'static str, took: Duration| match timings.iter_mut().find(|(n, _)| *n == name) {
            Some((_, all)) => all.push(took),
            None => timings.push((name, vec![took])),
        };
    for _ in 0..ROUNDS {
        record(
            "list, first page of 50",
            timed_page(&dlq, &DlqFilter::default(), None).await?,
        );
        record(
            "list, a page 4,000 deep",
            timed_page(&dlq, &DlqFilter::default(), deep).await?,
        );
        record(
            "list by workspace",
            timed_page(&dlq, &filters.workspace, None).await?,
        );
        record(
            "list by reason, older than 1h",
            timed_page(&dlq, &filters.reason_age, None).await?,
        );
        record(
            "list by request",
            timed_page(&dlq, &filters.request, None).await?,
        );
        record(
            "list replayed (history)",
            timed_page(&dlq, &filters.replayed, None).await?,
        );
        let started = Instant::now();
        let shown = dlq.show(&one.id.to_string(), None).await?;
        json(&shown);
        record("show one by id", started.elapsed());
        let started = Instant::now();
        json(&dlq.show(&event_id, None).await?);
        record("show one by event id", started.elapsed());
        let started = Instant::now();
        store.matched(&DlqFilter::default().at(Utc::now())).await?;
        record("dry run: count everything", started.elapsed());
        let started = Instant::now();
        store.stats().await?;
        record("metrics poll: count + oldest", started.elapsed());
    }
    let mut baseline = Vec::new();
    for _ in 0..BASELINE_ROUNDS {
        let started = Instant::now();
        let listed = transit::list(&broker, DlqQueue::Dead, &DlqFilter::default(), 50).await?;
        std::hint::black_box(listed);
        baseline.push(started.elapsed());
    }
    let browse = median(&mut baseline);

    println!();
    println!(
        "the parked set: {PARKED} parked + {REPLAYED} replayed dead letters, {LEDGER_ROWS} \
         ledger rows; {ROUNDS} interleaved rounds; library call + JSON of the answer"
    );
    println!(
        "{:<32} {:>9} {:>9} {:>9} {:>20}",
        "page", "median", "p95", "max", "browsing / this"
    );
    for (name, all) in &mut timings {
        let (p50, p95, max) = (
            median(all),
            percentile(all, 0.95),
            *all.iter().max().unwrap(),
        );
        let over = if max > PAGE_BUDGET {
            "  OVER 200 ms"
        } else {
            ""
        };
        println!(
            "{name:<32} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>19.0}x{over}",
            ms(p50),
            ms(p95),
            ms(max),
            browse.as_secs_f64() / p50.as_secs_f64()
        );
    }
    println!(
        "{:<32} {:>7.1}ms   (baseline: `dlq list` before, reading {PARKED} messages off a queue, \
         median of {BASELINE_ROUNDS})",
        "browse RabbitMQ, first page",
        ms(browse)
    );

    replay_rate(&dlq, &broker).await?;

    broker.close().await;
    env.cleanup().await;
    Ok(())
}

struct Filters {
    workspace: DlqFilter,
    reason_age: DlqFilter,
    request: DlqFilter,
    replayed: DlqFilter,
}

impl Filters {
    fn new(one: &thena_store::dead_letters::DeadLetter) -> Filters {
        Filters {
            workspace: DlqFilter {
                workspace: one.workspace_id.clone(),
                ..DlqFilter::default()
            },
            reason_age: DlqFilter {
                reason: Some("no_integration".into()),
                older_than: Some(Duration::from_secs(3_600)),
                ..DlqFilter::default()
            },
            request: DlqFilter {
                workspace: one.workspace_id.clone(),
                request_id: one.request_id,
                ..DlqFilter::default()
            },
            replayed: DlqFilter {
                state: thena_store::dead_letters::State::Replayed,
                ..DlqFilter::default()
            },
        }
    }
}

async fn timed_page(dlq: &Dlq, filter: &DlqFilter, after: Option<i64>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let page = dlq.list(filter, after, 50).await?;
    json(&page);
    Ok(started.elapsed())
}

fn json(value: &impl Serialize) {
    std::hint::black_box(serde_json::to_vec(value).unwrap_or_default());
}

/// The event of parked message `n`: 20 workspaces, a few versions per request, first
/// failures spread over two days, a realistic body (~2–3 KB).
fn event(n: usize) -> RequestChanged {
    let workspace = format!("TBENCH{:02}", n % WORKSPACES);
    let mut event = thena_events::sample::event(
        &workspace,
        (n / 3) as u64 + 1,
        (n % 3) as u64 + 1,
        Some("alice@acme.com"),
    );
    event.request.summary = Some("The CSV export times out for large accounts. ".repeat(20));
    event
}

fn parked_message(
    event: &RequestChanged,
    n: usize,
    topology: &Topology,
) -> (BasicProperties, Vec<u8>) {
    let mut failure = Failure::new(
        FailureClass::Permanent,
        REASONS[n % REASONS.len()],
        "400 Bad Request: {\"error\":\"invalid trait path\"}",
        topology.exchange(),
        Topology::routing_key(&event.workspace_id),
        Utc::now() - chrono::Duration::minutes((n % 2_880) as i64),
    );
    failure.attempts = (n % 7) as u32;
    let mut headers = failure.to_headers();
    headers.insert(
        WORKSPACE_HEADER.into(),
        AMQPValue::LongString(event.workspace_id.as_str().into()),
    );
    headers.insert(
        "x-thena-parked-at".into(),
        AMQPValue::LongString(Utc::now().to_rfc3339().into()),
    );
    let props = BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    (props, serde_json::to_vec(event).unwrap_or_default())
}

/// Stores the parked set the way the drain does; marks the first `REPLAYED` replayed.
async fn fill(store: &DeadLetters, topology: &Topology) -> anyhow::Result<Vec<RequestChanged>> {
    let events: Vec<RequestChanged> = (0..PARKED + REPLAYED).map(event).collect();
    let stored: Vec<anyhow::Result<()>> = stream::iter(events.iter().enumerate())
        .map(|(n, event)| async move {
            let (props, body) = parked_message(event, n, topology);
            let parked = Parked::read(&props, &body, topology, Utc::now());
            store.insert(&parked.letter, None).await?;
            Ok(())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    stored.into_iter().collect::<anyhow::Result<()>>()?;
    store
        .db()
        .client()
        .await?
        .execute(
            "UPDATE dead_letters SET state = 'replayed', state_by = 'bench', state_at = now()
             WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT $1)",
            &[&(REPLAYED as i64)],
        )
        .await?;
    store
        .db()
        .client()
        .await?
        .batch_execute("ANALYZE dead_letters")
        .await?;
    Ok(events[REPLAYED..].to_vec())
}

async fn fill_ledger(db: &thena_store::Db) -> anyhow::Result<()> {
    let ledger = Ledger::start(db.clone());
    let written: Vec<Result<(), thena_store::DbError>> = stream::iter(0..LEDGER_ROWS)
        .map(|n| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .record(Entry {
                        workspace_id: format!("TBENCH{:02}", n % WORKSPACES as u64),
                        request_id: n + 1,
                        version: 1,
                        snapshot: None,
                        outcome: "synced",
                        reason: "created".into(),
                        detail: None,
                        link: None,
                        instance_id: None,
                        failed_attempt: false,
                        backfill_job: None,
                        age: None,
                    })
                    .await
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    written.into_iter().collect::<Result<(), _>>()?;
    Ok(())
}

/// The same parked messages waiting in the dead queue (no replayer runs here).
async fn publish_dead(broker: &Broker, events: &[RequestChanged]) -> anyhow::Result<()> {
    let publisher = broker.publisher().await?;
    let topology = broker.topology().clone();
    let published: Vec<anyhow::Result<()>> = stream::iter(events.iter().enumerate())
        .map(|(n, event)| {
            let (publisher, topology) = (publisher.clone(), topology.clone());
            async move {
                let (props, body) = parked_message(event, n, &topology);
                publisher
                    .publish_raw(
                        &topology.dlx(),
                        &Topology::routing_key(&event.workspace_id),
                        &body,
                        props,
                    )
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    publisher.close().await;
    published.into_iter().collect()
}

/// Replays `REPLAY_BATCH` dead letters as fast as confirms come back, against publishing
/// the same bodies with confirms and no PostgreSQL, one at a time.
async fn replay_rate(dlq: &Dlq, broker: &Broker) -> anyhow::Result<()> {
    let page = dlq
        .list(&DlqFilter::default(), None, REPLAY_BATCH as i64)
        .await?;
    let ids: Vec<i64> = page.dead_letters.iter().map(|d| d.id).collect();
    let publisher = broker.publisher().await?;
    let topology = broker.topology().clone();
    let options = ReplayOptions {
        dry_run: false,
        rate_per_sec: None,
        actor: "bench".into(),
        why: "bench".into(),
    };
    let filter = DlqFilter {
        ids,
        ..DlqFilter::default()
    };
    let started = Instant::now();
    let job = dlq.prepare_replay(&filter, &options).await?;
    let report = dlq.replay(&publisher, job, |_| {}).await?;
    let replay = started.elapsed();
    let started = Instant::now();
    for letter in &page.dead_letters {
        let shown = dlq.show(&letter.id.to_string(), None).await?;
        std::hint::black_box(&shown);
    }
    let reads = started.elapsed();
    let started = Instant::now();
    for letter in &page.dead_letters {
        publisher
            .publish_raw(
                &topology.exchange(),
                &letter.original_routing_key,
                b"{}",
                BasicProperties::default(),
            )
            .await?;
    }
    let bare = started.elapsed();
    publisher.close().await;
    let rate = |n: u64, took: Duration| n as f64 / took.as_secs_f64();
    println!();
    println!(
        "replay of {} dead letters, unlimited rate: {:.0}/s, {:.2}x bare publish+confirm one at a \
         time ({:.0}/s); reading each back alone: {:.0}/s",
        report.replayed,
        rate(report.replayed, replay),
        bare.as_secs_f64() / replay.as_secs_f64(),
        rate(REPLAY_BATCH as u64, bare),
        rate(REPLAY_BATCH as u64, reads),
    );
    Ok(())
}

fn median(all: &mut [Duration]) -> Duration {
    percentile(all, 0.5)
}

fn percentile(all: &mut [Duration], p: f64) -> Duration {
    all.sort_unstable();
    let index = ((all.len() as f64 - 1.0) * p).round() as usize;
    all[index.min(all.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}
