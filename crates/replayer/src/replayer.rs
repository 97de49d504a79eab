//! The replayer role: consumes the dead queue and carries out [`RetrySchedule::plan`]
//! (publish with confirm, then ack); drains the parked queue into PostgreSQL (store, then
//! ack); polls queue depths and the parked set into the metrics.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use thena_broker::{Broker, BrokerMetrics, PARKED_AT_HEADER, Publisher};
use thena_store::{
    DbError,
    dead_letters::DeadLetters,
    ledger::{Entry, Ledger},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    parked::{Parked, parked_entry},
    schedule::{Decision, Plan, RetrySchedule},
};

/// Replayed and purged dead letters are deleted this long after they were settled.
pub const SETTLED_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How often the settled ones are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone)]
pub struct ReplayerConfig {
    pub schedule: RetrySchedule,
    /// Dead letters (and parked messages) handled at once.
    pub prefetch: u16,
    /// How often queue depths and the parked set's count and oldest age are refreshed.
    pub depth_poll_interval: Duration,
    /// Longest wait between reconnection attempts, and between attempts to store.
    pub max_reconnect_backoff: Duration,
}

impl ReplayerConfig {
    pub fn new(schedule: RetrySchedule) -> ReplayerConfig {
        ReplayerConfig {
            schedule,
            prefetch: 32,
            depth_poll_interval: Duration::from_secs(5),
            max_reconnect_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReplayerMetrics {
    pub broker: BrokerMetrics,
    /// `thena_vitally_replayer_retries_total{reason}`: dead letters sent to a delay tier.
    pub retries: IntCounterVec,
    /// `thena_vitally_replayer_parked_total{reason}`: dead letters parked.
    pub parked: IntCounterVec,
    /// `thena_vitally_parked_messages`: parked messages waiting for a human (PostgreSQL).
    pub parked_messages: IntGauge,
    /// `thena_vitally_parked_oldest_age_seconds`: 0 when nothing is parked.
    pub parked_oldest_age_seconds: Gauge,
}

impl ReplayerMetrics {
    pub fn register(registry: &Registry) -> Result<ReplayerMetrics, prometheus::Error> {
        let retries = IntCounterVec::new(
            Opts::new(
                "thena_vitally_replayer_retries_total",
                "Dead-lettered events scheduled for another attempt, by failure reason.",
            ),
            &["reason"],
        )?;
        let parked = IntCounterVec::new(
            Opts::new(
                "thena_vitally_replayer_parked_total",
                "Dead-lettered events parked for humans, by reason.",
            ),
            &["reason"],
        )?;
        let parked_messages = IntGauge::new(
            "thena_vitally_parked_messages",
            "Parked messages waiting for a human (the parked set in PostgreSQL).",
        )?;
        let parked_oldest_age_seconds = Gauge::with_opts(Opts::new(
            "thena_vitally_parked_oldest_age_seconds",
            "Age of the oldest parked message (since it was parked), 0 when none.",
        ))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(parked.clone()))?;
        registry.register(Box::new(parked_messages.clone()))?;
        registry.register(Box::new(parked_oldest_age_seconds.clone()))?;
        Ok(ReplayerMetrics {
            broker: BrokerMetrics::register(registry)?,
            retries,
            parked,
            parked_messages,
            parked_oldest_age_seconds,
        })
    }
}

/// What the replayer works with: the broker, and PostgreSQL for the parked set and the
/// request ledger.
#[derive(Clone, Debug)]
pub struct ReplayerDeps {
    pub broker: Broker,
    pub dead_letters: DeadLetters,
    pub ledger: Ledger,
}

impl ReplayerDeps {
    /// The ledger writer runs until the last clone of this is dropped.
    pub fn new(broker: Broker, db: thena_store::Db) -> ReplayerDeps {
        ReplayerDeps {
            broker,
            ledger: Ledger::start(db.clone()),
            dead_letters: DeadLetters::new(db),
        }
    }
}

/// Runs until `shutdown` is cancelled, with the default prefetch and poll interval.
pub async fn run_replayer(
    deps: ReplayerDeps,
    schedule: RetrySchedule,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_replayer_with(deps, ReplayerConfig::new(schedule), metrics, shutdown).await
}

/// Runs until `shutdown` is cancelled. Each queue's consumer reconnects and resubscribes
/// whenever the broker goes away or cancels it; in-flight messages finish before it
/// returns.
pub async fn run_replayer_with(
    deps: ReplayerDeps,
    config: ReplayerConfig,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let publisher = deps.broker.publisher().await?;
    let poller = tokio::spawn(poll(
        deps.clone(),
        metrics.clone(),
        config.depth_poll_interval,
        shutdown.clone(),
    ));
    let topology = deps.broker.topology().clone();
    let broker = deps.broker.clone();
    let replayer = Arc::new(Replayer {
        deps,
        publisher,
        config: config.clone(),
        metrics,
        shutdown: shutdown.clone(),
    });
    let dead = {
        let replayer = replayer.clone();
        move |delivery| {
            let replayer = replayer.clone();
            async move { replayer.retry_or_park(delivery).await }
        }
    };
    let parked = move |delivery| {
        let replayer = replayer.clone();
        async move { replayer.store_parked(delivery).await }
    };
    tokio::join!(
        consume_forever(&broker, topology.dead_queue(), &config, &shutdown, dead),
        consume_forever(&broker, topology.parked_queue(), &config, &shutdown, parked),
    );
    if let Err(error) = poller.await {
        tracing::warn!(%error, "queue depth poller ended abnormally");
    }
    tracing::info!("replayer stopped");
    Ok(())
}

/// Consumes `queue` with `handle` until `shutdown`, reconnecting with backoff.
async fn consume_forever<H, Fut>(
    broker: &Broker,
    queue: String,
    config: &ReplayerConfig,
    shutdown: &CancellationToken,
    handle: H,
) where
    H: Fn(Delivery) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match consume(broker, &queue, config.prefetch, shutdown, &handle).await {
            Ok(Consumed::Stopped) => break,
            Ok(Consumed::Ended { handled }) => {
                tracing::warn!(%queue, "the broker cancelled the replayer's consumer; resubscribing");
                if handled > 0 {
                    backoff = Duration::from_millis(100);
                }
            }
            Err(error) => {
                tracing::warn!(%queue, %error, retry_in = ?backoff, "replayer lost the broker; reconnecting");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_reconnect_backoff);
    }
}

enum Consumed {
    /// Shutdown requested.
    Stopped,
    /// The broker cancelled the consumer (queue deleted, node restart, ...).
    Ended { handled: u64 },
}

async fn consume<H, Fut>(
    broker: &Broker,
    queue: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    handle: &H,
) -> anyhow::Result<Consumed>
where
    H: Fn(Delivery) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let channel = broker.channel().await?;
    // The queue may have been deleted while we were away.
    broker.topology().declare(&channel).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("replayer-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%queue, "replayer consuming");

    let mut tasks = JoinSet::new();
    let mut handled = 0u64;
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Err(error) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                    tracing::debug!(%error, "cancelling the replayer's consumer failed");
                }
                break Ok(Consumed::Stopped);
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    handled += 1;
                    tasks.spawn(handle(delivery));
                }
                Some(Err(error)) => break Err(error.into()),
                None => break Ok(Consumed::Ended { handled }),
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined {
                    tracing::error!(%error, %queue, "replayer handler panicked");
                }
            }
        }
    };
    // Finish what is in flight: each handler settles its delivery.
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, %queue, "replayer handler panicked");
        }
    }
    if channel.status().connected()
        && let Err(error) = channel.close(200, "replayer done".into()).await
    {
        tracing::debug!(%error, "closing the replayer channel failed");
    }
    outcome
}

