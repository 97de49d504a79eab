//! The integration admin API: connect a workspace to Vitally, read (redacted), change
//! settings, disconnect, read the history. The Vitally auth header goes in, never out.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use vitally_client::{
    error::ErrorClass,
    integrations::StoreError,
    provision::{self, ConnectError, ConnectRequest, Toggles},
};

use crate::{
    app::AppState,
    error::{ApiError, bad_json},
};

/// Who changed an integration through this API, in its history.
const ACTOR: &str = "admin-api";

/// `POST /v1/integrations`. `Debug` (derived through `SecretString`) redacts the header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectBody {
    workspace_id: String,
    api_url: String,
    auth_header: SecretString,
    #[serde(default)]
    categories: Vec<String>,
    /// The product's setup asks to enable both; they default on.
    #[serde(default = "on")]
    push_requests: bool,
    #[serde(default = "on")]
    update_requests: bool,
    #[serde(default)]
    sync_threads: bool,
    #[serde(default)]
    auto_create_fields: bool,
    /// `VITALLY_BUDGET_PER_MIN` when absent.
    #[serde(default)]
    rate_budget_per_min: Option<u32>,
    /// The start of forward-only sync; absent keeps the earlier record's, or "now".
    #[serde(default)]
    established_at: Option<DateTime<Utc>>,
}

fn on() -> bool {
    true
}

impl ConnectBody {
    fn into_request(self, default_budget: u32) -> ConnectRequest {
        let body = self;
        ConnectRequest {
            workspace_id: body.workspace_id,
            api_url: body.api_url,
            auth_header: body.auth_header,
            categories: body.categories,
            push_requests: body.push_requests,
            update_requests: body.update_requests,
            sync_threads: body.sync_threads,
            auto_create_fields: body.auto_create_fields,
            rate_budget_per_min: body.rate_budget_per_min.unwrap_or(default_budget),
            established_at: body.established_at,
        }
    }
}

/// `PATCH /v1/integrations/{workspace_id}`: absent fields stay as they are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TogglesBody {
    push_requests: Option<bool>,
    update_requests: Option<bool>,
    sync_threads: Option<bool>,
    auto_create_fields: Option<bool>,
    rate_budget_per_min: Option<u32>,
    established_at: Option<DateTime<Utc>>,
}

impl From<TogglesBody> for Toggles {
    fn from(body: TogglesBody) -> Self {
        Toggles {
            push_requests: body.push_requests,
            update_requests: body.update_requests,
            sync_threads: body.sync_threads,
            auto_create_fields: body.auto_create_fields,
            rate_budget_per_min: body.rate_budget_per_min,
            established_at: body.established_at,
        }
    }
}

pub(crate) async fn connect(
    State(state): State<AppState>,
    body: Result<Json<ConnectBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad_json(&e))?;
    let workspace_id = body.workspace_id.clone();
    let request = body.into_request(state.config().default_budget_per_min);
    let connected = provision::connect(state.vitally(), state.integrations(), request, ACTOR)
        .await
        .map_err(|e| connect_error(&e))?;
    tracing::info!(workspace_id = %workspace_id, action = connected.action, "integration connected");
    let status = if connected.action == "connected" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut record = connected.integration.redacted();
    if let Some(record) = record.as_object_mut() {
        record.insert("object".into(), json!(connected.object));
        record.insert("traits_added".into(), json!(connected.traits_added));
    }
    let mut response = (status, Json(record)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/integrations/{workspace_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let redacted = state
        .integrations()
        .views()
        .await
        .map_err(|e| store_error(&e))?;
    Ok(Json(json!({ "integrations": redacted })))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state
        .integrations()
        .get(&workspace_id)
        .await
        .map_err(|e| store_error(&e))?
    {
        Some(integration) => Ok(Json(integration.redacted())),
        None => Err(not_connected(&workspace_id)),
    }
}

pub(crate) async fn patch_toggles(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
    body: Result<Json<TogglesBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(|e| bad_json(&e))?;
    let (integration, changes) =
        provision::set_toggles(state.integrations(), &workspace_id, body.into(), ACTOR)
            .await
            .map_err(|e| connect_error(&e))?;
    tracing::info!(workspace_id = %workspace_id, %changes, "integration settings changed");
    let mut record = integration.redacted();
    if let Some(record) = record.as_object_mut() {
        record.insert("changes".into(), changes);
    }
    Ok(Json(record))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    limit: Option<i64>,
}

/// `GET /v1/integrations/{workspace_id}/history`: newest `limit` changes (default 100,
/// at most 1000), oldest first.
pub(crate) async fn history(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 1000",
        ));
    }
    let entries = state
        .integrations()
        .history(&workspace_id, limit)
        .await
        .map_err(|e| store_error(&e))?;
    if entries.is_empty() {
        return Err(not_connected(&workspace_id));
    }
    Ok(Json(
        json!({ "workspace_id": workspace_id, "history": entries }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestsQuery {
    outcome: Option<String>,
    reason: Option<String>,
    since: Option<DateTime<Utc>>,
    after: Option<u64>,
    limit: Option<i64>,
}

/// `GET /v1/integrations/{workspace_id}/requests`: the ledger, filtered, in request-id
/// order; `next` is the `after` of the next page.
pub(crate) async fn list_requests(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
    query: Result<Query<RequestsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 1000",
        ));
    }
    let filter = thena_store::ledger::Filter {
        outcome: query.outcome,
        reason: query.reason,
        since: query.since,
        ids: Vec::new(),
        after: query.after,
    };
    let page = state
        .ledger()
        .list(&workspace_id, &filter, limit)
        .await
        .map_err(|e| store_error(&StoreError::Db(e)))?;
    Ok(Json(json!({
        "workspace_id": workspace_id,
        "requests": page.requests,
        "next": page.next,
    })))
}

