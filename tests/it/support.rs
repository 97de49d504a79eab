//! The fleet under test: a fake Vitally seeded with the demo's customer base, this test's
//! own RabbitMQ topology and Redis prefix, real consumers built exactly as the binary
//! builds them, and helpers to publish events and read what happened.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};

use fake_vitally::{FakeConfig, FakeVitally, RunningFake};
use prometheus::Registry;
use secrecy::SecretString;
use thena_broker::{Broker, Publisher};
use thena_events::RequestChanged;
use thena_runtime::{Config, ops::Readiness};
use thena_sync::{fault::FaultHook, worker::Worker};
use thena_testkit::{TestEnv, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vitally_client::{
    client::VitallyHttp,
    integrations::{Integration, IntegrationStore},
    metrics::VitallyMetrics,
    provision::{self, ConnectRequest},
};

pub const WS: &str = "T-ACME";

pub struct Consumer {
    pub registry: Registry,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Consumer {
    /// Graceful stop (as on SIGTERM).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("consumer task")
            .expect("consumer run");
    }

    /// An abrupt stop of the consume loop, without the graceful drain: prefetched but
    /// unstarted deliveries go back to the queue. Deliveries already being processed
    /// still finish; a real crash (SIGKILL of a consumer process) is in `chaos.rs`.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The producer role (ingest API) of a fleet.
pub struct Producer {
    /// `http://127.0.0.1:port`.
    pub base_url: String,
    pub token: String,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Producer {
    /// `POST /v1/events` with `body`; the status and the JSON answer.
    pub async fn post_events(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let response = reqwest::Client::new()
            .post(format!("{}/v1/events", self.base_url))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("the producer answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }
}

pub struct Fleet {
    pub env: TestEnv,
    pub fake: RunningFake,
    pub config: Config,
    pub store: IntegrationStore,
    pub publisher: Publisher,
    pub broker: Broker,
    consumers: Vec<Consumer>,
    /// Replayers live apart from consumers, so `take_consumer` never stops one.
    replayers: Vec<Consumer>,
    /// Registries of consumers that were stopped or killed, so their counts still add up.
    retired: Vec<Registry>,
    producers: Vec<Producer>,
    /// When each (workspace, request) was first published: its `occurred_at`.
    published: Mutex<HashMap<(String, u64), DateTime<Utc>>>,
}

impl Fleet {
    pub async fn start() -> Fleet {
        Self::start_with(FakeConfig::default(), &[]).await
    }

    pub async fn start_with(fake_config: FakeConfig, overrides: &[(&'static str, &str)]) -> Fleet {
        Self::start_in(TestEnv::new(), fake_config, overrides).await
    }

    /// A fleet in `env` (e.g. with production-like delay tiers).
    pub async fn start_in(
        env: TestEnv,
        fake_config: FakeConfig,
        overrides: &[(&'static str, &str)],
    ) -> Fleet {
        let fake = FakeVitally::spawn(fake_config).await.expect("fake vitally");
        fake.seed(serde_json::from_value(thena_demo::customers::fixture()).unwrap())
            .expect("seed");
        let mut pairs = fleet_variables(&env, &fake);
        pairs.extend(overrides.iter().map(|(k, v)| (*k, v.to_string())));
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = Config::defaults_with(&borrowed).expect("config");
        let store = vitally_client::integrations::IntegrationStore::from_config(&config)
            .await
            .expect("store");
        let broker = Broker::connect(
            config.amqp_url.clone(),
            "test",
            thena_broker::Topology::from_config(&config),
        )
        .await
        .expect("broker");
        let publisher = broker.publisher().await.expect("publisher");
        Fleet {
            env,
            fake,
            config,
            store,
            publisher,
            broker,
            consumers: Vec::new(),
            replayers: Vec::new(),
            retired: Vec::new(),
            producers: Vec::new(),
            published: Mutex::default(),
        }
    }

    /// The environment a role of this fleet runs with as a separate process.
    pub fn variables(&self) -> Vec<(&'static str, String)> {
        fleet_variables(&self.env, &self.fake)
    }

    /// Connects workspace `ws` to the fake (provisioning the object), like an admin would.
    pub async fn connect(&self, ws: &str, tweak: impl FnOnce(&mut ConnectRequest)) -> Integration {
        // One Vitally per workspace: any workspace but the main one gets a key of its own.
        let auth_header = if ws == WS {
            self.fake.auth_header()
        } else {
            let header = format!("Basic key-of-{ws}");
            self.fake.add_auth_header(header.clone());
            header
        };
        let mut request = ConnectRequest {
            workspace_id: ws.to_string(),
            api_url: self.fake.base_url(),
            auth_header: SecretString::from(auth_header),
            categories: vec!["Product".into()],
            push_requests: true,
            update_requests: true,
            sync_threads: false,
            auto_create_fields: false,
            rate_budget_per_min: 1_000,
            established_at: None,
        };
        tweak(&mut request);
        let http = VitallyHttp::from_settings(&self.config.vitally, VitallyMetrics::unregistered())
            .unwrap();
        provision::connect(&http, &self.store, request, "test")
            .await
            .expect("connect")
            .integration
    }

    pub async fn spawn_consumer(&mut self) {
        let config = self.config.clone();
        self.spawn_consumer_with(&config, Readiness::new()).await;
    }

    /// A consumer built from another configuration (e.g. another key), reporting its
    /// readiness to `readiness`.
    pub async fn spawn_consumer_with(&mut self, config: &Config, readiness: Readiness) {
        self.spawn_consumer_as(config, readiness, |worker| worker)
            .await;
    }

    /// A consumer that writes no request ledger (the benchmark's baseline for its cost).
    #[allow(dead_code)] // used by the benchmark only
    pub async fn spawn_consumer_without_ledger(&mut self) {
        let config = self.config.clone();
        self.spawn_consumer_as(&config, Readiness::new(), |mut worker| {
            std::sync::Arc::get_mut(&mut worker.pipeline)
                .expect("a fresh pipeline")
                .ledger = None;
            worker
        })
        .await;
    }

    /// A consumer (built from `config`) whose every event calls `hook` at each fault
    /// point: a test's way to panic inside real work.
    pub async fn spawn_consumer_with_fault(&mut self, config: &Config, hook: FaultHook) {
        self.spawn_consumer_as(config, Readiness::new(), |worker| {
            worker.with_fault_hook(hook)
        })
        .await;
    }

    async fn spawn_consumer_as(
        &mut self,
        config: &Config,
        readiness: Readiness,
        tweak: impl FnOnce(Worker) -> Worker,
    ) {
        let registry = Registry::new();
        let worker = thena_sync::app::build_worker(config, &registry, readiness)
            .await
            .expect("consumer");
        let worker = tweak(worker);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        self.consumers.push(Consumer {
            registry,
            shutdown,
            task,
        });
    }

    /// Starts the producer role (needs `PRODUCER_TOKEN` among the overrides) and returns
    /// it; it stops with the fleet.
    pub async fn spawn_producer(&mut self) -> &Producer {
        let token = self
            .config
            .require_producer_token()
            .expect("PRODUCER_TOKEN in the fleet's overrides");
        let state = thena_producer::from_config(&self.config, &Registry::new(), Readiness::new())
            .await
            .expect("producer");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let base_url = format!("http://{}", listener.local_addr().expect("bound"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(thena_producer::run(listener, state, shutdown.clone()));
        self.producers.push(Producer {
            base_url,
            token: secrecy::ExposeSecret::expose_secret(&token).to_owned(),
            shutdown,
            task,
        });
        self.producers.last().expect("just pushed")
    }

    /// Takes the most recently started consumer out of the fleet (to stop or kill it).
    pub fn take_consumer(&mut self) -> Consumer {
        let consumer = self.consumers.pop().expect("a running consumer");
        self.retired.push(consumer.registry.clone());
        consumer
    }

    /// Starts the replayer role (dead letters → delay tiers or parked; the parked queue
    /// drained into PostgreSQL).
    pub async fn spawn_replayer(&mut self) {
        let registry = Registry::new();
        let metrics = thena_replayer::ReplayerMetrics::register(&registry).expect("metrics");
        let schedule = thena_replayer::RetrySchedule::for_topology(self.broker.topology());
        let deps = thena_replayer::ReplayerDeps::new(self.broker.clone(), self.store.db().clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(thena_replayer::run_replayer(
            deps,
            schedule,
            metrics,
            shutdown.clone(),
        ));
        self.replayers.push(Consumer {
            registry,
            shutdown,
            task,
        });
    }

    /// The parked set's operations, as `dlq`, the admin API and the console use them.
    pub fn dlq(&self) -> thena_replayer::dlq::Dlq {
        thena_replayer::dlq::Dlq::new(self.store.db().clone())
    }

    /// Messages parked in PostgreSQL (waiting for a human) right now.
    pub async fn parked(&self) -> u64 {
        thena_store::dead_letters::DeadLetters::new(self.store.db().clone())
            .stats()
            .await
            .expect("parked set")
            .parked
    }

    pub async fn publish(&self, event: &RequestChanged) {
        self.publisher.publish_event(event).await.expect("publish");
        self.published
            .lock()
            .unwrap()
            .entry((event.workspace_id.clone(), event.request.id))
            .or_insert(event.occurred_at);
    }

    /// The `occurred_at` of the first event published for a request.
    pub fn published_at(&self, ws: &str, request_id: u64) -> DateTime<Utc> {
        self.published.lock().unwrap()[&(ws.to_string(), request_id)]
    }

    pub async fn publish_raw(&self, body: &[u8]) {
        let topology = self.broker.topology();
        self.publisher
            .publish_raw(
                &topology.exchange(),
                &thena_broker::Topology::routing_key(WS),
                body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish raw");
    }

    fn registries(&self) -> impl Iterator<Item = &Registry> {
        self.consumers
            .iter()
            .map(|c| &c.registry)
            .chain(self.retired.iter())
    }

    /// Events counted by outcome (and reason, if given) across every consumer so far.
    pub fn count(&self, outcome: &str, reason: Option<&str>) -> u64 {
        self.registries()
            .flat_map(|r| r.gather())
            .filter(|family| family.name() == "thena_vitally_events_total")
            .flat_map(|family| family.get_metric().to_vec())
            .filter(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                label("outcome").as_deref() == Some(outcome)
                    && reason.is_none_or(|r| label("reason").as_deref() == Some(r))
            })
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }

    /// The sum of every sample of the counter `name` across every consumer so far.
    pub fn counter(&self, name: &str) -> u64 {
        self.registries()
            .flat_map(|r| r.gather())
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().to_vec())
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }

    /// The gauge `name` summed over the running consumers.
    pub fn gauge(&self, name: &str) -> i64 {
        self.consumers
            .iter()
            .flat_map(|c| c.registry.gather())
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().to_vec())
            .map(|metric| metric.get_gauge().get_value() as i64)
            .sum()
    }

    /// Events settled for good (synced or skipped) across every consumer.
    pub fn settled(&self) -> u64 {
        self.count("synced", None) + self.count("skipped", None) + self.count("parked", None)
    }

    pub async fn wait_settled(&self, n: u64) {
        self.wait_settled_within(n, Duration::from_secs(20)).await;
    }

    pub async fn wait_settled_within(&self, n: u64, deadline: Duration) {
        wait_until(&format!("{n} settled events"), deadline, || async {
            (self.settled() >= n).then_some(())
        })
        .await;
    }

    pub fn instances_for(&self, ws: &str, request_id: u64) -> Vec<fake_vitally::Instance> {
        let external_id = format!("thena:{ws}:{request_id}");
        self.fake
            .instances()
            .into_iter()
            .filter(|i| i.external_id == external_id)
            .collect()
    }

    pub async fn stop(mut self) {
        for producer in self.producers.drain(..) {
            producer.shutdown.cancel();
            producer
                .task
                .await
                .expect("producer task")
                .expect("producer run");
        }
        for consumer in self.consumers.drain(..).chain(self.replayers.drain(..)) {
            consumer.stop().await;
        }
        self.broker.close().await;
        self.env.cleanup().await;
    }
}

/// An event whose Status trait carries its version (`v3`), so the final state shows
/// which version won.
/// The test env's variables, with the fake's origin allowed (plain http on loopback is
/// refused unless listed exactly).
fn fleet_variables(env: &TestEnv, fake: &RunningFake) -> Vec<(&'static str, String)> {
    let mut pairs = env.config_overrides();
    pairs.push(("VITALLY_ALLOWED_HOSTS", fake.base_url()));
    pairs
}

pub fn versioned(ws: &str, request_id: u64, version: u64) -> RequestChanged {
    let mut event = thena_events::sample::event(ws, request_id, version, Some("alice@acme.com"));
    event.request.status = Some(format!("v{version}"));
    event
}

/// Waits until every request has exactly one instance, at `v{version}`.
pub async fn wait_all_at(fleet: &Fleet, ids: &[u64], version: u64, deadline: Duration) {
    let want = format!("v{version}");
    wait_until(
        &format!("every request at exactly one instance at v{version}"),
        deadline,
        || async {
            ids.iter()
                .all(|id| {
                    let instances = fleet.instances_for(WS, *id);
                    instances.len() == 1 && status_of(&instances[0]) == want
                })
                .then_some(())
        },
    )
    .await;
    for id in ids {
        assert_eq!(
            fleet.instances_for(WS, *id).len(),
            1,
            "request {id}: one instance"
        );
    }
}

/// The instance's Status trait (the tests write the version into it), or "" without one.
pub fn status_of(instance: &fake_vitally::Instance) -> String {
    trait_of(instance, "status")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The trait of `instance` whose path ends with `.{key}` (the fake's path for a label,
/// e.g. `customerThread`).
pub fn trait_of(instance: &fake_vitally::Instance, key: &str) -> Option<serde_json::Value> {
    let suffix = format!(".{key}");
    instance
        .traits
        .iter()
        .find(|(k, _)| k.ends_with(&suffix))
        .map(|(_, v)| v.clone())
}

/// `host:port` of a service URL.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_string()
}

/// A child process that does not outlive a failing test.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
