//! The producer role: Thena posts request snapshots to `POST /v1/events`; each one is
//! validated strictly and published durably (persistent, mandatory, confirmed) before the
//! API answers 202. The same router carries the integration admin API (connect, toggles,
//! disconnect) and serves its own OpenAPI description.
//!
//! [`emit`] is the load/demo generator that feeds this API (or the broker directly) with
//! realistic request lifecycles.

mod admin;
mod app;
mod auth;
pub mod backfill;
mod config;
pub mod console;
mod dead_letters;
pub mod emit;
mod error;
pub mod ingest;
mod metrics;

pub use app::{AppDeps, AppState, from_config, router, run, run_console};
pub use config::{ConfigError, DEFAULT_BODY_LIMIT, DEFAULT_PUBLISH_TIMEOUT, ProducerConfig};
pub use metrics::IngestMetrics;

/// The OpenAPI 3.1 description of the whole HTTP API, served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");
