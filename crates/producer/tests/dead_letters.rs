//! The dead-letter admin API over the wire: the real router on 127.0.0.1:0, the real
//! RabbitMQ and PostgreSQL (this test's own topology and schema), and a replayer that
//! drains parked messages into the parked set.

use std::time::Duration;

use chrono::Utc;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use secrecy::SecretString;
use serde_json::{Value, json};
use thena_broker::{Broker, Failure, FailureClass, Topology, WORKSPACE_HEADER};
use thena_events::{RequestChanged, sample};
use thena_producer::{AppDeps, AppState, IngestMetrics, ProducerConfig};
use thena_runtime::{egress::AllowList, ops::Readiness};
use thena_testkit::{TestEnv, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vitally_client::{
    client::VitallyHttp, crypto::KeyRing, integrations::IntegrationStore, metrics::VitallyMetrics,
};

const TOKEN: &str = "test-token-dead-letters";
const WAIT: Duration = Duration::from_secs(10);

struct Api {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    broker: Broker,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Api {
    /// The producer and a replayer on this test's topology and schema.
    async fn start() -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let env = TestEnv::new();
        let broker = Broker::connect(
            env.amqp_url(),
            "dead-letters-api-test",
            env.topology.clone(),
        )
        .await
        .expect("RabbitMQ reachable");
        let db = env.db().await;
        let key: String = (0..32).map(|i| format!("{:02x}", i * 3 + 2)).collect();
        let keys = KeyRing::single(&SecretString::from(key)).unwrap();
        let state = AppState::new(
            ProducerConfig::new(SecretString::from(TOKEN)),
            AppDeps {
                publisher: broker.publisher().await.unwrap(),
                broker: broker.clone(),
                integrations: IntegrationStore::new(db.clone(), keys),
                vitally: VitallyHttp::new(
                    Duration::from_secs(5),
                    AllowList::vitally(),
                    VitallyMetrics::unregistered(),
                )
                .unwrap(),
                readiness: Readiness::new(),
            },
            IngestMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                thena_producer::run(listener, state, shutdown)
                    .await
                    .unwrap()
            }
        });
        let replayer = tokio::spawn({
            let deps = thena_replayer::ReplayerDeps::new(broker.clone(), db);
            let schedule = thena_replayer::RetrySchedule::for_topology(broker.topology());
            let metrics =
                thena_replayer::ReplayerMetrics::register(&prometheus::Registry::new()).unwrap();
            let shutdown = shutdown.clone();
            async move {
                thena_replayer::run_replayer(deps, schedule, metrics, shutdown)
                    .await
                    .unwrap()
            }
        });
        Api {
            env,
            base,
            http: reqwest::Client::new(),
            broker,
            shutdown,
            tasks: vec![server, replayer],
        }
    }

    /// Parks `event` the way a consumer does.
    async fn park(&self, event: &RequestChanged, reason: &str) {
        let mut headers = FieldTable::default();
        headers.insert(
            WORKSPACE_HEADER.into(),
            AMQPValue::LongString(event.workspace_id.as_str().into()),
        );
        let props = BasicProperties::default()
            .with_message_id(event.event_id.to_string().into())
            .with_headers(headers);
        let failure = Failure::new(
            FailureClass::Permanent,
            reason,
            format!("{reason} happened"),
            self.env.topology.exchange(),
            Topology::routing_key(&event.workspace_id),
            Utc::now(),
        );
        let publisher = self.broker.publisher().await.unwrap();
        publisher
            .park(&serde_json::to_vec(event).unwrap(), &props, &failure)
            .await
            .unwrap();
        publisher.close().await;
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body, _) = self.call(reqwest::Method::GET, path, None).await;
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn finish(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        self.broker.close().await;
        self.env.cleanup().await;
    }
}

