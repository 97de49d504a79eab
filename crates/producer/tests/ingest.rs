//! The producer over the wire: the real router on 127.0.0.1:0, a real RabbitMQ (a fresh
//! topology prefix per test, deleted afterwards), real Redis for integration records, and
//! fake-vitally for connects.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_vitally::{FakeConfig, FakeVitally};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use secrecy::SecretString;
use serde_json::{Value, json};
use thena_broker::{Broker, Topology};
use thena_events::{RequestChanged, sample};
use thena_producer::{AppDeps, AppState, IngestMetrics, ProducerConfig, emit};
use thena_runtime::{egress::AllowList, ops::Readiness};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vitally_client::{
    client::VitallyHttp, crypto::KeyRing, integrations::IntegrationStore, metrics::VitallyMetrics,
};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RABBIT: &str = "127.0.0.1:5672";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/thena_vitally";
const TOKEN: &str = "test-token-7f3a";
/// Deadline for anything a test waits on.
const PATIENCE: Duration = Duration::from_secs(20);

struct Options {
    body_limit: usize,
    publish_timeout: Duration,
    /// Reach RabbitMQ through a proxy the test can stop.
    proxied: bool,
    /// Origins added to Vitally's hosts (`VITALLY_ALLOWED_HOSTS`), e.g. a fake's.
    vitally_origins: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            body_limit: 64 * 1024,
            publish_timeout: Duration::from_secs(5),
            proxied: false,
            vitally_origins: Vec::new(),
        }
    }
}

struct App {
    base: String,
    http: reqwest::Client,
    /// A direct connection (never through the proxy) for inspecting queues.
    inspector: Broker,
    topology: Topology,
    schema: String,
    metrics: IngestMetrics,
    proxy: Option<Proxy>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

async fn start(options: Options) -> App {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let prefix = format!("t-{}", Uuid::new_v4().simple());
    let topology = Topology::new(prefix.clone());
    let inspector = Broker::connect(AMQP_URL.into(), "producer-test-inspector", topology.clone())
        .await
        .expect("RabbitMQ reachable");
    let proxy = if options.proxied {
        Some(Proxy::start(0, RABBIT.parse().unwrap()).await)
    } else {
        None
    };
    let url = match &proxy {
        Some(proxy) => format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
        None => AMQP_URL.to_string(),
    };
    let broker = Broker::connect(url.into(), "producer-test", topology.clone())
        .await
        .expect("broker connects");
    let publisher = broker.publisher().await.expect("publisher");

    let key: String = (0..32).map(|i| format!("{:02x}", i * 7 + 1)).collect();
    let keys = KeyRing::single(&SecretString::from(key)).unwrap();
    let schema = prefix.replace('-', "_");
    let integrations = IntegrationStore::new(schema_db(&schema).await, keys);
    let allowed = options
        .vitally_origins
        .iter()
        .try_fold(AllowList::vitally(), |list, origin| list.with(origin))
        .unwrap();
    let vitally = VitallyHttp::new(
        Duration::from_secs(5),
        allowed,
        VitallyMetrics::unregistered(),
    )
    .unwrap();

    let mut config = ProducerConfig::new(SecretString::from(TOKEN));
    config.body_limit = options.body_limit;
    config.publish_timeout = options.publish_timeout;
    let registry = prometheus::Registry::new();
    let metrics = IngestMetrics::new(&registry).unwrap();
    let state = AppState::new(
        config,
        AppDeps {
            broker,
            publisher,
            integrations,
            vitally,
            readiness: Readiness::new(),
        },
        metrics.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(thena_producer::run(listener, state, shutdown.clone()));
    App {
        base,
        http: reqwest::Client::new(),
        inspector,
        topology,
        schema: prefix.replace('-', "_"),
        metrics,
        proxy,
        shutdown,
        server: Some(server),
    }
}

impl App {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post_events(&self) -> reqwest::RequestBuilder {
        self.http.post(self.url("/v1/events")).bearer_auth(TOKEN)
    }

    /// `POST /v1/integrations` (connect) with `body`.
    async fn connect(&self, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
        let request = self.http.post(self.url("/v1/integrations"));
        answer(request.bearer_auth(TOKEN).json(body).send().await.unwrap()).await
    }

    async fn post_json(&self, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self.post_events().json(body).send().await.unwrap();
        answer(response).await
    }

    /// Ready messages on the sync queue (passive declare).
    async fn queued(&self) -> u32 {
        let channel = self.inspector.channel().await.unwrap();
        let queue = channel
            .queue_declare(
                self.topology.sync_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        queue.message_count()
    }

    /// Takes every message off the sync queue, waiting until `expected` have arrived.
    async fn drain(&self, expected: usize) -> Vec<RequestChanged> {
        let channel = self.inspector.channel().await.unwrap();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while events.len() < expected {
            match channel
                .basic_get(
                    self.topology.sync_queue().into(),
                    BasicGetOptions::default(),
                )
                .await
                .unwrap()
            {
                Some(message) => {
                    let delivery = message.delivery;
                    events.push(thena_events::decode_event(&delivery.data).unwrap());
                    delivery.ack(BasicAckOptions::default()).await.unwrap();
                }
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "only {} of {expected} messages arrived",
                        events.len()
                    );
                    tokio::task::yield_now().await;
                }
            }
        }
        events
    }

    /// Stops the server (draining in-flight requests) and deletes what the test created.
    async fn finish(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        let channel = self.inspector.channel().await.unwrap();
        self.topology.delete(&channel).await.unwrap();
        self.inspector.close().await;
        schema_db(&self.schema).await.drop_schema().await.unwrap();
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
    }
}

async fn answer(response: reqwest::Response) -> (u16, Value, reqwest::header::HeaderMap) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, headers)
}

