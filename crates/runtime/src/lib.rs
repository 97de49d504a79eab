//! What every role shares: typed configuration, telemetry (tracing + Prometheus), the
//! ops HTTP server (`/healthz`, `/readyz`, `/metrics`) and shutdown on signals.

pub mod config;
pub mod egress;
pub mod ops;
pub mod redis;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, ConfigError};

/// Cuts `text` to at most `max` characters (on a char boundary), marking a cut with `…`:
/// how an error message repeats something it did not write.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
