//! The typed Vitally REST client.
//!
//! [`VitallyHttp`] is the one shared connection pool (build it once per process);
//! [`VitallyClient`] binds it to one integration's base URL and auth header. Every call
//! is timed and counted by endpoint and status, records the rate-limit headers, and
//! fails with a [`VitallyError`] that says whether to retry. The auth header travels only
//! as a sensitive `Authorization` header: never in a span, log line, error or metric.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use reqwest::{
    Method, Url,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use thena_runtime::{
    config::VitallySettings,
    egress::{AllowList, Refusal},
};
use tracing::Instrument;

use crate::{
    error::{ErrorKind, VitallyError},
    metrics::VitallyMetrics,
    traits::FieldType,
};

/// Upper bound on establishing a connection, whatever the request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Page size for list endpoints (Vitally's maximum).
const PAGE_LIMIT: &str = "100";
/// Guard against a cursor that never ends (100 000 items at the maximum page size).
const MAX_PAGES: usize = 1000;

/// The process-wide HTTP client for Vitally: one connection pool, shared by every
/// integration, that reaches only the hosts its [`AllowList`] names. Cheap to clone.
#[derive(Clone)]
pub struct VitallyHttp {
    client: reqwest::Client,
    metrics: VitallyMetrics,
    timeout: Duration,
    allowed: Arc<AllowList>,
}

impl fmt::Debug for VitallyHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VitallyHttp { .. }")
    }
}

impl VitallyHttp {
    /// As configured: `VITALLY_TIMEOUT` and `VITALLY_ALLOWED_HOSTS`.
    pub fn from_settings(
        settings: &VitallySettings,
        metrics: VitallyMetrics,
    ) -> Result<Self, reqwest::Error> {
        Self::new(settings.timeout, settings.allowed_hosts.clone(), metrics)
    }

    /// `timeout` bounds each whole request (connect, send, and reading the body);
    /// `allowed` is where calls may go.
    pub fn new(
        timeout: Duration,
        allowed: AllowList,
        metrics: VitallyMetrics,
    ) -> Result<Self, reqwest::Error> {
        // reqwest is built without a bundled crypto provider; the first caller installs
        // ring, later calls find it installed and that is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allowed = Arc::new(allowed);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(CONNECT_TIMEOUT))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            // A redirect would carry the credentials somewhere the customer did not
            // configure; treat it as an error instead.
            .redirect(reqwest::redirect::Policy::none())
            // Every name is resolved here and its addresses checked, on each new
            // connection; a proxy (HTTPS_PROXY) would resolve it out of our sight.
            .dns_resolver(GuardedResolver {
                allowed: allowed.clone(),
            })
            .no_proxy()
            .user_agent(concat!("thena-vitally/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            metrics,
            timeout,
            allowed,
        })
    }

    /// Whether calls to `base_url` may be made (the scheme, host and port are allowed).
    pub fn check_url(&self, base_url: &str) -> Result<(), Refusal> {
        let url = Url::parse(base_url.trim()).map_err(|_| Refusal::NoHost)?;
        self.allowed.check(&url)
    }

    pub fn metrics(&self) -> &VitallyMetrics {
        &self.metrics
    }

    /// The bound on one whole request: a write whose answer did not come within it may
    /// still have been applied.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client for one integration. `base_url` is the API host such as
    /// `https://acme.rest.vitally.io` (a trailing `/` or `/resources` is tolerated);
    /// `auth` is the full `Authorization` value, sent verbatim.
    pub fn client(&self, base_url: &str, auth: SecretString, workspace: &str) -> VitallyClient {
        let base_url = base_url.trim().trim_end_matches('/');
        let base_url = base_url.strip_suffix("/resources").unwrap_or(base_url);
        VitallyClient {
            http: self.clone(),
            base_url: base_url.to_owned(),
            auth,
            workspace: workspace.to_owned(),
            last_rate_limit: Arc::new(Mutex::new(None)),
        }
    }
}

