use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// 1 MiB: a batch of a few hundred full snapshots; larger bodies get 413.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// How long one publish may wait for the broker's confirm before the API answers 503.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Vitally budget of a new integration unless configured: well under the 1000/min a key
/// allows, since the customer's other tools share that key (`VITALLY_BUDGET_PER_MIN`).
pub const DEFAULT_BUDGET_PER_MIN: u32 = 600;

/// Everything the producer's HTTP layer needs to know, parsed once at start.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Bearer token for ingest and admin (`PRODUCER_TOKEN`).
    pub token: SecretString,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
    /// Deadline for one publisher confirm.
    pub publish_timeout: Duration,
    /// Vitally budget of a newly connected integration (`VITALLY_BUDGET_PER_MIN`).
    pub default_budget_per_min: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the producer token must not be empty")]
    EmptyToken,
    #[error("the body limit must be at least 1 byte")]
    ZeroBodyLimit,
    #[error("the publish timeout must be longer than zero")]
    ZeroPublishTimeout,
}

impl ProducerConfig {
    /// A config with the default body limit and publish timeout.
    pub fn new(token: SecretString) -> Self {
        Self {
            token,
            body_limit: DEFAULT_BODY_LIMIT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            default_budget_per_min: DEFAULT_BUDGET_PER_MIN,
        }
    }

    /// Rejects settings that would make the API unusable (an empty token would let an
    /// empty `Bearer` header through).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.token.expose_secret().trim().is_empty() {
            return Err(ConfigError::EmptyToken);
        }
        if self.body_limit == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        if self.publish_timeout.is_zero() {
            return Err(ConfigError::ZeroPublishTimeout);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_token_is_refused() {
        let config = ProducerConfig::new(SecretString::from("  "));
        assert_eq!(config.validate(), Err(ConfigError::EmptyToken));
    }

    #[test]
    fn defaults_are_valid_and_the_token_never_prints() {
        let config = ProducerConfig::new(SecretString::from("s3cr3t-token"));
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.body_limit, 1024 * 1024);
        assert!(!format!("{config:?}").contains("s3cr3t-token"));
    }

    #[test]
    fn a_zero_limit_or_timeout_is_refused() {
        let mut config = ProducerConfig::new(SecretString::from("t"));
        config.body_limit = 0;
        assert_eq!(config.validate(), Err(ConfigError::ZeroBodyLimit));
        config.body_limit = 10;
        config.publish_timeout = Duration::ZERO;
        assert_eq!(config.validate(), Err(ConfigError::ZeroPublishTimeout));
    }
}
