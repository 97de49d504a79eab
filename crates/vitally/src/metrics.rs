//! Prometheus metrics for everything that talks to Vitally, registered into the registry
//! the role passes in (never the global default).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Handles are cheap clones of shared collectors; pass one `VitallyMetrics` around.
#[derive(Clone)]
pub struct VitallyMetrics {
    /// `thena_vitally_vitally_requests_total{endpoint,status}`; status is the HTTP code or
    /// `timeout` / `connect` / `transport` / `decode` / `invalid_request`.
    pub requests: IntCounterVec,
    /// `thena_vitally_vitally_request_duration_seconds{endpoint}`.
    pub request_duration: HistogramVec,
    /// `thena_vitally_vitally_ratelimit_remaining{workspace}`: the last `RateLimit-Remaining`.
    pub ratelimit_remaining: IntGaugeVec,
    /// `thena_vitally_limiter_waits_total{workspace}`: a call had to wait for budget.
    pub limiter_waits: IntCounterVec,
    /// `thena_vitally_limiter_paused_total{workspace}`: an integration was paused after a 429.
    pub limiter_paused: IntCounterVec,
    /// `thena_vitally_mapping_dropped_categories_total{workspace}`: a custom category had
    /// no matching trait and was left out.
    pub mapping_dropped_categories: IntCounterVec,
}

impl VitallyMetrics {
    /// Builds the collectors and registers them into `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Self::build()?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.request_duration.clone()))?;
        registry.register(Box::new(metrics.ratelimit_remaining.clone()))?;
        registry.register(Box::new(metrics.limiter_waits.clone()))?;
        registry.register(Box::new(metrics.limiter_paused.clone()))?;
        registry.register(Box::new(metrics.mapping_dropped_categories.clone()))?;
        Ok(metrics)
    }

    /// Collectors that are counted but exported nowhere, for CLI tools and tests.
    pub fn unregistered() -> Self {
        // The definitions are constants; building them only fails if they are malformed,
        // which the unit test below rules out.
        Self::build().expect("static Vitally metric definitions are valid")
    }

    fn build() -> prometheus::Result<Self> {
        Ok(Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_vitally_requests_total",
                    "Calls to the Vitally REST API by endpoint and outcome status.",
                ),
                &["endpoint", "status"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "thena_vitally_vitally_request_duration_seconds",
                    "Latency of calls to the Vitally REST API.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["endpoint"],
            )?,
            ratelimit_remaining: IntGaugeVec::new(
                Opts::new(
                    "thena_vitally_vitally_ratelimit_remaining",
                    "RateLimit-Remaining from the latest Vitally response, per workspace.",
                ),
                &["workspace"],
            )?,
            limiter_waits: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_limiter_waits_total",
                    "Vitally calls that had to wait for the integration's rate budget.",
                ),
                &["workspace"],
            )?,
            limiter_paused: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_limiter_paused_total",
                    "Times an integration was paused fleet-wide after a Vitally 429.",
                ),
                &["workspace"],
            )?,
            mapping_dropped_categories: IntCounterVec::new(
                Opts::new(
                    "thena_vitally_mapping_dropped_categories_total",
                    "Custom categories left out because the object has no trait for them.",
                ),
                &["workspace"],
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_collectors_register_under_the_project_prefix() {
        let registry = Registry::new();
        let metrics = VitallyMetrics::new(&registry).expect("register");
        metrics
            .requests
            .with_label_values(&["users.search", "200"])
            .inc();
        metrics
            .request_duration
            .with_label_values(&["users.search"])
            .observe(0.01);
        metrics
            .ratelimit_remaining
            .with_label_values(&["T1"])
            .set(999);
        metrics.limiter_waits.with_label_values(&["T1"]).inc();
        metrics.limiter_paused.with_label_values(&["T1"]).inc();
        metrics
            .mapping_dropped_categories
            .with_label_values(&["T1"])
            .inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("thena_vitally_")));
        // A second registry gets its own collectors: no global state.
        assert!(VitallyMetrics::new(&Registry::new()).is_ok());
        let _ = VitallyMetrics::unregistered();
    }
}
