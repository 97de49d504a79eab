//! Long-running roles: each starts its ops endpoints, runs until SIGTERM, and drains.

use std::path::PathBuf;

use anyhow::Context;
use fake_vitally::{FakeConfig, Fixture};
use thena_runtime::{Config, ops, shutdown};
use tokio_util::sync::CancellationToken;

/// Registry, readiness and shutdown token every role starts with.
pub struct RoleRuntime {
    pub registry: prometheus::Registry,
    pub readiness: ops::Readiness,
    pub shutdown: CancellationToken,
}

impl RoleRuntime {
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let readiness = ops::Readiness::new();
        let shutdown = CancellationToken::new();
        shutdown::cancel_on_signal(shutdown.clone());
        ops::spawn(
            config.metrics_addr,
            registry.clone(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot serve ops endpoints on METRICS_ADDR={}",
                config.metrics_addr
            )
        })?;
        Ok(Self {
            registry,
            readiness,
            shutdown,
        })
    }
}

pub async fn consumer(config: Config) -> anyhow::Result<()> {
    let role = RoleRuntime::start(&config).await?;
    let worker =
        thena_sync::app::build_worker(&config, &role.registry, role.readiness.clone()).await?;
    worker.run(role.shutdown).await
}

#[derive(clap::Args)]
pub struct FakeVitallyArgs {
    /// Accepted `Authorization` header (repeatable); default: the fake's own test key.
    #[arg(long = "auth-header", env = "FAKE_VITALLY_AUTH_HEADER")]
    auth_headers: Vec<String>,
    /// Requests per window per key before 429.
    #[arg(long, default_value_t = 1000, env = "FAKE_VITALLY_RATE_LIMIT")]
    rate_limit: u32,
    /// Sliding-window length in seconds.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// A JSON fixture to seed (organizations, accounts, users, customObjects, instances).
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Seed the demo's customer base (every linking case).
    #[arg(long, conflicts_with = "seed")]
    demo_seed: bool,
}

pub async fn fake_vitally(config: Config, args: FakeVitallyArgs) -> anyhow::Result<()> {
    let mut fake = FakeConfig {
        rate_limit: args.rate_limit,
        window: std::time::Duration::from_secs(args.window_secs.max(1)),
        ..FakeConfig::default()
    };
    if !args.auth_headers.is_empty() {
        fake.auth_headers = args.auth_headers;
    }
    let seed: Option<Fixture> = match (args.seed, args.demo_seed) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read seed {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("invalid seed {}", path.display()))?,
            )
        }
        (None, true) => Some(serde_json::from_value(thena_demo::customers::fixture())?),
        (None, false) => None,
    };
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    fake_vitally::run(config.http_addr, fake, seed, async move {
        shutdown.cancelled().await
    })
    .await
}