/// The test's own PostgreSQL schema for integration records.
async fn schema_db(schema: &str) -> thena_store::Db {
    thena_store::Db::connect(&SecretString::from(DATABASE_URL), schema)
        .await
        .expect("PostgreSQL reachable")
}

/// Posts `body` with `Transfer-Encoding: chunked` over a raw socket; returns the status line.
async fn post_chunked(base: &str, body: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    // The server may answer and close before reading everything; that is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut status_line = String::new();
    BufReader::new(stream)
        .read_line(&mut status_line)
        .await
        .unwrap();
    status_line
}

fn event_json(workspace: &str, request_id: u64) -> Value {
    serde_json::to_value(sample::event(workspace, request_id, 1, Some("a@acme.com"))).unwrap()
}

fn ids_of(body: &Value, key: &str) -> BTreeSet<Uuid> {
    body[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing in {body}"))
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect()
}

/// Polls `check` until it is true or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP forwarder in front of RabbitMQ that the test can stop (closing every
/// connection and the port) and start again on the same port: a broker outage without
/// touching the shared RabbitMQ.
struct Proxy {
    port: u16,
    upstream: SocketAddr,
    running: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(port: u16, upstream: SocketAddr) -> Proxy {
        let listener = bind_reusable(port).await;
        let port = listener.local_addr().unwrap().port();
        let token = CancellationToken::new();
        tokio::spawn(forward(listener, upstream, token.clone()));
        Proxy {
            port,
            upstream,
            running: Arc::new(Mutex::new(token)),
        }
    }

    fn stop(&self) {
        self.running.lock().unwrap().cancel();
    }

    async fn restart(&self) {
        let listener = bind_reusable(self.port).await;
        let token = CancellationToken::new();
        *self.running.lock().unwrap() = token.clone();
        tokio::spawn(forward(listener, self.upstream, token));
    }
}

async fn bind_reusable(port: u16) -> TcpListener {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .and_then(|()| socket.listen(64))
        {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot bind {port}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn forward(listener: TcpListener, upstream: SocketAddr, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            }
        });
    }
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_with_an_rfc_6750_challenge() {
    let app = start(Options::default()).await;
    let body = event_json("T1", 1);
    for path in ["/v1/events", "/v1/integrations"] {
        let response = app
            .http
            .post(app.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let challenge = response.headers().get("www-authenticate").cloned();
        let (status, error, _) = answer(response).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(challenge.unwrap(), "Bearer realm=\"thena-vitally\"");
        assert_eq!(error["error"], "missing bearer token");

        let response = app
            .http
            .post(app.url(path))
            .bearer_auth("test-token-7f3b")
            .json(&body)
            .send()
            .await
            .unwrap();
        let challenge = response.headers().get("www-authenticate").cloned();
        let (status, error, _) = answer(response).await;
        // RFC 6750 §3.1: a token that is not valid is a 401 naming `invalid_token`; 403
        // is for a valid token without the scope, which one token cannot lack.
        assert_eq!(status, 401, "{path}");
        assert_eq!(
            challenge.expect("a challenge"),
            "Bearer realm=\"thena-vitally\", error=\"invalid_token\""
        );
        assert_eq!(error["error"], "invalid token");
    }
    let response = app
        .http
        .get(app.url("/v1/integrations"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(app.queued().await, 0);
    app.finish().await;
}

#[tokio::test]
async fn invalid_bodies_get_400_listing_every_problem_and_nothing_is_published() {
    let app = start(Options::default()).await;

    // Not JSON at all.
    let response = app
        .post_events()
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body, _) = answer(response).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "malformed body");
    assert_eq!(body["problems"][0]["path"], "$");

    // The wrong schema.
    let mut wrong_schema = event_json("T1", 1);
    wrong_schema["schema"] = json!("thena.request.changed/v9");
    let (status, body, _) = app.post_json(&wrong_schema).await;
    assert_eq!(status, 400);
    assert_eq!(body["problems"][0]["path"], "schema");

    // No request id.
    let mut no_id = event_json("T1", 1);
    no_id["request"].as_object_mut().unwrap().remove("id");
    let (status, body, _) = app.post_json(&no_id).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["problems"],
        json!([{"index": 0, "path": "request.id", "message": "is required"}])
    );

    // A batch of valid events with one bad one in the middle: nothing goes out.
    let mut bad = event_json("T1", 3);
    bad["request"]["requestor"]["email"] = json!("not-an-email");
    bad["change"] = json!("deleted");
    let batch = json!([event_json("T1", 2), bad, event_json("T1", 4)]);
    let (status, body, _) = app.post_json(&batch).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid events");
    let problems: Vec<(u64, &str)> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["index"].as_u64().unwrap(), p["path"].as_str().unwrap()))
        .collect();
    assert_eq!(problems, [(1, "change"), (1, "request.requestor.email")]);

    // NDJSON problems carry their line.
    let ndjson = format!("{}\n{{\"schema\": 3}}\n", event_json("T1", 5));
    let response = app
        .post_events()
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .unwrap();
    let (status, body, _) = answer(response).await;
    assert_eq!(status, 400);
    assert!(
        body["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["index"] == 1 && p["line"] == 2)
    );

    // An unknown media type, and an empty batch.
    let response = app
        .post_events()
        .header("content-type", "text/plain")
        .body(event_json("T1", 6).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let (status, body, _) = app.post_json(&json!([])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("no events in body"))
    );

    assert_eq!(app.queued().await, 0, "nothing may be published");
    assert_eq!(app.metrics.events("accepted"), 0);
    assert_eq!(app.metrics.events("rejected"), 1 + 1 + 1 + 3 + 2 + 1 + 1);
    app.finish().await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_in_json() {
    let app = start(Options {
        body_limit: 4 * 1024,
        ..Options::default()
    })
    .await;
    let mut big = event_json("T1", 1);
    big["request"]["summary"] = json!("x".repeat(5 * 1024));
    let (status, body, _) = app.post_json(&big).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "body too large");
    assert_eq!(body["limit_bytes"], 4 * 1024);

    // Chunked, without a Content-Length: the limit still holds.
    let status_line = post_chunked(&app.base, &big.to_string()).await;
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");

    // Just under the limit is fine.
    let (status, _, _) = app.post_json(&event_json("T1", 2)).await;
    assert_eq!(status, 202);
    assert_eq!(app.drain(1).await.len(), 1);
    app.finish().await;
}

