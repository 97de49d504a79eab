//! One typed configuration for every role: defaults → optional file → environment,
//! parsed once at start and passed down. Nothing else reads the environment.
//!
//! The file uses the same `NAME=value` lines as the environment (one vocabulary; `#`
//! comments), so a value can move between a ConfigMap, a `.env` file and a shell
//! unchanged. Errors name the variable and what was wrong with it.

use std::{collections::HashMap, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use secrecy::SecretString;

use crate::egress::AllowList;

/// A configuration variable: its name, default (None = optional/unset), the values it
/// accepts and its meaning. `config`, the README's configuration table and the
/// deployment manifests test read this list; parsing enforces each `rule`.
pub struct Var {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub secret: bool,
    pub rule: Rule,
    pub help: &'static str,
}

const fn var(name: &'static str, default: &'static str, rule: Rule, help: &'static str) -> Var {
    Var {
        name,
        default: Some(default),
        secret: rule.is_secret(),
        rule,
        help,
    }
}

const fn unset(name: &'static str, rule: Rule, help: &'static str) -> Var {
    Var {
        name,
        default: None,
        secret: rule.is_secret(),
        rule,
        help,
    }
}

/// The values a variable accepts. Out of range, the role refuses to start with a
/// message naming the variable and this range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// A URL with one of these schemes; shown without its password.
    Url(&'static [&'static str]),
    /// Never shown; checked where it is used (the key ring).
    Secret,
    /// A bearer token: never shown, at least [`MIN_TOKEN_CHARS`] visible characters.
    Token,
    /// `host:port` to listen on.
    ListenAddr,
    OneOf(&'static [&'static str]),
    /// Letters, digits, `-`, `_` and `.`, at most this many.
    Name(usize),
    /// An unquoted PostgreSQL identifier, at most 40 characters.
    Schema,
    Count {
        min: u64,
        max: u64,
    },
    Bytes {
        min: u64,
        max: u64,
    },
    Duration {
        min: Duration,
        max: Duration,
    },
    /// Comma-separated, strictly growing, each in `min..=max`, at most `len` of them.
    Durations {
        min: Duration,
        max: Duration,
        len: usize,
    },
    /// A share of a budget, in (0, 1].
    Share,
    /// Comma-separated email domains, or `none` for an empty list.
    Domains,
    /// Hosts, `*.domains` and origins added to Vitally's own (see `egress`).
    Hosts,
}

impl Rule {
    const fn is_secret(&self) -> bool {
        matches!(self, Rule::Secret | Rule::Token)
    }

    /// The range as `config` and the README show it.
    pub fn describe(&self) -> String {
        match self {
            Rule::Url(schemes) => {
                let schemes: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
                format!("{} URL", schemes.join(" or "))
            }
            Rule::Secret => "secret".to_owned(),
            Rule::Token => format!("secret, at least {MIN_TOKEN_CHARS} visible characters"),
            Rule::ListenAddr => "ip:port".to_owned(),
            Rule::OneOf(choices) => choices.join(" or "),
            Rule::Name(max) => format!("letters, digits, - _ ., up to {max}"),
            Rule::Schema => "lowercase letters, digits, _, up to 40".to_owned(),
            Rule::Count { min, max } | Rule::Bytes { min, max } => format!("{min}–{max}"),
            Rule::Duration { min, max } => {
                format!("{}–{}", format_duration(*min), format_duration(*max))
            }
            Rule::Durations { min, max, len } => format!(
                "1–{len} growing, each {}–{}",
                format_duration(*min),
                format_duration(*max)
            ),
            Rule::Share => "(0, 1]".to_owned(),
            Rule::Domains => "domains, or none".to_owned(),
            Rule::Hosts => "hosts, *.domains, origins".to_owned(),
        }
    }
}

/// The shortest bearer token accepted (`openssl rand -hex 32` makes a good one).
pub const MIN_TOKEN_CHARS: usize = 16;

/// Vitally allows 1000 requests per minute per key: no budget can exceed it.
pub const VITALLY_LIMIT_PER_MIN: u32 = 1000;

/// Free-mail providers: a requestor at one of these is never linked by email domain.
pub const DEFAULT_FREE_MAIL: &str = "gmail.com,googlemail.com,outlook.com,hotmail.com,live.com,msn.com,yahoo.com,ymail.com,icloud.com,me.com,mac.com,aol.com,proton.me,protonmail.com,gmx.com,gmx.de,mail.com,zoho.com,yandex.com,yandex.ru,fastmail.com,hey.com,qq.com,163.com,126.com,web.de";

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

const fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

const fn count(min: u64, max: u64) -> Rule {
    Rule::Count { min, max }
}

const fn within(min: Duration, max: Duration) -> Rule {
    Rule::Duration { min, max }
}

