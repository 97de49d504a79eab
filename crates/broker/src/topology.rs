//! Names and declares every exchange and queue. All roles call [`Topology::declare`] at
//! start; it is idempotent as long as the settings (delivery limit, tiers) are unchanged.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// Default backoff tiers: every one under five minutes, so that once a fault ends every
/// event it hit is retried within one tier (≤ 4 min).
pub const DEFAULT_DELAY_TIERS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(240),
];

/// When a message sent to a delay queue should come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Not before this long (the smallest tier that waits long enough): a retry's
    /// backoff, a pause to wait out.
    NotBefore(Duration),
    /// As close to this long as the tiers allow, never much later: the largest tier that
    /// does not overshoot, so a long wait comes back early and is deferred again for the
    /// rest (a place in the budget queue that must not be missed by a whole tier).
    OnTime(Duration),
}

/// Used only when someone configures an empty tier list.
const FALLBACK_TIER: Duration = Duration::from_secs(1);

/// The fleet's RabbitMQ layout, derived from one name prefix (`thena` in production, a
/// unique prefix per test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    /// Deliveries of one message to the sync queue before RabbitMQ dead-letters it as poison.
    pub delivery_limit: u32,
    /// Delay queue TTLs, ascending.
    pub delay_tiers: Vec<Duration>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
            delivery_limit: 5,
            delay_tiers: DEFAULT_DELAY_TIERS.to_vec(),
        }
    }

    /// The fleet's topology as configured: every role declares the same one.
    pub fn from_config(config: &thena_runtime::Config) -> Self {
        Topology::new(config.name_prefix.clone())
            .with_delivery_limit(config.retry.delivery_limit)
            .with_delay_tiers(config.retry.tiers.clone())
    }

    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }

    pub fn with_delay_tiers(mut self, tiers: Vec<Duration>) -> Self {
        self.delay_tiers = tiers;
        self
    }

    /// Topic exchange the producer publishes to.
    pub fn exchange(&self) -> String {
        format!("{}.requests", self.prefix)
    }

    /// The work queue consumers read.
    pub fn sync_queue(&self) -> String {
        format!("{}.requests.sync", self.prefix)
    }

    /// The backfill lane: historical snapshots an operator imported, consumed beside the
    /// sync queue on a few slots of their own and a share of the budget.
    pub fn backfill_queue(&self) -> String {
        format!("{}.requests.backfill", self.prefix)
    }

    /// Fanout exchange for failed messages (explicit dead letters and delivery-limit poison).
    pub fn dlx(&self) -> String {
        format!("{}.requests.dlx", self.prefix)
    }

    /// Queue behind [`Self::dlx`], consumed by the replayer.
    pub fn dead_queue(&self) -> String {
        format!("{}.requests.dead", self.prefix)
    }

    /// Messages that will not be retried automatically, on their way to the parked set
    /// (PostgreSQL), where humans see them (`dlq`, the admin API, the console).
    pub fn parked_queue(&self) -> String {
        format!("{}.requests.parked", self.prefix)
    }

    /// Name of a delay tier's queue and of the fanout exchange in front of it.
    pub fn delay_queue(&self, tier: usize) -> String {
        format!(
            "{}.requests.delay.{}ms",
            self.prefix,
            self.tier_delay(tier).as_millis()
        )
    }

    /// All delay queue names, shortest tier first.
    pub fn delay_queues(&self) -> Vec<String> {
        (0..self.delay_tiers.len().max(1))
            .map(|tier| self.delay_queue(tier))
            .collect()
    }

    /// The TTL of a tier (an index past the end means the largest tier).
    pub fn tier_delay(&self, tier: usize) -> Duration {
        match self.delay_tiers.len() {
            0 => FALLBACK_TIER,
            len => self.delay_tiers[tier.min(len - 1)],
        }
    }

    pub fn routing_key(workspace_id: &str) -> String {
        format!("request.{workspace_id}")
    }

    /// The routing key of a backfilled snapshot: it stays on the backfill lane through
    /// every delay queue and replay, since they all keep the original routing key.
    pub fn backfill_routing_key(workspace_id: &str) -> String {
        format!("backfill.{workspace_id}")
    }

    /// The delay tier that wakes a message as `wake` asks.
    pub fn tier_to_wake(&self, wake: Wake) -> usize {
        match wake {
            Wake::NotBefore(wait) => self.tier_for(wait),
            Wake::OnTime(wait) => self
                .delay_tiers
                .iter()
                .rposition(|tier| *tier <= wait)
                .unwrap_or(0),
        }
    }

    /// The smallest tier that waits at least `wait`, else the largest tier (the message
    /// comes back early and is deferred again).
    pub fn tier_for(&self, wait: Duration) -> usize {
        self.delay_tiers
            .iter()
            .position(|tier| *tier >= wait)
            .unwrap_or(self.delay_tiers.len().saturating_sub(1))
    }

    /// Declares every exchange, queue and binding. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dlx().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;

        // The two work queues: the live lane and the backfill lane.
        for (queue, pattern) in [
            (self.sync_queue(), "request.#"),
            (self.backfill_queue(), "backfill.#"),
        ] {
            declare_queue(channel, &queue, self.work_queue_args()).await?;
            bind(channel, &queue, &self.exchange(), pattern).await?;
        }

        // Every queue's limit and dead-letter target is explicit: RabbitMQ 4.x gives a
        // quorum queue without one a delivery limit of 20 and then drops the message.
        // A dead letter that keeps crashing the replayer is parked by RabbitMQ itself.
        let mut dead_args = quorum_args();
        dead_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        dead_args.insert("x-dead-letter-exchange".into(), long_string(""));
        dead_args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.parked_queue()),
        );
        dead_args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        dead_args.insert("x-overflow".into(), long_string("reject-publish"));
        declare_queue(channel, &self.dead_queue(), dead_args).await?;
        bind(channel, &self.dead_queue(), &self.dlx(), "").await?;

        // The parked queue is a hand-off: the replayer drains it into PostgreSQL (the
        // parked set people page and replay) and nothing browses it, so it is a quorum
        // queue like the others (replicated on a cluster). Its delivery limit only counts
        // drains that crashed before their ack; past it RabbitMQ hands the message to the
        // dead queue, whose replayer parks it again as it was — never dropped.
        let mut parked_args = quorum_args();
        parked_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        parked_args.insert("x-dead-letter-exchange".into(), long_string(&self.dlx()));
        parked_args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        parked_args.insert("x-overflow".into(), long_string("reject-publish"));
        declare_queue(channel, &self.parked_queue(), parked_args).await?;

        for tier in 0..self.delay_tiers.len().max(1) {
            let name = self.delay_queue(tier);
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await?;
            // Quorum (replicated: a node loss does not lose what waits here), with
            // at-least-once dead-lettering so an expiring message is only removed once
            // the sync queue confirmed it; RabbitMQ (≥ 3.10, per-queue TTL on quorum
            // queues since 3.10) requires reject-publish overflow for that strategy.
            let mut args = quorum_args();
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(
                    i64::try_from(self.tier_delay(tier).as_millis()).unwrap_or(i64::MAX),
                ),
            );
            // No x-dead-letter-routing-key: an expired message keeps its original
            // routing key and lands back on the sync queue of its workspace.
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&self.exchange()),
            );
            declare_queue(channel, &name, args).await?;
            bind(channel, &name, &name, "").await?;
        }
        Ok(())
    }

    /// A work queue's arguments: quorum, with the delivery limit after which RabbitMQ
    /// dead-letters a message that keeps crashing consumers.
    fn work_queue_args(&self) -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(&self.dlx()));
        // At-least-once dead-lettering: a poison message is not dropped if the DLX target
        // is briefly unavailable. RabbitMQ requires reject-publish overflow for it.
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Every queue [`Self::declare`] creates.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.sync_queue(),
            self.backfill_queue(),
            self.dead_queue(),
            self.parked_queue(),
        ];
        queues.extend(self.delay_queues());
        queues
    }

    /// Every exchange [`Self::declare`] creates (each delay tier has one named like its
    /// queue).
    pub fn exchanges(&self) -> Vec<String> {
        let mut exchanges = vec![self.exchange(), self.dlx()];
        exchanges.extend(self.delay_queues());
        exchanges
    }

    /// Deletes everything [`Self::declare`] created (tests clean up with it).
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for queue in &self.queues() {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in &self.exchanges() {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let t = Topology::new("thena");
        assert_eq!(t.exchange(), "thena.requests");
        assert_eq!(t.sync_queue(), "thena.requests.sync");
        assert_eq!(t.dlx(), "thena.requests.dlx");
        assert_eq!(t.dead_queue(), "thena.requests.dead");
        assert_eq!(t.parked_queue(), "thena.requests.parked");
        assert_eq!(t.delay_queue(0), "thena.requests.delay.1000ms");
        assert_eq!(t.delay_queue(4), "thena.requests.delay.240000ms");
        assert_eq!(Topology::routing_key("T1"), "request.T1");
        assert_eq!(t.delivery_limit, 5);
    }

    #[test]
    fn tier_for_picks_the_smallest_tier_that_waits_long_enough() {
        let t = Topology::new("x");
        assert_eq!(t.tier_for(Duration::ZERO), 0);
        assert_eq!(t.tier_for(Duration::from_secs(1)), 0);
        assert_eq!(t.tier_for(Duration::from_millis(1001)), 1);
        assert_eq!(t.tier_for(Duration::from_secs(30)), 2);
        assert_eq!(t.tier_for(Duration::from_secs(31)), 3);
        assert_eq!(t.tier_for(Duration::from_secs(240)), 4);
        assert_eq!(t.tier_for(Duration::from_secs(3600)), 4);
    }

    #[test]
    fn the_configured_default_tiers_are_the_topology_defaults() {
        let config = thena_runtime::Config::defaults_with(&[]).unwrap();
        assert_eq!(
            Topology::from_config(&config).delay_tiers,
            DEFAULT_DELAY_TIERS.to_vec()
        );
    }

    #[test]
    fn on_time_picks_the_largest_tier_that_does_not_overshoot() {
        let t = Topology::new("x");
        let on_time = |ms| t.tier_to_wake(Wake::OnTime(Duration::from_millis(ms)));
        assert_eq!(on_time(0), 0, "below the smallest tier: the smallest");
        assert_eq!(on_time(999), 0);
        assert_eq!(on_time(1_000), 0);
        assert_eq!(on_time(4_999), 0);
        assert_eq!(on_time(5_000), 1);
        assert_eq!(on_time(29_000), 1);
        assert_eq!(on_time(600_000), 4);
        let not_before = |ms| t.tier_to_wake(Wake::NotBefore(Duration::from_millis(ms)));
        assert_eq!(not_before(1_001), 1);
        assert_eq!(not_before(29_000), 2);
    }

    #[test]
    fn an_empty_tier_list_still_names_one_delay_queue() {
        let t = Topology::new("x").with_delay_tiers(vec![]);
        assert_eq!(t.tier_for(Duration::from_secs(9)), 0);
        assert_eq!(
            t.delay_queues(),
            vec!["x.requests.delay.1000ms".to_string()]
        );
    }
}
