//! The replayer role against the real local RabbitMQ, with millisecond delay tiers.

#[path = "../../broker/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::*;
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use thena_broker::{
    Broker, DEAD_LETTERED_AT_HEADER, Failure, FailureClass, Publisher, Topology, WORKSPACE_HEADER,
};
use thena_replayer::{
    ReplayerConfig, ReplayerMetrics, RetrySchedule,
    dlq::{self, DlqFilter, ReplayOptions},
    run_replayer_with,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// What a test body gets while a replayer runs in the background.
#[derive(Clone)]
struct Replaying {
    broker: Broker,
    publisher: Publisher,
    metrics: ReplayerMetrics,
}

/// Runs a replayer (100 ms depth polls) for the duration of `body`, then stops it
/// gracefully (it must stop promptly) and deletes the topology, even if `body` panics.
async fn with_replayer<F, Fut>(topology: Topology, max_age: Duration, body: F)
where
    F: FnOnce(Replaying) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let broker = connect(topology).await;
    let registry = prometheus::Registry::new();
    let metrics = ReplayerMetrics::register(&registry).unwrap();
    let mut config =
        ReplayerConfig::new(RetrySchedule::for_topology(broker.topology()).with_max_age(max_age));
    config.depth_poll_interval = Duration::from_millis(100);
    config.max_reconnect_backoff = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_replayer_with(
        broker.clone(),
        config,
        metrics.clone(),
        shutdown.clone(),
    ));
    let replaying = Replaying {
        publisher: broker.publisher().await.unwrap(),
        broker: broker.clone(),
        metrics,
    };
    let outcome = tokio::spawn(body(replaying)).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), task).await;
    cleanup(&broker).await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
    stopped
        .expect("the replayer stops promptly")
        .unwrap()
        .unwrap();
}

fn message(workspace: &str, id: &str) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert(
        WORKSPACE_HEADER.into(),
        AMQPValue::LongString(workspace.into()),
    );
    let body = serde_json::to_vec(&thena_events::sample::event(workspace, 1, 1, None)).unwrap();
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(headers);
    (body, props)
}

fn failure(broker: &Broker, class: FailureClass, reason: &str, workspace: &str) -> Failure {
    Failure::new(
        class,
        reason,
        "boom",
        broker.topology().exchange(),
        Topology::routing_key(workspace),
        Utc::now(),
    )
}