pub const VARIABLES: &[Var] = &[
    var(
        "AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        Rule::Url(&["amqp", "amqps"]),
        "RabbitMQ URL (secret: may hold a password)",
    ),
    var(
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        Rule::Url(&["redis", "rediss", "redis+unix", "unix"]),
        "Redis URL: caches, locks, the limiter, the hot copy of the version guard (losable)",
    ),
    var(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/thena_vitally",
        Rule::Url(&["postgres", "postgresql"]),
        "PostgreSQL URL, the system of record: integrations, their history, synced versions (the database is created if missing)",
    ),
    var(
        "DATABASE_SCHEMA",
        "thena_vitally",
        Rule::Schema,
        "PostgreSQL schema of this deployment (created and migrated on start)",
    ),
    var(
        "LOG_FORMAT",
        "pretty",
        Rule::OneOf(&["pretty", "json"]),
        "`pretty` for people, `json` for log pipelines (filter with RUST_LOG)",
    ),
    var(
        "HTTP_ADDR",
        "0.0.0.0:8080",
        Rule::ListenAddr,
        "Listen address of the producer API (and of fake-vitally)",
    ),
    var(
        "METRICS_ADDR",
        "0.0.0.0:9090",
        Rule::ListenAddr,
        "Listen address of /healthz, /readyz and /metrics for every role",
    ),
    unset(
        "PRODUCER_TOKEN",
        Rule::Token,
        "Bearer token for the ingest and admin API (required by the producer)",
    ),
    unset(
        "INTEGRATIONS_KEY",
        Rule::Secret,
        "32-byte key (base64 or hex) encrypting Vitally auth headers at rest; the same as INTEGRATIONS_KEYS=k1:<key>",
    ),
    unset(
        "INTEGRATIONS_KEYS",
        Rule::Secret,
        "Key ring `id:key,id:key`, newest first: seals with the first, opens with any (rotation); overrides INTEGRATIONS_KEY",
    ),
    var(
        "NAME_PREFIX",
        "thena",
        Rule::Name(64),
        "Prefix of every exchange and queue, so environments and tests stay apart",
    ),
    var(
        "REDIS_PREFIX",
        "thena-vitally",
        Rule::Name(64),
        "Prefix of every Redis key",
    ),
    var(
        "CONSUMER_CONCURRENCY",
        "32",
        count(1, 1024),
        "Events one consumer processes at once",
    ),
    var(
        "CONSUMER_PREFETCH",
        "64",
        count(1, 10_000),
        "Unacked deliveries RabbitMQ hands one consumer (at least CONSUMER_CONCURRENCY)",
    ),
    var(
        "BACKFILL_CONCURRENCY",
        "4",
        count(1, 256),
        "Backfilled snapshots one consumer processes at once, on slots of their own (the live lane keeps CONSUMER_CONCURRENCY)",
    ),
    var(
        "BACKFILL_BUDGET_SHARE",
        "0.3",
        Rule::Share,
        "Most of an integration's Vitally budget a backfill may use, and only what live events leave idle",
    ),
    var(
        "SHUTDOWN_GRACE",
        "25s",
        within(secs(1), secs(10 * MINUTE)),
        "Time to finish in-flight events after SIGTERM (keep below terminationGracePeriodSeconds)",
    ),
    var(
        "REQUEST_LOCK_TTL",
        "60s",
        within(secs(5), secs(HOUR)),
        "Lifetime of a request lock: a crashed consumer's lock frees itself after this; one event's work is cut off at 3/4 of it, which must hold RATE_LIMIT_MAX_WAIT plus one VITALLY_TIMEOUT",
    ),
    var(
        "RATE_LIMIT_MAX_WAIT",
        "500ms",
        within(ms(0), secs(30)),
        "Longest a consumer waits for an integration's budget before deferring the event",
    ),
    var(
        "CACHE_TTL_USER",
        "10m",
        within(secs(1), secs(DAY)),
        "Cache lifetime of a user looked up by email",
    ),
    var(
        "CACHE_TTL_NEGATIVE",
        "2m",
        within(secs(1), secs(HOUR)),
        "Cache lifetime of a 'not found' answer",
    ),
    var(
        "CACHE_TTL_ACCOUNT_ORG",
        "1h",
        within(secs(1), secs(7 * DAY)),
        "Cache lifetime of an account's organization",
    ),
    var(
        "CACHE_TTL_DOMAIN",
        "30m",
        within(secs(1), secs(DAY)),
        "Cache lifetime of an email domain's link target",
    ),
    var(
        "CACHE_TTL_INSTANCE",
        "7d",
        within(secs(MINUTE), secs(90 * DAY)),
        "Cache lifetime of an instance id by externalId",
    ),
    var(
        "CACHE_TTL_FIELDS",
        "10m",
        within(secs(1), secs(DAY)),
        "Cache lifetime of the object's field paths",
    ),
    var(
        "INTEGRATION_REFRESH",
        "30s",
        within(ms(100), secs(HOUR)),
        "Backstop lifetime of a consumer's cached integration record (changes arrive at once over LISTEN/NOTIFY)",
    ),
    var(
        "HEALTH_PROBE_INTERVAL",
        "1m",
        within(ms(100), secs(HOUR)),
        "How often a paused integration is probed with one cheap Vitally call to see whether it healed",
    ),
    var(
        "RETRY_TIERS",
        "1s,5s,30s,2m,4m",
        Rule::Durations {
            min: ms(100),
            max: MAX_RETRY_TIER,
            len: 10,
        },
        "Delay queues, in order: attempt n waits tier n (the last repeats); none above 5m, or the 10-minute promise breaks; the smallest also sets how precisely an event waiting for budget comes back",
    ),
    var(
        "RETRY_MAX_AGE",
        "24h",
        within(secs(10 * MINUTE), secs(30 * DAY)),
        "A failing event older than this is parked for a human",
    ),
    var(
        "DELIVERY_LIMIT",
        "5",
        count(1, 100),
        "Deliveries before RabbitMQ dead-letters a message that keeps crashing consumers",
    ),
    var(
        "VITALLY_TIMEOUT",
        "10s",
        within(ms(100), secs(2 * MINUTE)),
        "Timeout of one Vitally call",
    ),
    var(
        "VITALLY_BUDGET_PER_MIN",
        "600",
        count(1, VITALLY_LIMIT_PER_MIN as u64),
        "Default fleet-wide Vitally budget per integration (Vitally allows 1000/min per key, shared with other tools)",
    ),
    unset(
        "VITALLY_ALLOWED_HOSTS",
        Rule::Hosts,
        "Where else a Vitally API may be, beyond https on *.rest.vitally.io, rest.vitally-eu.io and rest.vitally.io: hosts (https), *.domains (https), or origins with their scheme such as a local fake's http://127.0.0.1:8089 (an origin may resolve to a private address)",
    ),
    var(
        "LIMITER_FALLBACK_SHARE",
        "0.25",
        Rule::Share,
        "Share of the budget one replica uses alone while Redis is unreachable",
    ),
    var(
        "TEXTAREA_LIMIT",
        "10000",
        count(100, 1_000_000),
        "Characters kept in a textarea trait before the '… (truncated)' marker (a longer thread keeps its newest messages)",
    ),
    var(
        "FREE_MAIL_DOMAINS",
        DEFAULT_FREE_MAIL,
        Rule::Domains,
        "Domains never used for the email-domain fallback (comma-separated); `none` turns the guard off",
    ),
    var(
        "INGEST_BODY_LIMIT",
        "1048576",
        Rule::Bytes {
            min: 1024,
            max: 16 * 1024 * 1024,
        },
        "Largest ingest request body in bytes",
    ),
    var(
        "CONSOLE_ENABLED",
        "false",
        Rule::OneOf(&["true", "false"]),
        "Serve the operator console under /console (producer)",
    ),
    unset(
        "CONSOLE_ADDR",
        Rule::ListenAddr,
        "Listen address of the console when it should have a port of its own; unset: the API port (HTTP_ADDR)",
    ),
    var(
        "CONSOLE_SESSION_TTL",
        "8h",
        Rule::Duration {
            min: secs(MINUTE),
            max: secs(7 * 24 * HOUR),
        },
        "How long a console sign-in lasts",
    ),
];