/// Resolves like the system does, then keeps only the addresses the allow-list admits:
/// a Vitally host that resolves to a private or metadata address (DNS rebinding) is
/// refused at every new connection, not only at connect.
struct GuardedResolver {
    allowed: Arc<AllowList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = self.allowed.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let admitted = allowed.admit(&host, resolved).map_err(|refusal| {
                tracing::warn!(%host, %refusal, "refused to connect to Vitally");
                Box::new(refusal) as Box<dyn std::error::Error + Send + Sync>
            })?;
            Ok(Box::new(admitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Rate-limit state from one Vitally response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitInfo {
    /// Requests allowed per window: the first number of `RateLimit-Limit`
    /// (e.g. `1000, 1000;window=60`).
    pub limit: Option<u32>,
    /// Requests left in the current window (`RateLimit-Remaining`).
    pub remaining: Option<u32>,
    /// Time until the window frees capacity (`RateLimit-Reset`, seconds).
    pub reset: Option<Duration>,
}

impl RateLimitInfo {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            limit: text("ratelimit-limit").and_then(parse_count),
            remaining: text("ratelimit-remaining").and_then(parse_count),
            // `Retry-After` is undocumented for Vitally; honour it only as a fallback.
            reset: text("ratelimit-reset")
                .and_then(parse_seconds)
                .or_else(|| text("retry-after").and_then(parse_seconds)),
        }
    }

    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// The leading number of a structured header value (`1000, 1000;window=60` → 1000).
fn leading_number(value: &str) -> Option<f64> {
    let head = value
        .split([',', ';'])
        .next()
        .map(str::trim)
        .filter(|s| !s.is_empty())?;
    head.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

fn parse_count(value: &str) -> Option<u32> {
    // Saturating float-to-int cast; a fractional count is not meaningful anyway.
    leading_number(value).map(|n| n as u32)
}

fn parse_seconds(value: &str) -> Option<Duration> {
    leading_number(value)
        .filter(|n| *n <= 86_400.0)
        .map(Duration::from_secs_f64)
}

/// One integration's view of Vitally: base URL plus auth header over the shared pool.
#[derive(Clone)]
pub struct VitallyClient {
    http: VitallyHttp,
    base_url: String,
    auth: SecretString,
    workspace: String,
    last_rate_limit: Arc<Mutex<Option<RateLimitInfo>>>,
}

impl fmt::Debug for VitallyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VitallyClient")
            .field("base_url", &self.base_url)
            .field("workspace", &self.workspace)
            .field("auth", &"<redacted>")
            .finish()
    }
}

// ---------------------------------------------------------------- models

/// Vitally sends `null` for unset strings and lists; read those as empty.
fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub external_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub email: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub account_ids: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub organization_ids: Vec<String>,
}

/// Body of `POST /resources/users`; `account_ids` / `organization_ids` are Vitally ids,
/// at least one of them non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    pub external_id: String,
    pub name: String,
    pub email: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub account_ids: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub organization_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub external_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub organization_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Organization {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub external_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomObject {
    pub id: String,
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub label: String,
}

/// A custom field as Vitally returns it. Write trait values under `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Field {
    pub id: String,
    pub label: String,
    pub path: String,
    /// The type as Vitally spells it (`string`, `textarea`, `datetime`, `number`, …).
    #[serde(rename = "type")]
    pub field_type: String,
}

impl Field {
    /// The type, if it is one this project writes.
    pub fn known_type(&self) -> Option<FieldType> {
        [
            FieldType::String,
            FieldType::Textarea,
            FieldType::Datetime,
            FieldType::Number,
        ]
        .into_iter()
        .find(|t| t.as_str() == self.field_type)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub external_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub organization_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub traits: Map<String, Value>,
    /// When Vitally created it: the oldest of duplicates is the one kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

/// Body of an instance create or update. `traits` are keyed by field **path**; on update
/// a `null` value removes the trait.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceBody {
    pub name: String,
    pub external_id: String,
    /// The account (Vitally calls it the instance's customer).
    #[serde(skip_serializing_if = "Link::is_keep")]
    pub customer_id: Link,
    #[serde(skip_serializing_if = "Link::is_keep")]
    pub organization_id: Link,
    pub traits: Map<String, Value>,
}

/// What a write says about one of an instance's links (its account or organization).
/// On update Vitally keeps a link that is absent from the body and clears one sent as
/// `null`, so the two must be told apart: a relink that drops the organization sends
/// `organizationId: null`, a write that keeps the last link sends neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Link {
    /// Absent from the body: the instance keeps what it has.
    #[default]
    Keep,
    Set(String),
    /// `null`: the instance loses this link.
    Clear,
}

