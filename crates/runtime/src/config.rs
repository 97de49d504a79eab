//! One typed configuration for every role: defaults → optional file → environment,
//! parsed once at start and passed down. Nothing else reads the environment.
//!
//! The file uses the same `NAME=value` lines as the environment (one vocabulary; `#`
//! comments), so a value can move between a ConfigMap, a `.env` file and a shell
//! unchanged. Errors name the variable and what was wrong with it.

use std::{collections::HashMap, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use secrecy::SecretString;

/// A configuration variable: its name, default (None = optional/unset) and meaning.
/// The README's configuration table and the deployment manifests test read this list.
pub struct Var {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub secret: bool,
    pub help: &'static str,
}

const fn var(name: &'static str, default: &'static str, help: &'static str) -> Var {
    Var {
        name,
        default: Some(default),
        secret: false,
        help,
    }
}

/// Free-mail providers: a requestor at one of these is never linked by email domain.
pub const DEFAULT_FREE_MAIL: &str = "gmail.com,googlemail.com,outlook.com,hotmail.com,live.com,msn.com,yahoo.com,ymail.com,icloud.com,me.com,mac.com,aol.com,proton.me,protonmail.com,gmx.com,gmx.de,mail.com,zoho.com,yandex.com,yandex.ru,fastmail.com,hey.com,qq.com,163.com,126.com,web.de";

pub const VARIABLES: &[Var] = &[
    var(
        "AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "RabbitMQ URL (secret: may hold a password)",
    ),
    var(
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis URL: caches, locks, the limiter, the hot copy of the version guard (losable)",
    ),
    var(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/thena_vitally",
        "PostgreSQL URL, the system of record: integrations, their history, synced versions (the database is created if missing)",
    ),
    var(
        "DATABASE_SCHEMA",
        "thena_vitally",
        "PostgreSQL schema of this deployment (created and migrated on start)",
    ),
    var(
        "LOG_FORMAT",
        "pretty",
        "`pretty` for people, `json` for log pipelines (filter with RUST_LOG)",
    ),
    var(
        "HTTP_ADDR",
        "0.0.0.0:8080",
        "Listen address of the producer API (and of fake-vitally)",
    ),
    var(
        "METRICS_ADDR",
        "0.0.0.0:9090",
        "Listen address of /healthz, /readyz and /metrics for every role",
    ),
    Var {
        name: "PRODUCER_TOKEN",
        default: None,
        secret: true,
        help: "Bearer token for the ingest and admin API (required by the producer)",
    },
    Var {
        name: "INTEGRATIONS_KEY",
        default: None,
        secret: true,
        help: "32-byte key (base64 or hex) encrypting Vitally auth headers at rest; the same as INTEGRATIONS_KEYS=k1:<key>",
    },
    Var {
        name: "INTEGRATIONS_KEYS",
        default: None,
        secret: true,
        help: "Key ring `id:key,id:key`, newest first: seals with the first, opens with any (rotation); overrides INTEGRATIONS_KEY",
    },
    var(
        "NAME_PREFIX",
        "thena",
        "Prefix of every exchange and queue, so environments and tests stay apart",
    ),
    var("REDIS_PREFIX", "thena-vitally", "Prefix of every Redis key"),
    var(
        "CONSUMER_CONCURRENCY",
        "32",
        "Events one consumer processes at once",
    ),
    var(
        "CONSUMER_PREFETCH",
        "64",
        "Unacked deliveries RabbitMQ hands one consumer",
    ),
    var(
        "SHUTDOWN_GRACE",
        "25s",
        "Time to finish in-flight events after SIGTERM (keep below terminationGracePeriodSeconds)",
    ),
    var(
        "REQUEST_LOCK_TTL",
        "60s",
        "Lifetime of a request lock: a crashed consumer's lock frees itself after this; one event's work is cut off at 3/4 of it",
    ),
    var(
        "RATE_LIMIT_MAX_WAIT",
        "500ms",
        "Longest a consumer waits for an integration's budget before deferring the event",
    ),
    var(
        "CACHE_TTL_USER",
        "10m",
        "Cache lifetime of a user looked up by email",
    ),
    var(
        "CACHE_TTL_NEGATIVE",
        "2m",
        "Cache lifetime of a 'not found' answer",
    ),
    var(
        "CACHE_TTL_ACCOUNT_ORG",
        "1h",
        "Cache lifetime of an account's organization",
    ),
    var(
        "CACHE_TTL_DOMAIN",
        "30m",
        "Cache lifetime of an email domain's link target",
    ),
    var(
        "CACHE_TTL_INSTANCE",
        "7d",
        "Cache lifetime of an instance id by externalId",
    ),
    var(
        "CACHE_TTL_FIELDS",
        "10m",
        "Cache lifetime of the object's field paths",
    ),
    var(
        "INTEGRATION_REFRESH",
        "30s",
        "Backstop lifetime of a consumer's cached integration record (changes arrive at once over LISTEN/NOTIFY)",
    ),
    var(
        "HEALTH_PROBE_INTERVAL",
        "1m",
        "How often a paused integration is probed with one cheap Vitally call to see whether it healed",
    ),
    var(
        "RETRY_TIERS",
        "5s,30s,2m,4m",
        "Delay queues, in order: attempt n waits tier n (the last repeats)",
    ),
    var(
        "RETRY_MAX_AGE",
        "24h",
        "A failing event older than this is parked for a human",
    ),
    var(
        "DELIVERY_LIMIT",
        "5",
        "Deliveries before RabbitMQ dead-letters a message that keeps crashing consumers",
    ),
    var("VITALLY_TIMEOUT", "10s", "Timeout of one Vitally call"),
    var(
        "VITALLY_BUDGET_PER_MIN",
        "600",
        "Default fleet-wide Vitally budget per integration (Vitally allows 1000/min per key, shared with other tools)",
    ),
    var(
        "LIMITER_FALLBACK_SHARE",
        "0.25",
        "Share of the budget one replica uses alone while Redis is unreachable",
    ),
    var(
        "TEXTAREA_LIMIT",
        "10000",
        "Characters kept in a textarea trait before the '… (truncated)' marker (a longer thread keeps its newest messages)",
    ),
    var(
        "FREE_MAIL_DOMAINS",
        DEFAULT_FREE_MAIL,
        "Domains never used for the email-domain fallback (comma-separated)",
    ),
    var(
        "INGEST_BODY_LIMIT",
        "1048576",
        "Largest ingest request body in bytes",
    ),
];

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
        Ok(Config {
            amqp_url: SecretString::from(parsed("AMQP_URL")?),
            redis_url: SecretString::from(parsed("REDIS_URL")?),
            log_format: typed(&parsed, "LOG_FORMAT")?,
            http_addr: typed(&parsed, "HTTP_ADDR")?,
            metrics_addr: typed(&parsed, "METRICS_ADDR")?,
            database_url: SecretString::from(parsed("DATABASE_URL")?),
            database_schema: schema(&parsed, "DATABASE_SCHEMA")?,
            producer_token: get("PRODUCER_TOKEN").map(SecretString::from),
            integrations_key: get("INTEGRATIONS_KEY").map(SecretString::from),
            integrations_keys: get("INTEGRATIONS_KEYS").map(SecretString::from),
            health_probe_interval: duration(&parsed, "HEALTH_PROBE_INTERVAL")?,
            name_prefix: name(&parsed, "NAME_PREFIX")?,
            redis_prefix: name(&parsed, "REDIS_PREFIX")?,
            consumer: ConsumerSettings {
                concurrency: positive(&parsed, "CONSUMER_CONCURRENCY")?,
                prefetch: positive(&parsed, "CONSUMER_PREFETCH")?,
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
                delivery_limit: positive(&parsed, "DELIVERY_LIMIT")?,
            },
            vitally: VitallySettings {
                timeout: duration(&parsed, "VITALLY_TIMEOUT")?,
                default_budget_per_min: positive(&parsed, "VITALLY_BUDGET_PER_MIN")?,
                limiter_fallback_share: share(&parsed, "LIMITER_FALLBACK_SHARE")?,
                textarea_limit: positive(&parsed, "TEXTAREA_LIMIT")?,
            },
            free_mail_domains: parsed("FREE_MAIL_DOMAINS")?
                .split(',')
                .map(|d| d.trim().to_ascii_lowercase())
                .filter(|d| !d.is_empty())
                .collect(),
            ingest_body_limit: positive(&parsed, "INGEST_BODY_LIMIT")?,
        })
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
        .map_err(|e| invalid(name, format!("{e} (got {raw:?})")))
}

