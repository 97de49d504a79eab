//! The consumer: takes request-change events off RabbitMQ and makes Vitally show the
//! current request under the right customer.
//!
//! - [`linking`] and [`policy`]: the product doc's rules as pure functions.
//! - [`cache`] and [`guard`]: fleet-wide Redis state (lookups, per-request locks, versions).
//! - [`instances`]: which instance of a request is the one (pure).
//! - [`pipeline`]: one event → one [`outcome::Outcome`].
//! - [`worker`]: deliveries in, acks and hand-offs out.

pub mod app;
pub mod cache;
pub mod explain;
pub mod fault;
pub mod guard;
pub mod health;
pub mod instances;
pub mod linking;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod policy;
pub mod resync;
pub mod worker;
