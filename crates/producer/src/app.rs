use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use thena_broker::{Broker, Publisher};
use thena_events::Limits;
use thena_replayer::dlq::Dlq;
use thena_runtime::ops::Readiness;
use thena_store::ledger::Ledger;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vitally_client::{client::VitallyHttp, integrations::IntegrationStore};

use crate::{
    OPENAPI_JSON, admin, auth, backfill,
    config::ProducerConfig,
    console::{self, Console},
    dead_letters::routes as dead_letters,
    error, ingest,
    metrics::IngestMetrics,
};

/// How often the "broker" and "postgres" readiness checks are refreshed.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// The I/O handles the producer uses; built by the caller (the binary or a test).
pub struct AppDeps {
    pub broker: Broker,
    pub publisher: Publisher,
    pub integrations: IntegrationStore,
    pub vitally: VitallyHttp,
    pub readiness: Readiness,
}

/// Shared by every request: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    deps: AppDeps,
    metrics: IngestMetrics,
    limits: Limits,
    ledger: Ledger,
    dlq: Dlq,
    console: Option<Console>,
    console_addr: Option<SocketAddr>,
}

impl AppState {
    pub fn new(config: ProducerConfig, deps: AppDeps, metrics: IngestMetrics) -> Self {
        Self::with_console(config, deps, metrics, None, None)
    }

    /// A producer that also serves the operator console: on the API's port, or on
    /// `console_addr` when given (see [`run_console`]).
    pub fn with_console(
        config: ProducerConfig,
        deps: AppDeps,
        metrics: IngestMetrics,
        console: Option<Console>,
        console_addr: Option<SocketAddr>,
    ) -> Self {
        let ledger = Ledger::read_only(deps.integrations.db().clone());
        let dlq = Dlq::new(deps.integrations.db().clone());
        Self {
            inner: Arc::new(Inner {
                config,
                deps,
                metrics,
                limits: Limits::default(),
                ledger,
                dlq,
                console,
                console_addr,
            }),
        }
    }

    /// The console, when enabled.
    pub fn console(&self) -> Option<&Console> {
        self.inner.console.as_ref()
    }

    /// Where the console has a port of its own, if it does.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.inner.console_addr
    }

    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.inner.metrics
    }

    pub fn readiness(&self) -> &Readiness {
        &self.inner.deps.readiness
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub(crate) fn publisher(&self) -> &Publisher {
        &self.inner.deps.publisher
    }

    pub(crate) fn broker(&self) -> &Broker {
        &self.inner.deps.broker
    }

    pub(crate) fn integrations(&self) -> &IntegrationStore {
        &self.inner.deps.integrations
    }

    pub(crate) fn vitally(&self) -> &VitallyHttp {
        &self.inner.deps.vitally
    }

    pub(crate) fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The parked set's operations (the library `dlq` and the console use too).
    pub fn dlq(&self) -> &Dlq {
        &self.inner.dlq
    }
}

/// The producer as configured (the binary and the demo build it here): a publisher with
/// 64 confirm channels, since batched ingest is bounded by publishes in flight.
pub async fn from_config(
    config: &thena_runtime::Config,
    registry: &prometheus::Registry,
    readiness: Readiness,
) -> anyhow::Result<AppState> {
    use anyhow::Context;
    let mut producer = ProducerConfig::new(config.require_producer_token()?);
    producer.body_limit = config.ingest_body_limit;
    producer.default_budget_per_min = config.vitally.default_budget_per_min;
    producer.validate()?;
    let broker = Broker::connect(
        config.amqp_url.clone(),
        "thena-vitally-producer",
        thena_broker::Topology::from_config(config),
    )
    .await
    .context("cannot connect to RabbitMQ (AMQP_URL)")?;
    let publisher = broker
        .publisher_with(thena_broker::PublisherOptions {
            channels: 64,
            ..Default::default()
        })
        .await?;
    let integrations = IntegrationStore::from_config(config).await?;
    let vitally = VitallyHttp::from_settings(
        &config.vitally,
        vitally_client::metrics::VitallyMetrics::new(registry)?,
    )?;
    let console = if config.console.enabled {
        Some(Console::from_config(config, integrations.db().clone()).await?)
    } else {
        None
    };
    let deps = AppDeps {
        broker,
        publisher,
        integrations,
        vitally,
        readiness,
    };
    Ok(AppState::with_console(
        producer,
        deps,
        IngestMetrics::new(registry)?,
        console,
        config.console.addr,
    ))
}