impl Link {
    /// A target's side of the link: its id, or cleared when it has none.
    pub fn to(id: Option<&str>) -> Link {
        id.map_or(Link::Clear, |id| Link::Set(id.to_owned()))
    }

    pub fn is_keep(&self) -> bool {
        matches!(self, Link::Keep)
    }

    /// The link after a write carrying `self` on an instance that had `current`.
    pub fn apply(&self, current: Option<&str>) -> Option<String> {
        match self {
            Link::Keep => current.map(str::to_owned),
            Link::Set(id) => Some(id.clone()),
            Link::Clear => None,
        }
    }
}

impl Serialize for Link {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Link::Set(id) => serializer.serialize_str(id),
            // `Keep` is skipped by the body; should it get here, `null` is the safe side.
            Link::Clear | Link::Keep => serializer.serialize_none(),
        }
    }
}

impl InstanceBody {
    /// A create has nothing to keep or clear: only the links it sets are sent.
    fn for_create(&self) -> InstanceBody {
        let set = |link: &Link| match link {
            Link::Set(id) => Link::Set(id.clone()),
            Link::Keep | Link::Clear => Link::Keep,
        };
        InstanceBody {
            customer_id: set(&self.customer_id),
            organization_id: set(&self.organization_id),
            ..self.clone()
        }
    }
}

#[derive(Deserialize)]
#[serde(bound = "T: Deserialize<'de>")]
struct Page<T> {
    #[serde(default = "Vec::new", deserialize_with = "null_as_default")]
    results: Vec<T>,
    #[serde(default)]
    next: Option<String>,
}

/// `customFields` is documented as a bare array; accept the usual envelope as well.
#[derive(Deserialize)]
#[serde(untagged)]
enum FieldList {
    Bare(Vec<Field>),
    Enveloped { results: Vec<Field> },
}

fn field_specs(fields: &[(&str, FieldType)]) -> Value {
    Value::Array(
        fields
            .iter()
            .map(
                |(label, ty)| json!({"label": label, "type": ty.as_str(), "model": "CustomObject"}),
            )
            .collect(),
    )
}

// ---------------------------------------------------------------- calls