/// The longest delay tier the 10-minute promise allows (plus processing time).
pub const MAX_RETRY_TIER: Duration = Duration::from_secs(300);

/// The part of `REQUEST_LOCK_TTL` one event's work may take: past it another consumer
/// could take the lock.
pub fn work_lease(request_lock_ttl: Duration) -> Duration {
    request_lock_ttl * 3 / 4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `pretty` or `json`, got {other:?}")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub concurrency: usize,
    pub backfill_concurrency: usize,
    pub backfill_budget_share: f64,
    pub prefetch: u16,
    pub shutdown_grace: Duration,
    pub max_rate_wait: Duration,
    pub request_lock_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub user_ttl: Duration,
    pub negative_ttl: Duration,
    pub account_org_ttl: Duration,
    pub domain_ttl: Duration,
    pub instance_ttl: Duration,
    pub fields_ttl: Duration,
    pub integration_refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub tiers: Vec<Duration>,
    pub max_age: Duration,
    pub delivery_limit: u32,
}

#[derive(Debug, Clone)]
pub struct VitallySettings {
    pub timeout: Duration,
    pub default_budget_per_min: u32,
    pub limiter_fallback_share: f64,
    pub textarea_limit: usize,
    /// Where a Vitally API may be: Vitally's hosts plus `VITALLY_ALLOWED_HOSTS`.
    pub allowed_hosts: AllowList,
}

/// Everything a role needs, typed. `Debug` shows secrets as `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: SecretString,
    pub redis_url: SecretString,
    pub log_format: LogFormat,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub database_url: SecretString,
    pub database_schema: String,
    pub producer_token: Option<SecretString>,
    pub integrations_key: Option<SecretString>,
    pub integrations_keys: Option<SecretString>,
    pub health_probe_interval: Duration,
    pub name_prefix: String,
    pub redis_prefix: String,
    pub consumer: ConsumerSettings,
    pub cache: CacheSettings,
    pub retry: RetrySettings,
    pub vitally: VitallySettings,
    pub free_mail_domains: Vec<String>,
    pub ingest_body_limit: usize,
    pub console: ConsoleSettings,
}

/// The operator console (served by the producer).
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    pub enabled: bool,
    /// A port of its own; `None`: the API's.
    pub addr: Option<SocketAddr>,
    pub session_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("configuration: {name} is required for this role: {help}")]
    Missing {
        name: &'static str,
        help: &'static str,
    },
    #[error("configuration file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("configuration: {names} do not fit together: {reason}")]
    Conflict { names: &'static str, reason: String },
}

impl Config {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file_values = match file {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        Self::from_sources(file_values, std::env::vars())
    }

