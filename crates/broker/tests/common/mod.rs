//! Helpers for tests against the real local RabbitMQ: a unique topology per test, and
//! polling reads with a deadline (no fixed sleeps). The replayer's tests include this
//! file too (`#[path]`), so both crates test with one harness.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use lapin::{
    Channel,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    types::FieldTable,
};
use secrecy::SecretString;
use thena_broker::{Broker, Topology};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn unique_prefix() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

/// Small delay tiers so tests wait milliseconds, not minutes.
pub fn test_topology() -> Topology {
    Topology::new(unique_prefix()).with_delay_tiers(vec![
        Duration::from_millis(200),
        Duration::from_millis(500),
        Duration::from_secs(1),
    ])
}

pub async fn connect(topology: Topology) -> Broker {
    Broker::connect(
        SecretString::from(amqp_url()),
        "thena-broker-tests",
        topology,
    )
    .await
    .expect("local RabbitMQ is reachable")
}

pub async fn cleanup(broker: &Broker) {
    let channel = broker.channel().await.expect("channel");
    broker
        .topology()
        .delete(&channel)
        .await
        .expect("delete topology");
    let _ = channel.close(200, "bye".into()).await;
    broker.close().await;
}

/// Runs `body` against a fresh topology and deletes the topology afterwards, even when
/// `body` panics (the panic is then re-raised).
pub async fn with_broker<F, Fut>(topology: Topology, body: F)
where
    F: FnOnce(Broker) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let broker = connect(topology).await;
    let outcome = tokio::spawn(body(broker.clone())).await;
    cleanup(&broker).await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Takes (and acks) the next message of `queue`, waiting up to `deadline`.
pub async fn take(channel: &Channel, queue: &str, deadline: Duration) -> Option<BasicGetMessage> {
    let until = Instant::now() + deadline;
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic_get");
        if let Some(message) = got {
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            return Some(message);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns every delivery of `from` (a consumer crashing on it) until RabbitMQ moved a
/// message past the delivery limit into `to`, or `deadline` passed. How many it returned.
pub async fn crash_on(channel: &Channel, from: &str, to: &str, deadline: Duration) -> u32 {
    let until = Instant::now() + deadline;
    let mut returned = 0;
    while Instant::now() < until {
        let got = channel
            .basic_get(from.into(), BasicGetOptions::default())
            .await
            .expect("basic_get");
        match got {
            Some(message) => {
                returned += 1;
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                message.delivery.nack(requeue).await.expect("nack");
            }
            None if depth(channel, to).await == 1 => break,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    returned
}

/// Messages ready in `queue` right now.
pub async fn depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
}

pub fn header(message: &BasicGetMessage, key: &str) -> Option<String> {
    message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| thena_broker::header_str(h, key))
}

/// Polls `check` until it holds or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
