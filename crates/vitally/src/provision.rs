//! Connecting a workspace to Vitally: check the credentials, create or adopt the
//! "Thena Requests" object with every trait, record the field paths Vitally returned,
//! and store the integration. Plus the admin helpers behind the CLI and admin API.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use reqwest::{Url, header::HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use thena_runtime::egress::Refusal;

use crate::{
    client::{Field, VitallyHttp},
    error::{ErrorKind, VitallyError},
    integrations::{FieldRef, Health, Integration, IntegrationStore, StoreError},
    traits::{FieldType, OBJECT_NAME, own_traits},
};

/// Vitally allows 1000 requests per minute per key; a budget above that cannot be met.
pub const MAX_RATE_BUDGET_PER_MIN: u32 = thena_runtime::config::VITALLY_LIMIT_PER_MIN;

/// The longest piece of a refused URL an error message repeats.
const MAX_URL_SHOWN: usize = 200;

/// What an operator supplies to connect a workspace. `Debug` redacts the auth header.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub workspace_id: String,
    pub api_url: String,
    pub auth_header: SecretString,
    /// The workspace's custom categories; each becomes a `String` trait.
    pub categories: Vec<String>,
    pub push_requests: bool,
    pub update_requests: bool,
    pub sync_threads: bool,
    pub auto_create_fields: bool,
    pub rate_budget_per_min: u32,
    /// The start of forward-only sync, set by an operator; `None` keeps the earlier
    /// record's (a reconnect never widens the window), or "now" for a first connect.
    pub established_at: Option<DateTime<Utc>>,
}

/// Setting changes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Toggles {
    pub push_requests: Option<bool>,
    pub update_requests: Option<bool>,
    pub sync_threads: Option<bool>,
    pub auto_create_fields: Option<bool>,
    pub rate_budget_per_min: Option<u32>,
    pub established_at: Option<DateTime<Utc>>,
}

impl Toggles {
    pub fn is_empty(&self) -> bool {
        *self == Toggles::default()
    }
}

/// Whether connect made the "Thena Requests" object or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectOutcome {
    Created,
    Adopted,
}

