//! `thena-vitally teardown --prefix P`: removes what a hand-run fleet left behind — its
//! exchanges and queues (the topology under `P`), its Redis keys (`P:*`, or
//! `--redis-prefix`) and, with `--schema`, its PostgreSQL schema. `--dry-run` lists what
//! would go and removes nothing.
//!
//! It talks to RabbitMQ with plain lapin rather than [`thena_broker::Broker`], which
//! declares the topology on connect: a dry run must not create what it lists.

use anyhow::Context;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use secrecy::ExposeSecret;
use thena_broker::Topology;
use thena_runtime::Config;

#[derive(clap::Args)]
pub struct TeardownArgs {
    /// Name prefix of the fleet's exchanges and queues (its NAME_PREFIX), e.g. `dev`.
    #[arg(long)]
    prefix: String,
    /// Prefix of the fleet's Redis keys (its REDIS_PREFIX); default: the same as --prefix.
    #[arg(long)]
    redis_prefix: Option<String>,
    /// Also drop this PostgreSQL schema (the fleet's DATABASE_SCHEMA) and everything in it.
    #[arg(long)]
    schema: Option<String>,
    /// List what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(config: Config, args: TeardownArgs) -> anyhow::Result<()> {
    let prefix = args.prefix.trim();
    anyhow::ensure!(!prefix.is_empty(), "--prefix must not be empty");
    let redis_prefix = args.redis_prefix.as_deref().unwrap_or(prefix).trim();
    anyhow::ensure!(!redis_prefix.is_empty(), "--redis-prefix must not be empty");
    // The delay queues are named by their tier: RETRY_TIERS must be the fleet's.
    let topology = Topology::new(prefix).with_delay_tiers(config.retry.tiers.clone());
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let mut removed = 0usize;
    let mut failures: Vec<String> = Vec::new();

    match broker(&config, &topology, args.dry_run).await {
        Ok(lines) => {
            removed += lines.len();
            for line in lines {
                println!("{verb} {line}");
            }
        }
        Err(e) => failures.push(format!("RabbitMQ: {e:#}")),
    }
    match redis_keys(&config, redis_prefix, args.dry_run).await {
        Ok(0) => {}
        Ok(keys) => {
            removed += 1;
            println!("{verb} {keys} Redis key(s) under {redis_prefix}:*");
        }
        Err(e) => failures.push(format!("Redis: {e:#}")),
    }
    if let Some(schema) = &args.schema {
        match drop_schema(&config, schema, args.dry_run).await {
            Ok(false) => {}
            Ok(true) => {
                removed += 1;
                println!("{verb} PostgreSQL schema {schema}");
            }
            Err(e) => failures.push(format!("PostgreSQL: {e:#}")),
        }
    }
    if removed == 0 && failures.is_empty() {
        println!("nothing to remove for prefix {prefix}");
    }
    anyhow::ensure!(
        failures.is_empty(),
        "teardown incomplete:\n  {}",
        failures.join("\n  ")
    );
    Ok(())
}

/// The topology's queues and exchanges that exist, each deleted unless `dry_run`.
async fn broker(
    config: &Config,
    topology: &Topology,
    dry_run: bool,
) -> anyhow::Result<Vec<String>> {
    let connection = Connection::connect(
        config.amqp_url.expose_secret(),
        ConnectionProperties::default().with_connection_name("thena-vitally-teardown".into()),
    )
    .await
    .context("cannot connect to RabbitMQ (AMQP_URL)")?;
    let result = async {
        let mut lines = Vec::new();
        for queue in topology.queues() {
            // A passive declare of a missing queue closes its channel: one channel each.
            let channel = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let Ok(found) = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            else {
                continue;
            };
            if !dry_run {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            lines.push(format!(
                "queue {queue} ({} message(s))",
                found.message_count()
            ));
            close(&channel).await;
        }
        for exchange in topology.exchanges() {
            let channel = connection.create_channel().await?;
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            let exists = channel
                .exchange_declare(
                    exchange.as_str().into(),
                    lapin::ExchangeKind::Fanout,
                    passive,
                    FieldTable::default(),
                )
                .await
                .is_ok();
            if !exists {
                continue;
            }
            if !dry_run {
                channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await?;
            }
            lines.push(format!("exchange {exchange}"));
            close(&channel).await;
        }
        anyhow::Ok(lines)
    }
    .await;
    let _ = connection.close(200, "teardown done".into()).await;
    result
}

async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

/// Counts (and unless `dry_run` deletes) the keys under `prefix:`.
async fn redis_keys(config: &Config, prefix: &str, dry_run: bool) -> anyhow::Result<usize> {
    let mut redis = thena_runtime::redis::connect(&config.redis_url)
        .await
        .context("cannot connect to Redis (REDIS_URL)")?;
    let pattern = format!("{}:*", glob_escape(prefix));
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut redis, &pattern).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    if !dry_run {
        for chunk in keys.chunks(500) {
            let _: () = redis::AsyncCommands::del(&mut redis, chunk).await?;
        }
    }
    Ok(keys.len())
}

/// A literal prefix in a Redis `MATCH` pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether the schema exists (and unless `dry_run`, drops it).
async fn drop_schema(config: &Config, schema: &str, dry_run: bool) -> anyhow::Result<bool> {
    let db = thena_store::Db::new(&config.database_url, schema)?;
    let exists = db
        .client()
        .await?
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(thena_store::DbError::from)?
        .is_some();
    if exists && !dry_run {
        db.drop_schema().await?;
    }
    Ok(exists)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_is_matched_literally() {
        assert_eq!(super::glob_escape("dev-1"), "dev-1");
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