fn event_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// What each delivery's handler works with.
struct Replayer {
    deps: ReplayerDeps,
    publisher: Publisher,
    config: ReplayerConfig,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
}

impl Replayer {
    /// A dead letter: to a delay tier, or parked (with its request's ledger line first, as a
    /// consumer does it).
    async fn retry_or_park(&self, delivery: Delivery) {
        let Replayer {
            deps,
            publisher,
            config,
            metrics,
            shutdown,
        } = self;
        // Poison arrives through the DLX but was published to the requests exchange, with
        // its routing key kept by dead-lettering: that is where a replay must send it.
        let Plan { decision, failure } = config.schedule.plan(
            delivery.properties.headers().as_ref(),
            &publisher.topology().exchange(),
            delivery.routing_key.as_str(),
            Utc::now(),
        );
        let event_id = event_id(&delivery);
        let routing_key = if failure.original_routing_key.is_empty() {
            delivery.routing_key.to_string()
        } else {
            failure.original_routing_key.clone()
        };
        let published = match &decision {
            Decision::Retry {
                delay, attempts, ..
            } => {
                tracing::debug!(%event_id, reason = %failure.reason, attempts, ?delay, "retrying dead letter");
                publisher
                    .defer(
                        &delivery.data,
                        &delivery.properties,
                        &routing_key,
                        thena_broker::Wake::NotBefore(*delay),
                        Some(&failure),
                    )
                    .await
            }
            Decision::Park { reason } => {
                tracing::info!(%event_id, %reason, attempts = failure.attempts, last_error = %failure.last_error, "parking dead letter");
                // A message back from the parked queue was ledgered when it was first parked.
                let first_park = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .is_none_or(|h| !h.contains_key(PARKED_AT_HEADER));
                if let Some(event) = thena_events::decode_event(&delivery.data)
                    .ok()
                    .filter(|_| first_park)
                {
                    let backfill_job = delivery.properties.headers().as_ref().and_then(|h| {
                        thena_broker::header_str(h, thena_broker::BACKFILL_JOB_HEADER)
                    });
                    let entry =
                        parked_entry(&event, reason, &failure.last_error, backfill_job.as_deref());
                    let recorded = persist("the ledger line of a park", config, shutdown, || {
                        deps.ledger.record(entry.clone())
                    })
                    .await;
                    if recorded.is_none() {
                        // Shutting down: it stays in the dead queue for the next replayer.
                        return;
                    }
                }
                publisher
                    .park(&delivery.data, &delivery.properties, &failure)
                    .await
            }
        };
        match published {
            Ok(()) => {
                match &decision {
                    Decision::Retry { .. } => metrics
                        .retries
                        .with_label_values(&[failure.reason.as_str()])
                        .inc(),
                    Decision::Park { reason } => {
                        metrics.parked.with_label_values(&[reason.as_str()]).inc()
                    }
                }
                if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                    // Already republished: the dead letter comes back and is handled twice,
                    // which consumers tolerate (idempotent, version-checked).
                    tracing::warn!(%event_id, %error, "ack after republish failed");
                }
            }
            Err(error) => {
                tracing::warn!(%event_id, %error, "cannot republish dead letter; it stays in the dead queue");
                // Do not spin on a broker that keeps refusing: hold the slot a moment.
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(error) = delivery.nack(requeue).await {
                    tracing::debug!(%event_id, %error, "requeue failed; the broker returns it on channel close");
                }
            }
        }
    }

    /// A parked message: stored in PostgreSQL (once, however often it is delivered), then
    /// acked. While PostgreSQL cannot take it, it is held, not returned: a return would count
    /// toward the parked queue's delivery limit.
    async fn store_parked(&self, delivery: Delivery) {
        let Replayer {
            deps,
            config,
            shutdown,
            ..
        } = self;
        let parked = Parked::read(
            &delivery.properties,
            &delivery.data,
            deps.broker.topology(),
            Utc::now(),
        );
        let history: Option<Entry> = parked.ledger_entry();
        let stored = persist("a parked message", config, shutdown, || {
            deps.dead_letters.insert(&parked.letter, history.as_ref())
        })
        .await;
        let Some(stored) = stored else {
            // Shutting down: the channel's close returns it to the parked queue.
            return;
        };
        let event_id = parked.letter.event_id.as_deref().unwrap_or("-");
        match stored {
            Some(id) => {
                tracing::info!(%event_id, dead_letter = id, reason = %parked.letter.reason, "parked message stored")
            }
            None => tracing::debug!(%event_id, "parked message was already stored (a redelivery)"),
        }
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            // Stored: its redelivery finds the row and stores nothing.
            tracing::warn!(%event_id, %error, "ack after storing a parked message failed");
        }
    }
}

