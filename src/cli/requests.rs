//! `thena-vitally requests …`: where did request 135 go? The request ledger, read and
//! acted on.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use thena_broker::{Broker, Topology};
use thena_runtime::Config;
use thena_store::{
    Db,
    ledger::{Filter, Ledger, RequestRecord},
};

#[derive(Subcommand)]
pub enum RequestsCommand {
    /// One request: its latest outcome and why, how it was linked, its instance, and its
    /// recent history.
    Show {
        /// The Slack workspace id.
        workspace: String,
        /// The Thena request id.
        request_id: u64,
        /// How many of the newest history rows to show.
        #[arg(long, default_value_t = 50)]
        history: i64,
        /// Print JSON (with the latest snapshot) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Requests of a workspace, by outcome and reason, a page at a time.
    List {
        /// The Slack workspace id.
        workspace: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Requests per page.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Continue after this request id (the previous page's "next").
        #[arg(long)]
        after: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-evaluate the decision for the latest snapshot against live Vitally, step by
    /// step, writing nothing (no instance, no user, no cache entry).
    Explain {
        /// The Slack workspace id.
        workspace: String,
        /// The Thena request id.
        request_id: u64,
        /// Print JSON (with the traits that would be written).
        #[arg(long)]
        json: bool,
    },
    /// Send the latest stored snapshots through the pipeline again (e.g. after a user was
    /// added in Vitally for a request skipped as domain_unknown).
    Resync {
        /// The Slack workspace id.
        workspace: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Only these request ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u64>,
        /// Say what would be resent, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many requests per second, leaving live traffic its budget.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Your name in the audit line (default: $USER, then the host name).
        #[arg(long)]
        actor: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct FilterArgs {
    /// synced, skipped, deferred, held, retried, parked or replayed.
    #[arg(long)]
    outcome: Option<String>,
    /// e.g. domain_unknown, vitally_400.
    #[arg(long)]
    reason: Option<String>,
    /// Only outcomes newer than this (e.g. 1h, 30m, 7d).
    #[arg(long, value_parser = thena_runtime::config::parse_duration)]
    since: Option<Duration>,
}

impl FilterArgs {
    fn filter(&self, ids: Vec<u64>) -> anyhow::Result<Filter> {
        let since = self
            .since
            .map(|ago| chrono::Duration::from_std(ago).map(|ago| Utc::now() - ago))
            .transpose()
            .context("--since is too far back")?;
        Ok(Filter {
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
            since,
            ids,
            after: None,
        })
    }
}

pub async fn run(config: Config, command: RequestsCommand) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url, &config.database_schema)
        .await
        .context("cannot open PostgreSQL (DATABASE_URL)")?;
    let ledger = Ledger::read_only(db);
    match command {
        RequestsCommand::Show {
            workspace,
            request_id,
            history,
            json,
        } => {
            let Some(record) = ledger
                .show(&workspace, request_id, history.clamp(1, 1000))
                .await?
            else {
                anyhow::bail!(
                    "request {request_id} of workspace {workspace} never reached the fleet \
                     (no event for it was consumed)"
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                print!("{}", render(&record));
            }
            Ok(())
        }
        RequestsCommand::List {
            workspace,
            filter,
            limit,
            after,
            json,
        } => {
            let mut filter = filter.filter(Vec::new())?;
            filter.after = after;
            let page = ledger
                .list(&workspace, &filter, limit.clamp(1, 1000))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            if page.requests.is_empty() {
                println!("no request of {workspace} matches");
                return Ok(());
            }
            println!(
                "{:<10} {:>7} {:>7}  {:<28} {:<20}",
                "request", "latest", "synced", "outcome", "when"
            );
            for r in &page.requests {
                println!(
                    "{:<10} {:>7} {:>7}  {:<28} {:<20}",
                    r.request_id,
                    version(r.latest_version),
                    version(r.synced_version),
                    outcome(r),
                    r.outcome_at.map_or("—".to_owned(), when)
                );
            }
            match page.next {
                Some(next) => println!("more: --after {next}"),
                None => println!("({} shown, the last page)", page.requests.len()),
            }
            Ok(())
        }
        RequestsCommand::Explain {
            workspace,
            request_id,
            json,
        } => explain(&config, &ledger, &workspace, request_id, json).await,
        RequestsCommand::Resync {
            workspace,
            filter,
            ids,
            dry_run,
            rate,
            actor,
        } => {
            let filter = filter.filter(ids)?;
            let actor = actor
                .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
                .unwrap_or_else(|| "cli".to_owned());
            resync(&config, &ledger, &workspace, filter, dry_run, rate, &actor).await
        }
    }
}

async fn explain(
    config: &Config,
    ledger: &Ledger,
    workspace: &str,
    request_id: u64,
    json: bool,
) -> anyhow::Result<()> {
    let store = vitally_client::integrations::IntegrationStore::from_config(config).await?;
    let http = vitally_client::client::VitallyHttp::from_settings(
        &config.vitally,
        vitally_client::metrics::VitallyMetrics::unregistered(),
    )?;
    let options = vitally_client::mapping::MappingOptions {
        textarea_limit: config.vitally.textarea_limit,
    };
    let (version, explanation) = thena_sync::explain::explain_request(
        ledger,
        &store,
        &http,
        workspace,
        request_id,
        &config.free_mail_domains,
        &options,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
        return Ok(());
    }
    println!(
        "request {request_id} v{version} of workspace {workspace}, explained against Vitally now:"
    );
    for (n, step) in explanation.steps.iter().enumerate() {
        println!("  {}. {step}", n + 1);
    }
    println!("→ {}", explanation.verdict);
    Ok(())
}

async fn resync(
    config: &Config,
    ledger: &Ledger,
    workspace: &str,
    filter: Filter,
    dry_run: bool,
    rate: f64,
    actor: &str,
) -> anyhow::Result<()> {
    if !(rate > 0.0 && rate <= thena_sync::resync::MAX_RATE) {
        anyhow::bail!("--rate must be between 0 and 1000 per second, got {rate}");
    }
    let broker = if dry_run {
        None
    } else {
        Some(
            Broker::connect(
                config.amqp_url.clone(),
                "thena-vitally-resync",
                Topology::from_config(config),
            )
            .await
            .context("cannot connect to RabbitMQ (AMQP_URL)")?,
        )
    };
    let publisher = match &broker {
        Some(broker) => Some(broker.publisher().await?),
        None => None,
    };
    if !dry_run {
        let mut redis = thena_runtime::redis::connect(&config.redis_url)
            .await
            .context("cannot connect to Redis (REDIS_URL)")?;
        let cleared =
            thena_sync::resync::clear_cached_lookups(&mut redis, &config.redis_prefix, workspace)
                .await?;
        println!("cleared {cleared} cached lookup(s) of {workspace}");
    }
    let mut progress = 0u64;
    let sent = thena_sync::resync::resync(
        ledger,
        publisher.as_ref(),
        workspace,
        filter,
        rate,
        |resent| {
            if dry_run {
                println!(
                    "would resend request {} v{} ({})",
                    resent.request_id, resent.version, resent.outcome
                );
            } else {
                progress += 1;
                eprint!("\rresent {progress}");
            }
        },
    )
    .await?;
    if dry_run {
        println!("{sent} request(s) would be resent");
    } else {
        eprintln!();
        println!("resent {sent} request(s) of {workspace}");
        tracing::info!(target: "thena::audit", actor, workspace, resent = sent, "requests resync");
    }
    if let Some(broker) = broker {
        broker.close().await;
    }
    Ok(())
}

fn version(v: Option<u64>) -> String {
    v.map_or("—".to_owned(), |v| format!("v{v}"))
}

fn when(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn outcome(r: &RequestRecord) -> String {
    thena_sync::resync::outcome_text(r.outcome.as_deref(), r.reason.as_deref())
}

/// The text form of `requests show`.
fn render(r: &RequestRecord) -> String {
    let mut out = format!("request {} of workspace {}\n", r.request_id, r.workspace_id);
    let line = |out: &mut String, label: &str, value: String| {
        out.push_str(&format!("  {label:<16} {value}\n"));
    };
    line(&mut out, "latest version", version(r.latest_version));
    line(
        &mut out,
        "in Vitally",
        match (r.synced_version, r.synced_at) {
            (Some(v), Some(at)) => format!("v{v} since {}", when(at)),
            _ => "never synced".to_owned(),
        },
    );
    line(
        &mut out,
        "outcome",
        format!(
            "{} ({})",
            outcome(r),
            r.outcome_at.map_or("—".to_owned(), when)
        ),
    );
    let link = r
        .link
        .as_ref()
        .map_or("—".to_owned(), thena_sync::explain::describe_link);
    line(&mut out, "linking", link);
    line(
        &mut out,
        "instance",
        r.instance_id.clone().unwrap_or_else(|| "—".to_owned()),
    );
    line(&mut out, "failed attempts", r.attempts.to_string());
    line(&mut out, "first seen", when(r.first_seen_at));
    if !r.history.is_empty() {
        out.push_str("history (oldest first)\n");
        for h in &r.history {
            out.push_str(&format!(
                "  {}  v{:<5} {:<9} {}{}\n",
                when(h.at),
                h.version,
                h.outcome,
                h.reason,
                h.detail
                    .as_ref()
                    .map_or(String::new(), |d| format!(" — {d}"))
            ));
        }
    }
    out
}
