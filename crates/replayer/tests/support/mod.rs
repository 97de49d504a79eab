//! The replayer's tests against the real local RabbitMQ and PostgreSQL: a test-unique
//! topology and schema (removed at the end, even when a test panics), a replayer to start
//! and stop, and ways to park messages the way consumers do.

#![allow(dead_code)]

use std::time::Duration;

use chrono::Utc;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use thena_broker::{Broker, Failure, FailureClass, Publisher, Topology, WORKSPACE_HEADER};
use thena_events::RequestChanged;
use thena_replayer::{
    ReplayerConfig, ReplayerDeps, ReplayerMetrics, RetrySchedule,
    dlq::{Dlq, DlqFilter},
    run_replayer_with,
};
use thena_store::{
    Db,
    dead_letters::{DeadLetter, State},
};
use thena_testkit::{TestEnv, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    pub metrics: ReplayerMetrics,
}

pub struct Harness {
    pub env: TestEnv,
    pub broker: Broker,
    pub publisher: Publisher,
    pub db: Db,
    pub dlq: Dlq,
    replayer: Option<Running>,
}

impl Harness {
    pub async fn new(env: TestEnv) -> Harness {
        let broker = Broker::connect(env.amqp_url(), "thena-replayer-tests", env.topology.clone())
            .await
            .expect("local RabbitMQ is reachable");
        let db = env.db().await;
        Harness {
            publisher: broker.publisher().await.expect("publisher"),
            dlq: Dlq::new(db.clone()),
            broker,
            db,
            env,
            replayer: None,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.env.topology
    }

    /// Starts a replayer (100 ms polls) that parks failures older than `max_age`.
    pub async fn start_replayer(&mut self, max_age: Duration) -> ReplayerMetrics {
        self.start_replayer_polling(max_age, Duration::from_millis(100))
            .await
    }

    pub async fn start_replayer_polling(
        &mut self,
        max_age: Duration,
        poll: Duration,
    ) -> ReplayerMetrics {
        let registry = prometheus::Registry::new();
        let metrics = ReplayerMetrics::register(&registry).unwrap();
        let mut config = ReplayerConfig::new(
            RetrySchedule::for_topology(self.broker.topology()).with_max_age(max_age),
        );
        config.depth_poll_interval = poll;
        config.max_reconnect_backoff = Duration::from_millis(200);
        let shutdown = CancellationToken::new();
        let deps = ReplayerDeps::new(self.broker.clone(), self.db.clone());
        let task = tokio::spawn(run_replayer_with(
            deps,
            config,
            metrics.clone(),
            shutdown.clone(),
        ));
        self.replayer = Some(Running {
            shutdown,
            task,
            metrics: metrics.clone(),
        });
        metrics
    }

    /// The running replayer's metrics.
    pub fn metrics(&self) -> ReplayerMetrics {
        self.replayer
            .as_ref()
            .expect("a running replayer")
            .metrics
            .clone()
    }

    /// Stops the replayer gracefully; it must stop promptly.
    pub async fn stop_replayer(&mut self) {
        if let Some(running) = self.replayer.take() {
            running.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), running.task)
                .await
                .expect("the replayer stops promptly")
                .expect("replayer task")
                .expect("replayer run");
        }
    }

    /// Parks `event` the way a consumer does (permanent failure `reason`).
    pub async fn park(&self, event: &RequestChanged, reason: &str) {
        let failure = Failure::new(
            FailureClass::Permanent,
            reason,
            format!("{reason} happened"),
            self.topology().exchange(),
            Topology::routing_key(&event.workspace_id),
            Utc::now(),
        );
        self.publisher
            .park(&serde_json::to_vec(event).unwrap(), &props(event), &failure)
            .await
            .unwrap();
    }

    /// Waits until exactly `n` dead letters are parked in PostgreSQL; returns them.
    pub async fn wait_parked(&self, n: usize) -> Vec<DeadLetter> {
        wait_until(&format!("{n} parked dead letters"), WAIT, || async {
            let page = self
                .dlq
                .list(&DlqFilter::default(), None, 1000)
                .await
                .ok()?;
            (page.dead_letters.len() == n).then_some(page.dead_letters)
        })
        .await
    }

    /// Every dead letter in `state`.
    pub async fn in_state(&self, state: State) -> Vec<DeadLetter> {
        let filter = DlqFilter {
            state,
            ..DlqFilter::default()
        };
        self.dlq
            .list(&filter, None, 1000)
            .await
            .unwrap()
            .dead_letters
    }

    pub async fn depth(&self, queue: &str) -> u32 {
        self.env.queue_depth(queue).await.expect("queue depth")
    }

    pub async fn finish(mut self) {
        self.stop_replayer().await;
        self.publisher.close().await;
        self.broker.close().await;
        self.env.cleanup().await;
    }
}

/// The properties the producer gives an event.
pub fn props(event: &RequestChanged) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        WORKSPACE_HEADER.into(),
        AMQPValue::LongString(event.workspace_id.as_str().into()),
    );
    BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}