fn failure_of(message: &lapin::message::BasicGetMessage) -> Failure {
    Failure::from_headers(message.delivery.properties.headers().as_ref().unwrap())
        .expect("failure headers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_back_to_the_sync_queue_with_attempts_plus_one() {
    with_replayer(test_topology(), Duration::from_secs(3600), |r| async move {
        let (body, props) = message("W1", "ev-transient");
        let first = Failure {
            attempts: 1,
            ..failure(&r.broker, FailureClass::Transient, "vitally_503", "W1")
        };
        r.publisher
            .dead_letter(&body, &props, &first)
            .await
            .unwrap();

        let channel = r.broker.channel().await.unwrap();
        let back = take(&channel, &r.broker.topology().sync_queue(), WAIT)
            .await
            .expect("retried to the sync queue");
        assert_eq!(back.delivery.routing_key.as_str(), "request.W1");
        assert_eq!(back.delivery.data, body);
        assert_eq!(
            failure_of(&back),
            Failure {
                attempts: 2,
                ..first
            }
        );
        // The next failure of this retry must be dead-lettered afresh to count as ours.
        assert!(header(&back, DEAD_LETTERED_AT_HEADER).is_none());
        assert_eq!(
            r.metrics.retries.with_label_values(&["vitally_503"]).get(),
            1
        );
        assert_eq!(depth(&channel, &r.broker.topology().dead_queue()).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_failure_comes_back_without_counting_an_attempt() {
    with_replayer(test_topology(), Duration::from_secs(3600), |r| async move {
        let (body, props) = message("W2", "ev-429");
        let limited = Failure {
            attempts: 3,
            ..failure(&r.broker, FailureClass::RateLimited, "vitally_429", "W2")
        }
        .with_retry_at(Utc::now() + TimeDelta::milliseconds(300));
        r.publisher
            .dead_letter(&body, &props, &limited)
            .await
            .unwrap();

        let channel = r.broker.channel().await.unwrap();
        let back = take(&channel, &r.broker.topology().sync_queue(), WAIT)
            .await
            .expect("back after the window");
        assert_eq!(back.delivery.routing_key.as_str(), "request.W2");
        assert_eq!(failure_of(&back).attempts, 3);
        assert_eq!(failure_of(&back).class, FailureClass::RateLimited);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_parked_with_its_reason_and_counted() {
    with_replayer(test_topology(), Duration::from_secs(3600), |r| async move {
        let (body, props) = message("W3", "ev-perm");
        let permanent = failure(&r.broker, FailureClass::Permanent, "no_integration", "W3");
        r.publisher
            .dead_letter(&body, &props, &permanent)
            .await
            .unwrap();

        let topology = r.broker.topology().clone();
        let channel = r.broker.channel().await.unwrap();
        // Queue depth gauges and the oldest parked age follow within a poll interval.
        let gauges = r.metrics.broker.clone();
        assert!(
            eventually(WAIT, || {
                let gauges = gauges.clone();
                async move {
                    gauges.queue_messages.with_label_values(&["parked"]).get() == 1
                        && gauges.parked_oldest_age_seconds.get() > 0.0
                }
            })
            .await,
            "parked gauge never reached 1"
        );
        let parked = take(&channel, &topology.parked_queue(), WAIT)
            .await
            .expect("parked");
        assert_eq!(failure_of(&parked), permanent);
        assert_eq!(
            r.metrics
                .parked
                .with_label_values(&["no_integration"])
                .get(),
            1
        );
        assert_eq!(depth(&channel, &topology.sync_queue()).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_older_than_max_age_is_parked_as_too_old() {
    with_replayer(test_topology(), Duration::from_secs(60), |r| async move {
        let (body, props) = message("W4", "ev-old");
        let mut old = failure(&r.broker, FailureClass::Transient, "vitally_503", "W4");
        old.first_failure -= TimeDelta::hours(1);
        r.publisher.dead_letter(&body, &props, &old).await.unwrap();

        let channel = r.broker.channel().await.unwrap();
        let parked = take(&channel, &r.broker.topology().parked_queue(), WAIT)
            .await
            .expect("parked");
        let stored = failure_of(&parked);
        assert_eq!(stored.reason, "too_old");
        assert_eq!(stored.last_error, "boom");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_past_the_delivery_limit_is_parked_while_others_keep_flowing() {
    with_replayer(
        test_topology().with_delivery_limit(2),
        Duration::from_secs(3600),
        |r| async move {
            let topology = r.broker.topology().clone();
            let poison = thena_events::sample::event("POISON", 1, 1, None);
            r.publisher.publish_event(&poison).await.unwrap();
            let good: Vec<_> = (1..=5)
                .map(|n| thena_events::sample::event("GOOD", n, 1, None))
                .collect();
            for event in &good {
                r.publisher.publish_event(event).await.unwrap();
            }

            // A consumer that "crashes" on the poison message (returns it) and syncs the rest.
            let channel = r.broker.channel().await.unwrap();
            channel
                .basic_qos(2, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = channel
                .basic_consume(
                    topology.sync_queue().into(),
                    "crashy".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let mut synced = Vec::new();
            let mut returned = 0;
            // Delivery limit 2: the third return makes RabbitMQ dead-letter it.
            let consumed = tokio::time::timeout(WAIT, async {
                while synced.len() < good.len() || returned < 3 {
                    let delivery = consumer.next().await.unwrap().unwrap();
                    let event = thena_events::decode_event(&delivery.data).unwrap();
                    if event.workspace_id == "POISON" {
                        returned += 1;
                        delivery
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                    } else {
                        synced.push(event.request.id);
                        delivery.ack(BasicAckOptions::default()).await.unwrap();
                    }
                }
            })
            .await;
            assert!(
                consumed.is_ok(),
                "good events synced: {synced:?}, poison returned {returned} times"
            );
            synced.sort_unstable();
            assert_eq!(synced, vec![1, 2, 3, 4, 5]);

            // The crashing consumer goes away; once fixed, an operator replays the poison
            // message: it goes back to its original route.
            channel.close(200, "done".into()).await.unwrap();
            // Parked as poison: reason delivery_limit, original route recorded.
            let only_poison = DlqFilter {
                reason: Some("delivery_limit".into()),
                ids: vec![poison.event_id.to_string()],
                ..DlqFilter::default()
            };
            let options = ReplayOptions {
                dry_run: false,
                rate_per_sec: None,
                actor: "test".into(),
                reason: "consumer fixed".into(),
            };
            // The depth poller peeks at the parked queue's head now and then: retry.
            let until = std::time::Instant::now() + WAIT;
            let report = loop {
                match dlq::replay(&r.broker, &only_poison, &options, |_, _| {}).await {
                    Ok(done) if done.replayed == 1 => break done,
                    other => {
                        assert!(
                            std::time::Instant::now() < until,
                            "the poison message was never parked and replayed: {other:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            assert_eq!(report.audit[0].to_exchange, topology.exchange());
            let probe = r.broker.channel().await.unwrap();
            let replayed = take(&probe, &topology.sync_queue(), WAIT)
                .await
                .expect("replayed to the sync queue");
            assert_eq!(replayed.delivery.routing_key.as_str(), "request.POISON");
            assert!(
                Failure::from_headers(replayed.delivery.properties.headers().as_ref().unwrap())
                    .is_none()
            );
            assert_eq!(
                r.metrics
                    .parked
                    .with_label_values(&["delivery_limit"])
                    .get(),
                1
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replayer_resubscribes_after_its_queue_vanishes_or_its_connection_drops() {
    with_replayer(test_topology(), Duration::from_secs(3600), |r| async move {
        let topology = r.broker.topology().clone();
        let (body, props) = message("W6", "ev-resilient");
        let transient = failure(&r.broker, FailureClass::Transient, "vitally_503", "W6");

        // The broker cancels the consumer when its queue is deleted.
        let admin = r.broker.channel().await.unwrap();
        admin
            .queue_delete(topology.dead_queue().into(), Default::default())
            .await
            .unwrap();
        // Then the connection goes away entirely (what a broker restart looks like).
        r.broker.close().await;

        // Dead-lettering is unroutable until the replayer has redeclared its queue.
        let publisher = r.publisher.clone();
        let (b, p, f) = (body.clone(), props.clone(), transient.clone());
        assert!(
            eventually(WAIT, || {
                let (publisher, b, p, f) = (publisher.clone(), b.clone(), p.clone(), f.clone());
                async move { publisher.dead_letter(&b, &p, &f).await.is_ok() }
            })
            .await,
            "the dead queue was never redeclared"
        );
        let channel = r.broker.channel().await.unwrap();
        let back = take(&channel, &topology.sync_queue(), WAIT)
            .await
            .expect("the resubscribed replayer retried it");
        assert_eq!(failure_of(&back).attempts, 1);
    })
    .await;
}