/// What a connect did, for the operator.
#[derive(Debug, Clone)]
pub struct Connected {
    pub integration: Integration,
    pub object: ObjectOutcome,
    pub traits_added: Vec<String>,
    /// `connected` (first time) or `reconnected`.
    pub action: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid Vitally API URL: {0}")]
    InvalidUrl(String),
    #[error("invalid auth header: {0}")]
    InvalidAuthHeader(&'static str),
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    #[error(
        "Vitally rejected the auth header (HTTP {status}); copy the Basic auth header from \
         Vitally's REST API settings"
    )]
    Unauthorized { status: u16 },
    /// Closed, filtered, another protocol, or an HTTP server that does not answer like
    /// Vitally: one answer for all, so connect cannot be used to map a network. The
    /// detail is logged for the operator.
    #[error(
        "could not reach a Vitally API at that URL (no answer, or not one Vitally would \
         give); the log has the details"
    )]
    Unreachable {
        /// What happened, for the log only.
        detail: String,
    },
    #[error(
        "this Vitally instance is already connected to workspace {workspace}; one Vitally \
         can be integrated with a single workspace (disconnect it there first)"
    )]
    AlreadyConnected { workspace: String },
    #[error("Vitally did not provision the fields {labels:?} on \"{object}\"")]
    Provisioning { object: String, labels: Vec<String> },
    #[error(
        "the Vitally field \"{label}\" has type {field_type}, which this integration cannot \
         write; rename or remove that field in Vitally"
    )]
    UnsupportedFieldType { label: String, field_type: String },
    #[error("workspace {0} is not connected")]
    NotConnected(String),
    /// Shown without the body Vitally answered (see [`VitallyError::summary`]).
    #[error("{}", .0.summary())]
    Vitally(#[from] VitallyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates the credentials against Vitally, creates or adopts the "Thena Requests"
/// object with every trait, and stores the integration. Safe to repeat and to race: the
/// connects of the fleet run one at a time, a second connect adds nothing that exists
/// and keeps the original `established_at`, and a Vitally already connected to another
/// workspace is refused.
pub async fn connect(
    http: &VitallyHttp,
    store: &IntegrationStore,
    req: ConnectRequest,
    actor: &str,
) -> Result<Connected, ConnectError> {
    let workspace = req.workspace_id.clone();
    let result = connect_checked(http, store, req, actor).await;
    if let Err(error) = &result {
        // The whole story for the operator; the caller gets the bounded message.
        tracing::warn!(%workspace, ?error, "connect failed");
    }
    result
}

async fn connect_checked(
    http: &VitallyHttp,
    store: &IntegrationStore,
    req: ConnectRequest,
    actor: &str,
) -> Result<Connected, ConnectError> {
    let api_url = validate_credentials(http, &req.workspace_id, &req.api_url, &req.auth_header)?;
    validate_budget(req.rate_budget_per_min)?;
    let connecting = store.lock_connects().await?;
    let fingerprints = store.fingerprints(&api_url, &req.auth_header);
    if let Some(workspace) = store
        .connected_elsewhere(&req.workspace_id, &fingerprints)
        .await?
    {
        return Err(ConnectError::AlreadyConnected { workspace });
    }
    let previous = store.previous_connection(&req.workspace_id).await?;
    let client = http.client(&api_url, req.auth_header.clone(), &req.workspace_id);

    let objects = client.custom_objects().await.map_err(first_call_error)?;
    let desired = desired_fields(&req.categories);
    // Prefer the object this workspace already uses, should Vitally hold several.
    let adopt = previous
        .as_ref()
        .and_then(|p| objects.iter().find(|o| o.id == p.custom_object_id))
        .or_else(|| objects.iter().find(|o| o.name == OBJECT_NAME));
    let (object_id, object, traits_added) = match adopt {
        Some(object) => {
            let present = client.fields(&object.id).await?;
            let missing = missing_fields(&desired, &present);
            if !missing.is_empty() {
                client.add_fields(&object.id, &missing).await?;
            }
            let added: Vec<String> = missing.iter().map(|(l, _)| (*l).to_owned()).collect();
            (object.id.clone(), ObjectOutcome::Adopted, added)
        }
        None => {
            let object = client
                .create_custom_object(OBJECT_NAME, OBJECT_NAME, &desired)
                .await?;
            let added = desired.iter().map(|(l, _)| (*l).to_owned()).collect();
            (object.id, ObjectOutcome::Created, added)
        }
    };
    tracing::info!(
        workspace = %req.workspace_id,
        object_id = %object_id,
        ?object,
        traits_added = traits_added.len(),
        "provisioned the Vitally object"
    );

    // Paths come from what Vitally says now, never from a guess.
    let listed = client.fields(&object_id).await?;
    let fields = field_map(&listed);
    let absent: Vec<String> = desired
        .iter()
        .filter(|(label, _)| find_label(&fields, label).is_none())
        .map(|(label, _)| (*label).to_owned())
        .collect();
    if let Some(field) = absent.iter().find_map(|label| unusable(&listed, label)) {
        return Err(unsupported(field));
    }
    if !absent.is_empty() {
        return Err(ConnectError::Provisioning {
            object: object_id,
            labels: absent,
        });
    }

    let now = Utc::now();
    // Reconnecting must not widen the forward-only window; only an operator may move it.
    let established_at = req
        .established_at
        .or(previous.as_ref().map(|p| p.established_at))
        .unwrap_or(now);
    let integration = Integration {
        workspace_id: req.workspace_id,
        api_url,
        auth_header: req.auth_header,
        push_requests: req.push_requests,
        update_requests: req.update_requests,
        sync_threads: req.sync_threads,
        auto_create_fields: req.auto_create_fields,
        rate_budget_per_min: req.rate_budget_per_min,
        established_at,
        custom_object_id: object_id,
        fields,
        fields_refreshed_at: now,
        fingerprint: String::new(),
        health: Health::Healthy,
        health_detail: None,
        health_changed_at: now,
        connected_at: now,
        updated_at: now,
        revision: 0,
    };
    let action = if previous.is_some() {
        "reconnected"
    } else {
        "connected"
    };
    let details = json!({
        "object": object,
        "traits_added": traits_added,
        "established_at_set": req.established_at.is_some(),
    });
    let stored = match store
        .save_connection(&integration, actor, action, details)
        .await
    {
        Ok(stored) => stored,
        Err(StoreError::Db(e)) if e.is_unique_violation() => {
            // Connected elsewhere by a replica whose lock we could not see (never with
            // one database); say so rather than fail with SQL.
            let workspace = store
                .connected_elsewhere(&integration.workspace_id, &fingerprints)
                .await?
                .unwrap_or_else(|| "another workspace".to_owned());
            return Err(ConnectError::AlreadyConnected { workspace });
        }
        Err(other) => return Err(other.into()),
    };
    connecting.release().await;
    Ok(Connected {
        integration: stored,
        object,
        traits_added,
        action,
    })
}

/// What [`check`] found: the URL as it will be stored, and whether Vitally already holds
/// a "Thena Requests" object (connect would adopt it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub api_url: String,
    pub object_exists: bool,
}

