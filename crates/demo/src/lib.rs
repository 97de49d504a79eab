//! `thena-vitally demo`: every role in one process against the local RabbitMQ and Redis
//! and an embedded fake Vitally, with a customer base covering every linking case.
//!
//! It connects an integration through the producer's admin API, sends request
//! lifecycles through the ingest API (with a short Vitally outage on the way, so the
//! retry path shows), waits until every request settled, and prints where each one
//! went. Everything runs under a fresh name prefix, removed again at the end.

pub mod customers;
mod report;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, bail};
use chrono::Utc;
use fake_vitally::{FakeConfig, FakeVitally, Fault, FaultKind, RunningFake};
use secrecy::{ExposeSecret, SecretString};
use thena_broker::Topology;
use thena_events::{Change, Source};
use thena_producer::emit::{Persona, Scenario, default_categories, emit_http};
use thena_runtime::{Config, ops};
use thena_sync::{outcome::Outcome, worker::Settled};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;

pub use report::{DemoReport, InstanceView, REASONS, Recovery, RequestRow};

pub const WORKSPACE: &str = "T0DEMO";

/// What to run; the defaults are the README's demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Events per request lifecycle (created … closed with CSAT).
    pub steps: usize,
    /// Consumer replicas in the process.
    pub consumers: usize,
    /// Give up waiting for the requests to settle after this long.
    pub deadline: Duration,
    /// Keep serving (metrics, API, fake) after the table until Ctrl-C.
    pub serve: bool,
    /// Names the run's prefix `demo-{run_id}` (default: random); tests pick their own.
    pub run_id: Option<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            steps: 4,
            consumers: 2,
            deadline: Duration::from_secs(45),
            serve: false,
            run_id: None,
        }
    }
}

/// One role's ops endpoint, for the closing list of URLs.
struct Endpoint {
    role: &'static str,
    addr: SocketAddr,
}

/// Runs the demo against `base` configuration (the environment's, normally) and
/// returns what happened; the caller prints it.
pub async fn run(base: &Config, options: &DemoOptions) -> anyhow::Result<DemoReport> {
    let started = tokio::time::Instant::now();
    let random = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let run_id = options.run_id.as_deref().unwrap_or(&random);
    let mut config = demo_config(base, run_id)?;
    // Serving: the operator console too, on the API's port.
    config.console.enabled = options.serve;
    config.console.addr = None;
    let shutdown = CancellationToken::new();
    let sign_in = sign_in_hint(base, &config);
    let result = run_in(&config, options, &shutdown, started, &sign_in).await;
    if result.is_err() {
        // Whatever failed (Redis down, a consumer that could not start, a request that
        // never settled): the run's queues, exchanges, keys and schema still go.
        shutdown.cancel();
        cleanup(&config).await;
    }
    result
}

