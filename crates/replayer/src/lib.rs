//! The replayer role and the dead-letter operations.
//!
//! - [`schedule`]: pure retry policy ([`RetrySchedule::decide`], [`RetrySchedule::plan`]).
//! - [`run_replayer`]: consumes the dead queue, retries through the delay tiers or parks,
//!   publishing with confirm before acking; drains the parked queue into PostgreSQL (the
//!   parked set); polls queue depths and the parked set into the metrics.
//! - [`parked`]: a parked message as a row of the parked set (pure).
//! - [`dlq`]: list / show / replay / purge / audit of the parked set — the one library
//!   behind the `dlq` CLI, the admin API and the console.

pub mod dlq;
pub mod parked;
mod replayer;
pub mod schedule;

pub use replayer::{
    ReplayerConfig, ReplayerDeps, ReplayerMetrics, SETTLED_RETENTION, run_from_config,
    run_replayer, run_replayer_with,
};
pub use schedule::{Decision, Plan, RetrySchedule};
