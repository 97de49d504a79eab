//! Everything that talks to Vitally: the typed REST client and its error classes,
//! integration records (encrypted at rest in Redis), connecting/provisioning the
//! "Thena Requests" object, the pure trait mapping, and the fleet-wide rate limiter.

pub mod client;
pub mod crypto;
pub mod error;
pub mod integrations;
pub mod limiter;
pub mod mapping;
pub mod metrics;
pub mod provision;
pub mod traits;
