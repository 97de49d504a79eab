//! `thena-vitally dlq …`: the on-call engineer's tools for parked messages (the parked set
//! in PostgreSQL) and a look into the dead and delay queues. Parsing and printing only:
//! every operation is `thena_replayer::dlq`, which the admin API and the console call too.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use thena_broker::{Broker, Topology};
use thena_replayer::dlq::{
    self, Dlq, DlqError, DlqFilter, DlqQueue, PurgeOptions, ReplayOptions, render, transit,
};
use thena_runtime::{Config, config::parse_duration};
use thena_store::{Db, dead_letters::State};

#[derive(Subcommand)]
pub enum DlqCommand {
    /// A table of dead letters: id, event, workspace, request, reason, attempts, first
    /// failure, age, state — a page at a time.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// parked (waiting for a human), replayed or purged (parked set only).
        #[arg(long, default_value = "parked")]
        state: State,
        /// Continue after this dead letter id (the previous page's "more: --after N").
        #[arg(long)]
        after: Option<i64>,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table (parked set only).
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: why it failed, its headers and its pretty-printed event.
    Show {
        /// A dead letter id (the first column of `dlq list`), or an event id: the parked
        /// set first, then the dead and delay queues.
        id: String,
        /// Print JSON instead of text (parked set only).
        #[arg(long)]
        json: bool,
    },
    /// Send matching parked messages back to their original exchange and routing key,
    /// once each.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Say what would be replayed and how many, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Delete matching parked messages' events (their rows stay for the audit).
    /// Irreversible: needs --yes-really.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Confirm that the messages are to be deleted for good (without it, purge only
        /// says how many there are).
        #[arg(long)]
        yes_really: bool,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Who replayed or purged what, when and why (dry runs too), newest first.
    Audit {
        /// Only operations on this workspace's dead letters.
        #[arg(long)]
        workspace: Option<String>,
        /// Continue before this audit id (the previous page's "more: --before N").
        #[arg(long)]
        before: Option<i64>,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct FilterArgs {
    /// `parked` (the parked set, waiting for a human), `dead` (waiting for the replayer) or
    /// `delay` (every retry tier); the last two can only be listed and shown.
    #[arg(long, default_value = "parked")]
    queue: DlqQueue,
    /// Only messages of this Slack workspace id, e.g. T024BE7LD.
    #[arg(long)]
    workspace: Option<String>,
    /// Failure reason, e.g. vitally_400, no_integration, undecodable, delivery_limit.
    #[arg(long)]
    reason: Option<String>,
    /// Only this Thena request id.
    #[arg(long)]
    request: Option<u64>,
    /// First failed longer ago than this (e.g. 15m, 2h).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<std::time::Duration>,
    /// First failed less long ago than this.
    #[arg(long, value_parser = parse_duration)]
    younger_than: Option<std::time::Duration>,
    /// Only these dead letter ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<i64>,
}

impl FilterArgs {
    fn filter(&self, state: State) -> DlqFilter {
        DlqFilter {
            workspace: self.workspace.clone(),
            reason: self.reason.clone(),
            request_id: self.request,
            older_than: self.older_than,
            younger_than: self.younger_than,
            ids: self.ids.clone(),
            state,
        }
    }

    /// Replay and purge act on the parked set only.
    fn parked(&self) -> Result<DlqFilter, DlqError> {
        match self.queue {
            DlqQueue::Parked => Ok(self.filter(State::Parked)),
            transit => Err(DlqError::TransitIsReadOnly(transit)),
        }
    }
}

#[derive(Args)]
pub struct AuditArgs {
    /// Who does it (audit); default: $USER, then the host name.
    #[arg(long)]
    actor: Option<String>,
    /// Why (audit), e.g. a ticket.
    #[arg(long = "why", default_value = "")]
    why: String,
}

pub async fn run(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url, &config.database_schema)
        .await
        .context("cannot open PostgreSQL (DATABASE_URL)")?;
    let tools = Tools {
        dlq: Dlq::new(db),
        config: &config,
    };
    tools.execute(command).await
}

struct Tools<'a> {
    dlq: Dlq,
    config: &'a Config,
}

