//! What every role shares: typed configuration, telemetry (tracing + Prometheus), the
//! ops HTTP server (`/healthz`, `/readyz`, `/metrics`) and shutdown on signals.

pub mod config;
pub mod ops;
pub mod redis;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, ConfigError};