    /// Where each variable's value comes from, as `config` shows it: `(value, source)` of
    /// every variable set in `file` or the environment (file first, the environment
    /// overriding). Unset variables are absent: their default applies.
    pub fn explicit_values(
        file: Option<&Path>,
    ) -> Result<HashMap<&'static str, (String, &'static str)>, ConfigError> {
        let mut values = HashMap::new();
        let file_values = match file {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        let env: HashMap<String, String> = std::env::vars().collect();
        for var in VARIABLES {
            if let Some(value) = env.get(var.name).filter(|v| !v.trim().is_empty()) {
                values.insert(var.name, (value.clone(), "environment"));
            } else if let Some(value) = file_values.get(var.name) {
                values.insert(var.name, (value.clone(), "file"));
            }
        }
        Ok(values)
    }

    /// Defaults only (tests, demo), with `overrides` applied on top.
    pub fn defaults_with(overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Self::from_sources(
            HashMap::new(),
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    pub fn from_sources(
        mut values: HashMap<String, String>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let known: HashMap<&str, &Var> = VARIABLES.iter().map(|v| (v.name, v)).collect();
        values.extend(
            env.into_iter()
                .filter(|(k, _)| known.contains_key(k.as_str())),
        );
        let get = |name: &'static str| -> Option<String> {
            values
                .get(name)
                .cloned()
                .filter(|v| !v.trim().is_empty())
                .or_else(|| known.get(name).and_then(|v| v.default).map(str::to_string))
        };
        let parsed = |name: &'static str| -> Result<String, ConfigError> {
            get(name).ok_or(ConfigError::Missing {
                name,
                help: known.get(name).map_or("", |v| v.help),
            })
        };
        let config = Config {
            amqp_url: url(&parsed, "AMQP_URL")?,
            redis_url: url(&parsed, "REDIS_URL")?,
            log_format: typed(&parsed, "LOG_FORMAT")?,
            http_addr: typed(&parsed, "HTTP_ADDR")?,
            metrics_addr: typed(&parsed, "METRICS_ADDR")?,
            database_url: url(&parsed, "DATABASE_URL")?,
            database_schema: schema(&parsed, "DATABASE_SCHEMA")?,
            producer_token: get("PRODUCER_TOKEN")
                .map(|value| token("PRODUCER_TOKEN", value))
                .transpose()?,
            integrations_key: get("INTEGRATIONS_KEY").map(SecretString::from),
            integrations_keys: get("INTEGRATIONS_KEYS").map(SecretString::from),
            health_probe_interval: duration(&parsed, "HEALTH_PROBE_INTERVAL")?,
            name_prefix: name(&parsed, "NAME_PREFIX")?,
            redis_prefix: name(&parsed, "REDIS_PREFIX")?,
            consumer: ConsumerSettings {
                concurrency: number(&parsed, "CONSUMER_CONCURRENCY")?,
                backfill_concurrency: number(&parsed, "BACKFILL_CONCURRENCY")?,
                backfill_budget_share: share(&parsed, "BACKFILL_BUDGET_SHARE")?,
                prefetch: number(&parsed, "CONSUMER_PREFETCH")?,
                shutdown_grace: duration(&parsed, "SHUTDOWN_GRACE")?,
                max_rate_wait: duration(&parsed, "RATE_LIMIT_MAX_WAIT")?,
                request_lock_ttl: duration(&parsed, "REQUEST_LOCK_TTL")?,
            },
            cache: CacheSettings {
                user_ttl: duration(&parsed, "CACHE_TTL_USER")?,
                negative_ttl: duration(&parsed, "CACHE_TTL_NEGATIVE")?,
                account_org_ttl: duration(&parsed, "CACHE_TTL_ACCOUNT_ORG")?,
                domain_ttl: duration(&parsed, "CACHE_TTL_DOMAIN")?,
                instance_ttl: duration(&parsed, "CACHE_TTL_INSTANCE")?,
                fields_ttl: duration(&parsed, "CACHE_TTL_FIELDS")?,
                integration_refresh: duration(&parsed, "INTEGRATION_REFRESH")?,
            },
            retry: RetrySettings {
                tiers: duration_list(&parsed, "RETRY_TIERS")?,
                max_age: duration(&parsed, "RETRY_MAX_AGE")?,
                delivery_limit: number(&parsed, "DELIVERY_LIMIT")?,
            },
            vitally: VitallySettings {
                timeout: duration(&parsed, "VITALLY_TIMEOUT")?,
                default_budget_per_min: number(&parsed, "VITALLY_BUDGET_PER_MIN")?,
                limiter_fallback_share: share(&parsed, "LIMITER_FALLBACK_SHARE")?,
                textarea_limit: number(&parsed, "TEXTAREA_LIMIT")?,
                allowed_hosts: allowed_hosts(get("VITALLY_ALLOWED_HOSTS"))?,
            },
            free_mail_domains: domains(&parsed, "FREE_MAIL_DOMAINS")?,
            ingest_body_limit: number(&parsed, "INGEST_BODY_LIMIT")?,
            console: ConsoleSettings {
                enabled: typed(&parsed, "CONSOLE_ENABLED")?,
                addr: get("CONSOLE_ADDR")
                    .map(|raw| {
                        raw.trim().parse().map_err(|e| {
                            invalid("CONSOLE_ADDR", format!("{e} (got {})", echo(&raw)))
                        })
                    })
                    .transpose()?,
                session_ttl: duration(&parsed, "CONSOLE_SESSION_TTL")?,
            },
        };
        config.check_relations()?;
        Ok(config)
    }

    /// Values that are each in range but break together.
    pub fn check_relations(&self) -> Result<(), ConfigError> {
        let consumer = &self.consumer;
        let lease = work_lease(consumer.request_lock_ttl);
        let needed = consumer.max_rate_wait + self.vitally.timeout;
        if needed > lease {
            return Err(ConfigError::Conflict {
                names: "REQUEST_LOCK_TTL, RATE_LIMIT_MAX_WAIT and VITALLY_TIMEOUT",
                reason: format!(
                    "one event's work is cut off at 3/4 of REQUEST_LOCK_TTL ({}), which must \
                     hold RATE_LIMIT_MAX_WAIT ({}) plus one VITALLY_TIMEOUT ({}); raise \
                     REQUEST_LOCK_TTL to at least {} or lower the others",
                    format_duration(lease),
                    format_duration(consumer.max_rate_wait),
                    format_duration(self.vitally.timeout),
                    format_duration(ceil_secs(needed * 4 / 3)),
                ),
            });
        }
        if usize::from(consumer.prefetch) < consumer.concurrency {
            return Err(ConfigError::Conflict {
                names: "CONSUMER_PREFETCH and CONSUMER_CONCURRENCY",
                reason: format!(
                    "a consumer never has more events in hand than RabbitMQ delivers: \
                     CONSUMER_PREFETCH ({}) must be at least CONSUMER_CONCURRENCY ({})",
                    consumer.prefetch, consumer.concurrency
                ),
            });
        }
        Ok(())
    }

    /// The producer token, or a start-up error naming the variable.
    pub fn require_producer_token(&self) -> Result<SecretString, ConfigError> {
        require(&self.producer_token, "PRODUCER_TOKEN")
    }

    /// The integrations key ring (`Ok(true, ring)`) or single key (`Ok(false, key)`), or a
    /// start-up error naming the variable.
    pub fn require_integrations_keys(&self) -> Result<(bool, SecretString), ConfigError> {
        match &self.integrations_keys {
            Some(ring) => Ok((true, ring.clone())),
            None => require(&self.integrations_key, "INTEGRATIONS_KEY").map(|key| (false, key)),
        }
    }
}

fn require(value: &Option<SecretString>, name: &'static str) -> Result<SecretString, ConfigError> {
    value.clone().ok_or(ConfigError::Missing {
        name,
        help: VARIABLES
            .iter()
            .find(|v| v.name == name)
            .map_or("", |v| v.help),
    })
}

type Lookup<'a> = dyn Fn(&'static str) -> Result<String, ConfigError> + 'a;

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

fn typed<T: FromStr>(get: &Lookup<'_>, name: &'static str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let raw = get(name)?;
    raw.trim()
        .parse()
        .map_err(|e| invalid(name, format!("{e} (got {})", echo(&raw))))
}