/// Connect's checks without connecting (the setup's "Continue"): the URL and header are
/// well formed, this Vitally is not connected to another workspace, and Vitally accepts
/// the header (one read). Writes nothing, here or in Vitally.
pub async fn check(
    http: &VitallyHttp,
    store: &IntegrationStore,
    workspace_id: &str,
    api_url: &str,
    auth_header: &SecretString,
) -> Result<Checked, ConnectError> {
    let api_url = validate_credentials(http, workspace_id, api_url, auth_header)?;
    let fingerprints = store.fingerprints(&api_url, auth_header);
    if let Some(workspace) = store
        .connected_elsewhere(workspace_id, &fingerprints)
        .await?
    {
        return Err(ConnectError::AlreadyConnected { workspace });
    }
    let objects = http
        .client(&api_url, auth_header.clone(), workspace_id)
        .custom_objects()
        .await
        .map_err(first_call_error)?;
    Ok(Checked {
        object_exists: objects.iter().any(|o| o.name == OBJECT_NAME),
        api_url,
    })
}

/// Makes sure a `String` trait labelled `label` exists on the integration's object and
/// in its stored record, and returns where to write it. Idempotent: reads Vitally's
/// fields first and adds only when absent. Callers serialise concurrent calls for one
/// workspace (a lock), since Vitally does not deduplicate fields.
pub async fn ensure_field(
    http: &VitallyHttp,
    store: &IntegrationStore,
    integration: &Integration,
    label: &str,
    actor: &str,
) -> Result<FieldRef, ConnectError> {
    let label = label.trim();
    if label.is_empty() {
        return Err(ConnectError::InvalidSetting(
            "field label is empty".to_owned(),
        ));
    }
    let client = integration.client(http);
    let object_id = integration.custom_object_id.as_str();
    let listed = client.fields(object_id).await?;
    let mut fields = field_map(&listed);
    if find_label(&fields, label).is_none() {
        // Adding a String next to a same-named field of another type would leave two.
        if let Some(field) = unusable(&listed, label) {
            return Err(unsupported(field));
        }
        client
            .add_fields(object_id, &[(label, FieldType::String)])
            .await?;
        fields = field_map(&client.fields(object_id).await?);
    }
    let field = find_label(&fields, label)
        .map(|(_, field)| field.clone())
        .ok_or_else(|| ConnectError::Provisioning {
            object: object_id.to_owned(),
            labels: vec![label.to_owned()],
        })?;
    // Update the freshest record under its row lock, so a concurrent toggle change is
    // not overwritten.
    store
        .modify(
            &integration.workspace_id,
            actor,
            "trait_created",
            |current| -> Result<(), ConnectError> {
                current.fields = fields;
                current.fields_refreshed_at = Utc::now();
                Ok(())
            },
        )
        .await?
        .ok_or_else(|| ConnectError::NotConnected(integration.workspace_id.clone()))?;
    Ok(field)
}

/// What re-reading the object's fields found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldRefresh {
    pub fields: BTreeMap<String, FieldRef>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Labels whose path or type Vitally now reports differently.
    pub changed: Vec<String>,
}