impl VitallyClient {
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Rate-limit headers of the most recent response that carried them.
    pub fn last_rate_limit(&self) -> Option<RateLimitInfo> {
        *self
            .last_rate_limit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Users with exactly this email address.
    pub async fn users_by_email(&self, email: &str) -> Result<Vec<User>, VitallyError> {
        self.list_all("users.search", &["users", "search"], &[("email", email)])
            .await
    }

    /// Users whose email is at `domain`.
    pub async fn users_by_email_domain(&self, domain: &str) -> Result<Vec<User>, VitallyError> {
        self.list_all(
            "users.search",
            &["users", "search"],
            &[("emailSubdomain", domain)],
        )
        .await
    }

    pub async fn create_user(&self, user: &NewUser) -> Result<User, VitallyError> {
        let body = to_body("users.create", user)?;
        let bytes = self
            .call("users.create", Method::POST, &["users"], &[], Some(body))
            .await?;
        decode("users.create", &bytes, &self.auth)
    }

    /// The account by Vitally id or externalId; `None` if Vitally does not know it.
    pub async fn account(&self, id: &str) -> Result<Option<Account>, VitallyError> {
        self.get_optional("accounts.get", &["accounts", id]).await
    }

    /// The organization by Vitally id or externalId; `None` if Vitally does not know it.
    pub async fn organization(&self, id: &str) -> Result<Option<Organization>, VitallyError> {
        self.get_optional("organizations.get", &["organizations", id])
            .await
    }

    /// Every custom object, across all pages.
    pub async fn custom_objects(&self) -> Result<Vec<CustomObject>, VitallyError> {
        self.list_all(
            "custom_objects.list",
            &["customObjects"],
            &[("limit", PAGE_LIMIT)],
        )
        .await
    }

    pub async fn create_custom_object(
        &self,
        name: &str,
        label: &str,
        fields: &[(&str, FieldType)],
    ) -> Result<CustomObject, VitallyError> {
        let body = to_body(
            "custom_objects.create",
            &json!({"name": name, "label": label, "customFields": field_specs(fields)}),
        )?;
        let bytes = self
            .call(
                "custom_objects.create",
                Method::POST,
                &["customObjects"],
                &[],
                Some(body),
            )
            .await?;
        decode("custom_objects.create", &bytes, &self.auth)
    }

    /// Adds fields to an object. Vitally does not deduplicate: check [`fields`](Self::fields)
    /// first.
    pub async fn add_fields(
        &self,
        object_id: &str,
        fields: &[(&str, FieldType)],
    ) -> Result<(), VitallyError> {
        let body = to_body(
            "custom_objects.add_fields",
            &json!({"customFields": field_specs(fields)}),
        )?;
        self.call(
            "custom_objects.add_fields",
            Method::PUT,
            &["customObjects", object_id],
            &[],
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// The object's fields with the paths to write traits under.
    pub async fn fields(&self, object_id: &str) -> Result<Vec<Field>, VitallyError> {
        let bytes = self
            .call(
                "custom_fields.list",
                Method::GET,
                &["customFields"],
                &[("model", "customObjects"), ("customObjectId", object_id)],
                None,
            )
            .await?;
        match decode("custom_fields.list", &bytes, &self.auth)? {
            FieldList::Bare(fields) | FieldList::Enveloped { results: fields } => Ok(fields),
        }
    }

    pub async fn find_instance(
        &self,
        object_id: &str,
        external_id: &str,
    ) -> Result<Option<Instance>, VitallyError> {
        Ok(self
            .search_instances(object_id, external_id)
            .await?
            .into_iter()
            .next())
    }

    /// Every instance carrying `external_id` (more than one only after a duplicate).
    pub async fn search_instances(
        &self,
        object_id: &str,
        external_id: &str,
    ) -> Result<Vec<Instance>, VitallyError> {
        let bytes = self
            .call(
                "instances.search",
                Method::GET,
                &["customObjects", object_id, "instances", "search"],
                &[("externalId", external_id)],
                None,
            )
            .await?;
        let page: Page<Instance> = decode("instances.search", &bytes, &self.auth)?;
        Ok(page.results)
    }

    /// `DELETE /resources/customObjects/:coId/instances/:id` (the answer body is not used).
    pub async fn delete_instance(
        &self,
        object_id: &str,
        instance_id: &str,
    ) -> Result<(), VitallyError> {
        self.call(
            "instances.delete",
            Method::DELETE,
            &["customObjects", object_id, "instances", instance_id],
            &[],
            None,
        )
        .await
        .map(drop)
    }

    pub async fn create_instance(
        &self,
        object_id: &str,
        body: &InstanceBody,
    ) -> Result<Instance, VitallyError> {
        let body = to_body("instances.create", &body.for_create())?;
        let bytes = self
            .call(
                "instances.create",
                Method::POST,
                &["customObjects", object_id, "instances"],
                &[],
                Some(body),
            )
            .await?;
        decode("instances.create", &bytes, &self.auth)
    }

    pub async fn update_instance(
        &self,
        object_id: &str,
        instance_id: &str,
        body: &InstanceBody,
    ) -> Result<Instance, VitallyError> {
        let body = to_body("instances.update", body)?;
        let bytes = self
            .call(
                "instances.update",
                Method::PUT,
                &["customObjects", object_id, "instances", instance_id],
                &[],
                Some(body),
            )
            .await?;
        decode("instances.update", &bytes, &self.auth)
    }

    // ------------------------------------------------------------ plumbing

    async fn get_optional<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        segments: &[&str],
    ) -> Result<Option<T>, VitallyError> {
        match self.call(endpoint, Method::GET, segments, &[], None).await {
            Ok(bytes) => decode(endpoint, &bytes, &self.auth).map(Some),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Follows `next` cursors until the last page.
    async fn list_all<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, VitallyError> {
        let mut items = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = query.to_vec();
            if let Some(from) = cursor.as_deref() {
                params.push(("from", from));
            }
            let bytes = self
                .call(endpoint, Method::GET, segments, &params, None)
                .await?;
            let page: Page<T> = decode(endpoint, &bytes, &self.auth)?;
            items.extend(page.results);
            match page.next.filter(|next| !next.is_empty()) {
                Some(next) if seen.insert(next.clone()) => cursor = Some(next),
                Some(_) => {
                    tracing::warn!(endpoint, "Vitally repeated a page cursor; stopping");
                    return Ok(items);
                }
                None => return Ok(items),
            }
        }
        tracing::warn!(
            endpoint,
            max_pages = MAX_PAGES,
            "stopped paging at the limit"
        );
        Ok(items)
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url, &'static str> {
        let mut url = Url::parse(&self.base_url).map_err(|_| "the API URL is not a valid URL")?;
        // Credentials belong in the auth header, never in the URL.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        url.set_fragment(None);
        url.path_segments_mut()
            .map_err(|_| "the API URL cannot carry a path")?
            .pop_if_empty()
            .push("resources")
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// Sends one request and returns the body of a 2xx answer. Records metrics and the
    /// rate-limit headers whatever the outcome.
    async fn call(
        &self,
        endpoint: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, VitallyError> {
        let span = tracing::debug_span!(
            "vitally.call",
            endpoint,
            workspace = %self.workspace,
            method = %method,
        );
        async move {
            let started = Instant::now();
            let outcome = self.send(endpoint, method, segments, query, body).await;
            let elapsed = started.elapsed();
            let status = match &outcome {
                Ok((code, _)) => code.to_string(),
                Err(err) => err.status_label(),
            };
            let metrics = &self.http.metrics;
            metrics
                .requests
                .with_label_values(&[endpoint, status.as_str()])
                .inc();
            metrics
                .request_duration
                .with_label_values(&[endpoint])
                .observe(elapsed.as_secs_f64());
            let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            match &outcome {
                Ok(_) => tracing::debug!(%status, elapsed_ms, "vitally call ok"),
                Err(err) => tracing::debug!(
                    %status,
                    class = err.class().as_str(),
                    elapsed_ms,
                    error = %err,
                    "vitally call failed"
                ),
            }
            outcome.map(|(_, bytes)| bytes)
        }
        .instrument(span)
        .await
    }

    async fn send(
        &self,
        endpoint: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), VitallyError> {
        let invalid = |reason: &str| VitallyError::new(endpoint, ErrorKind::InvalidRequest, reason);
        let url = self.url(segments, query).map_err(invalid)?;
        self.http.allowed.check(&url).map_err(|refusal| {
            VitallyError::new(endpoint, ErrorKind::Refused, &refusal.to_string())
        })?;
        let mut auth = HeaderValue::from_str(self.auth.expose_secret())
            .map_err(|_| invalid("the auth header is not a valid HTTP header value"))?;
        // Sensitive values are never indexed by HPACK and print as "Sensitive".
        auth.set_sensitive(true);
        let mut request = self
            .http
            .client
            .request(method, url)
            .header(AUTHORIZATION, auth)
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|err| transport_error(endpoint, err))?;
        let status = response.status().as_u16();
        let rate = RateLimitInfo::from_headers(response.headers());
        self.record_rate_limit(rate);
        let bytes = response
            .bytes()
            .await
            .map_err(|err| transport_error(endpoint, err))?;
        if (200..300).contains(&status) {
            Ok((status, bytes.to_vec()))
        } else {
            let text = scrub(&String::from_utf8_lossy(&bytes), &self.auth);
            Err(
                VitallyError::new(endpoint, ErrorKind::Status(status), &text)
                    .with_reset(rate.reset),
            )
        }
    }

    fn record_rate_limit(&self, rate: RateLimitInfo) {
        if rate.is_empty() {
            return;
        }
        if let Some(remaining) = rate.remaining {
            self.http
                .metrics
                .ratelimit_remaining
                .with_label_values(&[self.workspace.as_str()])
                .set(i64::from(remaining));
        }
        *self
            .last_rate_limit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(rate);
    }
}

fn to_body<T: Serialize + ?Sized>(
    endpoint: &'static str,
    value: &T,
) -> Result<Vec<u8>, VitallyError> {
    serde_json::to_vec(value)
        .map_err(|err| VitallyError::new(endpoint, ErrorKind::InvalidRequest, &err.to_string()))
}

fn decode<T: DeserializeOwned>(
    endpoint: &'static str,
    bytes: &[u8],
    auth: &SecretString,
) -> Result<T, VitallyError> {
    serde_json::from_slice(bytes).map_err(|err| {
        let body = scrub(&String::from_utf8_lossy(bytes), auth);
        VitallyError::new(endpoint, ErrorKind::Decode, &format!("{err}; body: {body}"))
    })
}

fn transport_error(endpoint: &'static str, err: reqwest::Error) -> VitallyError {
    if let Some(refusal) = refusal_in(&err) {
        return VitallyError::new(endpoint, ErrorKind::Refused, &refusal.to_string());
    }
    let kind = if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Transport
    };
    // Without the URL: it is noise at best and could carry userinfo at worst.
    VitallyError::new(endpoint, kind, &error_chain(&err.without_url()))
}

/// The resolver's refusal, somewhere down the error's causes.
fn refusal_in<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refusal> {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(refusal) = current.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        cause = current.source();
    }
    None
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Removes the auth header (and its bare token) from text we keep, in case an error body
/// echoes the request.
fn scrub(text: &str, auth: &SecretString) -> String {
    let header = auth.expose_secret().trim();
    let token = header
        .split_once(' ')
        .map_or(header, |(_, token)| token.trim());
    let mut out = text.to_owned();
    for secret in [header, token] {
        if secret.len() >= 4 {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_link_is_absent_a_cleared_one_null_and_a_create_sends_only_set_ones() {
        let body = InstanceBody {
            name: "n".into(),
            external_id: "x".into(),
            customer_id: Link::Clear,
            organization_id: Link::Set("org".into()),
            traits: Map::new(),
        };
        let update = serde_json::to_value(&body).unwrap();
        assert_eq!(update["customerId"], Value::Null);
        assert!(update.as_object().unwrap().contains_key("customerId"));
        assert_eq!(update["organizationId"], "org");
        let create = serde_json::to_value(body.for_create()).unwrap();
        assert!(!create.as_object().unwrap().contains_key("customerId"));
        assert_eq!(create["organizationId"], "org");
        let kept = InstanceBody {
            organization_id: Link::Keep,
            ..body
        };
        let kept = serde_json::to_value(&kept).unwrap();
        assert!(!kept.as_object().unwrap().contains_key("organizationId"));
    }

    #[test]
    fn rate_limit_headers_parse_vitallys_structured_form() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "RateLimit-Limit",
            HeaderValue::from_static("1000, 1000;window=60"),
        );
        headers.insert("RateLimit-Remaining", HeaderValue::from_static("998"));
        headers.insert("RateLimit-Reset", HeaderValue::from_static("42"));
        assert_eq!(
            RateLimitInfo::from_headers(&headers),
            RateLimitInfo {
                limit: Some(1000),
                remaining: Some(998),
                reset: Some(Duration::from_secs(42)),
            }
        );
    }

    #[test]
    fn missing_or_garbled_rate_limit_headers_read_as_unknown() {
        let mut headers = HeaderMap::new();
        headers.insert("RateLimit-Remaining", HeaderValue::from_static("lots"));
        headers.insert("RateLimit-Reset", HeaderValue::from_static("-3"));
        assert!(RateLimitInfo::from_headers(&headers).is_empty());
        headers.insert("Retry-After", HeaderValue::from_static("7"));
        assert_eq!(
            RateLimitInfo::from_headers(&headers).reset,
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn scrub_removes_the_header_and_its_token() {
        let auth = SecretString::from("Basic c2VjcmV0LWtleTo=");
        assert_eq!(
            scrub("got Basic c2VjcmV0LWtleTo= and c2VjcmV0LWtleTo=", &auth),
            "got <redacted> and <redacted>"
        );
    }

    #[test]
    fn urls_are_built_from_encoded_segments_and_query_pairs() {
        let http = VitallyHttp::new(
            Duration::from_secs(1),
            AllowList::vitally(),
            VitallyMetrics::unregistered(),
        )
        .expect("client");
        let client = http.client(
            "https://user:pw@acme.rest.vitally.io/resources/",
            SecretString::from("Basic x"),
            "T1",
        );
        let url = client
            .url(&["accounts", "a/b c"], &[("email", "a+b@x.com")])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://acme.rest.vitally.io/resources/accounts/a%2Fb%20c?email=a%2Bb%40x.com"
        );
    }
}