/// The rule the table gives `name` (every name parsed here is in [`VARIABLES`]; a
/// test parses them all).
fn rule_of(name: &str) -> Rule {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.rule)
        .unwrap_or_else(|| panic!("{name} is not in VARIABLES"))
}

/// A refused value as an error repeats it: quoted, without a password, and short.
fn echo(raw: &str) -> String {
    format!("{:?}", crate::clip(&redact_url(raw), 100))
}

fn out_of_range(name: &'static str, got: &str) -> ConfigError {
    invalid(
        name,
        format!("allowed: {}; got {}", rule_of(name).describe(), echo(got)),
    )
}

/// A whole number within the table's `Count` or `Bytes` range.
fn number<T: TryFrom<u64>>(get: &Lookup<'_>, name: &'static str) -> Result<T, ConfigError> {
    let raw = get(name)?;
    let (min, max) = match rule_of(name) {
        Rule::Count { min, max } | Rule::Bytes { min, max } => (min, max),
        other => panic!("{name} has rule {other:?}, not a number"),
    };
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| out_of_range(name, &raw))
}

fn share(get: &Lookup<'_>, name: &'static str) -> Result<f64, ConfigError> {
    let raw = get(name)?;
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|value| *value > 0.0 && *value <= 1.0)
        .ok_or_else(|| out_of_range(name, &raw))
}

/// A URL whose scheme the table allows. Neither this error nor any other shows its
/// password.
fn url(get: &Lookup<'_>, name: &'static str) -> Result<SecretString, ConfigError> {
    let raw = get(name)?;
    let Rule::Url(schemes) = rule_of(name) else {
        panic!("{name} is not a URL in VARIABLES");
    };
    let scheme = raw.trim().split_once("://").map(|(scheme, _)| scheme);
    if !scheme.is_some_and(|scheme| schemes.contains(&scheme.to_ascii_lowercase().as_str())) {
        // Without a scheme the value may not be a URL at all: not repeated.
        return Err(match scheme {
            Some(_) => out_of_range(name, &raw),
            None => invalid(
                name,
                format!(
                    "allowed: {}; got a value without a scheme",
                    rule_of(name).describe()
                ),
            ),
        });
    }
    Ok(SecretString::from(raw.trim().to_owned()))
}

/// A bearer token long enough not to be guessed, made of characters a header carries
/// unchanged. The error never shows the token. Any token variable uses this rule.
pub fn token(name: &'static str, value: String) -> Result<SecretString, ConfigError> {
    let value = value.trim().to_owned();
    let length = value.chars().count();
    if !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            name,
            "may hold only visible ASCII characters (no spaces); `openssl rand -hex 32` makes one",
        ));
    }
    if length < MIN_TOKEN_CHARS {
        return Err(invalid(
            name,
            format!(
                "must be at least {MIN_TOKEN_CHARS} characters, got {length}; `openssl rand -hex 32` makes one"
            ),
        ));
    }
    Ok(SecretString::from(value))
}

/// Free-mail domains: a list, or `none` — an empty list only when asked for, since it
/// turns the guard off (a stranger at gmail.com would be linked by domain).
fn domains(get: &Lookup<'_>, name: &'static str) -> Result<Vec<String>, ConfigError> {
    let raw = get(name)?;
    if raw.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let domains: Vec<String> = raw
        .split(',')
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    if domains.is_empty() {
        return Err(invalid(
            name,
            format!(
                "lists no domain (got {}): name them, e.g. gmail.com,outlook.com, or set `none` to turn the free-mail guard off",
                echo(&raw)
            ),
        ));
    }
    if let Some(bad) = domains.iter().find(|d| !is_domain(d)) {
        return Err(invalid(
            name,
            format!(
                "{} is not a domain name like gmail.com (or set `none` alone)",
                echo(bad)
            ),
        ));
    }
    Ok(domains)
}

fn is_domain(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn allowed_hosts(raw: Option<String>) -> Result<AllowList, ConfigError> {
    match raw {
        None => Ok(AllowList::vitally()),
        Some(raw) => AllowList::vitally_and(&raw).map_err(|e| invalid("VITALLY_ALLOWED_HOSTS", e)),
    }
}

/// Hides everything secret in a URL-like value: the password of its userinfo, query
/// parameters that look like credentials, and `password=` in a key=value string. The
/// userinfo ends at the last `@`, since a password may hold `/`, `?` or `@` unencoded:
/// showing too little of a URL is the safe mistake.
pub fn redact_url(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return redact_pairs(value, ' ');
    };
    let shown = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{after}"),
            None => format!("{scheme}://{userinfo}@{after}"),
        },
        None => value.to_owned(),
    };
    match shown.split_once('?') {
        Some((base, query)) => format!("{base}?{}", redact_pairs(query, '&')),
        None => shown,
    }
}

/// A variable's value as `config` shows it: secrets never, URLs without a password.
pub fn shown_value(var: &Var, value: &str) -> String {
    match var.rule {
        Rule::Secret | Rule::Token => "<set, redacted>".to_owned(),
        Rule::Hosts => value
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(","),
        Rule::Url(_)
        | Rule::ListenAddr
        | Rule::OneOf(_)
        | Rule::Name(_)
        | Rule::Schema
        | Rule::Count { .. }
        | Rule::Bytes { .. }
        | Rule::Duration { .. }
        | Rule::Durations { .. }
        | Rule::Share
        | Rule::Domains => redact_url(value),
    }
}

