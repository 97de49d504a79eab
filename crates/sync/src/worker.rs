//! The consumer loop: takes deliveries with bounded concurrency, runs each through the
//! [`Pipeline`], and settles it — ack only once Vitally answered 2xx, the event was
//! deliberately skipped, or it was safely handed on (delay, dead-letter or parked queue,
//! with a publisher confirm). Reconnects when the broker goes away or cancels us.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    Acker,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use thena_broker::{
    BACKFILL_JOB_HEADER, Broker, Failure, FailureClass, Publisher, Wake, header_str,
};
use thena_events::{RequestChanged, decode_event};
use thena_runtime::ops::Readiness;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use thena_store::ledger::{Entry, Ledger};

use crate::{
    fault::{self, FaultHook, FaultPoint},
    metrics::SyncMetrics,
    outcome::Outcome,
    pipeline::{Pipeline, Trace},
    policy::Lane,
};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    /// Slots of the backfill lane (its prefetch too).
    pub backfill_concurrency: usize,
    pub prefetch: u16,
    pub shutdown_grace: Duration,
    /// How long a held event (paused integration) waits before it looks again.
    pub hold_wait: Duration,
}

pub struct Worker {
    pub broker: Broker,
    pub pipeline: Arc<Pipeline>,
    pub settings: WorkerSettings,
    pub metrics: SyncMetrics,
    pub readiness: Readiness,
    /// Told about every settled delivery (the demo's table, tests); none in production.
    pub observer: Option<mpsc::UnboundedSender<Settled>>,
    /// Probes paused integrations and resumes those Vitally accepts again.
    pub probe: Option<crate::health::HealthProbe>,
}

/// One delivery's end, as reported to an observer.
#[derive(Debug, Clone)]
pub struct Settled {
    pub workspace_id: Option<String>,
    pub request_id: Option<u64>,
    /// The message's version.
    pub version: Option<u64>,
    /// The version processed: newer than the message's when it was coalesced.
    pub processed_version: Option<u64>,
    pub outcome: Outcome,
}

/// Settles deliveries: the hand-off publisher plus what is told about each outcome.
#[derive(Clone)]
struct Settler {
    publisher: Publisher,
    metrics: SyncMetrics,
    observer: Option<mpsc::UnboundedSender<Settled>>,
    hold_wait: Duration,
    ledger: Option<Ledger>,
}