impl FieldRefresh {
    pub fn is_unchanged(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Re-reads the object's fields from Vitally and stores the map: a trait created in
/// Vitally after connect (the FAQ's remedy for a custom category) is written from now
/// on, and one that disappeared is reported (history, log) rather than guessed.
pub async fn refresh_fields(
    http: &VitallyHttp,
    store: &IntegrationStore,
    integration: &Integration,
    actor: &str,
) -> Result<FieldRefresh, ConnectError> {
    let listed = integration
        .client(http)
        .fields(&integration.custom_object_id)
        .await?;
    let refresh = compare_fields(&integration.fields, field_map(&listed));
    if refresh.is_unchanged() {
        store.touch_fields(&integration.workspace_id).await?;
        return Ok(refresh);
    }
    if !refresh.removed.is_empty() {
        tracing::warn!(
            workspace = %integration.workspace_id,
            removed = ?refresh.removed,
            "traits disappeared from the Vitally object; their values are no longer written"
        );
    }
    let fields = refresh.fields.clone();
    store
        .modify(
            &integration.workspace_id,
            actor,
            "fields_refreshed",
            |current| -> Result<(), ConnectError> {
                current.fields = fields;
                current.fields_refreshed_at = Utc::now();
                Ok(())
            },
        )
        .await?;
    Ok(refresh)
}

fn compare_fields(
    before: &BTreeMap<String, FieldRef>,
    after: BTreeMap<String, FieldRef>,
) -> FieldRefresh {
    FieldRefresh {
        added: after
            .keys()
            .filter(|label| !before.contains_key(*label))
            .cloned()
            .collect(),
        removed: before
            .keys()
            .filter(|label| !after.contains_key(*label))
            .cloned()
            .collect(),
        changed: before
            .iter()
            .filter(|(label, field)| after.get(*label).is_some_and(|now| now != *field))
            .map(|(label, _)| label.clone())
            .collect(),
        fields: after,
    }
}

/// Applies setting changes to a connected workspace; returns the record and what changed
/// (empty when nothing did).
pub async fn set_toggles(
    store: &IntegrationStore,
    workspace_id: &str,
    toggles: Toggles,
    actor: &str,
) -> Result<(Integration, Value), ConnectError> {
    store
        .modify(workspace_id, actor, "settings_changed", |integration| {
            apply_toggles(integration, toggles)
        })
        .await?
        .ok_or_else(|| ConnectError::NotConnected(workspace_id.to_owned()))
}

/// Disconnects the workspace (a soft delete that keeps `established_at`); `false` if it
/// was not connected. Vitally's object and its instances stay, so a later connect adopts
/// them.
pub async fn disconnect(
    store: &IntegrationStore,
    workspace_id: &str,
    actor: &str,
) -> Result<bool, ConnectError> {
    Ok(store.disconnect(workspace_id, actor).await?)
}

// ---------------------------------------------------------------- pure parts

fn apply_toggles(integration: &mut Integration, toggles: Toggles) -> Result<(), ConnectError> {
    let Toggles {
        push_requests,
        update_requests,
        sync_threads,
        auto_create_fields,
        rate_budget_per_min,
        established_at,
    } = toggles;
    if let Some(at) = established_at {
        integration.established_at = at;
    }
    if let Some(budget) = rate_budget_per_min {
        validate_budget(budget)?;
        integration.rate_budget_per_min = budget;
    }
    if let Some(on) = push_requests {
        integration.push_requests = on;
    }
    if let Some(on) = update_requests {
        integration.update_requests = on;
    }
    if let Some(on) = sync_threads {
        integration.sync_threads = on;
    }
    if let Some(on) = auto_create_fields {
        integration.auto_create_fields = on;
    }
    Ok(())
}

/// A base URL this fleet may call (see `VITALLY_ALLOWED_HOSTS`), normalised without a
/// trailing `/`. Checked before any connection is made.
fn validate_url(http: &VitallyHttp, raw: &str) -> Result<String, ConnectError> {
    let raw = raw.trim();
    let shown = shown_url(raw);
    let url = Url::parse(raw).map_err(|err| ConnectError::InvalidUrl(format!("{shown}: {err}")))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConnectError::InvalidUrl(format!(
            "{shown}: no query or fragment expected"
        )));
    }
    http.check_url(raw).map_err(|refusal| match refusal {
        // Do not echo it back: that part is a credential.
        Refusal::Credentials => ConnectError::InvalidUrl(refusal.to_string()),
        other => ConnectError::InvalidUrl(format!("{shown}: {other}")),
    })?;
    Ok(raw.trim_end_matches('/').to_owned())
}

/// The URL as an error may repeat it: without a password, and short.
fn shown_url(raw: &str) -> String {
    let redacted = thena_runtime::config::redact_url(raw);
    format!("{:?}", thena_runtime::clip(&redacted, MAX_URL_SHOWN))
}

/// The workspace, URL and header a connect needs; returns the normalised URL.
fn validate_credentials(
    http: &VitallyHttp,
    workspace_id: &str,
    api_url: &str,
    auth_header: &SecretString,
) -> Result<String, ConnectError> {
    if workspace_id.trim().is_empty() {
        return Err(ConnectError::InvalidSetting(
            "workspace id is empty".to_owned(),
        ));
    }
    let api_url = validate_url(http, api_url)?;
    validate_auth_header(auth_header)?;
    Ok(api_url)
}