async fn run_in(
    config: &Config,
    options: &DemoOptions,
    shutdown: &CancellationToken,
    started: tokio::time::Instant,
    sign_in: &str,
) -> anyhow::Result<DemoReport> {
    let mut config = config.clone();
    let shutdown = shutdown.clone();

    let fake = FakeVitally::spawn(FakeConfig::default()).await?;
    fake.seed(serde_json::from_value(customers::fixture())?)
        .map_err(|e| anyhow::anyhow!("seeding the fake Vitally: {e}"))?;
    // The fake is plain http on loopback: allowed by its exact origin, for this run only.
    config.vitally.allowed_hosts = config
        .vitally
        .allowed_hosts
        .clone()
        .with(&fake.base_url())
        .map_err(|e| anyhow::anyhow!("allowing the fake Vitally: {e}"))?;

    let mut endpoints = Vec::new();
    let mut registries = Vec::new();
    let (observer, mut settled) = mpsc::unbounded_channel();

    // Producer: ingest and admin API.
    let (producer_registry, producer_ready) =
        role_ops("producer", &mut endpoints, &shutdown).await?;
    let state = thena_producer::from_config(&config, &producer_registry, producer_ready).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let producer = tokio::spawn(thena_producer::run(listener, state, shutdown.clone()));
    registries.push(producer_registry);

    // Consumers, each with its own registry, as separate pods would have.
    let mut tasks = Vec::new();
    for _ in 0..options.consumers {
        let (registry, readiness) = role_ops("consumer", &mut endpoints, &shutdown).await?;
        let mut worker = thena_sync::app::build_worker(&config, &registry, readiness).await?;
        worker.observer = Some(observer.clone());
        tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        registries.push(registry);
    }
    drop(observer);

    // Replayer.
    let (replayer_registry, replayer_ready) =
        role_ops("replayer", &mut endpoints, &shutdown).await?;
    let replayer = {
        let config = config.clone();
        let registry = replayer_registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            thena_replayer::run_from_config(&config, &registry, replayer_ready, shutdown).await
        })
    };
    registries.push(replayer_registry);

    let token = config.require_producer_token()?;
    let outcome = drive(&api, &token, &fake, options, &mut settled).await;

    let mut report = match outcome {
        Ok((rows, recovery)) => {
            let mut report = DemoReport::new(rows, &fake.dump(), &registries, &fake.calls());
            report.recovery = recovery;
            report.elapsed = started.elapsed();
            report
        }
        Err(e) => {
            stop(&shutdown, tasks, producer, replayer).await;
            return Err(e);
        }
    };
    for (endpoint, registry) in endpoints.iter().zip(&registries) {
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )?;
        report
            .metrics
            .push((endpoint.role.to_string(), String::from_utf8(text)?));
    }
    report.urls = endpoints
        .iter()
        .map(|e| format!("{:<9} http://{}/metrics", e.role, e.addr))
        .chain([
            format!("{:<9} {api}/openapi.json", "api"),
            format!("{:<9} {}/_fake/state", "vitally", fake.base_url()),
        ])
        .collect();
    if config.console.enabled {
        report.urls.push(format!(
            "{:<9} {api}/console  (sign in with {sign_in})",
            "console"
        ));
    }

    if options.serve {
        report.serving = true;
        println!("{report}");
        println!("serving until Ctrl-C …");
        tokio::signal::ctrl_c().await?;
    }
    stop(&shutdown, tasks, producer, replayer).await;
    cleanup(&config).await;
    fake.shutdown().await;
    report.serving = false;
    Ok(report)
}

/// How to sign in to the console: the demo's own throwaway token is shown; a token the
/// environment set is the user's secret and is only named.
fn sign_in_hint(base: &Config, config: &Config) -> String {
    match (&base.producer_token, &config.producer_token) {
        (None, Some(token)) => format!("the demo's admin token {}", token.expose_secret()),
        _ => "your PRODUCER_TOKEN".to_owned(),
    }
}

/// The environment's configuration, isolated for this run: its own queues, Redis
/// keys and PostgreSQL schema (so it never touches a real deployment on the same broker), local listeners,
/// and throwaway secrets where none are configured.
fn demo_config(base: &Config, run_id: &str) -> anyhow::Result<Config> {
    let mut config = base.clone();
    config.name_prefix = format!("demo-{run_id}");
    config.redis_prefix = format!("demo-{run_id}");
    config.database_schema = format!("demo_{}", run_id.to_ascii_lowercase().replace('-', "_"));
    config.retry.tiers = vec![
        Duration::from_millis(500),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ];
    config.consumer.concurrency = 16;
    if config.producer_token.is_none() {
        config.producer_token = Some(SecretString::from(format!("demo-token-{run_id}")));
    }
    if config.integrations_key.is_none() {
        // 32 random bytes, hex: the demo's records are deleted at the end anyway.
        let key: String = (0..2)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        config.integrations_key = Some(SecretString::from(key));
    }
    Ok(config)
}