fn positive<T: FromStr + PartialEq + Default>(
    get: &Lookup<'_>,
    name: &'static str,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let value: T = typed(get, name)?;
    if value == T::default() {
        return Err(invalid(name, "must be greater than zero"));
    }
    Ok(value)
}

fn share(get: &Lookup<'_>, name: &'static str) -> Result<f64, ConfigError> {
    let value: f64 = typed(get, name)?;
    if !(value > 0.0 && value <= 1.0) {
        return Err(invalid(name, format!("must be in (0, 1], got {value}")));
    }
    Ok(value)
}

/// `scheme://user:***@host/…`: a URL as it may be shown, its password hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
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
                "{value:?}: use up to 40 lowercase letters, digits and _, starting with a letter"
            ),
        ));
    }
    Ok(value)
}

fn name(get: &Lookup<'_>, name: &'static str) -> Result<String, ConfigError> {
    let value = get(name)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            name,
            format!("may contain only letters, digits, '-', '_' and '.', got {value:?}"),
        ));
    }
    Ok(value)
}

fn duration(get: &Lookup<'_>, name: &'static str) -> Result<Duration, ConfigError> {
    let raw = get(name)?;
    parse_duration(&raw).map_err(|e| invalid(name, e))
}

fn duration_list(get: &Lookup<'_>, name: &'static str) -> Result<Vec<Duration>, ConfigError> {
    let raw = get(name)?;
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
    // A retry at most this far apart keeps "synced within 10 minutes of a fault ending".
    if tiers.iter().any(|tier| *tier > MAX_RETRY_TIER) {
        return Err(invalid(
            name,
            "a tier above 5m would break the 10-minute delivery promise",
        ));
    }
    Ok(tiers)
}

