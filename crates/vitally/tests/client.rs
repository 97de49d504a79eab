//! The REST client over real HTTP against the fake Vitally: every call, pagination,
//! rate-limit headers, and the class of every kind of failure.

mod common;

use std::time::Duration;

use fake_vitally::{FakeConfig, FakeVitally, Fault, FaultKind, Fixture, RunningFake};
use prometheus::Registry;
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use vitally_client::{
    client::{InstanceBody, Link, NewUser, VitallyClient, VitallyHttp},
    error::{ErrorClass, ErrorKind},
    metrics::VitallyMetrics,
    traits::FieldType,
};

async fn fake() -> RunningFake {
    FakeVitally::spawn(FakeConfig::default())
        .await
        .expect("fake Vitally")
}

fn client_for(fake: &RunningFake, timeout: Duration) -> VitallyClient {
    common::http(fake, timeout).client(
        &fake.base_url(),
        SecretString::from(fake.auth_header()),
        "T-client",
    )
}

fn seed(fake: &RunningFake, fixture: Value) {
    let fixture: Fixture = serde_json::from_value(fixture).expect("fixture shape");
    fake.seed(fixture).expect("seed");
}

fn seed_customers(fake: &RunningFake) {
    seed(
        fake,
        json!({
            "organizations": [{"id": "org-1", "externalId": "o1", "name": "Acme Org"}],
            "accounts": [
                {"id": "acc-1", "externalId": "a1", "name": "Acme", "organizationId": "org-1"},
                {"id": "acc-2", "externalId": "a2", "name": "Solo"}
            ],
            "users": [
                {"id": "u-1", "externalId": "x1", "name": "Ann", "email": "ann+ops@acme.com", "accountIds": ["acc-1"], "organizationIds": ["org-1"]},
                {"id": "u-2", "externalId": "x2", "name": "Bob", "email": "bob@acme.com", "accountIds": ["acc-1"]},
                {"id": "u-3", "externalId": "x3", "name": "Cid", "email": "cid@other.io", "accountIds": ["acc-2"]}
            ]
        }),
    );
}

#[tokio::test]
async fn users_are_found_by_exact_email_with_a_plus_and_by_email_domain() {
    let fake = fake().await;
    seed_customers(&fake);
    let client = client_for(&fake, Duration::from_secs(5));

    let found = client.users_by_email("ann+ops@acme.com").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, "u-1");
    assert_eq!(found[0].account_ids, ["acc-1"]);
    assert_eq!(found[0].organization_ids, ["org-1"]);
    // Without %2B the `+` would arrive as a space and match nobody.
    assert!(
        client
            .users_by_email("ann ops@acme.com")
            .await
            .unwrap()
            .is_empty()
    );

    let mut domain: Vec<String> = client
        .users_by_email_domain("acme.com")
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    domain.sort();
    assert_eq!(domain, ["u-1", "u-2"]);
    assert!(
        client
            .users_by_email_domain("nobody.dev")
            .await
            .unwrap()
            .is_empty()
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn a_created_user_comes_back_with_its_vitally_ids() {
    let fake = fake().await;
    seed_customers(&fake);
    let client = client_for(&fake, Duration::from_secs(5));
    let user = client
        .create_user(&NewUser {
            external_id: "thena:T1:dana@acme.com".into(),
            name: "Dana".into(),
            email: "dana@acme.com".into(),
            account_ids: vec!["acc-1".into()],
            organization_ids: vec![],
        })
        .await
        .unwrap();
    assert!(!user.id.is_empty());
    assert_eq!(user.email, "dana@acme.com");
    assert_eq!(user.account_ids, ["acc-1"]);
    let again = client.users_by_email("dana@acme.com").await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, user.id);
    fake.shutdown().await;
}

