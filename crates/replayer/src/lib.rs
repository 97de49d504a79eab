//! The replayer role and the `dlq` operations.
//!
//! - [`schedule`]: pure retry policy ([`RetrySchedule::decide`], [`RetrySchedule::plan`]).
//! - [`run_replayer`]: consumes the dead queue, retries through the delay tiers or parks,
//!   publishing with confirm before acking; polls queue depths into the metrics.
//! - [`dlq`]: list / show / replay / purge for the ops CLI.

pub mod dlq;
mod replayer;
pub mod schedule;

pub use replayer::{
    ReplayerConfig, ReplayerMetrics, run_from_config, run_replayer, run_replayer_with,
};
pub use schedule::{Decision, Plan, RetrySchedule};
