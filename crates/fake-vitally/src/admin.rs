//! Test/admin endpoints under `/_fake/`: unauthenticated, uncounted, never faulted.

use std::time::Duration;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    routing::{delete, get, post, put},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    FakeVitally,
    calls::CallCounts,
    error::{ApiError, bad_request},
    faults::Fault,
    model::{Fixture, StateDump},
    query::JsonBody,
};

pub(crate) fn routes() -> Router<FakeVitally> {
    Router::new()
        .route("/_fake/seed", post(seed))
        .route("/_fake/state", get(state))
        .route("/_fake/calls", get(calls).delete(reset_calls))
        .route("/_fake/faults", post(inject).delete(clear_faults))
        .route("/_fake/rate-limit", put(rate_limit))
        .route(
            "/_fake/auth-headers",
            post(add_auth_header).put(rotate_auth_header),
        )
        .route("/_fake/custom-objects/{id}", delete(delete_custom_object))
        .route("/_fake/healthz", get(healthz))
}

/// Answers with the whole state after seeding, so callers learn generated ids.
async fn seed(
    State(fake): State<FakeVitally>,
    JsonBody(fixture): JsonBody<Fixture>,
) -> Result<Json<StateDump>, ApiError> {
    fake.seed(fixture).map_err(ApiError::BadRequest)?;
    Ok(Json(fake.dump()))
}

async fn state(State(fake): State<FakeVitally>) -> Json<StateDump> {
    Json(fake.dump())
}

async fn calls(State(fake): State<FakeVitally>) -> Json<CallCounts> {
    Json(fake.calls())
}

async fn reset_calls(State(fake): State<FakeVitally>) -> StatusCode {
    fake.reset_calls();
    StatusCode::NO_CONTENT
}

async fn inject(
    State(fake): State<FakeVitally>,
    JsonBody(fault): JsonBody<Fault>,
) -> Result<StatusCode, ApiError> {
    if let Some(status) = fault.status().filter(|s| !(400..=599).contains(s)) {
        return Err(bad_request(format!(
            "a fault status must be 400..=599, got {status}"
        )));
    }
    fake.inject(fault);
    Ok(StatusCode::NO_CONTENT)
}

async fn clear_faults(State(fake): State<FakeVitally>) -> StatusCode {
    fake.clear_faults();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct RateLimitBody {
    limit: u32,
    window_ms: u64,
}

async fn rate_limit(
    State(fake): State<FakeVitally>,
    JsonBody(body): JsonBody<RateLimitBody>,
) -> Result<StatusCode, ApiError> {
    if body.window_ms == 0 {
        return Err(bad_request("window_ms must be positive"));
    }
    fake.set_rate_limit(body.limit, Duration::from_millis(body.window_ms));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AuthHeaderBody {
    header: String,
}

async fn add_auth_header(
    State(fake): State<FakeVitally>,
    JsonBody(body): JsonBody<AuthHeaderBody>,
) -> Result<StatusCode, ApiError> {
    if body.header.trim().is_empty() {
        return Err(bad_request("header must not be empty"));
    }
    fake.add_auth_header(body.header);
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /_fake/auth-headers {"header": …}`: the customer rotated the key in Vitally;
/// only this header is accepted from now on.
async fn rotate_auth_header(
    State(fake): State<FakeVitally>,
    JsonBody(body): JsonBody<AuthHeaderBody>,
) -> Result<StatusCode, ApiError> {
    if body.header.trim().is_empty() {
        return Err(bad_request("header must not be empty"));
    }
    fake.rotate_auth_header(body.header);
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_custom_object(
    State(fake): State<FakeVitally>,
    Path(id): Path<String>,
) -> StatusCode {
    if fake.delete_custom_object(&id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