/// Runs `write` until it succeeds, backing off while PostgreSQL is unavailable. `None`
/// when `shutdown` came first.
async fn persist<T, F, Fut>(
    what: &str,
    config: &ReplayerConfig,
    shutdown: &CancellationToken,
    mut write: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(done) => return Some(done),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot write {what} to PostgreSQL; holding it");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_reconnect_backoff);
    }
}

/// Refreshes the gauges every `interval`: queue depths from RabbitMQ (passive declares,
/// nothing is fetched), the parked set's count and oldest age from PostgreSQL. Prunes
/// long-settled dead letters now and then.
async fn poll(
    deps: ReplayerDeps,
    metrics: ReplayerMetrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut channel: Option<Channel> = None;
    let mut pruned_at: Option<tokio::time::Instant> = None;
    loop {
        let current = match channel.take().filter(|c| c.status().connected()) {
            Some(c) => Ok(c),
            None => deps.broker.channel().await,
        };
        let depths = match current {
            Ok(c) => {
                let polled = refresh_depths(&deps.broker, &c, &metrics.broker).await;
                channel = Some(c);
                polled.map_err(|e| e.to_string())
            }
            Err(error) => Err(error.to_string()),
        };
        let parked = refresh_parked(&deps.dead_letters, &metrics).await;
        match (depths, parked) {
            (Ok(()), Ok(())) => metrics.broker.depth_polls.inc(),
            (depths, parked) => {
                tracing::debug!(?depths, ?parked, "queue depth poll failed")
            }
        }
        if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL) {
            match deps.dead_letters.prune(SETTLED_RETENTION).await {
                Ok(pruned) => {
                    pruned_at = Some(tokio::time::Instant::now());
                    if pruned > 0 {
                        tracing::info!(pruned, "pruned settled dead letters");
                    }
                }
                Err(error) => tracing::debug!(%error, "pruning settled dead letters failed"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    if let Some(c) = channel
        && let Err(error) = c.close(200, "poller done".into()).await
    {
        tracing::debug!(%error, "closing the poller channel failed");
    }
}

async fn refresh_depths(
    broker: &Broker,
    channel: &Channel,
    metrics: &BrokerMetrics,
) -> Result<(), lapin::Error> {
    let topology = broker.topology();
    for (label, queue) in [
        ("sync", topology.sync_queue()),
        ("backfill", topology.backfill_queue()),
        ("dead", topology.dead_queue()),
        ("parked", topology.parked_queue()),
    ] {
        let depth = queue_depth(channel, &queue).await?;
        metrics
            .queue_messages
            .with_label_values(&[label])
            .set(i64::from(depth));
    }
    let mut delayed = 0i64;
    for queue in topology.delay_queues() {
        delayed += i64::from(queue_depth(channel, &queue).await?);
    }
    metrics
        .queue_messages
        .with_label_values(&["delay"])
        .set(delayed);
    Ok(())
}

async fn refresh_parked(store: &DeadLetters, metrics: &ReplayerMetrics) -> Result<(), DbError> {
    let stats = store.stats().await?;
    metrics
        .parked_messages
        .set(i64::try_from(stats.parked).unwrap_or(i64::MAX));
    let age = stats
        .oldest_parked_at
        .map_or(0.0, |at| (Utc::now() - at).as_seconds_f64().max(0.0));
    metrics.parked_oldest_age_seconds.set(age);
    Ok(())
}

pub(crate) async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// The replayer as configured (the binary and the demo run it here), keeping the
/// "broker" and "postgres" readiness checks current until `shutdown`.
pub async fn run_from_config(
    config: &thena_runtime::Config,
    registry: &Registry,
    readiness: thena_runtime::ops::Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let topology = thena_broker::Topology::from_config(config);
    let broker = Broker::connect(config.amqp_url.clone(), "thena-vitally-replayer", topology)
        .await
        .context("cannot connect to RabbitMQ (AMQP_URL)")?;
    let db = thena_store::Db::connect(&config.database_url, &config.database_schema)
        .await
        .context("cannot open PostgreSQL (DATABASE_URL)")?;
    let metrics = ReplayerMetrics::register(registry)?;
    let schedule =
        RetrySchedule::for_topology(broker.topology()).with_max_age(config.retry.max_age);
    let watcher = {
        let (broker, db) = (broker.clone(), db.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                readiness.set("broker", broker.is_healthy().await);
                readiness.set("postgres", db.ping().await);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    };
    let deps = ReplayerDeps::new(broker, db);
    let result = run_replayer(deps, schedule, metrics, shutdown).await;
    watcher.abort();
    result
}
