//! The Vitally auth header never leaks: not in TRACE-level logs (ours, reqwest's,
//! hyper's), not in error messages, not in `Debug` output, not in metrics, not in Redis.
//!
//! One test on purpose: it installs the process-wide subscriber (so log records from
//! every thread and from the `log` crate are captured) and owns it alone.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{ACTOR, Scope, connect_request};
use fake_vitally::{FakeConfig, FakeVitally, Fault, FaultKind};
use prometheus::{Encoder, Registry, TextEncoder};
use secrecy::SecretString;
use serde_json::Map;
use tracing_subscriber::fmt::MakeWriter;
use vitally_client::{
    client::{InstanceBody, Link, VitallyHttp},
    crypto::SecretCipher,
    metrics::VitallyMetrics,
    provision::{self, Toggles},
};

/// The secret key inside the accepted header, the header's base64 token, the header.
const KEY: &str = "leak-canary-7f3a9c";
const TOKEN: &str = "bGVhay1jYW5hcnktN2YzYTljOg==";
const HEADER: &str = "Basic bGVhay1jYW5hcnktN2YzYTljOg==";
/// A header the fake rejects, equally secret.
const WRONG_TOKEN: &str = "d3JvbmctY2FuYXJ5LTJiOGU6";
const WRONG_HEADER: &str = "Basic d3JvbmctY2FuYXJ5LTJiOGU6";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn assert_clean(what: &str, text: &str) {
    for secret in [KEY, TOKEN, HEADER, WRONG_TOKEN, WRONG_HEADER] {
        assert!(!text.contains(secret), "{what} leaks {secret:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_header_never_appears_in_logs_errors_debug_output_metrics_or_redis() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .try_init()
        .expect("the only subscriber in this test binary");
    assert_eq!(
        base64_header(KEY),
        HEADER,
        "the canary constants agree with each other"
    );

    let fake = FakeVitally::spawn(FakeConfig {
        auth_headers: vec![HEADER.to_owned()],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let redis = Scope::new();
    let store = redis.store(common::cipher()).await;
    let registry = Registry::new();
    let metrics = VitallyMetrics::new(&registry).unwrap();
    let http =
        VitallyHttp::new(Duration::from_millis(500), common::allowing(&fake), metrics).unwrap();
    let mut shown: Vec<(String, String)> = Vec::new();
    let mut show = |what: &str, text: String| shown.push((what.to_owned(), text));

    // Succeeding calls, through connect.
    let req = connect_request(&fake.base_url(), HEADER, "T-secret", &["Region"]);
    show("ConnectRequest debug", format!("{req:?}"));
    let integration = common::connect(&http, &store, req).await.unwrap();
    show("Integration debug", format!("{integration:?}"));
    show("Integration pretty debug", format!("{integration:#?}"));
    show("Integration redacted", integration.redacted().to_string());
    let client = integration.client(&http);
    show("VitallyClient debug", format!("{client:?}"));
    show("VitallyHttp debug", format!("{http:?}"));
    show("IntegrationStore debug", format!("{store:?}"));
    show(
        "SecretCipher debug",
        format!(
            "{:?}",
            SecretCipher::from_key(&common::random_key()).unwrap()
        ),
    );
    let toggled = provision::set_toggles(
        &store,
        "T-secret",
        Toggles {
            sync_threads: Some(true),
            ..Toggles::default()
        },
        ACTOR,
    )
    .await
    .unwrap();
    show("toggled debug", format!("{toggled:?}"));
    client.users_by_email("a+b@acme.com").await.unwrap();
    let body = InstanceBody {
        name: "Thena Request ID: 1".into(),
        external_id: "thena:T-secret:1".into(),
        customer_id: Link::Keep,
        organization_id: Link::Keep,
        traits: Map::new(),
    };
    // Vitally wants a customer or organization: a 400 with a body.
    let err = client
        .create_instance(&integration.custom_object_id, &body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    show("400 display", err.to_string());
    show("400 debug", format!("{err:?}"));

    // Failing calls of every kind.
    for kind in [
        FaultKind::Status(500),
        FaultKind::Status(429),
        FaultKind::Drop,
        FaultKind::Latency(Duration::from_secs(2)),
    ] {
        fake.inject(Fault::NextN {
            method: None,
            path_prefix: String::new(),
            count: 1,
            kind: kind.clone(),
        });
        let err = client.custom_objects().await.unwrap_err();
        show("fault display", err.to_string());
        show("fault debug", format!("{err:?}"));
    }
    let rejected = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), WRONG_HEADER, "T-wrong", &[]),
    )
    .await
    .unwrap_err();
    show("rejected display", rejected.to_string());
    show("rejected debug", format!("{rejected:?}"));
    let stranger = http.client(
        &fake.base_url(),
        SecretString::from(WRONG_HEADER),
        "T-wrong",
    );
    let err = stranger.account("acc-1").await.unwrap_err();
    show("401 display", err.to_string());
    show("401 debug", format!("{err:?}"));
    let unreachable = common::connect(
        &http,
        &store,
        connect_request("http://127.0.0.1:1", HEADER, "T-far", &[]),
    )
    .await
    .unwrap_err();
    show("unreachable display", unreachable.to_string());
    show("unreachable debug", format!("{unreachable:?}"));
    let with_userinfo = common::connect(
        &http,
        &store,
        connect_request(&format!("http://{KEY}:x@127.0.0.1:1"), HEADER, "T-far", &[]),
    )
    .await
    .unwrap_err();
    show("userinfo url display", with_userinfo.to_string());
    show("userinfo url debug", format!("{with_userinfo:?}"));
    let wrong_key = redis.store(common::cipher()).await;
    let err = wrong_key.get("T-secret").await.unwrap_err();
    show("store error display", err.to_string());
    show("store error debug", format!("{err:?}"));

    // Metrics as scraped.
    let mut scraped = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut scraped)
        .unwrap();
    let scraped = String::from_utf8(scraped).unwrap();
    assert!(scraped.contains("thena_vitally_vitally_requests_total"));
    show("metrics", scraped);

    // PostgreSQL as stored: every row of every table of the control plane.
    let client = store.db().client().await.unwrap();
    for table in ["integrations", "integration_events", "requests"] {
        for row in client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            show(table, row.get::<_, String>(0));
        }
    }
    drop(client);
    let history = serde_json::to_string(&store.history("T-secret", 100).await.unwrap()).unwrap();
    assert!(history.contains("settings_changed"), "{history}");
    show("integration history", history);

    for (what, text) in &shown {
        assert_clean(what, text);
    }
    let logs = captured.text();
    // The capture did see the calls, at TRACE, with reqwest's and hyper's records.
    for expected in ["vitally.call", "custom_objects.list", "T-secret", "TRACE"] {
        assert!(logs.contains(expected), "logs lack {expected:?}");
    }
    assert_clean("logs", &logs);
    fake.shutdown().await;
    redis.cleanup().await;
}

fn base64_header(key: &str) -> String {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    format!("Basic {}", STANDARD.encode(format!("{key}:")))
}
