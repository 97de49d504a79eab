//! Queue depth gauges, filled by whoever polls the broker (the replayer).

use prometheus::{IntCounter, IntGaugeVec, Opts, Registry};

/// `queue` label values of [`BrokerMetrics::queue_messages`].
pub const QUEUE_LABELS: [&str; 5] = ["sync", "backfill", "dead", "parked", "delay"];

#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// `thena_vitally_queue_messages{queue="sync|backfill|dead|parked|delay"}` (delay: all tiers).
    pub queue_messages: IntGaugeVec,
    /// `thena_vitally_queue_depth_polls_total`: completed polls of the depths (and, by the
    /// replayer, of the parked set).
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
        let depth_polls = IntCounter::new(
            "thena_vitally_queue_depth_polls_total",
            "Completed polls of the queue depths and of the parked set.",
        )?;
        registry.register(Box::new(depth_polls.clone()))?;
        registry.register(Box::new(queue_messages.clone()))?;
        for queue in QUEUE_LABELS {
            queue_messages.with_label_values(&[queue]).set(0);
        }
        Ok(BrokerMetrics {
            queue_messages,
            depth_polls,
        })
    }
}
