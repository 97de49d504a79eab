use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Ingest counters: events by outcome, request latency by answer status.
#[derive(Clone)]
pub struct IngestMetrics {
    events: IntCounterVec,
    duration: HistogramVec,
}

/// What happened to an ingested event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventOutcome {
    /// Confirmed by the broker.
    Accepted,
    /// Refused by validation (or in a refused body): never published.
    Rejected,
    /// Valid but not confirmed: the broker was down, nacked or timed out.
    Unavailable,
}

impl EventOutcome {
    fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Accepted => "accepted",
            EventOutcome::Rejected => "rejected",
            EventOutcome::Unavailable => "unavailable",
        }
    }
}

impl IngestMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered();
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        Ok(metrics)
    }

    /// Metrics that are counted but exported nowhere (tests, benchmarks).
    pub fn unregistered() -> Self {
        let events = IntCounterVec::new(
            Opts::new(
                "thena_vitally_ingest_events_total",
                "Events posted to the ingest API, by outcome.",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "thena_vitally_ingest_request_duration_seconds",
                "Time to answer POST /v1/events (validation and broker confirms), by status.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["status"],
        )
        .expect("static metric definition is valid");
        for outcome in [
            EventOutcome::Accepted,
            EventOutcome::Rejected,
            EventOutcome::Unavailable,
        ] {
            // Export zeroes too, so a rate() over a fresh replica is defined.
            events.with_label_values(&[outcome.as_str()]);
        }
        Self { events, duration }
    }

    pub(crate) fn count(&self, outcome: EventOutcome, events: usize) {
        self.events
            .with_label_values(&[outcome.as_str()])
            .inc_by(events as u64);
    }

    pub(crate) fn observe(&self, status: u16, seconds: f64) {
        self.duration
            .with_label_values(&[status.to_string().as_str()])
            .observe(seconds);
    }

    /// Events counted with `outcome` so far.
    pub fn events(&self, outcome: &str) -> u64 {
        self.events.with_label_values(&[outcome]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_once_with_the_fleet_prefix() {
        let registry = Registry::new();
        let metrics = IngestMetrics::new(&registry).unwrap();
        metrics.count(EventOutcome::Accepted, 3);
        metrics.observe(202, 0.01);
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "thena_vitally_ingest_events_total",
                "thena_vitally_ingest_request_duration_seconds"
            ]
        );
        assert_eq!(metrics.events("accepted"), 3);
        assert!(
            IngestMetrics::new(&registry).is_err(),
            "a second registration is refused"
        );
    }
}
