//! Ingest throughput: events/s through the HTTP API (one event per request, and 100 per
//! request) against a raw lapin publish-with-confirms baseline on the same broker, same
//! event sizes, same run. `cargo bench -p thena-producer --bench ingest`.
//!
//! Both sides keep the same number of requests / batches in flight (8), and every
//! message is persistent, mandatory and confirmed onto the same quorum queue.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions},
};
use secrecy::SecretString;
use thena_broker::{Broker, PublisherOptions, Topology};
use thena_events::RequestChanged;
use thena_producer::{AppDeps, AppState, IngestMetrics, ProducerConfig, emit};
use thena_runtime::{egress::AllowList, ops::Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vitally_client::{
    client::VitallyHttp, crypto::KeyRing, integrations::IntegrationStore, metrics::VitallyMetrics,
};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/thena_vitally";
const TOKEN: &str = "bench-token";
const IN_FLIGHT: usize = 8;
const SINGLE_EVENTS: usize = 2_000;
const BATCHED_EVENTS: usize = 5_000;
const BATCH: usize = 100;
const WIDE_CHANNELS: usize = 64;

struct Row {
    path: String,
    events: usize,
    elapsed: Duration,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(prefix.clone());
    let broker = Broker::connect(AMQP_URL.into(), "producer-bench", topology.clone()).await?;
    // Ingest never reads integrations: a pool that is never connected is enough.
    let db = thena_store::Db::new(&SecretString::from(DATABASE_URL), "bench_unused")?;
    let keys = KeyRing::single(&SecretString::from("ab".repeat(32)))?;
    let integrations = IntegrationStore::new(db, keys);
    let shutdown = CancellationToken::new();
    // The default publisher (8 confirm channels) and a wider one, to show where the
    // batched path's ceiling comes from.
    let mut servers = Vec::new();
    for channels in [PublisherOptions::default().channels, WIDE_CHANNELS] {
        let publisher = broker
            .publisher_with(PublisherOptions {
                channels,
                ..PublisherOptions::default()
            })
            .await?;
        let state = AppState::new(
            ProducerConfig::new(SecretString::from(TOKEN)),
            AppDeps {
                broker: broker.clone(),
                publisher,
                integrations: integrations.clone(),
                vitally: VitallyHttp::new(
                    Duration::from_secs(5),
                    AllowList::vitally(),
                    VitallyMetrics::unregistered(),
                )?,
                readiness: Readiness::new(),
            },
            IngestMetrics::unregistered(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(thena_producer::run(listener, state, shutdown.clone()));
        servers.push((channels, base, server));
    }

    let mut scenario = emit::Scenario::new("TBENCH", chrono::Utc::now());
    scenario.requests = (BATCHED_EVENTS / 6) as u64 + 1;
    scenario.steps = 6;
    let mut events = scenario.events();
    events.truncate(BATCHED_EVENTS);
    let mean_bytes = events
        .iter()
        .map(|e| serde_json::to_vec(e).map(|b| b.len()).unwrap_or(0))
        .sum::<usize>()
        / events.len();
    let channel = broker.channel().await?;
    let token = SecretString::from(TOKEN);

    // Warm every path (connections, channels, pools).
    for (_, base, _) in &servers {
        api(base, &token, &events[..200], 1).await?;
    }
    raw(&broker, &topology, &events[..200], 1).await?;
    purge(&channel, &topology).await?;

    let mut rows: Vec<Row> = Vec::new();
    for (per_request, n) in [(1, SINGLE_EVENTS), (BATCH, BATCHED_EVENTS)] {
        let started = Instant::now();
        raw(&broker, &topology, &events[..n], per_request).await?;
        rows.push(Row {
            path: format!("raw lapin {per_request}/req"),
            events: n,
            elapsed: started.elapsed(),
        });
        purge(&channel, &topology).await?;
        for (channels, base, _) in &servers {
            let started = Instant::now();
            api(base, &token, &events[..n], per_request).await?;
            rows.push(Row {
                path: format!("HTTP API {per_request}/req, {channels} ch"),
                events: n,
                elapsed: started.elapsed(),
            });
            purge(&channel, &topology).await?;
        }
    }

    println!();
    println!(
        "ingest throughput ({mean_bytes} B/event mean, {IN_FLIGHT} requests/batches in flight, \
         quorum queue, persistent + mandatory + confirmed; `ch` = publisher confirm channels)"
    );
    println!(
        "{:<28} {:>7} {:>9} {:>10} {:>13}",
        "path", "events", "seconds", "events/s", "vs raw lapin"
    );
    for group in rows.chunks(1 + servers.len()) {
        let raw_rate = group[0].rate();
        for row in group {
            println!(
                "{:<28} {:>7} {:>9.2} {:>10.0} {:>12.2}x",
                row.path,
                row.events,
                row.elapsed.as_secs_f64(),
                row.rate(),
                row.rate() / raw_rate
            );
        }
    }

    shutdown.cancel();
    for (_, _, server) in servers {
        server.await??;
    }
    topology.delete(&channel).await?;
    broker.close().await;
    Ok(())
}

async fn api(
    base: &str,
    token: &SecretString,
    events: &[RequestChanged],
    batch: usize,
) -> anyhow::Result<()> {
    let report = emit::emit_http(base, token, events, 0, batch).await?;
    anyhow::ensure!(
        report.accepted == events.len() as u64,
        "the API did not accept everything: {report:?}"
    );
    Ok(())
}

/// The baseline: what the API does minus HTTP and validation. `batch` messages are
/// published back to back on one confirm channel, then their confirms awaited; up to
/// [`IN_FLIGHT`] such batches run at once, each on its own channel.
async fn raw(
    broker: &Broker,
    topology: &Topology,
    events: &[RequestChanged],
    batch: usize,
) -> anyhow::Result<()> {
    let mut channels = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let channel = broker.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let exchange = topology.exchange();
    let results: Vec<anyhow::Result<()>> = stream::iter(events.chunks(batch).enumerate())
        .map(|(n, chunk)| {
            let channel = channels[n % IN_FLIGHT].clone();
            let exchange = exchange.clone();
            async move {
                let mut confirms = Vec::with_capacity(chunk.len());
                for event in chunk {
                    let payload = serde_json::to_vec(event)?;
                    let properties = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_message_id(event.event_id.to_string().into())
                        .with_delivery_mode(2);
                    confirms.push(
                        channel
                            .basic_publish(
                                exchange.as_str().into(),
                                Topology::routing_key(&event.workspace_id).into(),
                                BasicPublishOptions {
                                    mandatory: true,
                                    ..BasicPublishOptions::default()
                                },
                                &payload,
                                properties,
                            )
                            .await?,
                    );
                }
                for confirm in confirms {
                    let confirmation = confirm.await?;
                    anyhow::ensure!(confirmation.is_ack(), "nacked");
                    anyhow::ensure!(confirmation.take_message().is_none(), "unroutable");
                }
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    for channel in channels {
        channel.close(200, "done".into()).await?;
    }
    Ok(())
}

async fn purge(channel: &lapin::Channel, topology: &Topology) -> anyhow::Result<()> {
    channel
        .queue_purge(topology.sync_queue().into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}