/// The longest delay tier the 10-minute promise allows (plus processing time).
pub const MAX_RETRY_TIER: Duration = Duration::from_secs(300);

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d` (a bare number means seconds).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 5s, 2m, 1h or 7d, got {raw:?}"))?;
    let millis = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {raw:?} (use ms, s, m, h or d)"
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

    #[test]
    fn defaults_describe_a_local_setup() {
        let config = Config::from_sources(HashMap::new(), vec![]).unwrap();
        assert_eq!(
            config.amqp_url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            config.retry.tiers,
            [5, 30, 120, 240].map(Duration::from_secs)
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
                "CONSUMER_CONCURRENCY is invalid: must be greater than zero",
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
                "RETRY_TIERS is invalid: a tier above 5m would break",
            ),
            (
                "LIMITER_FALLBACK_SHARE",
                "2",
                "LIMITER_FALLBACK_SHARE is invalid: must be in (0, 1]",
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
                ("PRODUCER_TOKEN", "tok-very-secret"),
                ("AMQP_URL", "amqp://u:pa55word@host/%2f"),
            ]),
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("tok-very-secret") && !debug.contains("pa55word"),
            "{debug}"
        );
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
        assert_eq!(redact_url("p://u:a@b@h/x@y"), "p://u:***@h/x@y");
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