#[tokio::test]
async fn events_with_or_without_a_source_are_accepted_and_an_unknown_one_is_named() {
    let app = start(Options::default()).await;
    // Contract revision 1.0: no source, no requestor id.
    let mut old = event_json("T1", 1);
    old["request"].as_object_mut().unwrap().remove("source");
    old["request"]["requestor"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");
    let (status, body, _) = app.post_json(&old).await;
    assert_eq!(status, 202, "{body}");
    // Revision 1.1: an email request.
    let email = serde_json::to_value(sample::full_event_from(thena_events::Source::Email)).unwrap();
    let (status, body, _) = app.post_json(&email).await;
    assert_eq!(status, 202, "{body}");
    let received = app.drain(2).await;
    let sources: BTreeMap<u64, &str> = received
        .iter()
        .map(|e| (e.request.id, e.request.source.as_str()))
        .collect();
    assert_eq!(sources, BTreeMap::from([(1, "slack"), (135, "email")]));

    let mut unknown = event_json("T1", 2);
    unknown["request"]["source"] = json!("fax");
    let (status, body, _) = app.post_json(&unknown).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["problems"],
        json!([{"index": 0, "path": "request.source",
                "message": "must be one of \"slack\", \"email\", \"web\", \"ms_teams\"; got \"fax\""}])
    );
    assert_eq!(app.queued().await, 0);
    app.finish().await;
}

