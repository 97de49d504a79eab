//! The replayer role: consumes the dead queue, carries out [`RetrySchedule::plan`]
//! (publish with confirm, then ack), and polls queue depths into the metrics.

use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions,
        BasicNackOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use prometheus::{IntCounterVec, Opts, Registry};
use thena_broker::{Broker, BrokerMetrics, PARKED_AT_HEADER, Publisher, header_str};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::schedule::{Decision, Plan, RetrySchedule};

#[derive(Debug, Clone)]
pub struct ReplayerConfig {
    pub schedule: RetrySchedule,
    /// Dead letters handled at once.
    pub prefetch: u16,
    /// How often queue depths and the oldest parked age are refreshed.
    pub depth_poll_interval: Duration,
    /// Longest wait between reconnection attempts.
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
}

impl ReplayerMetrics {
    pub fn register(registry: &Registry) -> Result<ReplayerMetrics, prometheus::Error> {
        ReplayerMetrics::register_with(registry, BrokerMetrics::register(registry)?)
    }

    /// When the process already registered [`BrokerMetrics`] (e.g. the all-in-one demo).
    pub fn register_with(
        registry: &Registry,
        broker: BrokerMetrics,
    ) -> Result<ReplayerMetrics, prometheus::Error> {
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
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(parked.clone()))?;
        Ok(ReplayerMetrics {
            broker,
            retries,
            parked,
        })
    }
}

/// Runs until `shutdown` is cancelled, with the default prefetch and poll interval.
pub async fn run_replayer(
    broker: Broker,
    schedule: RetrySchedule,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_replayer_with(broker, ReplayerConfig::new(schedule), metrics, shutdown).await
}

/// Runs until `shutdown` is cancelled. Reconnects and resubscribes whenever the broker
/// goes away or cancels the consumer; in-flight dead letters finish before it returns.
pub async fn run_replayer_with(
    broker: Broker,
    config: ReplayerConfig,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let publisher = broker.publisher().await?;
    let poller = tokio::spawn(poll_depths(
        broker.clone(),
        metrics.broker.clone(),
        config.depth_poll_interval,
        shutdown.clone(),
    ));
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match consume(&broker, &publisher, &config, &metrics, &shutdown).await {
            Ok(Consumed::Stopped) => break,
            Ok(Consumed::Ended { handled }) => {
                tracing::warn!("dead-letter consumer was cancelled by the broker; resubscribing");
                if handled > 0 {
                    backoff = Duration::from_millis(100);
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "replayer lost the broker; reconnecting");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_reconnect_backoff);
    }
    if let Err(error) = poller.await {
        tracing::warn!(%error, "queue depth poller ended abnormally");
    }
    tracing::info!("replayer stopped");
    Ok(())
}

enum Consumed {
    /// Shutdown requested.
    Stopped,
    /// The broker cancelled the consumer (queue deleted, node restart, ...).
    Ended { handled: u64 },
}

async fn consume(
    broker: &Broker,
    publisher: &Publisher,
    config: &ReplayerConfig,
    metrics: &ReplayerMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<Consumed> {
    let channel = broker.channel().await?;
    let topology = broker.topology();
    // The dead queue may have been deleted while we were away.
    topology.declare(&channel).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("replayer-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            topology.dead_queue().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %topology.dead_queue(), "replayer consuming dead letters");

    let mut tasks = JoinSet::new();
    let mut handled = 0u64;
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Err(error) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                    tracing::debug!(%error, "cancelling the dead-letter consumer failed");
                }
                break Ok(Consumed::Stopped);
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    handled += 1;
                    tasks.spawn(handle(
                        delivery,
                        publisher.clone(),
                        config.schedule.clone(),
                        metrics.clone(),
                        shutdown.clone(),
                    ));
                }
                Some(Err(error)) => break Err(error.into()),
                None => break Ok(Consumed::Ended { handled }),
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined {
                    tracing::error!(%error, "dead-letter handler panicked");
                }
            }
        }
    };
    // Finish what is in flight: each handler publishes, then acks (or requeues).
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, "dead-letter handler panicked");
        }
    }
    if channel.status().connected()
        && let Err(error) = channel.close(200, "replayer done".into()).await
    {
        tracing::debug!(%error, "closing the replayer channel failed");
    }
    outcome
}

async fn handle(
    delivery: Delivery,
    publisher: Publisher,
    schedule: RetrySchedule,
    metrics: ReplayerMetrics,
    shutdown: CancellationToken,
) {
    // Poison arrives through the DLX but was published to the requests exchange, with
    // its routing key kept by dead-lettering: that is where a replay must send it.
    let Plan { decision, failure } = schedule.plan(
        delivery.properties.headers().as_ref(),
        &publisher.topology().exchange(),
        delivery.routing_key.as_str(),
        Utc::now(),
    );
    let event_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
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
                    *delay,
                    Some(&failure),
                )
                .await
        }
        Decision::Park { reason } => {
            tracing::info!(%event_id, %reason, attempts = failure.attempts, last_error = %failure.last_error, "parking dead letter");
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

async fn poll_depths(
    broker: Broker,
    metrics: BrokerMetrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut channel: Option<Channel> = None;
    loop {
        let current = match channel.take().filter(|c| c.status().connected()) {
            Some(c) => Ok(c),
            None => broker.channel().await,
        };
        match current {
            Ok(c) => match refresh_depths(&broker, &c, &metrics).await {
                Ok(()) => channel = Some(c),
                Err(error) => tracing::debug!(%error, "queue depth poll failed"),
            },
            Err(error) => tracing::debug!(%error, "queue depth poll cannot reach the broker"),
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
    metrics
        .parked_oldest_age_seconds
        .set(oldest_parked_age(channel, &topology.parked_queue()).await?);
    metrics.depth_polls.inc();
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

/// Peeks at the head of the parked queue (the oldest parked message) and puts it back.
/// The parked queue is a classic queue: the message returns to its place and the peek is
/// not counted as a delivery (no `x-delivery-count`, no delivery limit to reach).
async fn oldest_parked_age(channel: &Channel, queue: &str) -> Result<f64, lapin::Error> {
    let Some(head) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    else {
        return Ok(0.0);
    };
    let parked_at = head
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| header_str(h, PARKED_AT_HEADER))
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok());
    head.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await?;
    Ok(parked_at
        .map(|at| {
            (Utc::now() - at.with_timezone(&Utc))
                .as_seconds_f64()
                .max(0.0)
        })
        .unwrap_or(0.0))
}

/// The replayer as configured (the binary and the demo run it here), keeping the
/// "broker" readiness check current until `shutdown`.
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
    let metrics = ReplayerMetrics::register(registry)?;
    let schedule =
        RetrySchedule::for_topology(broker.topology()).with_max_age(config.retry.max_age);
    let watcher = {
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                readiness.set("broker", broker.is_healthy().await);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    };
    let result = run_replayer(broker, schedule, metrics, shutdown).await;
    watcher.abort();
    result
}