#[tokio::test]
async fn accounts_and_organizations_are_read_and_a_missing_one_is_none() {
    let fake = fake().await;
    seed_customers(&fake);
    let client = client_for(&fake, Duration::from_secs(5));

    let acme = client.account("acc-1").await.unwrap().expect("account");
    assert_eq!(acme.name, "Acme");
    assert_eq!(acme.organization_id.as_deref(), Some("org-1"));
    let solo = client.account("acc-2").await.unwrap().expect("account");
    assert_eq!(solo.organization_id, None);
    assert_eq!(client.account("nope").await.unwrap(), None);

    let org = client.organization("org-1").await.unwrap().expect("org");
    assert_eq!(org.name, "Acme Org");
    assert_eq!(client.organization("nope").await.unwrap(), None);
    fake.shutdown().await;
}

#[tokio::test]
async fn custom_objects_are_listed_across_every_page() {
    let fake = fake().await;
    let objects: Vec<Value> = (0..130)
        .map(|i| json!({"name": format!("Object {i:03}")}))
        .collect();
    seed(&fake, json!({ "customObjects": objects }));
    let client = client_for(&fake, Duration::from_secs(5));

    let listed = client.custom_objects().await.unwrap();
    assert_eq!(listed.len(), 130);
    let mut names: Vec<&str> = listed.iter().map(|o| o.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 130, "no page read twice");
    assert_eq!(fake.calls().route("GET /resources/customObjects"), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn an_object_is_created_with_typed_fields_and_more_can_be_added() {
    let fake = fake().await;
    let client = client_for(&fake, Duration::from_secs(5));
    let object = client
        .create_custom_object(
            "Thena Requests",
            "Thena Requests",
            &[
                ("Title", FieldType::Textarea),
                ("Thena Request Id", FieldType::Number),
            ],
        )
        .await
        .unwrap();
    assert_eq!(object.name, "Thena Requests");
    client
        .add_fields(&object.id, &[("Region", FieldType::String)])
        .await
        .unwrap();

    let fields = client.fields(&object.id).await.unwrap();
    let mut seen: Vec<(String, String)> = fields
        .iter()
        .map(|f| (f.label.clone(), f.field_type.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("Region".to_owned(), "string".to_owned()),
            ("Thena Request Id".to_owned(), "number".to_owned()),
            ("Title".to_owned(), "textarea".to_owned()),
        ]
    );
    assert!(fields.iter().all(|f| f.path.starts_with("vitally.custom.")));
    assert_eq!(
        fields
            .iter()
            .find(|f| f.label == "Title")
            .unwrap()
            .known_type(),
        Some(FieldType::Textarea)
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn an_instance_is_created_found_by_external_id_and_updated() {
    let fake = fake().await;
    seed_customers(&fake);
    let client = client_for(&fake, Duration::from_secs(5));
    let object = client
        .create_custom_object(
            "Thena Requests",
            "Thena Requests",
            &[
                ("Title", FieldType::Textarea),
                ("Status", FieldType::String),
            ],
        )
        .await
        .unwrap();
    let fields = client.fields(&object.id).await.unwrap();
    let path = |label: &str| {
        fields
            .iter()
            .find(|f| f.label == label)
            .map(|f| f.path.clone())
            .unwrap()
    };
    let mut traits = Map::new();
    traits.insert(path("Title"), json!("Login broken"));
    traits.insert(path("Status"), json!("open"));
    let body = InstanceBody {
        name: "Thena Request ID: 7".into(),
        external_id: "thena:T1:7".into(),
        customer_id: Link::Set("acc-1".into()),
        organization_id: Link::Clear,
        traits,
    };

    assert_eq!(
        client
            .find_instance(&object.id, "thena:T1:7")
            .await
            .unwrap(),
        None
    );
    let created = client.create_instance(&object.id, &body).await.unwrap();
    assert_eq!(created.customer_id.as_deref(), Some("acc-1"));
    let found = client
        .find_instance(&object.id, "thena:T1:7")
        .await
        .unwrap()
        .expect("instance");
    assert_eq!(found.id, created.id);
    assert_eq!(found.traits[&path("Status")], json!("open"));

    let mut update = body.clone();
    update.traits = Map::new();
    update.traits.insert(path("Status"), json!("closed"));
    update.traits.insert(path("Title"), Value::Null);
    let updated = client
        .update_instance(&object.id, &created.id, &update)
        .await
        .unwrap();
    assert_eq!(updated.traits[&path("Status")], json!("closed"));
    assert!(!updated.traits.contains_key(&path("Title")), "null removes");
    assert_eq!(updated.customer_id.as_deref(), Some("acc-1"), "kept");

    // An absent link is kept, a `null` one cleared: the relink to the organization
    // alone drops the account, and a traits-only write keeps whatever link there is.
    let mut relink = update.clone();
    relink.organization_id = Link::Set("org-1".into());
    relink.customer_id = Link::Clear;
    let moved = client
        .update_instance(&object.id, &created.id, &relink)
        .await
        .unwrap();
    assert_eq!(
        (
            moved.customer_id.as_deref(),
            moved.organization_id.as_deref()
        ),
        (None, Some("org-1"))
    );
    let mut traits_only = update.clone();
    traits_only.customer_id = Link::Keep;
    traits_only.organization_id = Link::Keep;
    let kept = client
        .update_instance(&object.id, &created.id, &traits_only)
        .await
        .unwrap();
    assert_eq!(
        (kept.customer_id.as_deref(), kept.organization_id.as_deref()),
        (None, Some("org-1"))
    );
    assert_eq!(fake.instances().len(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn rate_limit_headers_are_kept_and_exported_with_the_call_counts() {
    let fake = fake().await;
    let registry = Registry::new();
    let metrics = VitallyMetrics::new(&registry).unwrap();
    let http = VitallyHttp::new(
        Duration::from_secs(5),
        common::allowing(&fake),
        metrics.clone(),
    )
    .unwrap();
    let client = http.client(
        &fake.base_url(),
        SecretString::from(fake.auth_header()),
        "T-rl",
    );
    assert_eq!(client.last_rate_limit(), None);

    client.custom_objects().await.unwrap();
    client.custom_objects().await.unwrap();
    let rate = client.last_rate_limit().expect("headers seen");
    assert_eq!(rate.limit, Some(1000));
    assert_eq!(rate.remaining, Some(998));
    assert!(rate.reset.is_some_and(|r| r <= Duration::from_secs(60)));
    assert_eq!(
        metrics
            .ratelimit_remaining
            .with_label_values(&["T-rl"])
            .get(),
        998
    );
    assert_eq!(
        metrics
            .requests
            .with_label_values(&["custom_objects.list", "200"])
            .get(),
        2
    );
    let durations = metrics
        .request_duration
        .with_label_values(&["custom_objects.list"]);
    assert_eq!(durations.get_sample_count(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn past_the_window_a_429_is_rate_limited_until_the_reset_vitally_sent() {
    let fake = fake().await;
    fake.set_rate_limit(2, Duration::from_secs(30));
    let client = client_for(&fake, Duration::from_secs(5));
    client.custom_objects().await.unwrap();
    client.custom_objects().await.unwrap();
    let err = client.custom_objects().await.unwrap_err();
    assert_eq!(err.status(), Some(429));
    match err.class() {
        ErrorClass::RateLimited { reset } => {
            assert!(
                reset > Duration::ZERO && reset <= Duration::from_secs(30),
                "{reset:?}"
            )
        }
        other => panic!("expected rate limited, got {other:?}"),
    }
    assert_eq!(client.last_rate_limit().unwrap().remaining, Some(0));
    fake.shutdown().await;
}

/// Answers every connection with a 200 whose body is not JSON.
#[tokio::test]
async fn every_status_and_fault_lands_in_its_class() {
    let fake = fake().await;
    let registry = Registry::new();
    let metrics = VitallyMetrics::new(&registry).unwrap();
    // A 2xx that is not the documented JSON, and a port nobody listens on: both
    // listed, as an operator would to reach them.
    let garbage = thena_testkit::target::TcpTarget::http("200 OK", "<html>maintenance</html>")
        .await
        .unwrap();
    let garbage_url = format!("http://{}", garbage.addr());
    let allowed = common::allowing(&fake)
        .with("http://127.0.0.1:1")
        .and_then(|list| list.with(&garbage_url))
        .unwrap();
    let http = VitallyHttp::new(Duration::from_millis(400), allowed, metrics.clone()).unwrap();
    let auth = SecretString::from(fake.auth_header());
    let client = http.client(&fake.base_url(), auth.clone(), "T-faults");
    let objects = "/resources/customObjects";

    let table: [(u16, ErrorClass); 8] = [
        (500, ErrorClass::Transient),
        (503, ErrorClass::Transient),
        (408, ErrorClass::Transient),
        (400, ErrorClass::Permanent),
        (401, ErrorClass::Permanent),
        (403, ErrorClass::Permanent),
        (404, ErrorClass::Permanent),
        (422, ErrorClass::Permanent),
    ];
    for (status, class) in table {
        fake.inject(Fault::NextN {
            method: None,
            path_prefix: objects.into(),
            count: 1,
            kind: FaultKind::Status(status),
        });
        let err = client.custom_objects().await.unwrap_err();
        assert_eq!(err.status(), Some(status));
        assert_eq!(err.class(), class, "{status}");
        assert_eq!(err.endpoint(), "custom_objects.list");
        assert!(err.to_string().contains(&format!("HTTP {status}")), "{err}");
    }

    // An injected 429 says the window frees in one second.
    fake.inject(Fault::NextN {
        method: None,
        path_prefix: objects.into(),
        count: 1,
        kind: FaultKind::Status(429),
    });
    let err = client.custom_objects().await.unwrap_err();
    assert_eq!(
        err.class(),
        ErrorClass::RateLimited {
            reset: Duration::from_secs(1)
        }
    );

    // Slower than the client timeout.
    fake.inject(Fault::NextN {
        method: None,
        path_prefix: objects.into(),
        count: 1,
        kind: FaultKind::Latency(Duration::from_secs(2)),
    });
    let err = client.custom_objects().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(err.class(), ErrorClass::Transient);

    // Connection cut without an answer.
    fake.inject(Fault::NextN {
        method: None,
        path_prefix: objects.into(),
        count: 1,
        kind: FaultKind::Drop,
    });
    let err = client.custom_objects().await.unwrap_err();
    assert_eq!(err.status(), None, "{err}");
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");

    // A real 401: the fake does not know this key.
    let stranger = http.client(
        &fake.base_url(),
        SecretString::from("Basic d3Jvbmcta2V5Og=="),
        "T-faults",
    );
    let err = stranger.custom_objects().await.unwrap_err();
    assert_eq!(
        (err.status(), err.class()),
        (Some(401), ErrorClass::Permanent)
    );

    // Nobody listens on port 1.
    let nowhere = http.client("http://127.0.0.1:1", auth.clone(), "T-faults");
    let err = nowhere.custom_objects().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);

    // A 2xx that is not the documented JSON.
    let garbage = http.client(&garbage_url, auth.clone(), "T-faults");
    let err = garbage.custom_objects().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(err.to_string().contains("maintenance"), "{err}");

    // The client is still healthy afterwards.
    assert!(client.custom_objects().await.unwrap().is_empty());

    let count = |status: &str| {
        metrics
            .requests
            .with_label_values(&["custom_objects.list", status])
            .get()
    };
    assert_eq!(count("503"), 1);
    assert_eq!(count("timeout"), 1);
    assert_eq!(count("connect"), 1);
    assert_eq!(count("401"), 2);
    assert!(count("transport") >= 1);
    fake.shutdown().await;
}