impl Worker {
    /// Tests only: calls `hook` at each [`FaultPoint`] of every event, e.g. to panic in
    /// the middle of a real consumer's work. The consumer's start-up never sets it.
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        Arc::get_mut(&mut self.pipeline)
            .expect("set before the worker runs")
            .fault = Some(hook);
        self
    }

    /// Runs until `shutdown` is cancelled, then stops taking deliveries and gives the
    /// in-flight ones `shutdown_grace` to finish (unfinished ones are redelivered).
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Integration changes reach this replica's cache at once, not after its TTL.
        self.pipeline
            .integrations
            .follow_changes(shutdown.child_token());
        if let Some(probe) = self.probe.take() {
            tokio::spawn(probe.run(shutdown.child_token()));
        }
        tokio::spawn(watch_dependencies(
            self.pipeline.clone(),
            self.readiness.clone(),
            shutdown.child_token(),
        ));
        let tracker = TaskTracker::new();
        // Each lane has slots of its own: a backfill never takes a live event's slot.
        let (live, backfill) = tokio::join!(
            self.consume(Lane::Live, &tracker, &shutdown),
            self.consume(Lane::Backfill, &tracker, &shutdown),
        );

        // Stop new deliveries first; prefetched, unstarted ones go back to the queue when
        // the channel closes.
        let last_channels: Vec<_> = [live?, backfill?].into_iter().flatten().collect();
        for (channel, tag) in &last_channels {
            if let Err(e) = channel
                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                .await
            {
                tracing::debug!(error = %e, "cancel on shutdown");
            }
        }
        tracker.close();
        let in_flight = tracker.len();
        if tokio::time::timeout(self.settings.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = tracker.len(),
                "grace period over; unfinished deliveries will be redelivered"
            );
        } else {
            tracing::info!(in_flight, "in-flight deliveries finished");
        }
        for (channel, _) in last_channels {
            let _ = channel.close(200, "shutdown".into()).await;
        }
        self.readiness.set("broker", false);
        Ok(())
    }

    /// Consumes one lane's queue until `shutdown`, resubscribing whenever the broker
    /// goes away or cancels us; returns the channel and consumer tag it last used.
    async fn consume(
        &self,
        lane: Lane,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<(lapin::Channel, lapin::types::ShortString)>> {
        let slots = Arc::new(Semaphore::new(match lane {
            Lane::Live => self.settings.concurrency,
            Lane::Backfill => self.settings.backfill_concurrency,
        }));
        let mut backoff = reconnect_backoff();
        while !shutdown.is_cancelled() {
            let (channel, mut consumer, settler) = match self.subscribe(lane).await {
                Ok(parts) => parts,
                Err(e) => {
                    self.readiness.set("broker", false);
                    let pause = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot subscribe; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            backoff = reconnect_backoff();
            self.readiness.set("broker", true);
            tracing::info!(queue = %self.queue(lane), "consuming");
            loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Some((channel, consumer.tag()))),
                    permit = slots.clone().acquire_owned() => permit?,
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Some((channel, consumer.tag()))),
                    next = consumer.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => {
                        let pipeline = self.pipeline.clone();
                        let settler = settler.clone();
                        tracker.spawn(async move {
                            settler.handle(&pipeline, delivery, lane).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "delivery stream failed; resubscribing");
                        break;
                    }
                    None => {
                        tracing::warn!("the broker cancelled the consumer; resubscribing");
                        break;
                    }
                }
            }
            self.readiness.set("broker", false);
        }
        Ok(None)
    }

    fn queue(&self, lane: Lane) -> String {
        let topology = self.broker.topology();
        match lane {
            Lane::Live => topology.sync_queue(),
            Lane::Backfill => topology.backfill_queue(),
        }
    }

    async fn subscribe(
        &self,
        lane: Lane,
    ) -> anyhow::Result<(lapin::Channel, lapin::Consumer, Settler)> {
        let channel = self.broker.channel().await?;
        let prefetch = match lane {
            Lane::Live => self.settings.prefetch,
            // A backfill holds no more deliveries than it has slots for.
            Lane::Backfill => u16::try_from(self.settings.backfill_concurrency).unwrap_or(u16::MAX),
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("consumer-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                self.queue(lane).into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let publisher = self.broker.publisher().await?;
        let settler = Settler {
            publisher,
            metrics: self.metrics.clone(),
            observer: self.observer.clone(),
            hold_wait: self.settings.hold_wait,
            ledger: self.pipeline.ledger.clone(),
        };
        Ok((channel, consumer, settler))
    }
}

/// Keeps the `redis` and `postgres` readiness checks current: without Redis no request
/// lock can be taken, without PostgreSQL no version recorded, so events only retry.
async fn watch_dependencies(
    pipeline: Arc<Pipeline>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                readiness.set("redis", pipeline.guards.ping().await);
                readiness.set("postgres", pipeline.integrations.store().db().ping().await);
            }
        }
    }
}

/// Counts a delivery in flight from its start until it is dropped, whatever happened.
struct InFlight {
    gauge: prometheus::IntGauge,
    _timer: prometheus::HistogramTimer,
}