fn validate_auth_header(header: &SecretString) -> Result<(), ConnectError> {
    let value = header.expose_secret().trim();
    if value.is_empty() {
        return Err(ConnectError::InvalidAuthHeader("it is empty"));
    }
    if HeaderValue::from_str(value).is_err() {
        return Err(ConnectError::InvalidAuthHeader(
            "it contains characters not allowed in an HTTP header",
        ));
    }
    Ok(())
}

fn validate_budget(budget: u32) -> Result<(), ConnectError> {
    if budget == 0 || budget > MAX_RATE_BUDGET_PER_MIN {
        return Err(ConnectError::InvalidSetting(format!(
            "rate budget must be between 1 and {MAX_RATE_BUDGET_PER_MIN} requests per minute, \
             got {budget}"
        )));
    }
    Ok(())
}

/// The first call doubles as the credential and reachability check. Whatever does not
/// answer like Vitally gets one message, so a closed port, a Redis or AMQP port and a
/// foreign web server look alike and nothing of their answer is repeated.
fn first_call_error(err: VitallyError) -> ConnectError {
    match err.kind() {
        ErrorKind::Status(status @ (401 | 403)) => ConnectError::Unauthorized { status },
        ErrorKind::Status(429) => ConnectError::Vitally(err),
        ErrorKind::Refused => ConnectError::InvalidUrl(err.body().to_owned()),
        ErrorKind::Status(_)
        | ErrorKind::Timeout
        | ErrorKind::Connect
        | ErrorKind::Transport
        | ErrorKind::Decode
        | ErrorKind::InvalidRequest => ConnectError::Unreachable {
            detail: err.to_string(),
        },
    }
}

/// The integration's own traits (the product doc's and the extra ones), then one `String`
/// per custom category (blank and repeated labels, and categories named like an own
/// trait, ignoring case, are left out). A reconnect adds whichever of them is missing, so
/// an integration connected before an extra trait existed gets it then.
fn desired_fields(categories: &[String]) -> Vec<(&str, FieldType)> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut candidates: Vec<(&str, FieldType)> = own_traits().collect();
    candidates.extend(categories.iter().map(|c| (c.trim(), FieldType::String)));
    let mut out = Vec::with_capacity(candidates.len());
    for (label, ty) in candidates {
        if !label.is_empty() && seen.insert(label.to_lowercase()) {
            out.push((label, ty));
        }
    }
    out
}

fn missing_fields<'a>(
    desired: &[(&'a str, FieldType)],
    present: &[Field],
) -> Vec<(&'a str, FieldType)> {
    let have: BTreeSet<String> = present.iter().map(|f| f.label.to_lowercase()).collect();
    desired
        .iter()
        .filter(|(label, _)| !have.contains(&label.to_lowercase()))
        .copied()
        .collect()
}

/// A field labelled `label` (ignoring case) whose type this project cannot write.
fn unusable<'a>(listed: &'a [Field], label: &str) -> Option<&'a Field> {
    let lower = label.to_lowercase();
    listed
        .iter()
        .find(|f| f.known_type().is_none() && f.label.to_lowercase() == lower)
}

fn unsupported(field: &Field) -> ConnectError {
    ConnectError::UnsupportedFieldType {
        label: field.label.clone(),
        field_type: field.field_type.clone(),
    }
}

/// The entry for `label`: exact first, else ignoring case (an adopted object may have
/// been made by hand; the mapping looks labels up the same way).
fn find_label<'a>(
    fields: &'a BTreeMap<String, FieldRef>,
    label: &str,
) -> Option<(&'a str, &'a FieldRef)> {
    fields
        .get_key_value(label)
        .or_else(|| {
            let lower = label.to_lowercase();
            fields.iter().find(|(l, _)| l.to_lowercase() == lower)
        })
        .map(|(l, f)| (l.as_str(), f))
}

