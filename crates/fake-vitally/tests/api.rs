//! The fake over real HTTP: every endpoint, the error cases clients must handle,
//! the rate limit and each kind of fault. Each test runs its own fake.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use fake_vitally::{
    AccountSeed, CallCounts, CustomObjectSeed, FakeConfig, FakeVitally, Fault, FaultKind,
    FieldSeed, FieldType, Fixture, InstanceSeed, OrganizationSeed, RunningFake, StateDump,
};
use reqwest::{Client, Method, header::HeaderMap};
use serde_json::{Value, json};

const ORGS: &str = "/resources/organizations";

/// One response, read completely.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    fn ids(&self) -> Vec<String> {
        self.body["results"]
            .as_array()
            .unwrap_or_else(|| panic!("no results in {}", self.body))
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Asserts a 200 and hands back the body.
    fn ok(self) -> Value {
        assert_eq!(self.status, 200, "{}", self.body);
        self.body
    }
}

struct Harness {
    fake: RunningFake,
    http: Client,
}

impl Harness {
    async fn start() -> Self {
        Self::with(FakeConfig::default()).await
    }

    async fn with(config: FakeConfig) -> Self {
        let fake = FakeVitally::spawn(config).await.expect("the fake starts");
        Self {
            fake,
            http: client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.fake.base_url())
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("Authorization", self.fake.auth_header())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("a response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a complete body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    async fn get_query(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(Method::POST, path).json(&body))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(self.request(Method::PUT, path).json(&body)).await
    }

    /// An admin call: no Authorization header.
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn organization(&self, external_id: &str) -> String {
        let body = self
            .post(
                ORGS,
                json!({"externalId": external_id, "name": external_id}),
            )
            .await
            .ok();
        id_of(&body)
    }

    async fn account(&self, external_id: &str, organization_id: Option<&str>) -> String {
        let body = self
            .post(
                "/resources/accounts",
                json!({"externalId": external_id, "name": external_id, "organizationId": organization_id}),
            )
            .await
            .ok();
        id_of(&body)
    }

    /// A "requests" object with the fields the sync writes, and its id.
    async fn requests_object(&self) -> String {
        let body = self
            .post(
                "/resources/customObjects",
                json!({
                    "name": "thenaRequests",
                    "label": "Thena Requests",
                    "customFields": [
                        {"label": "Status", "type": "string", "model": "CustomObject"},
                        {"label": "Priority Score", "type": "number", "model": "CustomObject"},
                        {"label": "Opened At", "type": "datetime", "model": "CustomObject"},
                        {"label": "Escalated", "type": "boolean", "model": "CustomObject"},
                        {"label": "Summary", "type": "textarea", "model": "CustomObject"}
                    ]
                }),
            )
            .await
            .ok();
        id_of(&body)
    }
}

/// reqwest is built without a default TLS provider; plain HTTP never uses it, but
/// building a client requires one installed.
fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder().build().expect("an HTTP client")
}

fn id_of(body: &Value) -> String {
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_owned()
}

/// Polls `probe` until it returns `Some`, failing the test after `deadline`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    deadline: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- auth ---

#[tokio::test]
async fn a_missing_or_wrong_authorization_header_is_rejected_with_401() {
    let h = Harness::start().await;

    let missing = h.admin(Method::GET, ORGS, None).await;
    assert_eq!(missing.status, 401);
    assert!(!missing.error().is_empty(), "{}", missing.body);
    assert!(missing.headers.get("ratelimit-remaining").is_none());

    let wrong = h
        .send(
            h.http
                .get(h.url(ORGS))
                .header("Authorization", "Basic d3Jvbmc6"),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.error().is_empty(), "{}", wrong.body);

    h.get(ORGS).await.ok();
    assert_eq!(h.fake.calls().status(401), 2);
}

#[tokio::test]
async fn an_added_auth_header_is_accepted_and_rate_limited_on_its_own() {
    let h = Harness::start().await;
    let other = "Basic b3RoZXIta2V5Og==";
    let before = h
        .send(h.http.get(h.url(ORGS)).header("Authorization", other))
        .await;
    assert_eq!(before.status, 401);

    let added = h
        .admin(
            Method::POST,
            "/_fake/auth-headers",
            Some(json!({"header": other})),
        )
        .await;
    assert_eq!(added.status, 204);
    let limited = h
        .admin(
            Method::PUT,
            "/_fake/rate-limit",
            Some(json!({"limit": 1, "window_ms": 60_000})),
        )
        .await;
    assert_eq!(limited.status, 204);

    // Each key gets its own single request per window.
    h.get(ORGS).await.ok();
    assert_eq!(h.get(ORGS).await.status, 429);
    let with_other = h
        .send(h.http.get(h.url(ORGS)).header("Authorization", other))
        .await;
    assert_eq!(with_other.status, 200, "{}", with_other.body);
    assert_eq!(with_other.header("ratelimit-limit"), "1, 1;window=60");
}

#[tokio::test]
async fn a_rotated_key_rejects_the_old_header_and_accepts_the_new_one() {
    let h = Harness::start().await;
    assert_eq!(h.get(ORGS).await.status, 200);
    let old = h.fake.auth_header();
    let new = "Basic bmV3LWtleTo=";
    let rotated = h
        .admin(
            Method::PUT,
            "/_fake/auth-headers",
            Some(json!({"header": new})),
        )
        .await;
    assert_eq!(rotated.status, 204);
    let with_old = h
        .send(h.http.get(h.url(ORGS)).header("Authorization", old))
        .await;
    assert_eq!(with_old.status, 401, "the old header is revoked");
    let with_new = h
        .send(h.http.get(h.url(ORGS)).header("Authorization", new))
        .await;
    assert_eq!(with_new.status, 200, "{}", with_new.body);
    let empty = h
        .admin(
            Method::PUT,
            "/_fake/auth-headers",
            Some(json!({"header": " "})),
        )
        .await;
    assert_eq!(empty.status, 400);
}