impl InFlight {
    fn enter(metrics: &SyncMetrics) -> Self {
        metrics.in_flight.inc();
        Self {
            gauge: metrics.in_flight.clone(),
            _timer: metrics.processing.start_timer(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Reconnect pauses: 100 ms doubling to 5 s, jittered so a fleet does not reconnect in
/// lockstep after a broker restart, never giving up.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Settler {
    /// Settles the delivery whatever happens: a panic anywhere in its handling is caught
    /// and the delivery requeued (a redelivery is harmless: the version guard), so it is
    /// never left unacked on a live channel with its slot and in-flight count lost.
    /// Every line logged meanwhile carries the event's identifiers (its span).
    async fn handle(&self, pipeline: &Pipeline, delivery: Delivery, lane: Lane) {
        let _in_flight = InFlight::enter(&self.metrics);
        let span = tracing::info_span!(
            "event",
            event_id = tracing::field::Empty,
            workspace = tracing::field::Empty,
            request_id = tracing::field::Empty,
            version = tracing::field::Empty,
            delivery_tag = delivery.delivery_tag,
        );
        let acker = delivery.acker.clone();
        let handled = fault::catch(self.work(pipeline, &delivery, lane, &span))
            .instrument(span.clone())
            .await;
        if let Err(panic) = handled {
            self.after_panic(&acker, &panic).instrument(span).await;
        }
    }

    async fn work(
        &self,
        pipeline: &Pipeline,
        delivery: &Delivery,
        lane: Lane,
        span: &tracing::Span,
    ) {
        // Deferred, retried and held messages come back through a delay queue (x-death).
        let returning = delivery.redelivered
            || delivery
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key("x-death"));
        let (outcome, trace, event) = match decode_event(&delivery.data) {
            Ok(event) => {
                span.record("event_id", tracing::field::display(&event.event_id));
                span.record("workspace", event.workspace_id.as_str());
                span.record("request_id", event.request.id);
                span.record("version", event.request.version);
                let (outcome, trace) = pipeline.process(&event, returning, lane).await;
                (outcome, trace, Some(event))
            }
            Err(e) => (
                Outcome::Park {
                    reason: "undecodable".into(),
                    error: e.to_string(),
                },
                Trace::default(),
                None,
            ),
        };
        // Only the backfill lane's messages belong to a job (a header elsewhere is ignored).
        let backfill_job = match lane {
            Lane::Live => None,
            Lane::Backfill => delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| header_str(h, BACKFILL_JOB_HEADER)),
        };
        if let Err(e) = self
            .write_ledger(&outcome, &trace, event.as_ref(), backfill_job)
            .await
        {
            // Never acked before the ledger knows: keep it in the queue instead.
            let (label, reason) = outcome.labels();
            self.requeue(delivery, label, &reason, &e.to_string()).await;
            return;
        }
        if let (Some(fault), Some(event)) = (&pipeline.fault, &event) {
            fault(FaultPoint::Settling, event);
        }
        self.settle(delivery, &outcome, event.as_ref(), trace.version)
            .await;
    }

    /// The handling panicked: back to the queue, unless it was settled before the panic.
    async fn after_panic(&self, acker: &Acker, panic: &str) {
        if !acker.usable() {
            tracing::warn!(panic, "panicked after the delivery was settled");
            return;
        }
        self.metrics
            .events
            .with_label_values(&["requeued", "panic"])
            .inc();
        tracing::info!(
            outcome = "requeued",
            reason = "panic",
            error = panic,
            "event handled"
        );
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        self.settled("nack", acker.nack(requeue).await);
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        outcome: &Outcome,
        event: Option<&RequestChanged>,
        processed_version: Option<u64>,
    ) {
        let (label, reason) = outcome.labels();
        let handed_on = match outcome {
            Outcome::Synced { .. } => {
                if let Some(event) = event {
                    self.metrics
                        .event_age
                        .with_label_values(&[&event.workspace_id])
                        .observe(event_age(event).as_secs_f64());
                }
                Ok(())
            }
            Outcome::Skipped(_) => Ok(()),
            Outcome::Deferred { wake, .. } => {
                self.publisher
                    .defer(
                        &delivery.data,
                        &delivery.properties,
                        delivery.routing_key.as_str(),
                        *wake,
                        None,
                    )
                    .await
            }
            // No attempt counted: the event is not failing, its integration is paused.
            Outcome::Held { .. } => {
                self.publisher
                    .defer(
                        &delivery.data,
                        &delivery.properties,
                        delivery.routing_key.as_str(),
                        Wake::NotBefore(self.hold_wait),
                        None,
                    )
                    .await
            }
            Outcome::Retry { reason, error } => {
                let failure = self.failure(delivery, FailureClass::Transient, reason, error);
                self.publisher
                    .dead_letter(&delivery.data, &delivery.properties, &failure)
                    .await
            }
            Outcome::Park { reason, error } => {
                let failure = self.failure(delivery, FailureClass::Permanent, reason, error);
                self.publisher
                    .park(&delivery.data, &delivery.properties, &failure)
                    .await
            }
        };
        match handed_on {
            Ok(()) => {
                self.metrics
                    .events
                    .with_label_values(&[label, &reason])
                    .inc();
                let error = match outcome {
                    Outcome::Retry { error, .. } | Outcome::Park { error, .. } => Some(error),
                    Outcome::Synced { .. }
                    | Outcome::Skipped(_)
                    | Outcome::Deferred { .. }
                    | Outcome::Held { .. } => None,
                };
                // The event's one line at info, whatever its outcome.
                tracing::info!(
                    outcome = label,
                    reason,
                    processed_version,
                    error,
                    "event handled"
                );
                // Redelivered later if it did not reach RabbitMQ; the version guard makes
                // that harmless.
                self.settled("ack", delivery.ack(BasicAckOptions::default()).await);
                if let Some(observer) = &self.observer {
                    // A gone observer (demo finished) is no reason to stop consuming.
                    let _ = observer.send(Settled {
                        workspace_id: event.map(|e| e.workspace_id.clone()),
                        request_id: event.map(|e| e.request.id),
                        version: event.map(|e| e.request.version),
                        processed_version: processed_version.or(event.map(|e| e.request.version)),
                        outcome: outcome.clone(),
                    });
                }
            }
            // Could not hand it on: keep it in the queue rather than lose it.
            Err(e) => self.requeue(delivery, label, &reason, &e.to_string()).await,
        }
    }

    /// The outcome could not be handed on or recorded: back to the queue.
    async fn requeue(&self, delivery: &Delivery, label: &str, reason: &str, error: &str) {
        self.metrics
            .events
            .with_label_values(&["requeued", reason])
            .inc();
        tracing::info!(
            outcome = "requeued",
            reason,
            was = label,
            error,
            "event handled"
        );
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        self.settled("nack", delivery.nack(requeue).await);
    }

    /// An ack or nack RabbitMQ did not take: lapin answers `Ok(false)` when the channel
    /// had closed (RabbitMQ then redelivers the message) or the delivery was settled
    /// already. Said and counted either way, never silently dropped.
    fn settled(&self, op: &'static str, result: lapin::Result<bool>) {
        let failure = match result {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(
                    op,
                    "not sent: the delivery's channel closed (RabbitMQ redelivers it) or it \
                     was settled already"
                );
                "refused"
            }
            Err(e) => {
                tracing::warn!(op, error = %e, "failed; RabbitMQ redelivers it on reconnect");
                "error"
            }
        };
        self.metrics
            .settle_failures
            .with_label_values(&[op, failure])
            .inc();
    }