#[tokio::test]
async fn a_single_event_an_array_and_ndjson_are_confirmed_onto_the_sync_queue() {
    let app = start(Options::default()).await;
    let mut sent = BTreeSet::new();

    // One object without an event id: the producer assigns one and reports it.
    let mut single = event_json("T1", 1);
    single.as_object_mut().unwrap().remove("event_id");
    let (status, body, _) = app.post_json(&single).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let assigned = ids_of(&body, "event_ids");
    sent.extend(assigned.iter().copied());

    // An array of 50 across two workspaces.
    let batch: Vec<Value> = (0..50)
        .map(|i| event_json(if i % 2 == 0 { "T1" } else { "T2" }, 100 + i))
        .collect();
    let (status, body, _) = app.post_json(&Value::Array(batch.clone())).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 50);
    let batch_ids = ids_of(&body, "event_ids");
    let expected: BTreeSet<Uuid> = batch
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(batch_ids, expected);
    sent.extend(batch_ids);

    // NDJSON, with a blank line.
    let lines: Vec<Value> = (0..3).map(|i| event_json("T3", 200 + i)).collect();
    let ndjson = format!("{}\n\n{}\n{}\n", lines[0], lines[1], lines[2]);
    let response = app
        .post_events()
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .unwrap();
    let (status, body, _) = answer(response).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 3);
    sent.extend(ids_of(&body, "event_ids"));

    let received = app.drain(sent.len()).await;
    let received_ids: BTreeSet<Uuid> = received.iter().map(|e| e.event_id).collect();
    assert_eq!(received_ids, sent);
    let workspaces: BTreeMap<String, usize> = received.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.workspace_id.clone()).or_default() += 1;
        m
    });
    assert_eq!(
        workspaces,
        BTreeMap::from([("T1".into(), 26), ("T2".into(), 25), ("T3".into(), 3)])
    );
    assert!(received.iter().any(|e| assigned.contains(&e.event_id)));
    assert_eq!(app.metrics.events("accepted"), 54);
    assert_eq!(app.queued().await, 0);
    app.finish().await;
}

