//! The replayer role against the real local RabbitMQ and PostgreSQL, with millisecond
//! delay tiers.

#[path = "../../broker/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::{crash_on, depth, eventually, header, take};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use support::{Harness, WAIT};
use thena_broker::{
    Broker, DEAD_LETTERED_AT_HEADER, Failure, FailureClass, Topology, WORKSPACE_HEADER,
};
use thena_replayer::dlq::{DlqFilter, ReplayOptions};
use thena_store::ledger::Ledger;
use thena_testkit::{TestEnv, wait_until};

const HOUR: Duration = Duration::from_secs(3_600);

/// A harness whose replayer runs from the start.
async fn replaying(max_age: Duration) -> Harness {
    let mut h = Harness::new(TestEnv::new()).await;
    h.start_replayer(max_age).await;
    h
}

/// The ledger's newest history line of a request: (outcome, reason).
async fn last_outcome(h: &Harness, workspace: &str, request: u64) -> Option<(String, String)> {
    let record = Ledger::read_only(h.db.clone())
        .show(workspace, request, 1)
        .await
        .unwrap()?;
    let last = record.history.last()?;
    Some((last.outcome.clone(), last.reason.clone()))
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
    let r = replaying(HOUR).await;
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
        r.metrics()
            .retries
            .with_label_values(&["vitally_503"])
            .get(),
        1
    );
    assert_eq!(depth(&channel, &r.broker.topology().dead_queue()).await, 0);
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_failure_comes_back_without_counting_an_attempt() {
    let r = replaying(HOUR).await;
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
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_parked_in_postgresql_with_its_reason_counted_and_ledgered() {
    let r = replaying(HOUR).await;
    let (body, props) = message("W3", "ev-perm");
    let permanent = failure(&r.broker, FailureClass::Permanent, "no_integration", "W3");
    r.publisher
        .dead_letter(&body, &props, &permanent)
        .await
        .unwrap();

    let parked = r.wait_parked(1).await;
    let row = &parked[0];
    assert_eq!(row.event_id.as_deref(), Some("ev-perm"));
    assert_eq!(row.reason, "no_integration");
    assert_eq!(row.first_failure, permanent.first_failure);
    assert_eq!(row.last_error, "boom");
    assert_eq!(row.original_routing_key, "request.W3");
    // The parked count and the oldest parked age come from PostgreSQL within a poll.
    let gauges = r.metrics();
    wait_until("the parked gauges", WAIT, || async {
        (gauges.parked_messages.get() == 1 && gauges.parked_oldest_age_seconds.get() > 0.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        gauges.parked.with_label_values(&["no_integration"]).get(),
        1
    );
    // The replayer's park is in the request's history, like a consumer's.
    assert_eq!(
        last_outcome(&r, "W3", 1).await,
        Some(("parked".into(), "no_integration".into()))
    );
    let topology = r.topology().clone();
    assert_eq!(r.depth(&topology.sync_queue()).await, 0);
    wait_until("the parked queue drained", WAIT, || async {
        (r.depth(&topology.parked_queue()).await == 0).then_some(())
    })
    .await;
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_older_than_max_age_is_parked_as_too_old_and_its_request_says_so() {
    let r = replaying(Duration::from_secs(60)).await;
    let (body, props) = message("W4", "ev-old");
    let mut old = failure(&r.broker, FailureClass::Transient, "vitally_503", "W4");
    old.first_failure -= TimeDelta::hours(1);
    r.publisher.dead_letter(&body, &props, &old).await.unwrap();

    let parked = r.wait_parked(1).await;
    assert_eq!(parked[0].reason, "too_old");
    assert_eq!(parked[0].last_error, "boom");
    assert_eq!(
        last_outcome(&r, "W4", 1).await,
        Some(("parked".into(), "too_old".into()))
    );
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_past_the_delivery_limit_is_parked_while_others_keep_flowing() {
    let mut r = Harness::new(limited_to_two()).await;
    r.start_replayer(HOUR).await;
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
    let parked = r.wait_parked(1).await;
    assert_eq!(parked[0].event_id, Some(poison.event_id.to_string()));
    assert_eq!(parked[0].reason, "delivery_limit");
    assert_eq!(parked[0].original_exchange, topology.exchange());
    let only_poison = DlqFilter {
        reason: Some("delivery_limit".into()),
        ids: vec![parked[0].id],
        ..DlqFilter::default()
    };
    let options = ReplayOptions {
        dry_run: false,
        rate_per_sec: None,
        actor: "test".into(),
        why: "consumer fixed".into(),
    };
    let job = r.dlq.prepare_replay(&only_poison, &options).await.unwrap();
    let report = r.dlq.replay(&r.publisher, job, |_| {}).await.unwrap();
    assert_eq!(report.replayed, 1);
    assert_eq!(
        last_outcome(&r, "POISON", 1).await,
        Some(("replayed".into(), "delivery_limit".into()))
    );
    let probe = r.broker.channel().await.unwrap();
    let replayed = take(&probe, &topology.sync_queue(), WAIT)
        .await
        .expect("replayed to the sync queue");
    assert_eq!(replayed.delivery.routing_key.as_str(), "request.POISON");
    assert!(
        Failure::from_headers(replayed.delivery.properties.headers().as_ref().unwrap()).is_none()
    );
    assert_eq!(
        r.metrics()
            .parked
            .with_label_values(&["delivery_limit"])
            .get(),
        1
    );
    r.finish().await;
}

/// A consumer crashing on the message in `from` until RabbitMQ moves it to `to`.
async fn crash_until_moved(broker: &Broker, from: &str, to: &str) {
    let channel = broker.channel().await.unwrap();
    crash_on(&channel, from, to, WAIT).await;
    assert_eq!(
        depth(&channel, to).await,
        1,
        "RabbitMQ moved it from {from} to {to}"
    );
    channel.close(200, "done".into()).await.unwrap();
}

fn limited_to_two() -> TestEnv {
    let mut env = TestEnv::new();
    env.topology = env.topology.clone().with_delivery_limit(2);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_rabbitmq_moves_past_the_dead_queue_limit_ends_in_postgresql() {
    let mut r = Harness::new(limited_to_two()).await;
    let topology = r.topology().clone();
    // A consumer's dead letter that crashes every replayer that takes it.
    let (body, props) = message("W7", "ev-crashy");
    let transient = Failure {
        attempts: 2,
        ..failure(&r.broker, FailureClass::Transient, "vitally_503", "W7")
    };
    r.publisher
        .dead_letter(&body, &props, &transient)
        .await
        .unwrap();
    crash_until_moved(&r.broker, &topology.dead_queue(), &topology.parked_queue()).await;

    r.start_replayer(HOUR).await;
    let parked = r.wait_parked(1).await;
    let row = &parked[0];
    assert_eq!(row.event_id.as_deref(), Some("ev-crashy"));
    assert_eq!(row.reason, "delivery_limit");
    // Its history is kept: first failure, attempts, original route.
    assert_eq!(row.first_failure, transient.first_failure);
    assert_eq!(row.attempts, 2);
    assert_eq!(row.original_routing_key, "request.W7");
    // Nobody but the drain saw it parked: it writes the request's ledger line.
    assert_eq!(
        last_outcome(&r, "W7", 1).await,
        Some(("parked".into(), "delivery_limit".into()))
    );
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_back_from_the_parked_queue_limit_is_stored_once_as_it_was() {
    let mut r = Harness::new(limited_to_two()).await;
    let topology = r.topology().clone();
    let event = thena_events::sample::event("W8", 8, 2, None);
    r.park(&event, "vitally_400").await;
    // Storing it keeps failing (crashes before the ack) until RabbitMQ gives up on it.
    crash_until_moved(&r.broker, &topology.parked_queue(), &topology.dead_queue()).await;

    r.start_replayer(HOUR).await;
    let parked = r.wait_parked(1).await;
    assert_eq!(parked[0].event_id, Some(event.event_id.to_string()));
    assert_eq!(parked[0].reason, "vitally_400");
    assert_eq!(parked[0].last_error, "vitally_400 happened");
    wait_until("both queues drained", WAIT, || async {
        let dead = r.depth(&topology.dead_queue()).await;
        let parked = r.depth(&topology.parked_queue()).await;
        (dead == 0 && parked == 0).then_some(())
    })
    .await;
    assert_eq!(
        r.in_state(thena_store::dead_letters::State::Parked)
            .await
            .len(),
        1
    );
    // Parked again as it was, not a new decision: no second line in its history.
    assert_eq!(last_outcome(&r, "W8", 8).await, None);
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replayer_resubscribes_after_its_queue_vanishes_or_its_connection_drops() {
    let r = replaying(HOUR).await;
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
    r.finish().await;
}