    /// The event's line in the request ledger, durable before anything else happens.
    async fn write_ledger(
        &self,
        outcome: &Outcome,
        trace: &Trace,
        event: Option<&RequestChanged>,
        backfill_job: Option<String>,
    ) -> Result<(), thena_store::DbError> {
        let (Some(ledger), Some(event)) = (&self.ledger, event) else {
            return Ok(());
        };
        let (label, reason) = outcome.labels();
        let (detail, failed_attempt) = match outcome {
            Outcome::Retry { error, .. } | Outcome::Park { error, .. } => {
                (Some(error.clone()), true)
            }
            Outcome::Synced { .. }
            | Outcome::Skipped(_)
            | Outcome::Deferred { .. }
            | Outcome::Held { .. } => (None, false),
        };
        let version = trace.version.unwrap_or(event.request.version);
        // A coalesced message was processed as the ledger's newer snapshot: its own, older
        // one must not take that snapshot's place under the newer version.
        let snapshot = (version == event.request.version)
            .then(|| serde_json::to_value(event).ok())
            .flatten();
        ledger
            .record(Entry {
                workspace_id: event.workspace_id.clone(),
                request_id: event.request.id,
                version,
                snapshot,
                outcome: label,
                reason,
                detail,
                link: trace.link.clone(),
                instance_id: trace.instance_id.clone(),
                failed_attempt,
                backfill_job,
                age: matches!(outcome, Outcome::Synced { .. }).then(|| event_age(event)),
            })
            .await
    }

    fn failure(
        &self,
        delivery: &Delivery,
        class: FailureClass,
        reason: &str,
        error: &str,
    ) -> Failure {
        Failure::for_delivery(
            delivery.properties.headers().as_ref(),
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            class,
            reason,
            error,
            Utc::now(),
        )
    }
}

/// A change's age once synced: from the change in Thena to now (Vitally's 2xx).
fn event_age(event: &RequestChanged) -> std::time::Duration {
    (Utc::now() - event.occurred_at)
        .to_std()
        .unwrap_or_default()
}
