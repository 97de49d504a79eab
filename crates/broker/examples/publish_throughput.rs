//! Measures `Publisher::publish_event` against a local RabbitMQ (confirmed, persistent,
//! quorum queue). Cleans up its own topology.
//!
//! `cargo run --release -p thena-broker --example publish_throughput -- [events] [concurrency] [channels]`

use std::time::Instant;

use futures_util::{StreamExt, stream};
use secrecy::SecretString;
use thena_broker::{Broker, PublisherOptions, Topology};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5_000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let channels: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let topology = Topology::new(format!("bench-{}", uuid::Uuid::new_v4().simple()));
    let broker = Broker::connect(SecretString::from(url), "publish-bench", topology).await?;
    let publisher = broker
        .publisher_with(PublisherOptions {
            channels,
            ..PublisherOptions::default()
        })
        .await?;
    let samples: Vec<_> = (0..events)
        .map(|n| thena_events::sample::event(&format!("W{}", n % 10), n, 1, None))
        .collect();

    let started = Instant::now();
    let mut latencies: Vec<f64> = stream::iter(&samples)
        .map(|event| {
            let publisher = publisher.clone();
            async move {
                let t = Instant::now();
                publisher
                    .publish_event(event)
                    .await
                    .map(|()| t.elapsed().as_secs_f64() * 1e3)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{events} events, concurrency {concurrency}, {channels} channels: {:.0} events/s, latency p50 {:.2} ms, p99 {:.2} ms",
        events as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );

    let channel = broker.channel().await?;
    broker.topology().delete(&channel).await?;
    broker.close().await;
    Ok(())
}