async fn role_ops(
    role: &'static str,
    endpoints: &mut Vec<Endpoint>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(prometheus::Registry, ops::Readiness)> {
    let registry = prometheus::Registry::new();
    let readiness = ops::Readiness::new();
    let addr = ops::spawn(
        "127.0.0.1:0".parse()?,
        registry.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    endpoints.push(Endpoint { role, addr });
    Ok((registry, readiness))
}

/// Connects, sends the traffic, and collects each request's final outcome.
async fn drive(
    api: &str,
    token: &SecretString,
    fake: &RunningFake,
    options: &DemoOptions,
    settled: &mut mpsc::UnboundedReceiver<Settled>,
) -> anyhow::Result<(Vec<RequestRow>, Recovery)> {
    connect(api, token, fake).await?;

    let personas: Vec<Persona> = customers::PERSONAS
        .iter()
        .map(|p| Persona::new(p.name, p.email))
        .collect();
    let scenario = Scenario {
        workspace_id: WORKSPACE.into(),
        personas,
        // Every channel in turn: each linking case is shown from some channel.
        sources: Source::ALL.to_vec(),
        requests: customers::PERSONAS.len() as u64,
        first_request_id: 101,
        steps: options.steps.max(3),
        start: Utc::now(),
        max_step_gap: Duration::from_secs(2),
        categories: default_categories(),
        seed: 7,
    };
    let events = scenario.events();
    // Thread-only changes wait for the next metadata change (they are skipped).
    let thread_only = events.iter().filter(|e| e.change == Change::Thread).count();
    let last_version: HashMap<u64, u64> = events.iter().fold(HashMap::new(), |mut last, e| {
        let v = last.entry(e.request.id).or_insert(0);
        *v = (*v).max(e.request.version);
        last
    });

    // A short Vitally outage while the traffic flows: those events take the retry path.
    fake.inject(Fault::NextN {
        method: Some("PUT".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 3,
        kind: FaultKind::Status(503),
    });
    let sent = emit_http(api, token, &events, 0, 10).await?;
    if sent.accepted as usize != events.len() {
        bail!(
            "the producer accepted {} of {} events",
            sent.accepted,
            events.len()
        );
    }
    tracing::debug!(events = events.len(), thread_only, "traffic sent");

    // Wait until every event sent has its final outcome (synced, skipped or parked), not
    // only each request's last version: a retried or deferred older version comes back
    // later, and the counters are read only once nothing is in flight any more.
    let all: HashSet<(u64, u64)> = events
        .iter()
        .map(|e| (e.request.id, e.request.version))
        .collect();
    let mut done: HashMap<(u64, u64), (tokio::time::Instant, Outcome)> = HashMap::new();
    // A request's fate: the first settle that processed its last version (a retried or
    // deferred older message is processed as the latest snapshot, coalesced; the last
    // version's own message then settles as a duplicate, already_applied).
    let mut fates: BTreeMap<u64, Outcome> = BTreeMap::new();
    let mut retried: HashSet<(u64, u64)> = HashSet::new();
    let mut last_retry: Option<tokio::time::Instant> = None;
    let mut retries = 0;
    let deadline = tokio::time::Instant::now() + options.deadline;
    while done.len() < all.len() {
        let next = tokio::time::timeout_at(deadline, settled.recv())
            .await
            .with_context(|| {
                format!(
                    "only {} of {} events settled within {:?}",
                    done.len(),
                    all.len(),
                    options.deadline
                )
            })?
            .context("every consumer stopped")?;
        let (Some(request), Some(version)) = (next.request_id, next.version) else {
            continue;
        };
        let key = (request, version);
        let now = tokio::time::Instant::now();
        match next.outcome {
            Outcome::Retry { .. } => {
                retries += 1;
                retried.insert(key);
                last_retry = Some(now);
            }
            Outcome::Synced { .. } | Outcome::Skipped(_) | Outcome::Park { .. } => {
                if let Some(processed) = next.processed_version
                    && last_version.get(&request) == Some(&processed)
                {
                    fates.entry(request).or_insert_with(|| next.outcome.clone());
                }
                if all.contains(&key) {
                    done.entry(key).or_insert((now, next.outcome));
                }
            }
            Outcome::Deferred { .. } | Outcome::Held { .. } => {}
        }
    }
    let mut recovery = Recovery {
        retried: retried.len(),
        retries,
        ..Recovery::default()
    };
    for key in &retried {
        let Some((at, outcome)) = done.get(key) else {
            continue;
        };
        match outcome {
            Outcome::Synced { .. } => recovery.synced += 1,
            Outcome::Skipped(_) => recovery.superseded += 1,
            _ => {}
        }
        if let Some(outage_end) = last_retry {
            recovery.after = recovery.after.max(at.saturating_duration_since(outage_end));
        }
    }
    let finals = fates;

    Ok((
        customers::PERSONAS
            .iter()
            .enumerate()
            .map(|(i, persona)| {
                let request_id = 101 + i as u64;
                RequestRow {
                    request_id,
                    source: scenario.source_of(i as u64),
                    persona: *persona,
                    outcome: finals[&request_id].clone(),
                    versions: last_version[&request_id],
                }
            })
            .collect::<Vec<_>>(),
        recovery,
    ))
}

/// Connects the demo workspace through the producer's admin API, like an admin would.
async fn connect(api: &str, token: &SecretString, fake: &RunningFake) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let categories: Vec<String> = default_categories().into_iter().map(|c| c.name).collect();
    let response = reqwest::Client::new()
        .post(format!("{api}/v1/integrations"))
        .bearer_auth(token.expose_secret())
        .json(&serde_json::json!({
            "workspace_id": WORKSPACE,
            "api_url": fake.base_url(),
            "auth_header": fake.auth_header(),
            "categories": categories,
            "push_requests": true,
            "update_requests": true,
            "rate_budget_per_min": 1000,
        }))
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "connecting the integration failed: {status} {}",
            response.text().await?
        );
    }
    Ok(())
}

