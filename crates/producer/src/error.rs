use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// Seconds a client should wait before retrying after a 503.
pub(crate) const RETRY_AFTER_SECS: u64 = 5;

/// A JSON error answer: `{"error": "...", ...details}`. Every non-2xx answer of this API has
/// this shape, so clients need one decoder.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: serde_json::Map<String, Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), Value::String(message.into()));
        Self {
            status,
            body,
            retry_after: None,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// Adds a detail field next to `error`.
    pub(crate) fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.insert(key.into(), value.into());
        self
    }

    /// Marks the error as temporary: the answer carries `Retry-After: 5`.
    pub(crate) fn retry_later(self) -> Self {
        self.retry_after_secs(RETRY_AFTER_SECS)
    }

    pub(crate) fn retry_after_secs(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(Value::Object(self.body))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Answer for any path this API does not have.
pub(crate) async fn no_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; see GET /openapi.json",
    )
}

/// A JSON body that does not fit the expected shape.
pub(crate) fn bad_json(rejection: &axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError::new(rejection.status(), "invalid request body")
        .with("detail", json!(rejection.body_text()))
}