#[tokio::test]
async fn when_the_broker_goes_away_the_api_answers_503_and_recovers_by_itself() {
    let app = start(Options {
        proxied: true,
        publish_timeout: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let ready = |app: &App, want: u16| {
        let request = app.http.get(app.url("/readyz"));
        async move {
            request
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == want)
        }
    };
    eventually("ready", || ready(&app, 200)).await;
    let (status, before, _) = app.post_json(&event_json("T1", 1)).await;
    assert_eq!(status, 202);

    app.proxy.as_ref().unwrap().stop();
    let batch = json!([event_json("T1", 2), event_json("T1", 3)]);
    let (status, body, headers) = app.post_json(&batch).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(body["accepted"], 0);
    let batch_ids: BTreeSet<Uuid> = batch
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids_of(&body, "unconfirmed_event_ids"), batch_ids);
    assert!(ids_of(&body, "event_ids").is_empty());
    eventually("not ready while the broker is away", || ready(&app, 503)).await;
    assert_eq!(app.metrics.events("unavailable"), 2);

    // Same port again: the producer reconnects without help.
    app.proxy.as_ref().unwrap().restart().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let after = loop {
        let (status, body, _) = app.post_json(&batch).await;
        if status == 202 {
            break ids_of(&body, "event_ids");
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 202 after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after, batch_ids);
    eventually("ready again", || ready(&app, 200)).await;

    let received: BTreeSet<Uuid> = app.drain(3).await.iter().map(|e| e.event_id).collect();
    let mut expected = ids_of(&before, "event_ids");
    expected.extend(batch_ids);
    assert_eq!(received, expected);
    app.finish().await;
}

#[tokio::test]
async fn the_admin_api_connects_reads_redacted_changes_toggles_and_disconnects() {
    let fake = FakeVitally::spawn(FakeConfig::default()).await.unwrap();
    let app = start(Options {
        vitally_origins: vec![fake.base_url(), "http://127.0.0.1:9".into()],
        ..Options::default()
    })
    .await;
    let secret = fake.auth_header();
    let admin = |method: reqwest::Method, path: &str| {
        app.http.request(method, app.url(path)).bearer_auth(TOKEN)
    };
    let mut bodies = Vec::new();

    // Wrong credentials: a clear 422, and nothing stored.
    let (status, body, _) = answer(
        admin(reqwest::Method::POST, "/v1/integrations")
            .json(&json!({"workspace_id": "TADMIN", "api_url": fake.base_url(), "auth_header": "Basic d3Jvbmc6"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("rejected the auth header"),
        "{body}"
    );
    bodies.push(body);

    // An unreachable Vitally: 502.
    let (status, body, _) = answer(
        admin(reqwest::Method::POST, "/v1/integrations")
            .json(&json!({"workspace_id": "TADMIN", "api_url": "http://127.0.0.1:9", "auth_header": secret}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    bodies.push(body);

    // A bad URL, and an unknown field: 422.
    for request in [
        json!({"workspace_id": "TADMIN", "api_url": "ftp://x", "auth_header": secret}),
        json!({"workspace_id": "TADMIN", "api_url": fake.base_url(), "auth_header": secret, "push": true}),
    ] {
        let (status, body, _) = answer(
            admin(reqwest::Method::POST, "/v1/integrations")
                .json(&request)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        bodies.push(body);
    }

    let (status, body, headers) = answer(
        admin(reqwest::Method::POST, "/v1/integrations")
            .json(&json!({
                "workspace_id": "TADMIN",
                "api_url": fake.base_url(),
                "auth_header": secret,
                "categories": ["Product", "Region"],
                "sync_threads": true
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(headers["location"], "/v1/integrations/TADMIN");
    assert_eq!(body["workspace_id"], "TADMIN");
    assert_eq!(body["push_requests"], true);
    assert_eq!(body["sync_threads"], true);
    assert!(body["fields"]["Product"]["path"].is_string(), "{body}");
    bodies.push(body);

    let (status, one, _) = answer(
        admin(reqwest::Method::GET, "/v1/integrations/TADMIN")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(one["auth_header"], "Basic <redacted>");
    bodies.push(one);
    let (status, all, _) = answer(
        admin(reqwest::Method::GET, "/v1/integrations")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(all["integrations"].as_array().unwrap().len(), 1);
    bodies.push(all);

    let (status, patched, _) = answer(
        admin(reqwest::Method::PATCH, "/v1/integrations/TADMIN")
            .json(&json!({"update_requests": false, "rate_budget_per_min": 120}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["update_requests"], false);
    assert_eq!(patched["push_requests"], true);
    assert_eq!(patched["rate_budget_per_min"], 120);
    bodies.push(patched);
    let (status, body, _) = answer(
        admin(reqwest::Method::PATCH, "/v1/integrations/TADMIN")
            .json(&json!({"rate_budget_per_min": 5000}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{body}");

    // The history names every change and who made it.
    let (status, history, _) = answer(
        admin(reqwest::Method::GET, "/v1/integrations/TADMIN/history")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{history}");
    let actions: Vec<(&str, &str)> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["action"].as_str().unwrap(), h["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("connected", "admin-api"),
            ("settings_changed", "admin-api")
        ]
    );
    assert_eq!(
        history["history"][1]["changes"]["update_requests"],
        json!({"from": true, "to": false})
    );
    bodies.push(history);

    // One Vitally per workspace: the same key for another workspace is a 409.
    let (status, body, _) = answer(
        admin(reqwest::Method::POST, "/v1/integrations")
            .json(&json!({"workspace_id": "TOTHER", "api_url": fake.base_url(), "auth_header": secret}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["connected_workspace"], "TADMIN", "{body}");
    bodies.push(body);

    // The request ledger answers, empty while no consumer ran.
    let (status, page, _) = answer(
        admin(
            reqwest::Method::GET,
            "/v1/integrations/TADMIN/requests?outcome=skipped",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["requests"], json!([]));
    assert_eq!(page["next"], Value::Null);
    for (path, want) in [
        ("/v1/integrations/TADMIN/requests/135", 404),
        ("/v1/integrations/TADMIN/requests?limit=0", 400),
        ("/v1/integrations/TADMIN/history?limit=5000", 400),
    ] {
        let (status, body, _) =
            answer(admin(reqwest::Method::GET, path).send().await.unwrap()).await;
        assert_eq!(status, want, "{path}: {body}");
    }

    // Reconnecting is safe and answers 200.
    let (status, body, _) = answer(
        admin(reqwest::Method::POST, "/v1/integrations")
            .json(&json!({"workspace_id": "TADMIN", "api_url": fake.base_url(), "auth_header": secret}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    bodies.push(body);

    let response = admin(reqwest::Method::DELETE, "/v1/integrations/TADMIN")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/integrations/TADMIN"),
        (reqwest::Method::DELETE, "/v1/integrations/TADMIN"),
    ] {
        let (status, body, _) = answer(admin(method, path).send().await.unwrap()).await;
        assert_eq!(status, 404, "{body}");
        bodies.push(body);
    }
    let (status, body, _) = answer(
        admin(reqwest::Method::PATCH, "/v1/integrations/TADMIN")
            .json(&json!({"push_requests": false}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let key_material = secret.trim_start_matches("Basic ").to_string();
    for body in &bodies {
        let text = body.to_string();
        assert!(
            !text.contains(&key_material),
            "the auth header leaked: {text}"
        );
    }
    fake.shutdown().await;
    app.finish().await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_before_run_returns() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut app = start(Options::default()).await;
    let body = event_json("T1", 1).to_string();
    let stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await.unwrap();
    // `100 Continue` comes when the handler starts reading the body: the request is in flight.
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 100"), "{line}");
    read.read_line(&mut line).await.unwrap();

    app.shutdown.cancel();
    write.write_all(body.as_bytes()).await.unwrap();
    let mut status = String::new();
    read.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 202"), "{status}");
    let server = app.server.take().unwrap();
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("run returns once the request is answered")
        .unwrap()
        .unwrap();
    assert_eq!(app.drain(1).await.len(), 1);
    app.finish().await;
}

/// Every route the router serves, with its method: the OpenAPI document must list exactly
/// these, and the router must answer each (not 404/405).
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/events"),
    ("POST", "/v1/integrations"),
    ("GET", "/v1/integrations"),
    ("GET", "/v1/integrations/{workspace_id}"),
    ("PATCH", "/v1/integrations/{workspace_id}"),
    ("DELETE", "/v1/integrations/{workspace_id}"),
    ("GET", "/v1/integrations/{workspace_id}/history"),
    ("GET", "/v1/integrations/{workspace_id}/requests"),
    (
        "GET",
        "/v1/integrations/{workspace_id}/requests/{request_id}",
    ),
    ("POST", "/v1/integrations/{workspace_id}/backfill"),
    ("GET", "/v1/integrations/{workspace_id}/backfill"),
    ("GET", "/v1/integrations/{workspace_id}/backfill/{job}"),
    ("GET", "/v1/dead-letters"),
    ("GET", "/v1/dead-letters/{id}"),
    ("POST", "/v1/dead-letters/replay"),
    ("POST", "/v1/dead-letters/purge"),
    ("GET", "/v1/dead-letters/audit"),
    ("GET", "/v1/dead-letters/audit/{audit_id}"),
    ("GET", "/v1/integrations/{workspace_id}/dead-letters"),
    ("GET", "/v1/integrations/{workspace_id}/dead-letters/{id}"),
    (
        "POST",
        "/v1/integrations/{workspace_id}/dead-letters/replay",
    ),
    ("POST", "/v1/integrations/{workspace_id}/dead-letters/purge"),
    ("GET", "/v1/integrations/{workspace_id}/dead-letters/audit"),
    (
        "GET",
        "/v1/integrations/{workspace_id}/dead-letters/audit/{audit_id}",
    ),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
];

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_routes_the_router_serves() {
    let app = start(Options::default()).await;
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(thena_producer::OPENAPI_JSON).unwrap()
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, table);

    for (method, path) in ROUTES {
        let concrete = path
            .replace("{workspace_id}", "TNOPE")
            .replace("{id}", "9999")
            .replace("{audit_id}", "9999");
        let response = app
            .http
            .request(method.parse().unwrap(), app.url(&concrete))
            .bearer_auth(TOKEN)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            status != 404
                || body.contains("not connected")
                || body.contains("no dead letter")
                || body.contains("no backfill"),
            "{method} {path} is not routed: {body}"
        );
    }
    let response = app
        .http
        .get(app.url("/v1/nothing"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.json::<Value>().await.unwrap()["error"].is_string());

    // The event schema in the document is the events crate's, not a stale copy.
    let mut schema = thena_events::json_schema();
    let defs = schema.as_object_mut().unwrap().remove("$defs").unwrap();
    schema.as_object_mut().unwrap().remove("$schema");
    // schemars renders the `Uuid::now_v7` serde default as a random uuid: not part of the
    // contract, and the document leaves it out.
    schema["properties"]["event_id"]
        .as_object_mut()
        .unwrap()
        .remove("default");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["RequestChanged"], rewrite_refs(schema));
    for (name, def) in defs.as_object().unwrap() {
        assert_eq!(schemas[name], rewrite_refs(def.clone()), "{name}");
    }
    app.finish().await;
}

fn rewrite_refs(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => (
                        k,
                        Value::String(r.replace("#/$defs/", "#/components/schemas/")),
                    ),
                    (_, v) => (k, rewrite_refs(v)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(rewrite_refs).collect()),
        other => other,
    }
}

#[tokio::test]
async fn emitted_lifecycles_pass_the_api_and_land_on_the_queue() {
    let app = start(Options::default()).await;
    let mut scenario = emit::Scenario::new("TEMIT", chrono::Utc::now());
    scenario.requests = 6;
    scenario.steps = 5;
    scenario.max_step_gap = Duration::from_secs(1);
    let events = scenario.events();
    let report = emit::emit_http(&app.base, &SecretString::from(TOKEN), &events, 0, 7)
        .await
        .unwrap();
    assert_eq!(
        report,
        emit::EmitReport {
            accepted: 30,
            rejected: 0,
            unavailable: 0
        }
    );
    let received = app.drain(30).await;
    let mut last: BTreeMap<u64, &RequestChanged> = BTreeMap::new();
    for event in &received {
        let entry = last.entry(event.request.id).or_insert(event);
        if event.request.version > entry.request.version {
            *entry = event;
        }
    }
    assert_eq!(last.len(), 6);
    assert!(
        last.values()
            .all(|e| e.request.version == 5 && e.request.status.as_deref() == Some("closed"))
    );
    // Requests from every channel the product doc names.
    let sources: BTreeSet<&str> = last.values().map(|e| e.request.source.as_str()).collect();
    assert_eq!(
        sources,
        BTreeSet::from(["email", "ms_teams", "slack", "web"])
    );

    let wrong = emit::emit_http(&app.base, &SecretString::from("nope"), &events[..1], 0, 1).await;
    assert!(matches!(wrong, Err(emit::EmitError::Unauthorized(401))));

    // Straight onto the broker, paced: 10 events at 200/s take at least 45 ms.
    let publisher = app.inspector.publisher().await.unwrap();
    let started = tokio::time::Instant::now();
    let report = emit::emit_broker(&publisher, &events[..10], 200).await;
    assert!(started.elapsed() >= Duration::from_millis(45));
    assert_eq!((report.accepted, report.total()), (10, 10));
    let direct: BTreeSet<Uuid> = app.drain(10).await.iter().map(|e| e.event_id).collect();
    assert_eq!(direct, events[..10].iter().map(|e| e.event_id).collect());
    app.finish().await;
}

/// The SSRF forms of issue 15, each aimed at a local listener: none may be reached.
fn ssrf_forms(port: u16) -> Vec<String> {
    [
        "http://127.0.0.1:{p}",
        "https://127.0.0.1:{p}",
        "http://127.1:{p}",
        "https://127.1:{p}",
        "https://0x7f000001:{p}",
        "https://2130706433:{p}",
        "https://0177.0.0.1:{p}",
        "https://%31%32%37.0.0.1:{p}",
        "https://127.0.0.1.:{p}",
        "https://[::ffff:127.0.0.1]:{p}",
        "https://0.0.0.0:{p}",
        "https://localhost:{p}",
        "https://LOCALHOST.:{p}",
        "https://acme.rest.vitally.io@127.0.0.1:{p}",
        "https://user:pass@127.0.0.1:{p}",
        "http://acme.rest.vitally.io:{p}",
        "https://169.254.169.254",
        "http://169.254.169.254/latest/meta-data",
        "https://10.0.0.1",
        "https://100.64.0.1",
    ]
    .iter()
    .map(|form| form.replace("{p}", &port.to_string()))
    .collect()
}

#[tokio::test]
async fn connect_refuses_every_ssrf_form_without_opening_a_connection() {
    let target = thena_testkit::target::TcpTarget::http("200 OK", "{\"results\":[]}")
        .await
        .unwrap();
    let app = start(Options::default()).await;
    for url in ssrf_forms(target.port()) {
        let (status, body, _) = app
            .connect(
                &json!({"workspace_id": "TSSRF", "api_url": url, "auth_header": "Basic c3NyZjo="}),
            )
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("invalid Vitally API URL: ")
                && [
                    "address",
                    "not a Vitally API host",
                    "plain http",
                    "credentials"
                ]
                .iter()
                .any(|why| error.contains(why)),
            "{url}: {error}"
        );
        assert_eq!(target.accepted(), 0, "{url} reached the listener: {body}");
    }
    // The listener does count: a direct request is seen.
    app.http
        .get(format!("http://{}", target.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(target.accepted(), 1);
    app.finish().await;
}

#[tokio::test]
async fn connect_tells_no_closed_port_from_redis_amqp_or_a_foreign_web_server() {
    use thena_testkit::target::{TcpTarget, closed_port};
    let redis = TcpTarget::answering(b"-ERR wrong number of arguments for 'get' command\r\n")
        .await
        .unwrap();
    let amqp = TcpTarget::answering(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let failing = TcpTarget::http("500 Internal Server Error", "internal-secret-admin-page")
        .await
        .unwrap();
    let html = TcpTarget::http("200 OK", "<html>internal-secret-wiki</html>")
        .await
        .unwrap();
    let closed = closed_port().await.unwrap();
    let origins: Vec<String> = [
        closed,
        redis.port(),
        amqp.port(),
        failing.port(),
        html.port(),
    ]
    .iter()
    .map(|port| format!("http://127.0.0.1:{port}"))
    .collect();
    let app = start(Options {
        vitally_origins: origins.clone(),
        ..Options::default()
    })
    .await;
    let mut answers = Vec::new();
    for url in &origins {
        let (status, body, _) = app
            .connect(
                &json!({"workspace_id": "TPROBE", "api_url": url, "auth_header": "Basic cHJvYmU6"}),
            )
            .await;
        let error = body["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            !error.contains("internal-secret"),
            "{url} reflected: {error}"
        );
        answers.push((status, error));
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "the answers tell the targets apart: {answers:#?}"
    );
    assert_eq!(answers[0].0, 502);
    assert!(
        answers[0]
            .1
            .contains("could not reach a Vitally API at that URL")
    );
    app.finish().await;
}
