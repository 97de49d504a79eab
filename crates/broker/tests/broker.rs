//! The broker library against the real local RabbitMQ.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use lapin::{
    BasicProperties,
    options::BasicQosOptions,
    types::{AMQPValue, FieldTable},
};
use secrecy::SecretString;
use thena_broker::{
    Broker, DEAD_LETTERED_AT_HEADER, Failure, FailureClass, PARKED_AT_HEADER, PublishError,
    Topology, WORKSPACE_HEADER,
};
use thena_events::sample;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn declaring_the_topology_twice_is_idempotent() {
    with_broker(test_topology(), |broker| async move {
        let channel = broker.channel().await.unwrap();
        broker.topology().declare(&channel).await.unwrap();
        broker.topology().declare(&channel).await.unwrap();
        // A second process declaring the same topology is fine too.
        let again = connect(broker.topology().clone()).await;
        assert!(again.is_healthy().await);
        again.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_published_event_is_confirmed_and_lands_on_the_sync_queue_with_its_properties() {
    with_broker(test_topology(), |broker| async move {
        let publisher = broker.publisher().await.unwrap();
        let event = sample::event("T0WS1", 42, 3, Some("ada@acme.io"));
        publisher.publish_event(&event).await.unwrap();

        let channel = broker.channel().await.unwrap();
        let message = take(&channel, &broker.topology().sync_queue(), WAIT)
            .await
            .expect("the event is on the sync queue");
        let props = &message.delivery.properties;
        assert_eq!(message.delivery.routing_key.as_str(), "request.T0WS1");
        assert_eq!(
            message.delivery.exchange.as_str(),
            broker.topology().exchange()
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.message_id().as_ref().map(|m| m.to_string()),
            Some(event.event_id.to_string())
        );
        assert_eq!(header(&message, WORKSPACE_HEADER).as_deref(), Some("T0WS1"));
        assert_eq!(
            thena_events::decode_event(&message.delivery.data).unwrap(),
            event
        );
    })
    .await;
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error_and_the_publisher_keeps_working() {
    with_broker(test_topology(), |broker| async move {
        let publisher = broker.publisher().await.unwrap();
        let topology = broker.topology().clone();

        // The topic exchange exists but nothing is bound to this key.
        let unroutable = publisher
            .publish_raw(
                &topology.exchange(),
                "nobody.listens",
                b"{}",
                BasicProperties::default(),
            )
            .await;
        assert!(
            matches!(unroutable, Err(PublishError::Unroutable { .. })),
            "{unroutable:?}"
        );

        // A missing exchange closes the channel (404): an error, then a fresh channel.
        let missing = publisher
            .publish_raw(
                &format!("{}.nope", topology.prefix),
                "request.x",
                b"{}",
                BasicProperties::default(),
            )
            .await;
        assert!(missing.is_err(), "{missing:?}");

        // Every pool channel gets exercised: all of them still work afterwards.
        for n in 0..10 {
            publisher
                .publish_event(&sample::event("T0WS2", n, 1, None))
                .await
                .unwrap();
        }
        let channel = broker.channel().await.unwrap();
        assert_eq!(depth(&channel, &topology.sync_queue()).await, 10);
    })
    .await;
}

#[tokio::test]
async fn the_publisher_recovers_after_its_connection_is_closed() {
    with_broker(test_topology(), |broker| async move {
        let publisher = broker.publisher().await.unwrap();
        publisher
            .publish_event(&sample::event("T0WS3", 1, 1, None))
            .await
            .unwrap();

        // What a broker restart looks like to the client: the connection goes away.
        broker.close().await;
        publisher
            .publish_event(&sample::event("T0WS3", 2, 1, None))
            .await
            .expect("the next publish reconnects transparently");

        let channel = broker.channel().await.unwrap();
        assert_eq!(depth(&channel, &broker.topology().sync_queue()).await, 2);
    })
    .await;
}

#[tokio::test]
async fn a_deferred_message_comes_back_to_the_sync_queue_with_its_original_routing_key() {
    with_broker(test_topology(), |broker| async move {
        let publisher = broker.publisher().await.unwrap();
        let topology = broker.topology().clone();
        let event = sample::event("T0WS4", 7, 1, None);
        let props = BasicProperties::default().with_message_id(event.event_id.to_string().into());
        let failure = Failure::new(
            FailureClass::RateLimited,
            "vitally_429",
            "429 Too Many Requests",
            topology.exchange(),
            "request.T0WS4",
            Utc::now(),
        )
        .with_retry_at(Utc::now());

        let started = Instant::now();
        publisher
            .defer(
                &serde_json::to_vec(&event).unwrap(),
                &props,
                "request.T0WS4",
                thena_broker::Wake::NotBefore(Duration::from_millis(300)),
                Some(&failure),
            )
            .await
            .unwrap();
        let channel = broker.channel().await.unwrap();
        let back = take(&channel, &topology.sync_queue(), WAIT)
            .await
            .expect("the deferred message comes back");
        // 300 ms rounds up to the 500 ms tier.
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(back.delivery.routing_key.as_str(), "request.T0WS4");
        assert_eq!(
            back.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str(),
            event.event_id.to_string()
        );
        let headers = back.delivery.properties.headers().clone().unwrap();
        assert_eq!(Failure::from_headers(&headers), Some(failure));
        assert_eq!(*back.delivery.properties.delivery_mode(), Some(2));
    })
    .await;
}

/// The arguments of a delay tier's queue, with `queue_type` and `strategy`.
fn delay_args(topology: &Topology, tier: usize, queue_type: &str, strategy: &str) -> FieldTable {
    let text = |s: &str| AMQPValue::LongString(s.into());
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text(queue_type));
    args.insert("x-dead-letter-strategy".into(), text(strategy));
    args.insert("x-overflow".into(), text("reject-publish"));
    let ttl = i64::try_from(topology.tier_delay(tier).as_millis()).unwrap();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert("x-dead-letter-exchange".into(), text(&topology.exchange()));
    args
}

#[tokio::test]
async fn delay_queues_are_quorum_queues_that_dead_letter_at_least_once() {
    with_broker(test_topology(), |broker| async move {
        let topology = broker.topology().clone();
        let durable = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for tier in 0..topology.delay_tiers.len() {
            let name = topology.delay_queue(tier);
            // RabbitMQ refuses a redeclare with inequivalent arguments, so an accepted one
            // names the queue's arguments.
            let channel = broker.channel().await.unwrap();
            channel
                .queue_declare(
                    name.as_str().into(),
                    durable,
                    delay_args(&topology, tier, "quorum", "at-least-once"),
                )
                .await
                .unwrap_or_else(|e| panic!("{name} is not a quorum at-least-once queue: {e}"));
            for (queue_type, strategy) in [("classic", "at-least-once"), ("quorum", "at-most-once")]
            {
                let channel = broker.channel().await.unwrap();
                let refused = channel
                    .queue_declare(
                        name.as_str().into(),
                        durable,
                        delay_args(&topology, tier, queue_type, strategy),
                    )
                    .await;
                assert!(refused.is_err(), "{name} is also {queue_type}/{strategy}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn dead_letter_and_park_carry_the_failure_in_headers() {
    with_broker(test_topology(), |broker| async move {
        let publisher = broker.publisher().await.unwrap();
        let topology = broker.topology().clone();
        let mut headers = FieldTable::default();
        headers.insert(
            WORKSPACE_HEADER.into(),
            AMQPValue::LongString("T0WS5".into()),
        );
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(headers);
        let failure = Failure::new(
            FailureClass::Transient,
            "vitally_503",
            "503",
            topology.exchange(),
            "request.T0WS5",
            Utc::now(),
        );

        publisher
            .dead_letter(b"body", &props, &failure)
            .await
            .unwrap();
        let channel = broker.channel().await.unwrap();
        let dead = take(&channel, &topology.dead_queue(), WAIT)
            .await
            .expect("dead-lettered");
        assert_eq!(dead.delivery.data, b"body");
        assert_eq!(
            Failure::from_headers(dead.delivery.properties.headers().as_ref().unwrap()),
            Some(failure.clone())
        );
        assert!(header(&dead, DEAD_LETTERED_AT_HEADER).is_some());
        assert_eq!(header(&dead, WORKSPACE_HEADER).as_deref(), Some("T0WS5"));

        let permanent = failure.next_attempt(FailureClass::Permanent, "no_integration", "none");
        publisher
            .park(&dead.delivery.data, &dead.delivery.properties, &permanent)
            .await
            .unwrap();
        let parked = take(&channel, &topology.parked_queue(), WAIT)
            .await
            .expect("parked");
        assert_eq!(
            Failure::from_headers(parked.delivery.properties.headers().as_ref().unwrap()),
            Some(permanent)
        );
        assert!(header(&parked, PARKED_AT_HEADER).is_some());
        // Parking replaces the dead-letter marker: it describes the current state only.
        assert!(header(&parked, DEAD_LETTERED_AT_HEADER).is_none());
    })
    .await;
}

/// Issue 14, item 1: the dead queue has an explicit delivery limit and target, so a dead
/// letter that keeps crashing the replayer is parked, never dropped (RabbitMQ 4.x drops a
/// quorum queue's message past its default limit when there is no target).
#[tokio::test]
async fn a_dead_letter_past_the_delivery_limit_is_parked_by_rabbitmq() {
    with_broker(
        test_topology().with_delivery_limit(2),
        |broker| async move {
            let publisher = broker.publisher().await.unwrap();
            let topology = broker.topology().clone();
            publisher
                .publish_raw(
                    &topology.dlx(),
                    "request.T0WS7",
                    b"{}",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            let channel = broker.channel().await.unwrap();
            crash_on(
                &channel,
                &topology.dead_queue(),
                &topology.parked_queue(),
                WAIT,
            )
            .await;
            let parked = take(&channel, &topology.parked_queue(), WAIT)
                .await
                .expect("RabbitMQ parked the crash-looping dead letter");
            assert_eq!(parked.delivery.data, b"{}");
        },
    )
    .await;
}

/// The parked queue is a quorum queue (replicated) with an explicit delivery limit and
/// target: a parked message whose storing keeps failing goes to the dead queue (whose
/// replayer parks it again), never dropped.
#[tokio::test]
async fn a_parked_message_past_the_delivery_limit_goes_to_the_dead_queue() {
    with_broker(
        test_topology().with_delivery_limit(2),
        |broker| async move {
            let topology = broker.topology().clone();
            let channel = broker.channel().await.unwrap();
            // RabbitMQ refuses a redeclare with another queue type: it is not classic.
            let probe = broker.channel().await.unwrap();
            let mut classic = FieldTable::default();
            classic.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("classic".into()),
            );
            let redeclared = probe
                .queue_declare(
                    topology.parked_queue().as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    classic,
                )
                .await;
            assert!(redeclared.is_err(), "the parked queue is a classic queue");
            let publisher = broker.publisher().await.unwrap();
            let failure = Failure::new(
                FailureClass::Permanent,
                "vitally_400",
                "400",
                topology.exchange(),
                "request.T0WS8",
                Utc::now(),
            );
            publisher
                .park(b"{}", &BasicProperties::default(), &failure)
                .await
                .unwrap();
            crash_on(
                &channel,
                &topology.parked_queue(),
                &topology.dead_queue(),
                WAIT,
            )
            .await;
            let dead = take(&channel, &topology.dead_queue(), WAIT)
                .await
                .expect("RabbitMQ handed the parked message to the dead queue");
            let headers = dead.delivery.properties.headers().clone().unwrap();
            assert_eq!(Failure::from_headers(&headers), Some(failure));
            assert!(header(&dead, PARKED_AT_HEADER).is_some());
        },
    )
    .await;
}

#[tokio::test]
async fn rabbitmq_dead_letters_a_message_past_the_delivery_limit_without_our_headers() {
    with_broker(
        test_topology().with_delivery_limit(2),
        |broker| async move {
            let publisher = broker.publisher().await.unwrap();
            let topology = broker.topology().clone();
            publisher
                .publish_event(&sample::event("T0WS6", 1, 1, None))
                .await
                .unwrap();

            // A consumer that crashes on the message: it is returned every time.
            let channel = broker.channel().await.unwrap();
            channel
                .basic_qos(1, BasicQosOptions::default())
                .await
                .unwrap();
            let returns = crash_on(
                &channel,
                &topology.sync_queue(),
                &topology.dead_queue(),
                WAIT,
            )
            .await;
            assert!(returns >= 2, "delivered {returns} times");
            let dead = take(&channel, &topology.dead_queue(), WAIT)
                .await
                .expect("RabbitMQ dead-lettered the poison message");
            let headers = dead.delivery.properties.headers().clone().unwrap();
            assert!(Failure::from_headers(&headers).is_none());
            assert!(headers.contains_key("x-death"), "{headers:?}");
            assert_eq!(dead.delivery.routing_key.as_str(), "request.T0WS6");
        },
    )
    .await;
}

#[tokio::test]
async fn connection_errors_name_the_host_but_never_the_password() {
    let refused = Broker::connect(
        SecretString::from("amqp://guest:hunter2-secret@127.0.0.1:1/%2f"),
        "t",
        test_topology(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.starts_with("cannot connect to RabbitMQ at 127.0.0.1:1:"),
        "{refused}"
    );
    assert!(!refused.contains("hunter2"), "{refused}");

    let bad_login = Broker::connect(
        SecretString::from("amqp://guest:wrong-password-xyz@127.0.0.1:5672/%2f"),
        "t",
        test_topology(),
    )
    .await
    .unwrap_err();
    let text = format!("{bad_login} {bad_login:?}");
    assert!(text.contains("127.0.0.1:5672"), "{text}");
    assert!(!text.contains("wrong-password-xyz"), "{text}");
}

#[tokio::test]
async fn a_test_topology_is_deleted_even_when_the_test_panics() {
    let topology = test_topology();
    let panicked = tokio::spawn(with_broker(topology.clone(), |_broker| async {
        panic!("a failing test body");
    }))
    .await;
    assert!(panicked.is_err(), "the panic is re-raised");

    with_broker(Topology::new(unique_prefix()), |probe| async move {
        let channel = probe.channel().await.unwrap();
        let gone = channel
            .queue_declare(
                topology.sync_queue().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(gone.is_err(), "the sync queue was deleted");
    })
    .await;
}
