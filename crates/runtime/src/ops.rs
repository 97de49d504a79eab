//! The ops endpoints every role serves: `/healthz` (alive), `/readyz` (dependencies
//! reachable) and `/metrics` (Prometheus text format).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness checks (e.g. "broker", "redis") that the role's own loops keep current.
/// Ready when every registered check is ok; a role with no checks is ready.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, check: &'static str, ok: bool) {
        self.lock().insert(check, ok);
    }

    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|ok| *ok)
    }

    pub fn report(&self) -> BTreeMap<&'static str, bool> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A poisoned map still holds valid booleans.
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct OpsState {
    registry: prometheus::Registry,
    readiness: Readiness,
}

/// `/healthz`, `/readyz`, `/metrics` for `registry` and `readiness`.
pub fn router(registry: prometheus::Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            registry,
            readiness,
        })
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let status = if state.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(state.readiness.report()))
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` and serves the ops router in a background task; returns the bound address.
pub async fn spawn(
    addr: std::net::SocketAddr,
    registry: prometheus::Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(registry, readiness);
    tokio::spawn(async move {
        if let Err(e) = serve(listener, app, shutdown).await {
            tracing::error!(error = %e, "ops server stopped");
        }
    });
    tracing::info!(%bound, "ops endpoints: /healthz /readyz /metrics");
    Ok(bound)
}