/// The whole producer API: ingest and admin behind the bearer token; health probes and
/// the OpenAPI document open.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/integrations", post(admin::connect).get(admin::list))
        .route(
            "/v1/integrations/{workspace_id}",
            get(admin::get_one)
                .patch(admin::patch_toggles)
                .delete(admin::disconnect),
        )
        .route(
            "/v1/integrations/{workspace_id}/history",
            get(admin::history),
        )
        .route(
            "/v1/integrations/{workspace_id}/requests",
            get(admin::list_requests),
        )
        .route(
            "/v1/integrations/{workspace_id}/backfill",
            post(backfill::post)
                .get(backfill::list)
                .layer(DefaultBodyLimit::max(backfill::BODY_LIMIT)),
        )
        .route(
            "/v1/integrations/{workspace_id}/backfill/{job}",
            get(backfill::show),
        )
        .route(
            "/v1/integrations/{workspace_id}/requests/{request_id}",
            get(admin::show_request),
        )
        .route("/v1/dead-letters", get(dead_letters::list_all))
        .route("/v1/dead-letters/replay", post(dead_letters::replay_all))
        .route("/v1/dead-letters/purge", post(dead_letters::purge_all))
        .route("/v1/dead-letters/audit", get(dead_letters::audit_all))
        .route(
            "/v1/dead-letters/audit/{audit_id}",
            get(dead_letters::audit_entry_any),
        )
        .route("/v1/dead-letters/{id}", get(dead_letters::show_any))
        .route(
            "/v1/integrations/{workspace_id}/dead-letters",
            get(dead_letters::list_of),
        )
        .route(
            "/v1/integrations/{workspace_id}/dead-letters/replay",
            post(dead_letters::replay_of),
        )
        .route(
            "/v1/integrations/{workspace_id}/dead-letters/purge",
            post(dead_letters::purge_of),
        )
        .route(
            "/v1/integrations/{workspace_id}/dead-letters/audit",
            get(dead_letters::audit_of),
        )
        .route(
            "/v1/integrations/{workspace_id}/dead-letters/audit/{audit_id}",
            get(dead_letters::audit_entry_of),
        )
        .route(
            "/v1/integrations/{workspace_id}/dead-letters/{id}",
            get(dead_letters::show_of),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let mut router = Router::new().merge(protected);
    if state.console().is_some() && state.console_addr().is_none() {
        router = router.merge(console::router());
    }
    router
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(error::no_route)
        .layer(DefaultBodyLimit::max(state.config().body_limit))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let status = if state.readiness().is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(state.readiness().report()))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

/// Serves the API on `listener` until `shutdown`; in-flight requests (and their broker
/// confirms) finish before this returns. Keeps the "broker" readiness check current.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    state
        .config()
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // A child token: stopping the watcher must not cancel the caller's other tasks.
    let watching = shutdown.child_token();
    let watcher = tokio::spawn(watch_broker(state.clone(), watching.clone()));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "producer API listening");
    }
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    // The server can also stop on an accept error: the watcher must not outlive it.
    watching.cancel();
    if let Err(e) = watcher.await {
        tracing::warn!(error = %e, "readiness watcher ended abnormally");
    }
    served
}

/// Serves the console alone on `listener` (its own port, `CONSOLE_ADDR`) until
/// `shutdown`.
pub async fn run_console(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "operator console listening");
    }
    let router = console::router()
        .fallback(error::no_route)
        .layer(DefaultBodyLimit::max(state.config().body_limit))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn watch_broker(state: AppState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let healthy = state.broker().is_healthy().await;
                state.readiness().set("broker", healthy);
                let answers = state.integrations().db().ping().await;
                state.readiness().set("postgres", answers);
            }
        }
    }
}
