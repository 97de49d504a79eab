//! Assembles a consumer from the shared configuration: the one place the CLI, the demo
//! and the tests build it, so they all run the same thing.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use thena_broker::{Broker, Topology};
use thena_runtime::{Config, ops::Readiness};
use thena_store::ledger::Ledger;
use vitally_client::{
    client::VitallyHttp,
    integrations::{IntegrationCache, IntegrationStore},
    limiter::RateLimiter,
    metrics::VitallyMetrics,
};

use crate::{
    cache::Cache,
    guard::RequestGuards,
    health::HealthProbe,
    metrics::SyncMetrics,
    pipeline::{KeyHealth, Pipeline, PipelineSettings},
    worker::{Worker, WorkerSettings},
};

/// A ready-to-run consumer with its metrics registered in `registry`.
pub async fn build_worker(
    config: &Config,
    registry: &prometheus::Registry,
    readiness: Readiness,
) -> anyhow::Result<Worker> {
    let broker = Broker::connect(
        config.amqp_url.clone(),
        "thena-vitally-consumer",
        Topology::from_config(config),
    )
    .await
    .context("cannot connect to RabbitMQ (AMQP_URL)")?;
    let redis = thena_runtime::redis::connect(&config.redis_url)
        .await
        .context("cannot connect to Redis (REDIS_URL)")?;
    let store = IntegrationStore::from_config(config).await?;
    let vitally_metrics = VitallyMetrics::new(registry)?;
    let metrics = SyncMetrics::new(registry)?;
    let keys = KeyHealth::new(readiness.clone(), metrics.undecryptable.clone());
    for workspace in store.undecryptable().await? {
        keys.set(&workspace, false);
    }
    let http = VitallyHttp::from_settings(&config.vitally, vitally_metrics.clone())?;
    let limiter = RateLimiter::new(
        redis.clone(),
        &config.redis_prefix,
        config.vitally.limiter_fallback_share,
    )
    .with_metrics(vitally_metrics);
    let guards = RequestGuards::new(
        redis.clone(),
        store.db().clone(),
        &config.redis_prefix,
        config.consumer.request_lock_ttl,
    );
    let first_start = store.db().first_start().await?;
    if let Err(e) = guards.start(first_start).await {
        // Locks stay refused (events deferred) until Redis answers and the epoch is set.
        tracing::warn!(error = ?e, "cannot set the fleet epoch in Redis yet");
    }
    let probe = HealthProbe {
        store: store.clone(),
        http: http.clone(),
        limiter: limiter.clone(),
        interval: config.health_probe_interval,
        metrics: metrics.clone(),
    };
    let pipeline = Pipeline {
        integrations: IntegrationCache::new(store.clone(), config.cache.integration_refresh),
        http,
        limiter,
        cache: Cache::new(redis.clone(), &config.redis_prefix, metrics.clone()),
        guards,
        settings: PipelineSettings {
            user_ttl: config.cache.user_ttl,
            negative_ttl: config.cache.negative_ttl,
            account_org_ttl: config.cache.account_org_ttl,
            domain_ttl: config.cache.domain_ttl,
            instance_ttl: config.cache.instance_ttl,
            free_mail_domains: config.free_mail_domains.clone(),
            textarea_limit: config.vitally.textarea_limit,
            max_rate_wait: config.consumer.max_rate_wait,
            lock_wait: Duration::from_secs(2),
            lock_ttl: config.consumer.request_lock_ttl,
            fields_ttl: config.cache.fields_ttl,
            actor: "consumer".to_owned(),
            backfill_budget_share: config.consumer.backfill_budget_share,
        },
        metrics: metrics.clone(),
        keys,
        ledger: Some(Ledger::start(store.db().clone())),
        fault: None,
    };
    Ok(Worker {
        broker,
        pipeline: Arc::new(pipeline),
        settings: WorkerSettings {
            concurrency: config.consumer.concurrency,
            backfill_concurrency: config.consumer.backfill_concurrency,
            prefetch: config.consumer.prefetch,
            shutdown_grace: config.consumer.shutdown_grace,
            hold_wait: config.health_probe_interval.min(Duration::from_secs(30)),
        },
        metrics,
        readiness,
        observer: None,
        probe: Some(probe),
    })
}