#[tokio::test]
async fn a_custom_object_deleted_in_the_ui_answers_404_with_its_instances_gone() {
    let h = Harness::start().await;
    let object = h.requests_object().await;
    let org = h.organization("acme").await;
    let instances = format!("/resources/customObjects/{object}/instances");
    let created = h
        .post(
            &instances,
            json!({"name": "r1", "externalId": "x1", "organizationId": org, "traits": {}}),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let deleted = h
        .admin(
            Method::DELETE,
            &format!("/_fake/custom-objects/{object}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert!(h.fake.instances().is_empty());
    let search = h
        .get_query(&format!("{instances}/search"), &[("externalId", "x1")])
        .await;
    assert_eq!(search.status, 404);
    let again = h
        .admin(
            Method::DELETE,
            &format!("/_fake/custom-objects/{object}"),
            None,
        )
        .await;
    assert_eq!(again.status, 404);
}

#[tokio::test]
async fn an_unknown_resource_path_is_a_404_only_after_authentication() {
    let h = Harness::start().await;
    assert_eq!(
        h.admin(Method::GET, "/resources/nope", None).await.status,
        401
    );
    let reply = h.get("/resources/nope").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, json!({"error": "not found"}));
}

// --- organizations and accounts ---

#[tokio::test]
async fn organizations_are_created_fetched_by_id_or_external_id_updated_and_listed() {
    let h = Harness::start().await;
    for (body, problem) in [
        (json!({"name": "Acme"}), "externalId"),
        (json!({"externalId": "acme"}), "name"),
    ] {
        let reply = h.post(ORGS, body).await;
        assert_eq!(reply.status, 400);
        assert!(reply.error().contains(problem), "{}", reply.body);
    }

    let created = h
        .post(
            ORGS,
            json!({"externalId": "acme", "name": "Acme", "traits": {"tier": "gold", "seats": 5}}),
        )
        .await
        .ok();
    let id = id_of(&created);
    assert_eq!(created["externalId"], "acme");
    assert!(
        created["createdAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(
        h.post(ORGS, json!({"externalId": "acme", "name": "Again"}))
            .await
            .status,
        400
    );

    assert_eq!(h.get(&format!("{ORGS}/{id}")).await.ok(), created);
    assert_eq!(h.get(&format!("{ORGS}/acme")).await.ok(), created);
    let missing = h.get(&format!("{ORGS}/nobody")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body, json!({"error": "not found"}));

    let updated = h
        .put(
            &format!("{ORGS}/{id}"),
            json!({"name": "Acme Inc", "traits": {"seats": 6, "tier": null, "region": "eu"}}),
        )
        .await
        .ok();
    assert_eq!(updated["name"], "Acme Inc");
    assert_eq!(updated["traits"], json!({"seats": 6, "region": "eu"}));
    assert_eq!(
        h.put(&format!("{ORGS}/nobody"), json!({})).await.status,
        404
    );

    let list = h.get(ORGS).await;
    assert_eq!(list.ids(), [id]);
    assert_eq!(list.body["next"], Value::Null);
}

#[tokio::test]
async fn accounts_belong_to_existing_organizations_and_list_their_users() {
    let h = Harness::start().await;
    let org = h.organization("org-1").await;

    let unknown = h
        .post(
            "/resources/accounts",
            json!({"externalId": "a", "name": "A", "organizationId": "no-such-org"}),
        )
        .await;
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.error().contains("organizationId"),
        "{}",
        unknown.body
    );
    let by_external = h
        .post(
            "/resources/accounts",
            json!({"externalId": "a", "name": "A", "organizationId": "org-1"}),
        )
        .await;
    assert_eq!(by_external.status, 400);
    assert!(
        by_external.error().contains("externalId"),
        "{}",
        by_external.body
    );
    assert_eq!(
        h.post("/resources/accounts", json!({"name": "A"}))
            .await
            .status,
        400
    );

    let account = h.account("acct-1", Some(&org)).await;
    let lone = h.account("acct-2", None).await;
    let fetched = h.get(&format!("/resources/accounts/{account}")).await.ok();
    assert_eq!(fetched["organizationId"], org.as_str());
    assert_eq!(h.get("/resources/accounts/acct-1").await.ok(), fetched);
    assert_eq!(h.get("/resources/accounts/nobody").await.status, 404);

    let updated = h
        .put(
            &format!("/resources/accounts/{lone}"),
            json!({"name": "Renamed", "organizationId": org, "traits": {"mrr": 10}}),
        )
        .await
        .ok();
    assert_eq!(updated["name"], "Renamed");
    assert_eq!(updated["organizationId"], org.as_str());
    assert_eq!(updated["traits"], json!({"mrr": 10}));

    assert_eq!(
        h.get("/resources/accounts").await.ids(),
        [account.as_str(), lone.as_str()]
    );
    assert_eq!(
        h.get(&format!("{ORGS}/{org}/accounts")).await.ids(),
        [account.as_str(), lone.as_str()]
    );
    assert_eq!(h.get(&format!("{ORGS}/org-1/accounts")).await.status, 200);
    assert_eq!(h.get(&format!("{ORGS}/nobody/accounts")).await.status, 404);

    let user = h
        .post(
            "/resources/users",
            json!({"externalId": "u1", "email": "u1@acme.test", "accountIds": [account]}),
        )
        .await
        .ok();
    assert_eq!(
        h.get(&format!("/resources/accounts/{account}/users"))
            .await
            .ids(),
        [id_of(&user)]
    );
    assert!(
        h.get(&format!("/resources/accounts/{lone}/users"))
            .await
            .ids()
            .is_empty()
    );
    assert_eq!(h.get("/resources/accounts/nobody/users").await.status, 404);
}

// --- users ---

#[tokio::test]
async fn creating_a_user_requires_an_external_id_and_existing_account_or_organization_ids() {
    let h = Harness::start().await;
    let org = h.organization("org").await;
    let account = h.account("acct", None).await;

    for (body, problem) in [
        (
            json!({"name": "No Id", "accountIds": [account]}),
            "externalId",
        ),
        (json!({"externalId": "u"}), "accountIds or organizationIds"),
        (
            json!({"externalId": "u", "accountIds": [], "organizationIds": []}),
            "accountIds or organizationIds",
        ),
        (
            json!({"externalId": "u", "accountIds": ["missing"]}),
            "accountIds",
        ),
        (
            json!({"externalId": "u", "accountIds": ["acct"]}),
            "externalId",
        ),
        (
            json!({"externalId": "u", "organizationIds": ["missing"]}),
            "organizationIds",
        ),
    ] {
        let reply = h.post("/resources/users", body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        assert!(reply.error().contains(problem), "{body}: {}", reply.body);
    }
    assert!(h.fake.dump().users.is_empty());

    let user = h
        .post(
            "/resources/users",
            json!({"externalId": "u", "organizationIds": [org]}),
        )
        .await
        .ok();
    assert_eq!(user["organizationIds"], json!([org]));
    assert_eq!(user["accountIds"], json!([]));
    assert_eq!(user["email"], Value::Null);
}

#[tokio::test]
async fn posting_a_user_again_with_the_same_external_id_updates_that_user() {
    let h = Harness::start().await;
    let first = h.account("first", None).await;
    let second = h.account("second", None).await;
    let created = h
        .post(
            "/resources/users",
            json!({"externalId": "u", "name": "Ann", "accountIds": [first], "traits": {"a": 1}}),
        )
        .await
        .ok();
    let again = h
        .post(
            "/resources/users",
            json!({"externalId": "u", "email": "ann@x.test", "accountIds": [second], "traits": {"b": 2}}),
        )
        .await
        .ok();

    assert_eq!(again["id"], created["id"]);
    assert_eq!(again["name"], "Ann");
    assert_eq!(again["email"], "ann@x.test");
    assert_eq!(again["accountIds"], json!([second]));
    assert_eq!(again["traits"], json!({"a": 1, "b": 2}));
    assert_eq!(h.fake.dump().users.len(), 1);
}

#[tokio::test]
async fn updating_a_user_merges_traits_and_replaces_the_fields_given() {
    let h = Harness::start().await;
    let first = h.account("first", None).await;
    let second = h.account("second", None).await;
    let user = h
        .post(
            "/resources/users",
            json!({"externalId": "u", "name": "Ann", "accountIds": [first], "traits": {"a": 1, "b": 2}}),
        )
        .await
        .ok();
    let path = format!("/resources/users/{}", id_of(&user));

    let updated = h
        .put(
            &path,
            json!({"email": "Ann@X.test", "accountIds": [first, second], "traits": {"a": null, "c": 3}}),
        )
        .await
        .ok();
    assert_eq!(updated["name"], "Ann");
    assert_eq!(updated["email"], "Ann@X.test");
    assert_eq!(updated["accountIds"], json!([first, second]));
    assert_eq!(updated["traits"], json!({"b": 2, "c": 3}));

    assert_eq!(
        h.put(&path, json!({"accountIds": ["missing"]}))
            .await
            .status,
        400
    );
    assert_eq!(h.put(&path, json!({"accountIds": []})).await.status, 400);
    assert_eq!(
        h.put("/resources/users/u", json!({"name": "By external id"}))
            .await
            .ok()["name"],
        "By external id"
    );
    assert_eq!(
        h.put("/resources/users/nobody", json!({})).await.status,
        404
    );
}

#[tokio::test]
async fn user_search_matches_email_ignoring_case_external_id_and_email_domain() {
    let h = Harness::start().await;
    let account = h.account("acct", None).await;
    let mut ids = Vec::new();
    for (external_id, email) in [
        ("u1", "ann+tag@Acme.test"),
        ("u2", "bob@acme.test"),
        ("u3", "cy@other.test"),
    ] {
        let user = h
            .post(
                "/resources/users",
                json!({"externalId": external_id, "email": email, "accountIds": [account]}),
            )
            .await
            .ok();
        ids.push(id_of(&user));
    }
    let search = "/resources/users/search";

    let by_email = h.get_query(search, &[("email", "ANN+TAG@acme.test")]).await;
    assert_eq!(by_email.ids(), [ids[0].as_str()]);
    assert_eq!(by_email.body["next"], Value::Null);
    assert_eq!(
        h.get_query(search, &[("externalId", "u2")]).await.ids(),
        [ids[1].as_str()]
    );
    assert_eq!(
        h.get_query(search, &[("emailSubdomain", "ACME.test")])
            .await
            .ids(),
        [ids[0].as_str(), ids[1].as_str()]
    );
    assert!(
        h.get_query(search, &[("email", "nobody@acme.test")])
            .await
            .ids()
            .is_empty()
    );
}

#[tokio::test]
async fn user_search_needs_exactly_one_search_parameter() {
    let h = Harness::start().await;
    let search = "/resources/users/search";
    for query in [
        vec![],
        vec![("limit", "5")],
        vec![("email", "a@b.test"), ("externalId", "x")],
        vec![("email", "a@b.test"), ("email", "c@d.test")],
    ] {
        let reply = h.get_query(search, &query).await;
        assert_eq!(reply.status, 400, "{query:?}");
        assert!(reply.error().contains("exactly one"), "{}", reply.body);
    }
}

// --- custom objects and fields ---

#[tokio::test]
async fn custom_object_fields_get_paths_from_their_labels_and_adding_one_twice_duplicates_it() {
    let h = Harness::start().await;
    let created = h
        .post(
            "/resources/customObjects",
            json!({
                "name": "requests",
                "customFields": [
                    {"label": "Thena Request Id", "type": "string", "model": "CustomObject"},
                    {"label": "AI Tags", "type": "textarea", "model": "CustomObject"}
                ]
            }),
        )
        .await
        .ok();
    let id = id_of(&created);
    assert_eq!(created["label"], "requests");
    let paths: Vec<&Value> = created["customFields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| &f["path"])
        .collect();
    assert_eq!(
        paths,
        ["vitally.custom.thenaRequestId", "vitally.custom.aiTags"]
    );

    let updated = h
        .put(
            &format!("/resources/customObjects/{id}"),
            json!({"customFields": [
                {"label": "AI Tags", "type": "textarea", "model": "CustomObject"},
                {"label": "Amount", "type": "number", "model": "CustomObject"}
            ]}),
        )
        .await
        .ok();
    assert_eq!(updated["customFields"].as_array().map(Vec::len), Some(4));

    let fields = h
        .get_query(
            "/resources/customFields",
            &[("model", "customObjects"), ("customObjectId", &id)],
        )
        .await
        .ok();
    let listed: Vec<(&str, &str, &str)> = fields
        .as_array()
        .expect("a bare array")
        .iter()
        .map(|f| {
            assert!(f["id"].is_string() && f["createdAt"].is_string(), "{f}");
            (
                f["label"].as_str().unwrap_or_default(),
                f["type"].as_str().unwrap_or_default(),
                f["path"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("AI Tags", "textarea", "vitally.custom.aiTags"),
            ("AI Tags", "textarea", "vitally.custom.aiTags2"),
            ("Amount", "number", "vitally.custom.amount"),
            (
                "Thena Request Id",
                "string",
                "vitally.custom.thenaRequestId"
            ),
        ]
    );

    let list = h.get("/resources/customObjects").await;
    assert_eq!(list.ids(), [id.as_str()]);
    assert_eq!(list.body["next"], Value::Null);
}

#[tokio::test]
async fn invalid_custom_objects_and_field_queries_are_rejected() {
    let h = Harness::start().await;
    let id = h.requests_object().await;
    for body in [
        json!({"label": "No name"}),
        json!({"name": "thenaRequests"}),
        json!({"name": "other", "customFields": [{"label": "X", "type": "picklist"}]}),
        json!({"name": "other", "customFields": [{"label": "X", "type": "string", "model": "Account"}]}),
        json!({"name": "other", "customFields": [{"label": "", "type": "string"}]}),
    ] {
        let reply = h.post("/resources/customObjects", body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
    }
    assert_eq!(
        h.put("/resources/customObjects/nope", json!({"customFields": []}))
            .await
            .status,
        404
    );

    let fields = "/resources/customFields";
    assert_eq!(
        h.get_query(fields, &[("model", "customObjects")])
            .await
            .status,
        400
    );
    assert_eq!(
        h.get_query(fields, &[("customObjectId", &id)]).await.status,
        400
    );
    assert_eq!(
        h.get_query(
            fields,
            &[("model", "customObjects"), ("customObjectId", "nope")]
        )
        .await
        .status,
        404
    );
}

// --- instances ---

#[tokio::test]
async fn instances_are_created_found_by_each_search_key_and_updated_by_merging_traits() {
    let h = Harness::start().await;
    let org = h.organization("org").await;
    let account = h.account("acct", Some(&org)).await;
    let object = h.requests_object().await;
    let instances = format!("/resources/customObjects/{object}/instances");

    let created = h
        .post(
            &instances,
            json!({
                "name": "Request 1",
                "externalId": "req-1",
                "customerId": account,
                "traits": {
                    "vitally.custom.status": "open",
                    "vitally.custom.priorityScore": 3,
                    "vitally.custom.openedAt": "2024-05-01T10:00:00+02:00",
                    "vitally.custom.escalated": false,
                    "vitally.custom.summary": null
                }
            }),
        )
        .await
        .ok();
    let id = id_of(&created);
    assert_eq!(created["customObjectId"], object.as_str());
    assert_eq!(created["organizationId"], Value::Null);
    assert_eq!(created["traits"].as_object().map(|t| t.len()), Some(4));
    let by_org = h
        .post(
            &instances,
            json!({"name": "Request 2", "externalId": "req-2", "organizationId": org}),
        )
        .await
        .ok();

    let search = format!("{instances}/search");
    assert_eq!(
        h.get_query(&search, &[("externalId", "req-1")]).await.ids(),
        [id.as_str()]
    );
    assert_eq!(
        h.get_query(&search, &[("id", &id)]).await.ids(),
        [id.as_str()]
    );
    assert_eq!(
        h.get_query(&search, &[("customerId", &account)])
            .await
            .ids(),
        [id.as_str()]
    );
    let found = h.get_query(&search, &[("organizationId", &org)]).await;
    assert_eq!(found.ids(), [id_of(&by_org)]);
    assert_eq!(found.body["next"], Value::Null);
    assert!(
        h.get_query(&search, &[("externalId", "nope")])
            .await
            .ids()
            .is_empty()
    );
    assert_eq!(h.get(&search).await.status, 400);
    assert_eq!(
        h.get_query(&search, &[("externalId", "req-1"), ("id", &id)])
            .await
            .status,
        400
    );
    assert_eq!(
        h.get_query(
            "/resources/customObjects/nope/instances/search",
            &[("id", &id)]
        )
        .await
        .status,
        404
    );

    let updated = h
        .put(
            &format!("{instances}/{id}"),
            json!({
                "name": "Request 1 (renamed)",
                "organizationId": org,
                "traits": {"vitally.custom.status": "closed", "vitally.custom.escalated": null}
            }),
        )
        .await
        .ok();
    assert_eq!(updated["name"], "Request 1 (renamed)");
    assert_eq!(updated["customerId"], account.as_str());
    assert_eq!(updated["organizationId"], org.as_str());
    assert_eq!(
        updated["traits"],
        json!({
            "vitally.custom.status": "closed",
            "vitally.custom.priorityScore": 3,
            "vitally.custom.openedAt": "2024-05-01T10:00:00+02:00"
        })
    );
    assert_eq!(
        h.fake.instances()[0].traits,
        *updated["traits"].as_object().expect("traits")
    );

    assert_eq!(
        h.put(&format!("{instances}/nope"), json!({})).await.status,
        404
    );
    assert_eq!(
        h.put(
            &format!("/resources/customObjects/nope/instances/{id}"),
            json!({})
        )
        .await
        .status,
        404
    );
    assert_eq!(
        h.post(
            "/resources/customObjects/nope/instances",
            json!({"name": "x", "externalId": "x", "customerId": account})
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn invalid_instances_are_rejected_with_a_400_naming_the_problem() {
    let h = Harness::start().await;
    let account = h.account("acct", None).await;
    let object = h.requests_object().await;
    let instances = format!("/resources/customObjects/{object}/instances");
    let valid = json!({"name": "R", "externalId": "r", "customerId": account});
    let with = |patch: Value| {
        let mut body = valid.clone();
        for (key, value) in patch.as_object().expect("an object") {
            body[key] = value.clone();
        }
        body
    };

    for (body, problem) in [
        (with(json!({"name": null})), "name"),
        (with(json!({"name": ""})), "name"),
        (with(json!({"externalId": null})), "externalId"),
        (
            with(json!({"customerId": null})),
            "customerId or organizationId",
        ),
        (with(json!({"customerId": "no-such-account"})), "customerId"),
        (with(json!({"customerId": "acct"})), "externalId"),
        (
            with(json!({"organizationId": "no-such-org"})),
            "organizationId",
        ),
        (
            with(json!({"traits": {"Status": "open"}})),
            "vitally.custom.status",
        ),
        (
            with(json!({"traits": {"vitally.custom.nope": "x"}})),
            "vitally.custom.nope",
        ),
        (
            with(json!({"traits": {"vitally.custom.priorityScore": "3"}})),
            "number",
        ),
        (
            with(json!({"traits": {"vitally.custom.openedAt": "2024-05-01T10:00:00"}})),
            "RFC 3339",
        ),
        (
            with(json!({"traits": {"vitally.custom.openedAt": 1714550400}})),
            "RFC 3339",
        ),
        (
            with(json!({"traits": {"vitally.custom.status": 1}})),
            "string",
        ),
        (
            with(json!({"traits": {"vitally.custom.escalated": "yes"}})),
            "boolean",
        ),
    ] {
        let reply = h.post(&instances, body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        assert!(reply.error().contains(problem), "{body}: {}", reply.body);
    }
    assert!(h.fake.instances().is_empty());

    let id = id_of(&h.post(&instances, valid).await.ok());
    let reply = h
        .put(
            &format!("{instances}/{id}"),
            json!({"traits": {"vitally.custom.status": "ok", "vitally.custom.priorityScore": "high"}}),
        )
        .await;
    assert_eq!(reply.status, 400);
    assert!(
        h.fake.instances()[0].traits.is_empty(),
        "a rejected PUT changes nothing"
    );
    let unlinked = h
        .put(&format!("{instances}/{id}"), json!({"customerId": null}))
        .await;
    assert_eq!(unlinked.status, 400);
}

#[tokio::test]
async fn an_instance_update_keeps_an_absent_link_clears_a_null_one_and_never_both() {
    let h = Harness::start().await;
    let org = h.organization("org").await;
    let other = h.organization("other").await;
    let account = h.account("acct", Some(&org)).await;
    let object = h.requests_object().await;
    let instances = format!("/resources/customObjects/{object}/instances");
    let id = id_of(
        &h.post(
            &instances,
            json!({"name": "R", "externalId": "r", "customerId": account, "organizationId": org}),
        )
        .await
        .ok(),
    );
    let links = |reply: &Value| {
        (
            reply["customerId"].as_str().map(str::to_owned),
            reply["organizationId"].as_str().map(str::to_owned),
        )
    };
    let path = format!("{instances}/{id}");
    let put = |body: Value| h.put(&path, body);

    let kept = put(json!({"traits": {}})).await.ok();
    assert_eq!(
        links(&kept),
        (Some(account.clone()), Some(org.clone())),
        "absent: kept"
    );
    let moved = put(json!({"organizationId": other, "customerId": null}))
        .await
        .ok();
    assert_eq!(
        links(&moved),
        (None, Some(other.clone())),
        "set and null: moved, cleared"
    );
    let refused = put(json!({"organizationId": null})).await;
    assert_eq!(refused.status, 400, "an instance keeps at least one link");
    assert!(refused.error().contains("customerId or organizationId"));
    assert_eq!(
        h.fake.instances()[0].organization_id.as_deref(),
        Some(other.as_str()),
        "a refused update changes nothing"
    );
}

// --- pagination ---

#[tokio::test]
async fn a_list_pages_through_every_item_with_limit_two_and_ends_with_a_null_next() {
    let h = Harness::start().await;
    let seeded: Vec<String> = (0..5).map(|n| format!("org-{n}")).collect();
    h.fake
        .seed(Fixture {
            organizations: seeded
                .iter()
                .map(|id| OrganizationSeed {
                    id: Some(id.clone()),
                    external_id: format!("ext-{id}"),
                    name: id.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .expect("seeded");

    let walk = |sort: &'static str| {
        let h = &h;
        async move {
            let mut seen = Vec::new();
            let mut pages = Vec::new();
            let mut from: Option<String> = None;
            loop {
                let mut query = vec![("limit", "2".to_owned()), ("sortBy", sort.to_owned())];
                if let Some(cursor) = &from {
                    query.push(("from", cursor.clone()));
                }
                let query: Vec<(&str, &str)> =
                    query.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let page = h.get_query(ORGS, &query).await;
                assert_eq!(page.status, 200, "{}", page.body);
                pages.push(page.ids().len());
                seen.extend(page.ids());
                match page.body["next"].as_str() {
                    Some(next) => from = Some(next.to_owned()),
                    None => return (pages, seen),
                }
                assert!(pages.len() < 10, "pagination does not end");
            }
        }
    };

    let (pages, seen) = walk("createdAt").await;
    assert_eq!(pages, [2, 2, 1]);
    assert_eq!(seen, seeded);

    // Updating the first organization moves it to the end in updatedAt order.
    h.put(&format!("{ORGS}/org-0"), json!({"name": "touched"}))
        .await
        .ok();
    let (pages, seen) = walk("updatedAt").await;
    assert_eq!(pages, [2, 2, 1]);
    assert_eq!(seen.last().map(String::as_str), Some("org-0"));
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seeded, "no duplicates or gaps");
}

#[tokio::test]
async fn bad_pagination_parameters_are_rejected() {
    let h = Harness::start().await;
    h.organization("one").await;
    let first = h.get_query(ORGS, &[("limit", "100")]).await.ok();
    assert_eq!(first["next"], Value::Null);
    for query in [
        [("limit", "101")],
        [("limit", "0")],
        [("limit", "ten")],
        [("sortBy", "name")],
        [("from", "not-a-cursor")],
    ] {
        let reply = h.get_query(ORGS, &query).await;
        assert_eq!(reply.status, 400, "{query:?}");
        assert!(!reply.error().is_empty());
    }
}

// --- rate limit ---

#[tokio::test]
async fn the_rate_limit_counts_down_then_answers_429_then_recovers_after_the_window() {
    let h = Harness::with(FakeConfig {
        rate_limit: 5,
        window: Duration::from_secs(1),
        ..FakeConfig::default()
    })
    .await;

    for remaining in (0..5).rev() {
        let reply = h.get(ORGS).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("ratelimit-limit"), "5, 5;window=1");
        assert_eq!(reply.header("ratelimit-remaining"), remaining.to_string());
        assert_eq!(reply.header("ratelimit-reset"), "1");
    }
    for _ in 0..2 {
        let limited = h.get(ORGS).await;
        assert_eq!(limited.status, 429);
        assert_eq!(limited.body, json!({"error": "Too many requests"}));
        assert_eq!(limited.header("ratelimit-limit"), "5, 5;window=1");
        assert_eq!(limited.header("ratelimit-remaining"), "0");
        assert_eq!(limited.header("ratelimit-reset"), "1");
    }

    let recovered = eventually(Duration::from_secs(3), "the window to pass", || async {
        let reply = h.get(ORGS).await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert!(
        recovered
            .header("ratelimit-remaining")
            .parse::<u32>()
            .is_ok_and(|n| n < 5)
    );
}

// --- faults ---

#[tokio::test]
async fn status_faults_fail_the_next_matching_calls_then_the_api_behaves_normally() {
    let h = Harness::start().await;

    h.fake.inject(Fault::NextN {
        method: None,
        path_prefix: ORGS.to_owned(),
        count: 2,
        kind: FaultKind::Status(500),
    });
    assert_eq!(
        h.get("/resources/accounts").await.status,
        200,
        "other paths are untouched"
    );
    for _ in 0..2 {
        let reply = h.get(ORGS).await;
        assert_eq!(reply.status, 500);
        assert!(!reply.error().is_empty());
        assert!(reply.headers.contains_key("ratelimit-remaining"));
    }
    h.get(ORGS).await.ok();

    h.fake.inject(Fault::NextN {
        method: Some("POST".to_owned()),
        path_prefix: ORGS.to_owned(),
        count: 1,
        kind: FaultKind::Status(503),
    });
    h.get(ORGS).await.ok();
    let body = json!({"externalId": "o", "name": "O"});
    assert_eq!(h.post(ORGS, body.clone()).await.status, 503);
    assert!(
        h.fake.dump().organizations.is_empty(),
        "a faulted call has no effect"
    );
    h.post(ORGS, body).await.ok();

    let injected = h
        .admin(
            Method::POST,
            "/_fake/faults",
            Some(json!({"type": "next_n", "path_prefix": "/resources/", "count": 1, "kind": {"status": 429}})),
        )
        .await;
    assert_eq!(injected.status, 204);
    let limited = h.get(ORGS).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("ratelimit-limit"), "1000, 1000;window=60");
    assert_eq!(limited.header("ratelimit-remaining"), "0");
    assert_eq!(limited.header("ratelimit-reset"), "1");
    h.get(ORGS).await.ok();
}

#[tokio::test]
async fn deleting_faults_disarms_them_and_bad_faults_are_rejected() {
    let h = Harness::start().await;
    let fault = json!({"type": "next_n", "count": 5, "kind": {"status": 500}});
    assert_eq!(
        h.admin(Method::POST, "/_fake/faults", Some(fault))
            .await
            .status,
        204
    );
    assert_eq!(h.get(ORGS).await.status, 500);
    assert_eq!(
        h.admin(Method::DELETE, "/_fake/faults", None).await.status,
        204
    );
    h.get(ORGS).await.ok();

    for bad in [
        json!({"type": "next_n", "count": 1, "kind": {"status": 200}}),
        json!({"type": "outage", "duration_ms": 10}),
        json!({"type": "explode"}),
    ] {
        let reply = h
            .admin(Method::POST, "/_fake/faults", Some(bad.clone()))
            .await;
        assert_eq!(reply.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn a_latency_fault_delays_the_call_which_then_succeeds() {
    let h = Harness::start().await;
    let delay = Duration::from_millis(300);
    h.fake.inject(Fault::NextN {
        method: Some("GET".to_owned()),
        path_prefix: ORGS.to_owned(),
        count: 1,
        kind: FaultKind::Latency(delay),
    });
    let started = Instant::now();
    h.get(ORGS).await.ok();
    assert!(started.elapsed() >= delay, "took {:?}", started.elapsed());
    assert_eq!(h.fake.calls().status(200), 1);
}

#[tokio::test]
async fn a_drop_fault_cuts_the_connection_without_any_status() {
    let h = Harness::start().await;
    let org = h.organization("org").await;
    let injected = h
        .admin(
            Method::POST,
            "/_fake/faults",
            Some(json!({"type": "next_n", "method": "GET", "path_prefix": ORGS, "count": 1, "kind": "drop"})),
        )
        .await;
    assert_eq!(injected.status, 204);

    let error = h
        .request(Method::GET, &format!("{ORGS}/{org}"))
        .send()
        .await
        .expect_err("the connection is cut");
    assert!(error.status().is_none(), "{error:?}");
    assert!(
        error.is_request() || error.is_connect() || error.is_body(),
        "{error:?}"
    );

    h.get(&format!("{ORGS}/{org}")).await.ok();
    let calls = h.fake.calls();
    assert_eq!(calls.route("GET /resources/organizations/:id"), 2);
    assert_eq!(calls.status(200), 2, "the dropped call has no status");
}

#[tokio::test]
async fn an_outage_fails_every_call_until_its_window_ends() {
    let h = Harness::start().await;
    let started = Instant::now();
    let window = Duration::from_millis(400);
    let injected = h
        .admin(
            Method::POST,
            "/_fake/faults",
            Some(json!({"type": "outage", "duration_ms": 400, "status": 503})),
        )
        .await;
    assert_eq!(injected.status, 204);

    assert_eq!(h.get(ORGS).await.status, 503);
    let during = h.get("/resources/customObjects").await;
    assert_eq!(during.status, 503);
    assert!(during.headers.contains_key("ratelimit-remaining"));

    eventually(Duration::from_secs(3), "the outage to end", || async {
        (h.get(ORGS).await.status == 200).then_some(())
    })
    .await;
    assert!(started.elapsed() >= window);
}

// --- admin endpoints ---

#[tokio::test]
async fn a_fixture_seeded_over_http_is_served_and_appears_in_the_state_dump() {
    let h = Harness::start().await;
    assert_eq!(
        h.admin(Method::GET, "/_fake/healthz", None).await.body,
        json!({"status": "ok"})
    );
    let fixture = json!({
        "organizations": [{"id": "org-1", "externalId": "o1", "name": "Org"}],
        "accounts": [{"id": "acct-1", "externalId": "a1", "name": "Acct", "organizationId": "org-1"}],
        "users": [{"externalId": "u1", "email": "u@x.test", "accountIds": ["acct-1"]}],
        "customObjects": [{"id": "co-1", "name": "requests", "fields": [{"label": "Status", "type": "string"}]}],
        "instances": [{
            "id": "inst-1", "externalId": "r1", "name": "R1", "customObjectId": "co-1",
            "customerId": "acct-1", "traits": {"vitally.custom.status": "open"}
        }]
    });
    let seeded = h.admin(Method::POST, "/_fake/seed", Some(fixture)).await;
    assert_eq!(seeded.status, 200, "{}", seeded.body);

    let state: StateDump =
        serde_json::from_value(h.admin(Method::GET, "/_fake/state", None).await.ok())
            .expect("a state dump");
    assert_eq!(state, h.fake.dump());
    assert_eq!(serde_json::to_value(&state).ok(), Some(seeded.body));
    assert_eq!(state.accounts[0].organization_id.as_deref(), Some("org-1"));
    assert_eq!(state.users[0].account_ids, ["acct-1"]);
    assert_eq!(
        state.custom_objects[0].custom_fields[0].path,
        "vitally.custom.status"
    );
    assert_eq!(state.instances[0].traits["vitally.custom.status"], "open");
    assert_eq!(
        h.get_query(
            "/resources/customObjects/co-1/instances/search",
            &[("externalId", "r1")]
        )
        .await
        .ids(),
        ["inst-1"]
    );

    // A bad entry rejects the whole fixture.
    let bad = json!({
        "organizations": [{"externalId": "o2", "name": "Org 2"}],
        "instances": [{"externalId": "r2", "name": "R2", "customObjectId": "co-1", "customerId": "a1"}]
    });
    let rejected = h.admin(Method::POST, "/_fake/seed", Some(bad)).await;
    assert_eq!(rejected.status, 400);
    assert!(
        rejected.error().starts_with("instances[0]"),
        "{}",
        rejected.body
    );
    assert_eq!(h.fake.dump(), state);
}

#[tokio::test]
async fn the_in_process_handle_seeds_the_same_state_the_api_serves() {
    let h = Harness::start().await;
    h.fake
        .seed(Fixture {
            accounts: vec![AccountSeed {
                id: Some("acct".into()),
                external_id: "a".into(),
                name: "A".into(),
                ..Default::default()
            }],
            custom_objects: vec![CustomObjectSeed {
                id: Some("co".into()),
                name: "requests".into(),
                label: Some("Requests".into()),
                fields: vec![FieldSeed {
                    label: "Score".into(),
                    field_type: FieldType::Number,
                }],
            }],
            instances: vec![InstanceSeed {
                external_id: "r".into(),
                name: "R".into(),
                custom_object_id: "co".into(),
                customer_id: Some("acct".into()),
                traits: json!({"vitally.custom.score": 1.5})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .expect("seeded");
    let duplicate = h.fake.seed(Fixture {
        accounts: vec![AccountSeed {
            id: Some("acct".into()),
            external_id: "other".into(),
            name: "Other".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    assert!(duplicate.is_err_and(|e| e.contains("accounts[0]")));

    let found = h
        .get_query(
            "/resources/customObjects/co/instances/search",
            &[("customerId", "acct")],
        )
        .await
        .ok();
    let served: Vec<fake_vitally::Instance> =
        serde_json::from_value(found["results"].clone()).expect("instances");
    assert_eq!(served, h.fake.instances());
    assert_eq!(h.get("/resources/accounts/a").await.ok()["id"], "acct");
}

#[tokio::test]
async fn calls_are_counted_by_route_template_and_status() {
    let h = Harness::start().await;
    let account = h.account("acct", None).await;
    let object = h.requests_object().await;
    let instances = format!("/resources/customObjects/{object}/instances");
    let instance = id_of(
        &h.post(
            &instances,
            json!({"name": "R", "externalId": "r", "customerId": account}),
        )
        .await
        .ok(),
    );
    h.put(&format!("{instances}/{instance}"), json!({"name": "R2"}))
        .await
        .ok();
    h.put(&format!("{instances}/missing"), json!({})).await;
    h.get_query(&format!("{instances}/search"), &[("externalId", "r")])
        .await
        .ok();
    h.get("/resources/users/search").await;
    h.admin(Method::GET, ORGS, None).await;
    h.admin(Method::GET, "/_fake/state", None).await;

    let counts: CallCounts =
        serde_json::from_value(h.admin(Method::GET, "/_fake/calls", None).await.ok())
            .expect("call counts");
    assert_eq!(counts, h.fake.calls());
    assert_eq!(counts.route("POST /resources/accounts"), 1);
    assert_eq!(counts.route("POST /resources/customObjects"), 1);
    assert_eq!(
        counts.route("POST /resources/customObjects/:id/instances"),
        1
    );
    assert_eq!(
        counts.route("PUT /resources/customObjects/:id/instances/:id"),
        2
    );
    assert_eq!(
        counts.route("GET /resources/customObjects/:id/instances/search"),
        1
    );
    assert_eq!(counts.route("GET /resources/users/search"), 1);
    assert_eq!(counts.route("GET /resources/organizations"), 1);
    assert_eq!(counts.status(200), 5);
    assert_eq!(counts.status(404), 1);
    assert_eq!(counts.status(400), 1);
    assert_eq!(counts.status(401), 1);
    assert_eq!(counts.total, 8, "admin calls are not counted");

    assert_eq!(
        h.admin(Method::DELETE, "/_fake/calls", None).await.status,
        204
    );
    assert_eq!(h.fake.calls(), CallCounts::default());
}

#[tokio::test]
async fn the_standalone_server_serves_its_seed_until_shut_down() {
    // Find a free port, then let `run` bind it itself as the CLI does.
    let addr: SocketAddr = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let seed = Fixture {
        organizations: vec![OrganizationSeed {
            external_id: "seeded".into(),
            name: "Seeded".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fake_vitally::run(
        addr,
        FakeConfig::default(),
        Some(seed),
        async {
            let _ = stopped.await;
        },
    ));

    let http = client();
    let base = format!("http://{addr}");
    eventually(Duration::from_secs(5), "the server to listen", || async {
        let reply = http
            .get(format!("{base}/_fake/healthz"))
            .send()
            .await
            .ok()?;
        reply.status().is_success().then_some(())
    })
    .await;
    let org: Value = http
        .get(format!("{base}{ORGS}/seeded"))
        .header("Authorization", fake_vitally::default_auth_header())
        .send()
        .await
        .expect("a response")
        .json()
        .await
        .expect("JSON");
    assert_eq!(org["name"], "Seeded");

    let _ = stop.send(());
    let finished = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops");
    assert!(matches!(finished, Ok(Ok(()))), "{finished:?}");
}

#[tokio::test]
async fn shutting_down_a_spawned_fake_closes_its_port() {
    let h = Harness::start().await;
    h.get(ORGS).await.ok();
    let url = h.url("/_fake/healthz");
    let Harness { fake, http } = h;
    fake.shutdown().await;
    let error = http.get(url).send().await.expect_err("nothing listens");
    assert!(error.is_connect() || error.is_request(), "{error:?}");
}
