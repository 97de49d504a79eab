//! The broker side every role shares: the RabbitMQ topology (one place that names and
//! declares every exchange and queue), a reconnecting [`Broker`] handle, a
//! [`Publisher`] that never reports success without a publisher confirm, and the
//! failure headers ([`Failure`]) that travel with a message through retries.
//!
//! ```text
//!  producer ──► {p}.requests (topic) ──request.#──► {p}.requests.sync (quorum, delivery limit)
//!                    ▲                                   │ consumer: dead_letter / park / defer
//!                    │ TTL expiry (keeps routing key)    │ RabbitMQ: delivery limit exceeded
//!   {p}.requests.delay.{ms}ms (fanout ► quorum, TTL)     ▼
//!                    ▲                      {p}.requests.dlx (fanout) ──► {p}.requests.dead (quorum)
//!                    └─────────── replayer: retry ◄──────────────────────────────┘
//!                                 replayer: park ──► {p}.requests.parked (quorum) ──► PostgreSQL
//! ```

mod broker;
mod failure;
mod metrics;
mod publisher;
mod redact;
mod topology;

pub use broker::{Broker, BrokerError};
pub use failure::{
    ATTEMPTS_HEADER, BACKFILL_JOB_HEADER, CLASS_HEADER, DEAD_LETTERED_AT_HEADER, FAILURE_HEADERS,
    FIRST_FAILURE_HEADER, Failure, FailureClass, LAST_ERROR_HEADER, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER, PARKED_AT_HEADER, REASON_HEADER, RETRY_AT_HEADER,
    WORKSPACE_HEADER, header_str, strip_failure_headers,
};
pub use lapin;
pub use metrics::{BrokerMetrics, QUEUE_LABELS};
pub use publisher::{PublishError, Publisher, PublisherOptions};
pub use redact::scrub_secrets;
pub use topology::{DEFAULT_DELAY_TIERS, Topology, Wake};
