//! `thena-vitally dlq …`: the on-call engineer's tools for parked and dead-lettered events.

use std::io::Write;

use clap::{Args, Subcommand};
use thena_broker::{Broker, Topology};
use thena_replayer::dlq::{self, DlqFilter, DlqQueue, Page, ReplayOptions};
use thena_runtime::Config;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// A table of messages: event id, workspace, request, reason, attempts, first failure, age.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Skip this many matching messages.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One message: its headers and pretty-printed body.
    Show {
        /// The event id (message id), as the first column of `dlq list` shows it.
        id: String,
    },
    /// Send matching messages back to their original exchange and routing key, once.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Who replays (audit); default: $USER, then the host name.
        #[arg(long)]
        actor: Option<String>,
        /// Why (audit), e.g. a ticket.
        #[arg(long = "why", default_value = "manual replay")]
        why: String,
    },
    /// Delete every message of a queue. Irreversible: needs --yes-really.
    Purge {
        /// `parked` (waiting for a human) or `dead` (waiting for the replayer).
        #[arg(long, default_value = "parked")]
        queue: DlqQueue,
        /// Confirm that the messages are to be deleted for good (without it, purge only
        /// says how many there are).
        #[arg(long)]
        yes_really: bool,
    },
}

#[derive(Args)]
pub struct FilterArgs {
    /// `parked` (waiting for a human), `dead` (waiting for the replayer) or `delay` (every
    /// retry tier: waiting out a delay; list only).
    #[arg(long, default_value = "parked")]
    queue: DlqQueue,
    /// Only messages of this Slack workspace id, e.g. T024BE7LD.
    #[arg(long)]
    workspace: Option<String>,
    /// Failure reason, e.g. vitally_400, no_integration, undecodable, delivery_limit.
    #[arg(long)]
    reason: Option<String>,
    /// First failed longer ago than this (e.g. 15m, 2h).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<std::time::Duration>,
    /// First failed less long ago than this.
    #[arg(long, value_parser = parse_age)]
    younger_than: Option<std::time::Duration>,
    /// Only these event ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    dlq::parse_duration(text).map_err(|e| e.to_string())
}

impl From<FilterArgs> for DlqFilter {
    fn from(args: FilterArgs) -> Self {
        DlqFilter {
            queue: args.queue,
            workspace: args.workspace,
            reason: args.reason,
            older_than: args.older_than,
            younger_than: args.younger_than,
            ids: args.ids,
        }
    }
}

pub async fn run(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    let broker = Broker::connect(
        config.amqp_url.clone(),
        "thena-vitally-dlq",
        Topology::from_config(&config),
    )
    .await?;
    let result = execute(&broker, command).await;
    broker.close().await;
    result
}

/// Who replays, for the audit: `--actor`, else `$USER`, else the host name. Never a
/// made-up name: with none of them the replay is refused.
fn actor_name(explicit: Option<String>) -> anyhow::Result<String> {
    let non_empty = |s: String| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    explicit
        .and_then(non_empty)
        .or_else(|| std::env::var("USER").ok().and_then(non_empty))
        .or_else(|| {
            ["/etc/hostname", "/proc/sys/kernel/hostname"]
                .iter()
                .find_map(|path| std::fs::read_to_string(path).ok().and_then(non_empty))
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell who replays ($USER and the host name are unset): pass --actor"
            )
        })
}

async fn execute(broker: &Broker, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            filter,
            offset,
            limit,
        } => {
            let filter: DlqFilter = filter.into();
            let entries = dlq::list(broker, &filter, Page { offset, limit }).await?;
            if entries.is_empty() {
                print!("{}", dlq::nothing_to_do(filter.queue));
            } else {
                print!("{}", dlq::render_table(&entries));
            }
        }
        DlqCommand::Show { id } => println!("{}", dlq::show(broker, &id).await?),
        DlqCommand::Replay {
            filter,
            dry_run,
            rate,
            actor,
            why,
        } => {
            let options = ReplayOptions {
                dry_run,
                rate_per_sec: rate,
                actor: actor_name(actor)?,
                reason: why,
            };
            let report = dlq::replay(broker, &filter.into(), &options, progress_bar).await?;
            if report.matched >= PROGRESS_BAR_MIN {
                eprintln!();
            }
            print!("{}", report.render());
        }
        DlqCommand::Purge { queue, yes_really } => {
            let purged = dlq::purge(broker, queue, yes_really).await?;
            println!("purged {purged} messages from the {} queue", queue.as_str());
        }
    }
    Ok(())
}

/// Runs shorter than this show no progress bar.
const PROGRESS_BAR_MIN: usize = 20;

/// A one-line progress bar on stderr for runs long enough to need one.
fn progress_bar(done: usize, total: usize) {
    if total < PROGRESS_BAR_MIN {
        return;
    }
    let width = 40;
    let filled = done * width / total.max(1);
    eprint!(
        "\r[{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}