impl Tools<'_> {
    /// RabbitMQ, for a replay or a look into the transit queues.
    async fn broker(&self) -> anyhow::Result<Broker> {
        Ok(Broker::connect(
            self.config.amqp_url.clone(),
            "thena-vitally-dlq",
            Topology::from_config(self.config),
        )
        .await?)
    }

    async fn execute(&self, command: DlqCommand) -> anyhow::Result<()> {
        match command {
            DlqCommand::List {
                filter,
                state,
                after,
                limit,
                json,
            } => self.list(&filter, state, after, limit, json).await,
            DlqCommand::Show { id, json } => self.show(&id, json).await,
            DlqCommand::Replay {
                filter,
                dry_run,
                rate,
                audit,
            } => {
                let options = ReplayOptions {
                    dry_run,
                    rate_per_sec: rate,
                    actor: actor_name(audit.actor)?,
                    why: audit.why,
                };
                self.replay(&filter.parked()?, &options).await
            }
            DlqCommand::Purge {
                filter,
                yes_really,
                audit,
            } => {
                let options = PurgeOptions {
                    confirm: yes_really,
                    actor: actor_name(audit.actor)?,
                    why: audit.why,
                };
                let report = match self.dlq.purge(&filter.parked()?, &options).await {
                    Err(DlqError::ConfirmRequired { matched }) => anyhow::bail!(
                        "{}; add --yes-really",
                        DlqError::ConfirmRequired { matched }
                    ),
                    other => other?,
                };
                match report.audit_id {
                    None => print!("{}", render::NOTHING_TO_DO),
                    Some(audit) => {
                        println!("purged {} parked message(s) (audit {audit})", report.purged)
                    }
                }
                Ok(())
            }
            DlqCommand::Audit {
                workspace,
                before,
                limit,
                json,
            } => {
                let page = self.dlq.audit(workspace.as_deref(), before, limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&page)?);
                } else if page.audit.is_empty() {
                    println!("no replay or purge recorded");
                } else {
                    print!("{}", render::audit_table(&page.audit));
                    if let Some(next) = page.next {
                        println!("more: --before {next}");
                    }
                }
                Ok(())
            }
        }
    }

    async fn list(
        &self,
        filter: &FilterArgs,
        state: State,
        after: Option<i64>,
        limit: i64,
        json: bool,
    ) -> anyhow::Result<()> {
        let dlq_filter = filter.filter(state);
        if filter.queue != DlqQueue::Parked {
            let broker = self.broker().await?;
            let listed =
                transit::list(&broker, filter.queue, &dlq_filter, limit.max(0) as usize).await;
            broker.close().await;
            let entries = listed?;
            if entries.is_empty() {
                print!("{}", render::nothing_in(filter.queue));
            } else {
                print!("{}", render::transit_table(&entries));
            }
            return Ok(());
        }
        let page = self.dlq.list(&dlq_filter, after, limit).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&page)?);
        } else if page.dead_letters.is_empty() {
            print!("{}", render::NOTHING_TO_DO);
        } else {
            print!(
                "{}",
                render::parked_table(&page.dead_letters, chrono::Utc::now())
            );
            if let Some(next) = page.next {
                println!("more: --after {next}");
            }
        }
        Ok(())
    }

    async fn show(&self, id: &str, json: bool) -> anyhow::Result<()> {
        match self.dlq.show(id, None).await {
            Ok(shown) if json => println!("{}", serde_json::to_string_pretty(&shown)?),
            Ok(shown) => print!("{}", render::shown(&shown, chrono::Utc::now())),
            // Not parked: an event id may be passing through the dead or delay queues.
            Err(DlqError::NotFound(_)) if id.trim().parse::<i64>().is_err() => {
                let broker = self.broker().await?;
                let shown = transit::show(&broker, id).await;
                broker.close().await;
                print!("{}", shown?);
            }
            Err(error) => return Err(error.into()),
        }
        Ok(())
    }

    async fn replay(&self, filter: &DlqFilter, options: &ReplayOptions) -> anyhow::Result<()> {
        let job = self.dlq.prepare_replay(filter, options).await?;
        let total = job.matched;
        let broker = match job.matched {
            0 => None,
            _ if options.dry_run => None,
            _ => Some(self.broker().await?),
        };
        let publisher = match &broker {
            Some(broker) => Some(broker.publisher().await?),
            None => None,
        };
        let mut done = 0u64;
        let each = |line: &dlq::ReplayLine| {
            println!("{line}");
            done += 1;
            progress_bar(done, total);
        };
        let report = match &publisher {
            Some(publisher) => self.dlq.replay(publisher, job, each).await,
            None => self.dlq.preview(job, each).await,
        };
        if let Some(publisher) = publisher {
            publisher.close().await;
        }
        if let Some(broker) = broker {
            broker.close().await;
        }
        let report = report?;
        if total >= PROGRESS_BAR_MIN {
            eprintln!();
        }
        print!("{}", report.render());
        Ok(())
    }
}

/// Who replays or purges, for the audit: `--actor`, else `$USER`, else the host name.
/// Never a made-up name: with none of them the command is refused.
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
                "cannot tell who you are ($USER and the host name are unset): pass --actor"
            )
        })
}

/// Runs shorter than this show no progress bar.
const PROGRESS_BAR_MIN: u64 = 20;

/// A one-line progress bar on stderr for runs long enough to need one.
fn progress_bar(done: u64, total: u64) {
    if total < PROGRESS_BAR_MIN {
        return;
    }
    let width = 40;
    let filled = (done * width / total.max(1)).min(width) as usize;
    eprint!(
        "\r[{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(width as usize - filled)
    );
    let _ = std::io::stderr().flush();
}