/// `key=value` pairs split by `separator`, with the values of credential-like keys hidden.
fn redact_pairs(text: &str, separator: char) -> String {
    const SECRET_KEYS: [&str; 6] = ["pass", "pwd", "secret", "token", "key", "auth"];
    let hide = |pair: &str| match pair.split_once('=') {
        Some((key, _))
            if SECRET_KEYS
                .iter()
                .any(|s| key.to_ascii_lowercase().contains(s)) =>
        {
            format!("{key}=***")
        }
        Some(_) | None => pair.to_owned(),
    };
    text.split(separator)
        .map(hide)
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

/// A PostgreSQL schema name: lowercase letters, digits and `_`, as an unquoted identifier.
fn schema(get: &Lookup<'_>, name: &'static str) -> Result<String, ConfigError> {
    let value = get(name)?;
    let mut chars = value.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && value.len() <= 40;
    if !ok {
        return Err(invalid(
            name,
            format!(
                "{}: use up to 40 lowercase letters, digits and _, starting with a letter",
                echo(&value)
            ),
        ));
    }
    Ok(value)
}

fn name(get: &Lookup<'_>, name: &'static str) -> Result<String, ConfigError> {
    let value = get(name)?;
    let Rule::Name(max) = rule_of(name) else {
        panic!("{name} is not a name in VARIABLES");
    };
    if value.len() > max
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            name,
            format!(
                "may contain only letters, digits, '-', '_' and '.', up to {max}, got {}",
                echo(&value)
            ),
        ));
    }
    Ok(value)
}

/// A duration within the table's range.
fn duration(get: &Lookup<'_>, name: &'static str) -> Result<Duration, ConfigError> {
    let raw = get(name)?;
    let rule = rule_of(name);
    let Rule::Duration { min, max } = rule else {
        panic!("{name} is not a duration in VARIABLES");
    };
    let value = parse_duration(&raw)
        .map_err(|e| invalid(name, format!("{e}; allowed: {}", rule.describe())))?;
    if !(min..=max).contains(&value) {
        return Err(out_of_range(name, &raw));
    }
    Ok(value)
}

fn duration_list(get: &Lookup<'_>, name: &'static str) -> Result<Vec<Duration>, ConfigError> {
    let raw = get(name)?;
    let Rule::Durations { min, max, len } = rule_of(name) else {
        panic!("{name} is not a duration list in VARIABLES");
    };
    let tiers = raw
        .split(',')
        .map(|part| parse_duration(part).map_err(|e| invalid(name, e)))
        .collect::<Result<Vec<_>, _>>()?;
    if tiers.is_empty() || tiers.iter().any(Duration::is_zero) {
        return Err(invalid(name, "needs at least one non-zero duration"));
    }
    if tiers.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(invalid(name, "tiers must grow strictly, e.g. 5s,30s,2m,4m"));
    }
    // A retry at most 5m apart keeps "synced within 10 minutes of a fault ending".
    if tiers.iter().any(|tier| *tier > max) {
        return Err(invalid(
            name,
            format!(
                "allowed: {}; got {}: a tier above {} would break the 10-minute delivery promise",
                rule_of(name).describe(),
                echo(&raw),
                format_duration(max)
            ),
        ));
    }
    if tiers.len() > len || tiers.iter().any(|tier| *tier < min) {
        return Err(out_of_range(name, &raw));
    }
    Ok(tiers)
}

/// `value` rounded up to whole seconds.
fn ceil_secs(value: Duration) -> Duration {
    secs(u64::try_from(value.as_millis().div_ceil(1000)).unwrap_or(u64::MAX))
}

