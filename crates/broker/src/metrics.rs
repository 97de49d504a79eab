//! Queue depth gauges, filled by whoever polls the broker (the replayer).

use prometheus::{Gauge, IntCounter, IntGaugeVec, Opts, Registry};

/// `queue` label values of [`BrokerMetrics::queue_messages`].
pub const QUEUE_LABELS: [&str; 4] = ["sync", "dead", "parked", "delay"];

#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// `thena_vitally_queue_messages{queue="sync|dead|parked|delay"}` (delay: all tiers).
    pub queue_messages: IntGaugeVec,
    /// `thena_vitally_parked_oldest_age_seconds`: 0 when nothing is parked.
    pub parked_oldest_age_seconds: Gauge,
    /// `thena_vitally_queue_depth_polls_total`: completed polls of the depths and the
    /// oldest parked message.
    pub depth_polls: IntCounter,
}

impl BrokerMetrics {
    pub fn register(registry: &Registry) -> Result<BrokerMetrics, prometheus::Error> {
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "thena_vitally_queue_messages",
                "Messages ready in each queue (delay: all tiers together).",
            ),
            &["queue"],
        )?;
        let parked_oldest_age_seconds = Gauge::with_opts(Opts::new(
            "thena_vitally_parked_oldest_age_seconds",
            "Age of the oldest parked message (since it was parked), 0 when none.",
        ))?;
        let depth_polls = IntCounter::new(
            "thena_vitally_queue_depth_polls_total",
            "Completed polls of the queue depths and of the oldest parked message.",
        )?;
        registry.register(Box::new(depth_polls.clone()))?;
        registry.register(Box::new(queue_messages.clone()))?;
        registry.register(Box::new(parked_oldest_age_seconds.clone()))?;
        for queue in QUEUE_LABELS {
            queue_messages.with_label_values(&[queue]).set(0);
        }
        Ok(BrokerMetrics {
            queue_messages,
            parked_oldest_age_seconds,
            depth_polls,
        })
    }
}