/// Label → where to write it, from Vitally's answer. When a label appears twice (an
/// earlier duplicate), the first one listed wins; fields of types this project does not
/// write are left out.
fn field_map(fields: &[Field]) -> BTreeMap<String, FieldRef> {
    let mut map = BTreeMap::new();
    for field in fields {
        let Some(field_type) = field.known_type() else {
            tracing::debug!(
                label = %field.label,
                field_type = %field.field_type,
                "skipping a field of a type this project does not write"
            );
            continue;
        };
        map.entry(field.label.clone()).or_insert_with(|| FieldRef {
            path: field.path.clone(),
            field_type,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traits::{EXTRA_TRAITS, FIXED_TRAITS};

    fn field(label: &str, ty: &str, path: &str) -> Field {
        Field {
            id: format!("id-{path}"),
            label: label.to_owned(),
            path: path.to_owned(),
            field_type: ty.to_owned(),
        }
    }

    #[test]
    fn desired_fields_are_the_fixed_traits_plus_distinct_categories() {
        let cats = vec![
            "Product Area".to_owned(),
            " Product Area ".to_owned(),
            "".to_owned(),
            "status".to_owned(),
            "Region".to_owned(),
            "REGION".to_owned(),
        ];
        let desired = desired_fields(&cats);
        let own: Vec<_> = own_traits().collect();
        assert_eq!(own.len(), FIXED_TRAITS.len() + EXTRA_TRAITS.len());
        assert_eq!(desired.len(), own.len() + 2);
        assert_eq!(desired[..20], FIXED_TRAITS[..]);
        assert_eq!(desired[20..own.len()], EXTRA_TRAITS[..]);
        assert_eq!(
            desired[own.len()..],
            [
                ("Product Area", FieldType::String),
                ("Region", FieldType::String)
            ]
        );
    }

    #[test]
    fn an_object_from_before_the_source_trait_misses_only_source() {
        let present: Vec<Field> = FIXED_TRAITS
            .iter()
            .chain([("Region", FieldType::String)].iter())
            .map(|(label, ty)| field(label, ty.as_str(), label))
            .collect();
        let categories = ["Region".to_owned()];
        let missing = missing_fields(&desired_fields(&categories), &present);
        assert_eq!(missing, [(crate::traits::label::SOURCE, FieldType::String)]);
    }

    #[test]
    fn only_labels_vitally_lacks_are_missing() {
        let categories = ["Region".to_owned()];
        let desired = desired_fields(&categories);
        let present = vec![
            field("Title", "textarea", "vitally.custom.title"),
            field("region", "string", "vitally.custom.region"),
        ];
        let missing = missing_fields(&desired, &present);
        assert_eq!(missing.len(), desired.len() - 2);
        assert!(missing.iter().all(|(l, _)| *l != "Title" && *l != "Region"));
    }

    #[test]
    fn the_field_map_keeps_the_first_of_duplicate_labels_and_skips_unknown_types() {
        let map = field_map(&[
            field("Title", "textarea", "vitally.custom.title"),
            field("Title", "textarea", "vitally.custom.title2"),
            field("Flag", "boolean", "vitally.custom.flag"),
        ]);
        assert_eq!(map.len(), 1);
        assert_eq!(map["Title"].path, "vitally.custom.title");
        assert_eq!(map["Title"].field_type, FieldType::Textarea);
    }

    #[test]
    fn a_refresh_names_the_traits_that_appeared_and_disappeared() {
        let at = |path: &str| FieldRef {
            path: path.into(),
            field_type: FieldType::String,
        };
        let before = BTreeMap::from([
            ("Old".to_owned(), at("a")),
            ("Kept".to_owned(), at("b")),
            ("Moved".to_owned(), at("d")),
        ]);
        let after = BTreeMap::from([
            ("Kept".to_owned(), at("b")),
            ("New".to_owned(), at("c")),
            ("Moved".to_owned(), at("e")),
        ]);
        let refresh = compare_fields(&before, after.clone());
        assert_eq!(refresh.added, ["New"]);
        assert_eq!(refresh.removed, ["Old"]);
        assert_eq!(refresh.changed, ["Moved"]);
        assert_eq!(refresh.fields, after);
        assert!(compare_fields(&after, after.clone()).is_unchanged());
    }

    fn http(allowed: &str) -> VitallyHttp {
        let allowed = thena_runtime::egress::AllowList::vitally_and(allowed).unwrap();
        let metrics = crate::metrics::VitallyMetrics::unregistered();
        VitallyHttp::new(std::time::Duration::from_secs(1), allowed, metrics).unwrap()
    }

    #[test]
    fn urls_must_be_allowed_and_plain() {
        let http = http("http://127.0.0.1:8080");
        assert_eq!(
            validate_url(&http, " https://acme.rest.vitally.io/ ").unwrap(),
            "https://acme.rest.vitally.io"
        );
        assert!(validate_url(&http, "http://127.0.0.1:8080").is_ok());
        for bad in [
            "",
            "acme.rest.vitally.io",
            "ftp://acme.rest.vitally.io",
            "https://acme.rest.vitally.io/?x=1",
            "http://acme.rest.vitally.io",
            "https://127.0.0.1:8080",
            "http://127.0.0.1:8081",
        ] {
            assert!(
                matches!(validate_url(&http, bad), Err(ConnectError::InvalidUrl(_))),
                "{bad}"
            );
        }
        let err = validate_url(&http, "https://key:pw@acme.rest.vitally.io").unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
        let long = format!("https://{}.example", "a".repeat(20_000));
        let err = validate_url(&http, &long).unwrap_err().to_string();
        assert!(err.len() < 600, "{} characters", err.len());
    }

    #[test]
    fn auth_headers_and_budgets_are_checked_before_any_call() {
        assert!(validate_auth_header(&SecretString::from("  ")).is_err());
        assert!(validate_auth_header(&SecretString::from("Basic a\nb")).is_err());
        assert!(validate_auth_header(&SecretString::from("Basic YWJjOg==")).is_ok());
        assert!(validate_budget(0).is_err());
        assert!(validate_budget(1001).is_err());
        assert!(validate_budget(600).is_ok());
    }

    #[test]
    fn toggles_change_only_what_they_name() {
        let mut integration = Integration {
            workspace_id: "T1".into(),
            api_url: "https://x".into(),
            auth_header: SecretString::from("Basic x"),
            push_requests: true,
            update_requests: true,
            sync_threads: false,
            auto_create_fields: false,
            rate_budget_per_min: 600,
            established_at: Utc::now(),
            custom_object_id: "co".into(),
            fields: BTreeMap::new(),
            fields_refreshed_at: Utc::now(),
            fingerprint: "k1:f".into(),
            health: Health::Healthy,
            health_detail: None,
            health_changed_at: Utc::now(),
            connected_at: Utc::now(),
            updated_at: Utc::now(),
            revision: 1,
        };
        apply_toggles(
            &mut integration,
            Toggles {
                sync_threads: Some(true),
                rate_budget_per_min: Some(300),
                ..Toggles::default()
            },
        )
        .unwrap();
        assert!(integration.push_requests && integration.update_requests);
        assert!(integration.sync_threads && !integration.auto_create_fields);
        assert_eq!(integration.rate_budget_per_min, 300);
        let refused = apply_toggles(
            &mut integration,
            Toggles {
                rate_budget_per_min: Some(0),
                push_requests: Some(false),
                ..Toggles::default()
            },
        );
        assert!(refused.is_err());
        assert!(
            integration.push_requests,
            "a refused change applies nothing"
        );
    }

    #[test]
    fn the_first_call_tells_bad_credentials_from_anything_else_and_repeats_no_body() {
        let e = |kind| VitallyError::new("custom_objects.list", kind, "internal-secret");
        assert!(matches!(
            first_call_error(e(ErrorKind::Status(401))),
            ConnectError::Unauthorized { status: 401 }
        ));
        assert!(matches!(
            first_call_error(e(ErrorKind::Status(403))),
            ConnectError::Unauthorized { status: 403 }
        ));
        assert!(matches!(
            first_call_error(e(ErrorKind::Status(429))),
            ConnectError::Vitally(_)
        ));
        assert!(matches!(
            first_call_error(e(ErrorKind::Refused)),
            ConnectError::InvalidUrl(_)
        ));
        let unreachable = [
            ErrorKind::Connect,
            ErrorKind::Timeout,
            ErrorKind::Transport,
            ErrorKind::Decode,
            ErrorKind::Status(404),
            ErrorKind::Status(500),
        ]
        .map(|kind| first_call_error(e(kind)).to_string());
        assert!(
            unreachable.iter().all(|m| *m == unreachable[0]),
            "{unreachable:?}"
        );
        assert!(unreachable[0].contains("could not reach a Vitally API at that URL"));
        assert!(!unreachable[0].contains("internal-secret"));
        let later = ConnectError::from(e(ErrorKind::Status(500))).to_string();
        assert_eq!(later, "vitally custom_objects.list failed: HTTP 500");
    }
}
