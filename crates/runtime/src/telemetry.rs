//! Tracing set-up shared by every role: human-readable or JSON lines, filtered by RUST_LOG.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber once; a second call (tests, demo) is a no-op.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_target(true),
            )
            .try_init(),
        // Colours only for a person at a terminal: redirected logs (a file, a pipe, a
        // collector) get no ANSI escape codes. The fmt layer writes to stdout.
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stdout().is_terminal()),
            )
            .try_init(),
    };
    // Already initialised by an earlier caller in the same process: keep that one.
    drop(result);
}