/// `GET /v1/integrations/{workspace_id}/requests/{request_id}`: one request's ledger row,
/// its latest snapshot and its history.
pub(crate) async fn show_request(
    State(state): State<AppState>,
    Path((workspace_id, request_id)): Path<(String, u64)>,
) -> Result<Json<Value>, ApiError> {
    let record = state
        .ledger()
        .show(&workspace_id, request_id, 50)
        .await
        .map_err(|e| store_error(&StoreError::Db(e)))?;
    match record {
        Some(record) => Ok(Json(json!(record))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("request {request_id} of workspace {workspace_id} never reached the fleet"),
        )),
    }
}

pub(crate) async fn disconnect(
    State(state): State<AppState>,
    Path(workspace_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let removed = provision::disconnect(state.integrations(), &workspace_id, ACTOR)
        .await
        .map_err(|e| connect_error(&e))?;
    if removed {
        tracing::info!(workspace_id = %workspace_id, "integration disconnected");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_connected(&workspace_id))
    }
}

fn not_connected(workspace_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("workspace {workspace_id} is not connected"),
    )
}

/// Every connect/toggle failure, classified once: the operator's input (422), Vitally
/// (502, or 503 while rate limited), our store (503/500), or an unknown workspace (404).
/// The messages carry no credential: `ConnectError` never holds the header's value.
pub(crate) fn connect_error(error: &ConnectError) -> ApiError {
    let message = error.to_string();
    match error {
        ConnectError::InvalidUrl(_)
        | ConnectError::InvalidAuthHeader(_)
        | ConnectError::InvalidSetting(_)
        | ConnectError::UnsupportedFieldType { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
        ConnectError::Unauthorized { status } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message).with("vitally_status", *status)
        }
        ConnectError::NotConnected(_) => ApiError::new(StatusCode::NOT_FOUND, message),
        ConnectError::AlreadyConnected { workspace } => {
            ApiError::new(StatusCode::CONFLICT, message)
                .with("connected_workspace", workspace.clone())
        }
        ConnectError::Unreachable { .. } | ConnectError::Provisioning { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, message)
        }
        ConnectError::Vitally(e) => match e.class() {
            ErrorClass::RateLimited { reset } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Vitally rate limit reached: {message}"),
            )
            .retry_after_secs(reset.as_secs_f64().ceil() as u64),
            ErrorClass::Transient | ErrorClass::Permanent => ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("Vitally failed: {message}"),
            ),
        },
        ConnectError::Store(e) => store_error(e),
    }
}

/// Store details (database errors) are logged, not returned: they describe our insides.
pub(crate) fn store_error(error: &StoreError) -> ApiError {
    tracing::error!(error = %error, "integration store failed");
    match error {
        StoreError::Db(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "integration store unavailable",
        )
        .retry_later(),
        StoreError::Corrupt { .. } | StoreError::Cipher { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "integration record unreadable; reconnect the workspace",
        ),
    }
}

#[cfg(test)]
mod tests {
    use vitally_client::error::{ErrorKind, VitallyError};

    use super::*;

    fn status(error: ConnectError) -> StatusCode {
        connect_error(&error).into_response().status()
    }

    #[test]
    fn operator_mistakes_are_422_and_vitally_trouble_is_502() {
        assert_eq!(
            status(ConnectError::InvalidUrl("x".into())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(ConnectError::InvalidAuthHeader("it is empty")),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(ConnectError::InvalidSetting("x".into())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(ConnectError::Unauthorized { status: 401 }),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(ConnectError::NotConnected("T1".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(ConnectError::AlreadyConnected {
                workspace: "T0".into()
            }),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(ConnectError::Unreachable {
                detail: "refused".into()
            }),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status(ConnectError::Provisioning {
                object: "o".into(),
                labels: vec![]
            }),
            StatusCode::BAD_GATEWAY
        );
        let server_error = VitallyError::new("customObjects.list", ErrorKind::Status(500), "oops");
        assert_eq!(
            status(ConnectError::Vitally(server_error)),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn a_vitally_rate_limit_asks_to_retry_after_its_reset() {
        let limited = VitallyError::new("customObjects.list", ErrorKind::Status(429), "slow down")
            .with_reset(Some(std::time::Duration::from_millis(12_300)));
        let response = connect_error(&ConnectError::Vitally(limited)).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "13");
    }

    #[test]
    fn connect_bodies_default_the_toggles_and_hide_the_header() {
        let body: ConnectBody = serde_json::from_value(json!({
            "workspace_id": "T1",
            "api_url": "https://acme.rest.vitally.io",
            "auth_header": "Basic c2VjcmV0LWtleTo="
        }))
        .unwrap();
        assert!(!format!("{body:?}").contains("c2VjcmV0LWtleTo"));
        let request = body.into_request(600);
        assert!(request.push_requests && request.update_requests);
        assert!(!request.sync_threads && !request.auto_create_fields);
        assert_eq!(request.rate_budget_per_min, 600);
        assert_eq!(request.established_at, None);

        let unknown = serde_json::from_value::<ConnectBody>(json!({
            "workspace_id": "T1", "api_url": "x", "auth_header": "y", "push": true
        }));
        assert!(unknown.is_err());
    }
}