/// `90s` → `90s`, `120s` → `2m`: the largest unit that states it exactly.
pub fn format_duration(value: Duration) -> String {
    let millis = value.as_millis();
    let units = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    units
        .iter()
        .find(|(size, _)| millis > 0 && millis.is_multiple_of(*size))
        .map_or_else(
            || format!("{millis}ms"),
            |(size, unit)| format!("{}{unit}", millis / size),
        )
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d` (a bare number means seconds).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!(
            "expected a duration like 500ms, 5s, 2m, 1h or 7d, got {}",
            echo(raw)
        )
    })?;
    let millis = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown duration unit {} in {} (use ms, s, m, h or d)",
                echo(other),
                echo(raw)
            ));
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(millis)))
}

fn read_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let known: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
    let mut values = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| file_error(format!("line {}: expected NAME=value", number + 1)))?;
        let key = key.trim().trim_start_matches("export ").trim();
        if !known.contains(&key) {
            return Err(file_error(format!(
                "line {}: unknown variable {key}",
                number + 1
            )));
        }
        let value = value.trim().trim_matches('"');
        values.insert(key.to_string(), value.to_string());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Why the defaults with `pairs` on top are refused (panics if they are not).
    fn refusal(pairs: &[(&str, &str)]) -> String {
        match Config::from_sources(HashMap::new(), env(pairs)) {
            Ok(_) => panic!("{pairs:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_describe_a_local_setup() {
        let config = Config::from_sources(HashMap::new(), vec![]).unwrap();
        assert_eq!(
            config.amqp_url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            config.retry.tiers,
            [1, 5, 30, 120, 240].map(Duration::from_secs)
        );
        assert!(config.free_mail_domains.contains(&"gmail.com".to_string()));
        assert!(config.producer_token.is_none());
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("tv-config-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# comment\nCONSUMER_CONCURRENCY=8\nexport NAME_PREFIX=\"staging\"\n",
        )
        .unwrap();
        let file = read_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let config =
            Config::from_sources(file, env(&[("NAME_PREFIX", "prod"), ("HOME", "/x")])).unwrap();
        assert_eq!(config.consumer.concurrency, 8);
        assert_eq!(config.name_prefix, "prod");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let cases = [
            (
                "CONSUMER_CONCURRENCY",
                "many",
                "CONSUMER_CONCURRENCY is invalid",
            ),
            (
                "CONSUMER_CONCURRENCY",
                "0",
                "CONSUMER_CONCURRENCY is invalid: allowed: 1–1024",
            ),
            (
                "SHUTDOWN_GRACE",
                "5 fortnights",
                "SHUTDOWN_GRACE is invalid: unknown duration unit",
            ),
            (
                "LOG_FORMAT",
                "xml",
                "LOG_FORMAT is invalid: expected `pretty` or `json`",
            ),
            ("METRICS_ADDR", "localhost", "METRICS_ADDR is invalid"),
            (
                "RETRY_TIERS",
                "5s,0s",
                "RETRY_TIERS is invalid: needs at least one non-zero duration",
            ),
            (
                "RETRY_TIERS",
                "30s,5s",
                "RETRY_TIERS is invalid: tiers must grow strictly",
            ),
            (
                "RETRY_TIERS",
                "5s,10m",
                "a tier above 5m would break the 10-minute delivery promise",
            ),
            (
                "LIMITER_FALLBACK_SHARE",
                "2",
                "LIMITER_FALLBACK_SHARE is invalid: allowed: (0, 1]",
            ),
            ("NAME_PREFIX", "a b", "NAME_PREFIX is invalid"),
        ];
        for (name, value, expected) in cases {
            let err = Config::from_sources(HashMap::new(), env(&[(name, value)])).unwrap_err();
            assert!(err.to_string().contains(expected), "{name}={value}: {err}");
        }
    }

    #[test]
    fn a_missing_required_secret_names_the_variable() {
        let config = Config::from_sources(HashMap::new(), vec![]).unwrap();
        let err = config.require_integrations_keys().unwrap_err().to_string();
        assert!(err.contains("INTEGRATIONS_KEY is required"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = Config::from_sources(
            HashMap::new(),
            env(&[
                ("PRODUCER_TOKEN", "tok-very-secret-0001"),
                ("AMQP_URL", "amqp://u:pa55word-amqp@host/%2f"),
                ("REDIS_URL", "redis://:pa55word-redis@host:6379"),
                ("DATABASE_URL", "postgres://u:pa55word-pg@host/db"),
                ("INTEGRATIONS_KEY", "pa55word-key"),
                ("INTEGRATIONS_KEYS", "k1:pa55word-ring"),
            ]),
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("tok-very-secret"), "{debug}");
        assert!(!debug.contains("pa55word"), "{debug}");
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redact_url("amqp://thena:s3cret@rabbitmq:5672/%2f"),
            "amqp://thena:***@rabbitmq:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://:pw@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/db"),
            "postgres://postgres@127.0.0.1:5432/db"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        // A password may hold '@', '/', ':' or '?' unencoded: hide up to the last '@'.
        assert_eq!(redact_url("p://u:a@b@h/x@y"), "p://u:***@y");
        assert_eq!(
            redact_url("amqp://u:p@ss/w:rd?x@rabbit:5672/%2f"),
            "amqp://u:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=u&password=pw&sslmode=disable"),
            "postgres://db/x?user=u&password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("host=db user=u password=pw"),
            "host=db user=u password=***"
        );
    }

    /// Relations hold whatever one variable is set to within its range.
    const ROOMY: [(&str, &str); 5] = [
        ("REQUEST_LOCK_TTL", "1h"),
        ("VITALLY_TIMEOUT", "100ms"),
        ("RATE_LIMIT_MAX_WAIT", "0ms"),
        ("CONSUMER_PREFETCH", "10000"),
        ("CONSUMER_CONCURRENCY", "1"),
    ];

    fn with_roomy(name: &str, value: &str) -> Result<Config, ConfigError> {
        let mut pairs = env(&ROOMY);
        pairs.push((name.to_owned(), value.to_owned()));
        Config::from_sources(HashMap::new(), pairs)
    }

    /// The values just inside and just outside a rule's range, when it has one.
    fn edges(rule: Rule) -> Option<([String; 2], Vec<String>)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        match rule {
            Rule::Count { min, max } | Rule::Bytes { min, max } => Some((
                [min.to_string(), max.to_string()],
                [min.checked_sub(1), max.checked_add(1)]
                    .into_iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect(),
            )),
            Rule::Duration { min, max } => Some((
                [ms(min), ms(max)],
                [
                    min.checked_sub(Duration::from_millis(1)),
                    Some(max + Duration::from_millis(1)),
                ]
                .into_iter()
                .flatten()
                .map(ms)
                .collect(),
            )),
            Rule::Durations { min, max, len } => Some((
                [ms(min), ms(max)],
                vec![
                    ms(min - Duration::from_millis(1)),
                    ms(max + Duration::from_millis(1)),
                    (1..=len as u64 + 1)
                        .map(|n| format!("{n}s"))
                        .collect::<Vec<_>>()
                        .join(","),
                ],
            )),
            Rule::Url(_)
            | Rule::Secret
            | Rule::Token
            | Rule::ListenAddr
            | Rule::OneOf(_)
            | Rule::Name(_)
            | Rule::Schema
            | Rule::Share
            | Rule::Domains
            | Rule::Hosts => None,
        }
    }

    #[test]
    fn every_ranged_variable_accepts_its_ends_and_refuses_just_outside_naming_the_range() {
        let mut checked = 0;
        for var in VARIABLES {
            let Some((inside, outside)) = edges(var.rule) else {
                continue;
            };
            for value in inside {
                with_roomy(var.name, &value)
                    .unwrap_or_else(|e| panic!("{}={value} refused: {e}", var.name));
            }
            for value in outside {
                let err = with_roomy(var.name, &value)
                    .map(|_| ())
                    .expect_err(&format!("{}={value} accepted", var.name))
                    .to_string();
                assert!(
                    err.contains(&format!("{} is invalid", var.name))
                        && err.contains(&var.rule.describe()),
                    "{}={value}: {err}",
                    var.name
                );
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} ranged variables");
    }

    #[test]
    fn the_values_that_started_but_broke_are_refused() {
        let cases = [
            ("REQUEST_LOCK_TTL", "0s", "allowed: 5s–1h"),
            ("REQUEST_LOCK_TTL", "1ms", "allowed: 5s–1h"),
            (
                "FREE_MAIL_DOMAINS",
                ",,,",
                "set `none` to turn the free-mail guard off",
            ),
            ("VITALLY_TIMEOUT", "0s", "allowed: 100ms–2m"),
            (
                "INGEST_BODY_LIMIT",
                "99999999999999",
                "allowed: 1024–16777216",
            ),
            ("VITALLY_BUDGET_PER_MIN", "5000", "allowed: 1–1000"),
            ("PRODUCER_TOKEN", "x", "at least 16 characters, got 1"),
            ("CONSUMER_CONCURRENCY", "1000000000", "allowed: 1–1024"),
            ("SHUTDOWN_GRACE", "0s", "allowed: 1s–10m"),
            ("RETRY_MAX_AGE", "0s", "allowed: 10m–30d"),
            ("CACHE_TTL_USER", "0s", "allowed: 1s–1d"),
            (
                "RETRY_TIERS",
                "5s,30s,2m,10m",
                "would break the 10-minute delivery promise",
            ),
            ("DELIVERY_LIMIT", "0", "allowed: 1–100"),
        ];
        for (name, value, expected) in cases {
            let err = refusal(&[(name, value)]);
            assert!(
                err.contains(&format!("{name} is invalid")) && err.contains(expected),
                "{name}={value}: {err}"
            );
        }
    }

    #[test]
    fn variables_that_break_together_are_refused_naming_both() {
        let err = refusal(&[("REQUEST_LOCK_TTL", "8s")]);
        assert!(
            err.contains("REQUEST_LOCK_TTL, RATE_LIMIT_MAX_WAIT and VITALLY_TIMEOUT")
                && err.contains("at least 14s"),
            "{err}"
        );
        assert!(
            Config::from_sources(
                HashMap::new(),
                env(&[("REQUEST_LOCK_TTL", "8s"), ("VITALLY_TIMEOUT", "5s")])
            )
            .is_ok()
        );
        let err = refusal(&[("CONSUMER_PREFETCH", "16")]);
        assert!(
            err.contains("CONSUMER_PREFETCH and CONSUMER_CONCURRENCY"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_free_mail_list_must_be_asked_for_by_name() {
        let domains = |value: &str| {
            Config::from_sources(HashMap::new(), env(&[("FREE_MAIL_DOMAINS", value)]))
                .map(|c| c.free_mail_domains)
        };
        assert_eq!(domains("none").unwrap(), Vec::<String>::new());
        assert_eq!(domains(" NONE ").unwrap(), Vec::<String>::new());
        assert_eq!(
            domains("Gmail.com,, outlook.com,").unwrap(),
            ["gmail.com", "outlook.com"]
        );
        for bad in [",,,", " , ", "none,gmail.com", "gmail", "gmail.com,a b.com"] {
            assert!(domains(bad).is_err(), "{bad:?}");
        }
        // Unset or blank keeps the default list.
        assert!(domains("").unwrap().contains(&"gmail.com".to_owned()));
    }

    #[test]
    fn a_token_is_long_and_plain_and_its_error_never_shows_it() {
        for (value, expected) in [
            ("Q", "at least 16 characters, got 1"),
            ("short-token", "at least 16 characters, got 11"),
            ("a token with spaces in it", "only visible ASCII"),
        ] {
            let err = token("PRODUCER_TOKEN", value.to_owned())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{value}: {err}");
            assert!(!err.contains(value), "{err}");
        }
        assert!(token("INGEST_TOKEN", "0123456789abcdef".to_owned()).is_ok());
    }

    #[test]
    fn a_url_of_another_kind_is_refused_without_its_password() {
        for (name, value) in [
            ("AMQP_URL", "http://u:hunter2-secret@rabbit:5672"),
            ("AMQP_URL", "u:hunter2-secret@rabbit:5672"),
            ("REDIS_URL", "amqp://:hunter2-secret@redis"),
            ("DATABASE_URL", "host=db password=hunter2-secret"),
        ] {
            let err = refusal(&[(name, value)]);
            assert!(err.contains(&format!("{name} is invalid")), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let config = Config::from_sources(
            HashMap::new(),
            env(&[
                ("REDIS_URL", "rediss://:pw@redis:6380"),
                ("AMQP_URL", "AMQPS://h"),
            ]),
        );
        assert!(config.is_ok());
    }

    #[test]
    fn a_refused_value_is_repeated_short_and_without_a_password() {
        let long = "9".repeat(20_000);
        for (name, value) in [
            ("INGEST_BODY_LIMIT", long.as_str()),
            ("SHUTDOWN_GRACE", long.as_str()),
            ("HTTP_ADDR", "http://u:hunter2-secret@host:80"),
            ("NAME_PREFIX", "amqp://u:hunter2-secret@host"),
        ] {
            let err = refusal(&[(name, value)]);
            assert!(err.len() < 400, "{name}: {} characters", err.len());
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn allowed_hosts_widen_vitallys_own_and_a_bad_entry_names_the_variable() {
        let config = Config::from_sources(
            HashMap::new(),
            env(&[("VITALLY_ALLOWED_HOSTS", "http://127.0.0.1:8089")]),
        )
        .unwrap();
        let allowed = &config.vitally.allowed_hosts;
        let url = |raw: &str| url::Url::parse(raw).unwrap();
        assert!(allowed.check(&url("http://127.0.0.1:8089")).is_ok());
        assert!(allowed.check(&url("https://acme.rest.vitally.io")).is_ok());
        let defaults = Config::from_sources(HashMap::new(), vec![]).unwrap();
        assert!(
            defaults
                .vitally
                .allowed_hosts
                .check(&url("http://127.0.0.1:8089"))
                .is_err()
        );
        for bad in [",,,", "*", "https://u:p@h.example"] {
            let err = refusal(&[("VITALLY_ALLOWED_HOSTS", bad)]);
            assert!(
                err.contains("VITALLY_ALLOWED_HOSTS is invalid"),
                "{bad}: {err}"
            );
            assert!(!err.contains("u:p"), "{err}");
        }
    }

    #[test]
    fn durations_show_in_their_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(86_400 * 30)), "30d");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_file_with_an_unknown_variable_is_refused() {
        let path = std::env::temp_dir().join(format!("tv-config-bad-{}", std::process::id()));
        std::fs::write(&path, "CONSUMER_CONCURENCY=8\n").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains("unknown variable CONSUMER_CONCURENCY"),
            "{err}"
        );
    }
}