fn ids(page: &Value) -> Vec<i64> {
    page["dead_letters"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_api_lists_shows_replays_purges_and_audits_per_workspace_or_fleet() {
    let api = Api::start().await;
    let (a1, a2, b1) = (
        sample::event("WA", 1, 1, None),
        sample::event("WA", 2, 1, None),
        sample::event("WB", 3, 1, None),
    );
    api.park(&a1, "vitally_400").await;
    api.park(&a2, "vitally_400").await;
    api.park(&b1, "no_integration").await;
    let all = wait_until("three parked messages in PostgreSQL", WAIT, || async {
        let (status, page) = api.get("/v1/dead-letters").await;
        (status == 200 && ids(&page).len() == 3).then_some(ids(&page))
    })
    .await;

    // Keyset pages and filters, fleet-wide and per workspace.
    let (_, first) = api.get("/v1/dead-letters?limit=2").await;
    assert_eq!(ids(&first), all[..2]);
    let (_, second) = api
        .get(&format!("/v1/dead-letters?limit=2&after={}", first["next"]))
        .await;
    assert_eq!(
        (ids(&second), &second["next"]),
        (all[2..].to_vec(), &Value::Null)
    );
    let (_, of_a) = api.get("/v1/integrations/WA/dead-letters").await;
    assert_eq!(ids(&of_a).len(), 2);
    let (_, by_reason) = api
        .get("/v1/dead-letters?reason=no_integration&older_than=0s")
        .await;
    assert_eq!(by_reason["dead_letters"][0]["workspace_id"], "WB");
    let (status, body) = api
        .get("/v1/integrations/WA/dead-letters?workspace=WB")
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get("/v1/dead-letters?older_than=soon").await;
    assert_eq!(status, 400, "{body}");

    // One, with its event; not through another workspace's path.
    let b_id = by_reason["dead_letters"][0]["id"].as_i64().unwrap();
    let (status, shown) = api.get(&format!("/v1/dead-letters/{b_id}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["event"]["request"]["id"], 3);
    assert_eq!(shown["headers"]["x-thena-reason"], "no_integration");
    let (status, _) = api
        .get(&format!("/v1/integrations/WA/dead-letters/{b_id}"))
        .await;
    assert_eq!(status, 404);

    // A dry run counts; a replay answers 202 and its audit line shows it finish.
    let (status, dry, _) = api
        .post(
            "/v1/integrations/WA/dead-letters/replay",
            json!({"dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["message"], "2 message(s) would be replayed");
    assert_eq!(
        api.env
            .queue_depth(&api.env.topology.sync_queue())
            .await
            .unwrap(),
        0
    );
    let a_id = ids(&of_a)[0];
    let (status, started, headers) = api
        .post(
            "/v1/integrations/WA/dead-letters/replay",
            json!({"filter": {"ids": [a_id]}, "rate_per_sec": 50, "actor": "ana", "why": "INC-9"}),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["matched"], 1);
    let location = headers["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        format!(
            "/v1/integrations/WA/dead-letters/audit/{}",
            started["audit_id"]
        )
    );
    let entry = wait_until("the replay finished", WAIT, || async {
        let (_, entry) = api.get(&location).await;
        entry["finished_at"].is_string().then_some(entry)
    })
    .await;
    assert_eq!(
        (entry["done"].as_i64(), entry["actor"].as_str()),
        (Some(1), Some("ana"))
    );
    assert_eq!(
        api.env
            .queue_depth(&api.env.topology.sync_queue())
            .await
            .unwrap(),
        1
    );
    let (_, replayed) = api.get(&format!("/v1/dead-letters/{a_id}")).await;
    assert_eq!(replayed["dead_letter"]["state"], "replayed");

    // Purge needs an explicit confirmation.
    let (status, refused, _) = api
        .post(
            "/v1/dead-letters/purge",
            json!({"filter": {"workspace": "WB"}}),
        )
        .await;
    assert_eq!(
        (status, refused["matched"].as_i64()),
        (409, Some(1)),
        "{refused}"
    );
    let (status, purged, _) = api
        .post(
            "/v1/dead-letters/purge",
            json!({"filter": {"workspace": "WB"}, "confirm": true, "why": "test tenant"}),
        )
        .await;
    assert_eq!(
        (status, purged["purged"].as_i64()),
        (200, Some(1)),
        "{purged}"
    );
    let (_, left) = api.get("/v1/dead-letters").await;
    assert_eq!(ids(&left).len(), 1);

    // The audit trail: the fleet's, and one workspace's.
    let (_, fleet) = api.get("/v1/dead-letters/audit").await;
    let actions: Vec<(&str, bool)> = fleet["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap(),
                a["dry_run"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [("purge", false), ("replay", false), ("replay", true)]
    );
    let (_, of_a) = api.get("/v1/integrations/WA/dead-letters/audit").await;
    assert_eq!(of_a["audit"].as_array().unwrap().len(), 2);
    let (_, of_b) = api.get("/v1/integrations/WB/dead-letters/audit").await;
    assert_eq!(of_b["audit"][0]["action"], "purge");

    let anonymous = api
        .http
        .get(format!("{}/v1/dead-letters", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    api.finish().await;
}
