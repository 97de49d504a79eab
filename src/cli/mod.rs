//! The command line: roles (long-running services) and tools (one-shot commands).

mod backfill;
mod dlq;
mod integrations;
mod requests;
mod roles;
mod teardown;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thena_runtime::{Config, telemetry};

#[derive(Parser)]
#[command(
    name = "thena-vitally",
    version,
    about = "Keeps Vitally in sync with Thena customer requests",
    long_about = "Keeps Vitally in sync with Thena customer requests.\n\nConfiguration comes from \
                  defaults, then the optional --config file (NAME=value lines), then the \
                  environment. Run `thena-vitally config` to see every variable."
)]
pub struct Cli {
    /// A file of NAME=value lines (same names as the environment variables).
    #[arg(long, global = true, env = "THENA_VITALLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP ingest of request changes (and the integration admin API).
    Producer,
    /// Consume request-change events and upsert them into Vitally.
    Consumer,
    /// Retry dead-lettered events with backoff; park what cannot be delivered.
    Replayer,
    /// Inspect, replay and purge parked or dead-lettered events.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Generate realistic request lifecycles (load and demo traffic).
    Emit(thena_producer::emit::EmitArgs),
    /// Every role in one process against local RabbitMQ and Redis and a fake Vitally:
    /// prints where each demo request went.
    Demo(roles::DemoArgs),
    /// Serve the fake Vitally REST API (tests, demo, benchmarks).
    #[command(after_help = roles::FAKE_VITALLY_HELP)]
    FakeVitally(roles::FakeVitallyArgs),
    /// Connect, inspect and change Vitally integrations (one per Slack workspace).
    #[command(subcommand)]
    Integrations(integrations::IntegrationsCommand),
    /// Import historical requests (opt-in, past the forward-only rule) on the backfill
    /// lane with a share of the budget; without --file, show the workspace's backfills.
    Backfill(backfill::BackfillArgs),
    /// Where did a request go? Show, list and resync requests from the ledger.
    #[command(subcommand)]
    Requests(requests::RequestsCommand),
    /// Create the PostgreSQL database if missing and apply the schema migrations (every
    /// role also does this on start).
    Migrate,
    /// Print every configuration variable with its current value (secrets redacted).
    Config,
    /// Remove a hand-run fleet: its exchanges and queues, its Redis keys and optionally
    /// its PostgreSQL schema (`--dry-run` lists them). RETRY_TIERS must be the fleet's.
    Teardown(teardown::TeardownArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // `config` shows the values even when they are invalid, then says what is wrong.
    if let Command::Config = cli.command {
        return print_config(cli.config.as_deref());
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Producer => {
            telemetry::init_tracing(config.log_format, "info");
            roles::producer(config).await
        }
        Command::Consumer => {
            telemetry::init_tracing(config.log_format, "info");
            roles::consumer(config).await
        }
        Command::Replayer => {
            telemetry::init_tracing(config.log_format, "info");
            roles::replayer(config).await
        }
        Command::Dlq(command) => {
            // `dlq replay` prints each audit line on stdout; the same line as a log event
            // (target thena::audit) is for log pipelines only, so a terminal shows it once.
            let filter = match config.log_format {
                thena_runtime::config::LogFormat::Json => "warn,thena::audit=info",
                thena_runtime::config::LogFormat::Pretty => "warn",
            };
            telemetry::init_tracing(config.log_format, filter);
            dlq::run(config, command).await
        }
        Command::Emit(args) => {
            telemetry::init_tracing(config.log_format, "warn");
            roles::emit(config, args).await
        }
        Command::FakeVitally(args) => {
            telemetry::init_tracing(config.log_format, "info");
            roles::fake_vitally(config, args).await
        }
        Command::Integrations(command) => {
            telemetry::init_tracing(config.log_format, "warn");
            integrations::run(config, command).await
        }
        Command::Demo(args) => {
            // lapin reports its own connections closing at the end as errors: noise here.
            telemetry::init_tracing(config.log_format, "warn,lapin=off");
            roles::demo(config, args).await
        }
        Command::Requests(command) => {
            telemetry::init_tracing(config.log_format, "warn,thena::audit=info");
            requests::run(config, command).await
        }
        Command::Backfill(args) => {
            telemetry::init_tracing(config.log_format, "warn,thena::audit=info,lapin=off");
            backfill::run(config, args).await
        }
        Command::Migrate => {
            telemetry::init_tracing(config.log_format, "warn");
            let db = thena_store::Db::new(&config.database_url, &config.database_schema)?;
            let report = thena_store::migrate::run_creating(&db).await?;
            match report.applied.as_slice() {
                [] => println!(
                    "schema {} is up to date (migration {})",
                    config.database_schema, report.current
                ),
                applied => println!(
                    "schema {}: applied migration(s) {applied:?}; now at {}",
                    config.database_schema, report.current
                ),
            }
            Ok(())
        }
        Command::Config => print_config(cli.config.as_deref()),
        Command::Teardown(args) => {
            // lapin reports the passive declares of missing queues as channel errors.
            telemetry::init_tracing(config.log_format, "warn,lapin=off");
            teardown::run(config, args).await
        }
    }
}

/// Every variable with the value this role would run with, where it came from
/// (defaults → `--config` file → environment) and the values it accepts. Secrets are
/// never shown; URLs lose their password. Ends with what is invalid, if anything.
fn print_config(file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use thena_runtime::config::{VARIABLES, shown_value};
    let explicit = Config::explicit_values(file)?;
    for var in VARIABLES {
        let shown = match (explicit.get(var.name), var.default) {
            (Some((value, source)), _) => format!("{} ({source})", shown_value(var, value)),
            (None, Some(default)) => format!("{} (default)", shown_value(var, default)),
            (None, None) => "<unset>".to_string(),
        };
        println!(
            "{:<24} {shown}\n{:<24} {}\n{:<24} allowed: {}\n",
            var.name,
            "",
            var.help,
            "",
            var.rule.describe()
        );
    }
    println!(
        "/readyz checks: producer — broker, postgres; consumer — broker, redis, postgres, \
         integrations_key; replayer — broker, postgres."
    );
    Config::load(file)?;
    println!("The configuration is valid.");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fake_vitally_help_names_the_header_it_really_accepts() {
        let help = super::roles::FAKE_VITALLY_HELP;
        assert!(
            help.contains(&fake_vitally::default_auth_header()),
            "{help}"
        );
        for path in [
            "/_fake/faults",
            "/_fake/auth-headers",
            "/_fake/seed",
            "/_fake/state",
        ] {
            assert!(help.contains(path), "{path}");
        }
    }
}
