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

/// What `fake-vitally --help` says after the options: how to call it and how to break it.
pub const FAKE_VITALLY_HELP: &str = "\
Authentication: every /resources call needs `Authorization: Basic ZmFrZS1zZWNyZXQta2V5Og==`
(base64 of \"fake-secret-key:\", the fake's test key, never a real credential) unless
--auth-header says otherwise. Connect an integration with
VITALLY_AUTH_HEADER='Basic ZmFrZS1zZWNyZXQta2V5Og==' and --api-url http://<HTTP_ADDR>.
It serves on HTTP_ADDR only (no METRICS_ADDR; health: GET /_fake/healthz).

Admin API (no auth, not counted, never faulted):
  POST   /_fake/seed          a fixture: organizations, accounts, users, customObjects, instances
  GET    /_fake/state         everything the fake holds
  GET    /_fake/calls         call counts;  DELETE /_fake/calls resets them
  POST   /_fake/faults        inject a fault; DELETE /_fake/faults clears them:
           {\"type\":\"outage\",\"duration_ms\":5000,\"status\":503}
           {\"type\":\"next_n\",\"count\":3,\"path_prefix\":\"/resources/users\",\"kind\":{\"status\":429}}
           kind: {\"status\":N} | {\"latency_ms\":N} | \"drop\" (cut the connection)
  PUT    /_fake/rate-limit    {\"limit\":5,\"window_ms\":1000}
  POST   /_fake/auth-headers  {\"header\":\"Basic ...\"} also accept this header
  PUT    /_fake/auth-headers  {\"header\":\"Basic ...\"} accept only this one (a key rotation)
  GET    /_fake/healthz";

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

pub async fn producer(config: Config) -> anyhow::Result<()> {
    // Refuse before anything listens: a producer without a token must not look alive on
    // its ops port, not even for a moment.
    config.require_producer_token()?;
    let role = RoleRuntime::start(&config).await?;
    let state =
        thena_producer::from_config(&config, &role.registry, role.readiness.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on HTTP_ADDR={}", config.http_addr))?;
    let console = match state.console_addr() {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on CONSOLE_ADDR={addr}"))?;
            Some(tokio::spawn(thena_producer::run_console(
                listener,
                state.clone(),
                role.shutdown.clone(),
            )))
        }
        None => None,
    };
    thena_producer::run(listener, state, role.shutdown).await?;
    if let Some(console) = console {
        console.await??;
    }
    Ok(())
}

pub async fn replayer(config: Config) -> anyhow::Result<()> {
    let role = RoleRuntime::start(&config).await?;
    thena_replayer::run_from_config(&config, &role.registry, role.readiness, role.shutdown).await
}

pub async fn emit(config: Config, args: thena_producer::emit::EmitArgs) -> anyhow::Result<()> {
    use thena_producer::emit::{Via, emit_broker, emit_http};
    let now = chrono::Utc::now();
    let events = args.scenario(now).events_until(now);
    let report = match args.via {
        Via::Http => {
            let token = config.require_producer_token()?;
            emit_http(&args.url, &token, &events, args.rate, args.batch).await?
        }
        Via::Broker => {
            let broker = thena_broker::Broker::connect(
                config.amqp_url.clone(),
                "thena-vitally-emit",
                thena_broker::Topology::from_config(&config),
            )
            .await?;
            let publisher = broker.publisher().await?;
            let report = emit_broker(&publisher, &events, args.rate).await;
            publisher.close().await;
            broker.close().await;
            report
        }
    };
    println!(
        "emitted {} events for {} requests: {} accepted, {} rejected, {} unavailable",
        report.total(),
        args.requests,
        report.accepted,
        report.rejected,
        report.unavailable
    );
    anyhow::ensure!(
        report.rejected == 0 && report.unavailable == 0,
        "not every event was accepted"
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Events per request lifecycle (at least 3).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Consumer replicas.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Keep the APIs and metrics up after the table, until Ctrl-C.
    #[arg(long)]
    serve: bool,
    /// Also write each role's final /metrics text to DIR/<role>-<n>.prom (CI lints them
    /// with `promtool check metrics`).
    #[arg(long, value_name = "DIR")]
    metrics_dir: Option<PathBuf>,
}

pub async fn demo(config: Config, args: DemoArgs) -> anyhow::Result<()> {
    let options = thena_demo::DemoOptions {
        steps: args.steps,
        consumers: args.consumers.max(1),
        serve: args.serve,
        ..Default::default()
    };
    let report = thena_demo::run(&config, &options).await?;
    if let Some(dir) = &args.metrics_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (n, (role, text)) in report.metrics.iter().enumerate() {
            let path = dir.join(format!("{role}-{n}.prom"));
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if !args.serve {
        println!("{report}");
    }
    let mismatches = report.mismatches();
    anyhow::ensure!(
        mismatches.is_empty(),
        "some requests did not land where the linking rules say:\n  {}",
        mismatches.join("\n  ")
    );
    println!(
        "\nall {} requests landed where the linking rules say, in {:.1} s",
        report.rows.len(),
        // The run itself, not the time spent serving after it (`--serve`).
        report.elapsed.as_secs_f64()
    );
    Ok(())
}
