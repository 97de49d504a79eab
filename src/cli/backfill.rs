//! `thena-vitally backfill WS --file export.ndjson`: import historical requests (opt-in,
//! past the forward-only rule) on the backfill lane, and follow their progress.

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use thena_broker::{Broker, Topology};
use thena_events::Limits;
use thena_producer::backfill::{self, PROBLEMS_SHOWN};
use thena_runtime::Config;
use thena_store::{Db, backfill as jobs};
use vitally_client::integrations::IntegrationStore;

use super::integrations::ActorArg;

/// Largest export read (it is read whole; split a bigger one).
const MAX_EXPORT: u64 = 512 * 1024 * 1024;

#[derive(Args)]
pub struct BackfillArgs {
    /// The workspace (its integration must be connected).
    workspace: String,
    /// An export: one `thena.request.changed/v1` event per line. Importing the same file
    /// again resumes it. Without --file: show the workspace's backfill jobs.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Return once every snapshot is on the broker instead of following the consumers.
    #[arg(long)]
    no_wait: bool,
    /// Print JSON (the jobs, or the finished job).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    actor: ActorArg,
}

pub async fn run(config: Config, args: BackfillArgs) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url, &config.database_schema)
        .await
        .context("cannot open PostgreSQL (DATABASE_URL)")?;
    let Some(file) = &args.file else {
        let list = jobs::list(&db, &args.workspace).await?;
        if args.json {
            let views: Vec<_> = list.iter().map(jobs::view).collect();
            println!("{}", serde_json::to_string_pretty(&views)?);
        } else if list.is_empty() {
            println!("no backfill of {} yet", args.workspace);
        } else {
            for job in &list {
                println!("{}", describe(job));
            }
        }
        return Ok(());
    };
    let store = IntegrationStore::from_config(&config).await?;
    if store.get(&args.workspace).await?.is_none() {
        anyhow::bail!(
            "workspace {} is not connected: connect it first (`thena-vitally integrations connect`)",
            args.workspace
        );
    }
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if size > MAX_EXPORT {
        anyhow::bail!(
            "{} is {size} bytes; exports are read whole, at most {MAX_EXPORT}: split it",
            file.display()
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let export = backfill::read_export(&args.workspace, &bytes, &Limits::default());
    drop(bytes);
    for problem in &export.problems {
        eprintln!("line {}: refused: {}", problem.line, problem.problem);
    }
    if export.rejected > PROBLEMS_SHOWN {
        eprintln!(
            "… and {} more refused line(s)",
            export.rejected - PROBLEMS_SHOWN
        );
    }
    if export.snapshots.is_empty() {
        anyhow::bail!(
            "{}: no valid event of {} in it",
            file.display(),
            args.workspace
        );
    }
    let broker = Broker::connect(
        config.amqp_url.clone(),
        "thena-vitally-backfill",
        Topology::from_config(&config),
    )
    .await
    .context("cannot connect to RabbitMQ (AMQP_URL)")?;
    let publisher = broker.publisher().await?;
    let actor = args.actor.name();
    let total = export.snapshots.len();
    let tty = std::io::stderr().is_terminal();
    let started = backfill::run(
        &db,
        &publisher,
        &args.workspace,
        &file.display().to_string(),
        &actor,
        &export,
        |published| {
            if tty {
                eprint!("\rpublished {published}/{total}");
            }
        },
    )
    .await?;
    if tty {
        eprintln!();
    }
    broker.close().await;
    let job = &started.job;
    println!(
        "backfill {} of {}: {} request(s) ({} line(s) refused); {} — {} published by this run",
        job.id,
        args.workspace,
        job.requests,
        job.rejected,
        if started.resumed {
            "resumed (this export was imported before)"
        } else {
            "new"
        },
        started.published_now
    );
    tracing::info!(
        target: "thena::audit",
        actor,
        workspace = %args.workspace,
        job = %job.id,
        requests = job.requests,
        published = started.published_now,
        resumed = started.resumed,
        "backfill"
    );
    let job = if args.no_wait {
        started.job
    } else {
        follow(&db, &args.workspace, &job.id, tty).await?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&jobs::view(&job))?);
    } else {
        println!("{}", describe(&job));
    }
    Ok(())
}

/// Follows the job until every request settled, printing its progress.
async fn follow(db: &Db, workspace: &str, job: &str, tty: bool) -> anyhow::Result<jobs::Progress> {
    let mut last = u64::MAX;
    loop {
        let progress = jobs::progress(db, workspace, job)
            .await?
            .context("the backfill job vanished")?;
        let settled = progress.settled();
        if tty {
            eprint!("\r{}", describe(&progress));
        } else if settled != last {
            eprintln!("{}", describe(&progress));
        }
        last = settled;
        if progress.is_done() {
            if tty {
                eprintln!();
            }
            return Ok(progress);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn describe(job: &jobs::Progress) -> String {
    format!(
        "{} {}: settled {}/{} (synced {}, skipped {}, parked {}); published {}/{}{}",
        job.id,
        job.source,
        job.settled(),
        job.requests,
        job.synced,
        job.skipped,
        job.parked,
        job.published,
        job.requests,
        if job.is_done() { "; done" } else { "" }
    )
}