async fn stop(
    shutdown: &CancellationToken,
    consumers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    producer: tokio::task::JoinHandle<std::io::Result<()>>,
    replayer: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    shutdown.cancel();
    for task in consumers {
        let _ = task.await;
    }
    let _ = producer.await;
    let _ = replayer.await;
}

/// Removes the run's queues, exchanges, Redis keys and PostgreSQL schema.
async fn cleanup(config: &Config) {
    match thena_store::Db::new(&config.database_url, &config.database_schema) {
        Ok(db) => {
            if let Err(e) = db.drop_schema().await {
                tracing::warn!(error = %e, "could not drop the demo's PostgreSQL schema");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not drop the demo's PostgreSQL schema"),
    }
    let topology = Topology::from_config(config);
    if let Ok(broker) = thena_broker::Broker::connect(
        config.amqp_url.clone(),
        "thena-vitally-demo-cleanup",
        topology.clone(),
    )
    .await
    {
        if let Ok(channel) = broker.channel().await
            && let Err(e) = topology.delete(&channel).await
        {
            tracing::warn!(error = %e, "could not delete the demo's queues");
        }
        broker.close().await;
    }
    if let Err(e) = delete_redis_keys(config).await {
        tracing::warn!(error = %e, "could not delete the demo's Redis keys");
    }
}

async fn delete_redis_keys(config: &Config) -> redis::RedisResult<()> {
    let mut redis = thena_runtime::redis::connect(&config.redis_url).await?;
    let pattern = format!("{}:*", config.redis_prefix);
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut redis, &pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        keys
    };
    if !keys.is_empty() {
        let _: () = redis::AsyncCommands::del(&mut redis, keys).await?;
    }
    Ok(())
}
