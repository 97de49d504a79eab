//! The consumer's Prometheus metrics (prefix `thena_vitally_`).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct SyncMetrics {
    pub events: IntCounterVec,
    pub event_age: HistogramVec,
    pub processing: Histogram,
    pub cache_lookups: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub in_flight: IntGauge,
    /// 1 per paused integration, by why (refreshed by the health probe).
    pub integration_paused: IntGaugeVec,
    /// Integrations this replica cannot decrypt.
    pub undecryptable: IntGauge,
    /// Returning messages resolved to a newer snapshot of their request.
    pub coalesced: IntCounter,
    /// Duplicate instances (same externalId) deleted, keeping the oldest.
    pub duplicates_removed: IntCounterVec,
    /// Acks and nacks RabbitMQ did not take (a closed channel: it redelivers).
    pub settle_failures: IntCounterVec,
}

impl SyncMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.event_age.clone()))?;
        registry.register(Box::new(metrics.processing.clone()))?;
        registry.register(Box::new(metrics.cache_lookups.clone()))?;
        registry.register(Box::new(metrics.redis_errors.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.integration_paused.clone()))?;
        registry.register(Box::new(metrics.undecryptable.clone()))?;
        registry.register(Box::new(metrics.coalesced.clone()))?;
        registry.register(Box::new(metrics.duplicates_removed.clone()))?;
        registry.register(Box::new(metrics.settle_failures.clone()))?;
        Ok(metrics)
    }

    pub fn unregistered() -> prometheus::Result<Self> {
        Ok(Self {
            events: IntCounterVec::new(
                Opts::new("thena_vitally_events_total", "Events handled by outcome and reason"),
                &["outcome", "reason"],
            )?,
            event_age: HistogramVec::new(
                HistogramOpts::new(
                    "thena_vitally_event_age_seconds",
                    "Time from the change in Thena to Vitally's 2xx (600 s is the product's promise)",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]),
                &["workspace"],
            )?,
            processing: Histogram::with_opts(
                HistogramOpts::new(
                    "thena_vitally_event_processing_seconds",
                    "Time a consumer spends on one delivery",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            cache_lookups: IntCounterVec::new(
                Opts::new("thena_vitally_cache_lookups_total", "Redis cache lookups by kind and result"),
                &["kind", "result"],
            )?,
            redis_errors: IntCounterVec::new(
                Opts::new("thena_vitally_redis_errors_total", "Redis operations that failed (the consumer degraded)"),
                &["op"],
            )?,
            in_flight: IntGauge::new("thena_vitally_consumer_in_flight", "Deliveries being processed")?,
            integration_paused: IntGaugeVec::new(
                Opts::new(
                    "thena_vitally_integration_paused",
                    "1 while an integration is paused (auth_rejected, object_missing): its events are held",
                ),
                &["workspace", "reason"],
            )?,
            coalesced: IntCounter::new(
                "thena_vitally_events_coalesced_total",
                "Deferred, retried or held messages processed as their request's newer snapshot",
            )?,
            undecryptable: IntGauge::new(
                "thena_vitally_integrations_undecryptable",
                "Integrations whose Vitally header this replica cannot decrypt (INTEGRATIONS_KEYS differs)",
            )?,
            duplicates_removed: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_instance_duplicates_removed_total",
                    "Duplicate instances of one request deleted from Vitally (the oldest is kept)",
                ),
                &["workspace"],
            )?,
            settle_failures: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_settle_failures_total",
                    "Acks and nacks that did not reach RabbitMQ (refused: the delivery's channel had closed or it was settled already; error: the call failed): RabbitMQ redelivers what was not acked",
                ),
                &["op", "result"],
            )?,
        })
    }

    pub fn cache(&self, kind: &str, result: &str) {
        self.cache_lookups.with_label_values(&[kind, result]).inc();
    }

    pub fn redis_error(&self, op: &str) {
        self.redis_errors.with_label_values(&[op]).inc();
    }
}
