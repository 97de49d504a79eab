//! Connecting a workspace against the fake Vitally and a real Redis: the object and
//! its traits are provisioned once, adopted when present, and failures say what to fix.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{ACTOR, Scope, connect_request};
use fake_vitally::{FakeConfig, FakeVitally, Fixture, RunningFake, StateDump};
use serde_json::json;
use vitally_client::{
    integrations::IntegrationStore,
    provision::{self, ConnectError, Toggles},
    traits::{EXTRA_TRAITS, FIXED_TRAITS, FieldType, OBJECT_NAME, label},
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The traits the integration owns: the product doc's 20 fixed ones (with the built-in
/// name and the categories, its 22) plus the extra ones (Source).
const OWN: usize = FIXED_TRAITS.len() + EXTRA_TRAITS.len();

async fn fake() -> RunningFake {
    FakeVitally::spawn(FakeConfig::default())
        .await
        .expect("fake Vitally")
}

/// label → (type, path) of the one "Thena Requests" object in the fake.
fn provisioned(dump: &StateDump) -> BTreeMap<String, Vec<(String, String)>> {
    let objects: Vec<_> = dump
        .custom_objects
        .iter()
        .filter(|o| o.name == OBJECT_NAME)
        .collect();
    assert_eq!(objects.len(), 1, "exactly one {OBJECT_NAME} object");
    let mut fields: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for field in &objects[0].custom_fields {
        let ty = serde_json::to_value(field.field_type).unwrap();
        fields
            .entry(field.label.clone())
            .or_default()
            .push((ty.as_str().unwrap().to_owned(), field.path.clone()));
    }
    fields
}

async fn setup() -> (RunningFake, Scope, IntegrationStore) {
    let fake = fake().await;
    let redis = Scope::new();
    let store = redis.store(common::cipher()).await;
    (fake, redis, store)
}

#[tokio::test]
async fn connecting_an_empty_vitally_creates_the_object_with_every_trait() {
    let (fake, _redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let req = connect_request(
        &fake.base_url(),
        &fake.auth_header(),
        "T-empty",
        &["Product Area", "Region"],
    );
    let integration = common::connect(&http, &store, req).await.unwrap();

    let fields = provisioned(&fake.dump());
    assert_eq!(fields.len(), OWN + 2);
    for (label, ty) in FIXED_TRAITS.iter().chain(&EXTRA_TRAITS) {
        assert_eq!(fields[*label].len(), 1, "{label} once");
        assert_eq!(fields[*label][0].0, ty.as_str(), "{label}");
    }
    assert_eq!(fields["Product Area"][0].0, "string");
    assert_eq!(fields["Region"][0].0, "string");

    // Paths come from Vitally's answer, for every label.
    assert_eq!(integration.fields.len(), OWN + 2);
    for (label, versions) in &fields {
        let field = &integration.fields[label];
        assert_eq!(field.path, versions[0].1, "{label}");
        assert_eq!(field.field_type.as_str(), versions[0].0);
    }
    assert_eq!(
        integration.fields[label::REQUEST_ID].field_type,
        FieldType::Number
    );
    assert_eq!(
        integration.custom_object_id,
        fake.dump().custom_objects[0].id
    );
    assert_eq!(integration.api_url, fake.base_url());

    let stored = store.get("T-empty").await.unwrap().expect("stored");
    assert_eq!(stored.fields, integration.fields);
    assert_eq!(stored.established_at, integration.established_at);
    assert!(stored.push_requests && !stored.sync_threads);
    fake.shutdown().await;
}

#[tokio::test]
async fn connecting_twice_creates_no_duplicate_object_or_field() {
    let (fake, _redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let first = common::connect(
        &http,
        &store,
        connect_request(
            &fake.base_url(),
            &fake.auth_header(),
            "T-twice",
            &["Region"],
        ),
    )
    .await
    .unwrap();
    let mut again = connect_request(
        &fake.base_url(),
        &fake.auth_header(),
        "T-twice",
        &["Region", "Tier"],
    );
    again.sync_threads = true;
    let second = common::connect(&http, &store, again).await.unwrap();

    let fields = provisioned(&fake.dump());
    assert_eq!(fields.len(), OWN + 2);
    assert!(fields.values().all(|v| v.len() == 1), "no label twice");
    assert_eq!(fake.calls().route("POST /resources/customObjects"), 1);
    assert_eq!(fake.calls().route("PUT /resources/customObjects/:id"), 1);
    assert_eq!(second.custom_object_id, first.custom_object_id);
    assert_eq!(second.fields["Region"], first.fields["Region"]);
    assert!(second.fields.contains_key("Tier"));
    // Forward-only sync: reconnecting keeps the original start.
    assert_eq!(second.established_at, first.established_at);
    assert!(second.sync_threads);

    // A third connect with nothing new changes nothing in Vitally.
    common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-twice", &["Tier"]),
    )
    .await
    .unwrap();
    assert_eq!(fake.calls().route("PUT /resources/customObjects/:id"), 1);
    assert_eq!(provisioned(&fake.dump()).len(), OWN + 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn connecting_adopts_a_partial_object_adding_only_the_missing_traits() {
    let (fake, _redis, store) = setup().await;
    let fixture: Fixture = serde_json::from_value(json!({
        "customObjects": [
            {"name": "Something Else", "fields": [{"label": "Title", "type": "string"}]},
            {"name": OBJECT_NAME, "fields": [
                {"label": "Title", "type": "textarea"},
                {"label": "status", "type": "string"},
                {"label": "Region", "type": "string"}
            ]}
        ]
    }))
    .unwrap();
    fake.seed(fixture).unwrap();
    let before = provisioned(&fake.dump());
    let http = common::http(&fake, TIMEOUT);

    let integration = common::connect(
        &http,
        &store,
        connect_request(
            &fake.base_url(),
            &fake.auth_header(),
            "T-adopt",
            &["Region"],
        ),
    )
    .await
    .unwrap();

    let after = provisioned(&fake.dump());
    assert_eq!(fake.dump().custom_objects.len(), 2, "nothing new created");
    assert_eq!(fake.calls().route("POST /resources/customObjects"), 0);
    assert_eq!(after.len(), OWN + 1);
    assert!(after.values().all(|v| v.len() == 1));
    // "status" was made by hand in lower case: adopted, not duplicated as "Status".
    assert!(!after.contains_key("Status"));
    for label in ["Title", "status", "Region"] {
        assert_eq!(after[label], before[label], "{label} untouched");
        assert_eq!(integration.fields[label].path, before[label][0].1);
    }
    let adopted = fake
        .dump()
        .custom_objects
        .into_iter()
        .find(|o| o.name == OBJECT_NAME)
        .unwrap();
    assert_eq!(integration.custom_object_id, adopted.id);
    fake.shutdown().await;
}

#[tokio::test]
async fn reconnecting_an_integration_from_before_the_source_trait_adds_only_source() {
    let (fake, _redis, store) = setup().await;
    // What a connect before issue 21 left in Vitally: the product doc's traits and a category.
    let fields: Vec<_> = FIXED_TRAITS
        .iter()
        .map(|(label, ty)| json!({"label": label, "type": ty.as_str()}))
        .chain([json!({"label": "Region", "type": "string"})])
        .collect();
    fake.seed(
        serde_json::from_value(json!({"customObjects": [{"name": OBJECT_NAME, "fields": fields}]}))
            .unwrap(),
    )
    .unwrap();
    let http = common::http(&fake, TIMEOUT);
    let request = || connect_request(&fake.base_url(), &fake.auth_header(), "T-old", &["Region"]);

    let connected = provision::connect(&http, &store, request(), ACTOR)
        .await
        .unwrap();
    assert_eq!(connected.traits_added, [label::SOURCE]);
    let fields = provisioned(&fake.dump());
    assert_eq!(fields.len(), OWN + 1);
    assert_eq!(
        fields[label::SOURCE],
        [("string".to_owned(), fields[label::SOURCE][0].1.clone())]
    );
    assert_eq!(
        connected.integration.fields[label::SOURCE].path,
        fields[label::SOURCE][0].1
    );

    // Connected already: a second reconnect has nothing left to add.
    let again = provision::connect(&http, &store, request(), ACTOR)
        .await
        .unwrap();
    assert!(again.traits_added.is_empty(), "{:?}", again.traits_added);
    assert_eq!(fake.calls().route("PUT /resources/customObjects/:id"), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_rejected_auth_header_says_vitally_rejected_it_and_stores_nothing() {
    let (fake, _redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let err = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), "Basic bm90LXRoZS1rZXk6", "T-bad", &[]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ConnectError::Unauthorized { status: 401 }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("Vitally rejected the auth header (HTTP 401)"),
        "{message}"
    );
    assert!(message.contains("REST API settings"));
    assert!(!message.contains("bm90LXRoZS1rZXk6"));
    assert!(store.get("T-bad").await.unwrap().is_none());
    assert!(fake.dump().custom_objects.is_empty());
    fake.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_or_malformed_url_is_reported_before_anything_is_stored() {
    let redis = Scope::new();
    let store = redis.store(common::cipher()).await;
    let http = common::http_allowing(&["http://127.0.0.1:1"], TIMEOUT);
    let err = common::connect(
        &http,
        &store,
        connect_request("http://127.0.0.1:1", "Basic eDo=", "T-far", &[]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("could not reach a Vitally API at that URL"),
        "{err}"
    );

    for bad in [
        "not a url",
        "ftp://vitally.example",
        "https://k:s@acme.rest.vitally.io",
    ] {
        let err = common::connect(
            &http,
            &store,
            connect_request(bad, "Basic eDo=", "T-far", &[]),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ConnectError::InvalidUrl(_)), "{bad}: {err:?}");
    }
    assert!(store.get("T-far").await.unwrap().is_none());
}

#[tokio::test]
async fn ensure_field_adds_a_missing_trait_once_and_records_its_path() {
    let (fake, _redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let integration = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-ensure", &[]),
    )
    .await
    .unwrap();
    assert!(!integration.fields.contains_key("Escalation"));

    let added = provision::ensure_field(&http, &store, &integration, "Escalation", ACTOR)
        .await
        .unwrap();
    // The caller may still hold the old record: a repeat must not add it again.
    let again = provision::ensure_field(&http, &store, &integration, "Escalation", ACTOR)
        .await
        .unwrap();
    assert_eq!(added, again);
    assert_eq!(added.field_type, FieldType::String);

    let fields = provisioned(&fake.dump());
    assert_eq!(fields["Escalation"].len(), 1);
    assert_eq!(fields["Escalation"][0].1, added.path);
    let stored = store.get("T-ensure").await.unwrap().unwrap();
    assert_eq!(stored.fields["Escalation"], added);
    assert_eq!(stored.fields.len(), OWN + 1);

    // An existing fixed trait comes back without any write to Vitally.
    let puts = fake.calls().route("PUT /resources/customObjects/:id");
    let title = provision::ensure_field(&http, &store, &integration, label::TITLE, ACTOR)
        .await
        .unwrap();
    assert_eq!(title, integration.fields[label::TITLE]);
    assert_eq!(fake.calls().route("PUT /resources/customObjects/:id"), puts);
    fake.shutdown().await;
}

#[tokio::test]
async fn toggles_change_the_stored_record_and_disconnect_removes_it() {
    let (fake, _redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let connected = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-admin", &[]),
    )
    .await
    .unwrap();

    let changed = provision::set_toggles(
        &store,
        "T-admin",
        Toggles {
            push_requests: Some(false),
            auto_create_fields: Some(true),
            rate_budget_per_min: Some(120),
            ..Toggles::default()
        },
        ACTOR,
    )
    .await
    .unwrap()
    .0;
    assert!(!changed.push_requests && changed.update_requests);
    assert!(changed.auto_create_fields);
    assert_eq!(changed.rate_budget_per_min, 120);
    let stored = store.get("T-admin").await.unwrap().unwrap();
    assert!(!stored.push_requests);
    assert_eq!(stored.fields, connected.fields);

    let refused = provision::set_toggles(
        &store,
        "T-admin",
        Toggles {
            rate_budget_per_min: Some(0),
            ..Toggles::default()
        },
        ACTOR,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(refused, ConnectError::InvalidSetting(_)),
        "{refused:?}"
    );

    assert!(
        provision::disconnect(&store, "T-admin", ACTOR)
            .await
            .unwrap()
    );
    assert!(
        !provision::disconnect(&store, "T-admin", ACTOR)
            .await
            .unwrap()
    );
    assert!(store.get("T-admin").await.unwrap().is_none());
    let err = provision::set_toggles(&store, "T-admin", Toggles::default(), ACTOR)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::NotConnected(_)), "{err:?}");
    fake.shutdown().await;
}

#[tokio::test]
async fn reconnecting_after_a_key_rotation_replaces_the_record_and_keeps_its_start() {
    let (fake, redis, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let first = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-rotate", &[]),
    )
    .await
    .unwrap();

    let rotated = redis.store(common::cipher()).await;
    assert!(
        rotated.get("T-rotate").await.is_err(),
        "old record unreadable"
    );
    let second = common::connect(
        &http,
        &rotated,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-rotate", &[]),
    )
    .await
    .unwrap();
    assert_eq!(second.established_at, first.established_at);
    assert_eq!(second.custom_object_id, first.custom_object_id);
    let readable = rotated
        .get("T-rotate")
        .await
        .unwrap()
        .expect("re-encrypted");
    assert_eq!(readable.fields, first.fields);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_same_named_field_of_another_type_is_reported_not_duplicated() {
    let (fake, _redis, store) = setup().await;
    let fixture: Fixture = serde_json::from_value(json!({
        "customObjects": [{"name": OBJECT_NAME, "fields": [{"label": "Escalation", "type": "boolean"}]}]
    }))
    .unwrap();
    fake.seed(fixture).unwrap();
    let http = common::http(&fake, TIMEOUT);
    let integration = common::connect(
        &http,
        &store,
        connect_request(&fake.base_url(), &fake.auth_header(), "T-typed", &[]),
    )
    .await
    .unwrap();
    assert!(!integration.fields.contains_key("Escalation"));

    let err = provision::ensure_field(&http, &store, &integration, "escalation", ACTOR)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectError::UnsupportedFieldType { field_type, .. } if field_type == "boolean"),
        "{err:?}"
    );
    let err = common::connect(
        &http,
        &store,
        connect_request(
            &fake.base_url(),
            &fake.auth_header(),
            "T-typed",
            &["Escalation"],
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("\"Escalation\" has type boolean"),
        "{err}"
    );
    assert_eq!(provisioned(&fake.dump())["Escalation"].len(), 1);
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_simultaneous_connects_of_one_workspace_leave_exactly_one_object() {
    let (fake, scope, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let connects = (0..5).map(|_| {
        let req = connect_request(&fake.base_url(), &fake.auth_header(), "T-race", &["Region"]);
        common::connect(&http, &store, req)
    });
    let results = futures_util::future::join_all(connects).await;
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    let dump = fake.dump();
    provisioned(&dump); // asserts exactly one object
    let history = store.history("T-race", 100).await.unwrap();
    let actions: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "connected",
            "reconnected",
            "reconnected",
            "reconnected",
            "reconnected"
        ]
    );
    assert_eq!(history[0].changes["object"], "created");
    assert!(
        history[1..]
            .iter()
            .all(|h| h.changes["object"] == "adopted")
    );
    fake.shutdown().await;
    scope.cleanup().await;
}

#[tokio::test]
async fn a_second_workspace_connecting_the_same_vitally_is_refused_naming_the_first() {
    let (fake, scope, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let first = connect_request(&fake.base_url(), &fake.auth_header(), "T-first", &[]);
    common::connect(&http, &store, first).await.unwrap();
    fake.reset_calls();

    let second = connect_request(&fake.base_url(), &fake.auth_header(), "T-second", &[]);
    let err = common::connect(&http, &store, second).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::AlreadyConnected { workspace } if workspace == "T-first"),
        "{err:?}"
    );
    assert!(err.to_string().contains("T-first"), "{err}");
    assert_eq!(fake.calls().total, 0, "refused before any call to Vitally");
    assert!(store.get("T-second").await.unwrap().is_none());

    // Once the first workspace disconnects, the Vitally is free again.
    assert!(
        provision::disconnect(&store, "T-first", ACTOR)
            .await
            .unwrap()
    );
    let again = connect_request(&fake.base_url(), &fake.auth_header(), "T-second", &[]);
    common::connect(&http, &store, again).await.unwrap();
    fake.shutdown().await;
    scope.cleanup().await;
}

#[tokio::test]
async fn a_reconnect_after_a_disconnect_keeps_established_at_unless_an_operator_sets_it() {
    let (fake, scope, store) = setup().await;
    let http = common::http(&fake, TIMEOUT);
    let req = || connect_request(&fake.base_url(), &fake.auth_header(), "T-fwd", &[]);
    let first = common::connect(&http, &store, req()).await.unwrap();
    assert!(provision::disconnect(&store, "T-fwd", ACTOR).await.unwrap());
    let again = common::connect(&http, &store, req()).await.unwrap();
    assert_eq!(
        again.established_at, first.established_at,
        "never widened by accident"
    );

    let chosen = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00.123Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut explicit = req();
    explicit.established_at = Some(chosen);
    let moved = common::connect(&http, &store, explicit).await.unwrap();
    assert_eq!(moved.established_at, chosen);
    let history = store.history("T-fwd", 100).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.changes["established_at_set"], true);
    assert!(
        last.changes["established_at"]["to"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T00:00:00.123")
    );
    fake.shutdown().await;
    scope.cleanup().await;
}

/// A host the allow-list names whose name resolves to a loopback address (DNS rebinding,
/// or a record pointing inside): refused at resolution, at connect and at every later
/// call, and no connection is opened. Listed as an origin, the same name is reached.
#[tokio::test]
async fn a_listed_name_that_resolves_to_loopback_is_refused_at_every_call_without_a_connection() {
    let target = thena_testkit::target::TcpTarget::http("200 OK", "{\"results\":[]}")
        .await
        .unwrap();
    let port = target.port();
    let redis = Scope::new();
    let store = redis.store(common::cipher()).await;
    // `localhost:PORT` alone means https to a public address; /etc/hosts says 127.0.0.1.
    let entry = format!("localhost:{port}");
    let http = common::http_allowing(&[&entry], TIMEOUT);
    let url = format!("https://localhost:{port}");
    let err = common::connect(
        &http,
        &store,
        connect_request(&url, "Basic eDo=", "T-rebind", &[]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::InvalidUrl(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("localhost resolved to")
            && message.contains("a loopback address: refused"),
        "{message}"
    );
    // A consumer's later call with a stored record goes through the same resolver.
    let client = http.client(&url, secrecy::SecretString::from("Basic eDo="), "T-rebind");
    let call = client.custom_objects().await.unwrap_err();
    assert_eq!(
        call.kind(),
        vitally_client::error::ErrorKind::Refused,
        "{call}"
    );
    // And a URL the list does not name is refused before resolution.
    let elsewhere = http.client(
        &format!("https://127.0.0.1:{port}"),
        secrecy::SecretString::from("Basic eDo="),
        "T-rebind",
    );
    let call = elsewhere.custom_objects().await.unwrap_err();
    assert_eq!(
        call.kind(),
        vitally_client::error::ErrorKind::Refused,
        "{call}"
    );
    assert_eq!(target.accepted(), 0, "a refused call reached the listener");
    assert!(store.get("T-rebind").await.unwrap().is_none());

    // The operator vouches for the origin: the same name is called (the listener counts).
    let origin = format!("http://localhost:{port}");
    let vouched = common::http_allowing(&[&origin], TIMEOUT);
    let client = vouched.client(
        &origin,
        secrecy::SecretString::from("Basic eDo="),
        "T-rebind",
    );
    client
        .custom_objects()
        .await
        .expect("the listed origin answers");
    assert!(target.accepted() >= 1);
    redis.cleanup().await;
}
