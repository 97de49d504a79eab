//! `thena-vitally integrations …`: the operator's view of the integration records.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use secrecy::SecretString;
use thena_runtime::Config;
use vitally_client::{
    client::VitallyHttp,
    metrics::VitallyMetrics,
    provision::{self, ConnectRequest, Toggles},
};

#[derive(Subcommand)]
pub enum IntegrationsCommand {
    /// Validate credentials, provision the "Thena Requests" object and store the record
    /// (a reconnect, e.g. with a rotated key, keeps `established_at` and heals a pause).
    Connect {
        /// The Slack workspace id the events carry (e.g. T024BE7LD).
        #[arg(long)]
        workspace: String,
        /// e.g. https://acme.rest.vitally.io (US) or https://rest.vitally-eu.io (EU).
        #[arg(long)]
        api_url: String,
        /// The whole header value ("Basic …"). Read from the environment, never argv,
        /// so it does not show up in `ps` or shell history.
        #[arg(long = "auth-header-env", default_value = "VITALLY_AUTH_HEADER")]
        auth_header_env: String,
        /// A custom category of the workspace (repeatable): one String trait each.
        #[arg(long = "category")]
        categories: Vec<String>,
        /// Do not create instances for new requests ("push requests" off).
        #[arg(long)]
        no_push: bool,
        /// Do not update existing instances ("update existing requests" off).
        #[arg(long)]
        no_update: bool,
        /// Also write the request's thread into the Customer Thread trait.
        #[arg(long)]
        sync_threads: bool,
        /// Create a trait for a custom category that has none yet, on first use.
        #[arg(long)]
        auto_create_fields: bool,
        /// Fleet-wide Vitally calls per minute for this integration (1–1000; default
        /// VITALLY_BUDGET_PER_MIN).
        #[arg(long)]
        budget: Option<u32>,
        /// The start of forward-only sync (RFC 3339); default: keep the earlier record's,
        /// or now for a first connect.
        #[arg(long)]
        established_at: Option<DateTime<Utc>>,
        #[command(flatten)]
        actor: ActorArg,
    },
    /// Every connected workspace with its health (credentials redacted).
    List,
    /// One workspace's record (credentials redacted).
    Show {
        /// The Slack workspace id.
        workspace: String,
    },
    /// Change settings of a connected workspace (each change goes into its history).
    Set {
        /// The Slack workspace id.
        workspace: String,
        #[arg(long)]
        push_requests: Option<bool>,
        #[arg(long)]
        update_requests: Option<bool>,
        #[arg(long)]
        sync_threads: Option<bool>,
        #[arg(long)]
        auto_create_fields: Option<bool>,
        /// Fleet-wide Vitally calls per minute (1–1000).
        #[arg(long)]
        budget: Option<u32>,
        /// Move the start of forward-only sync (RFC 3339).
        #[arg(long)]
        established_at: Option<DateTime<Utc>>,
        #[command(flatten)]
        actor: ActorArg,
    },
    /// Stop syncing the workspace. A soft delete: the record keeps `established_at`,
    /// and Vitally's object and instances stay for a later connect.
    Disconnect {
        /// The Slack workspace id.
        workspace: String,
        #[command(flatten)]
        actor: ActorArg,
    },
    /// Every connect, change, pause, resume and disconnect of a workspace, oldest first.
    History {
        /// The Slack workspace id.
        workspace: String,
        /// Show at most this many of the newest entries.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Re-seal every record with the newest key of INTEGRATIONS_KEYS (after a rotation).
    Reencrypt {
        #[command(flatten)]
        actor: ActorArg,
    },
}

/// Who made a change, for the history.
#[derive(clap::Args)]
pub(crate) struct ActorArg {
    /// Your name in the integration's history (default: $USER, then the host name).
    #[arg(long)]
    actor: Option<String>,
}

impl ActorArg {
    pub(crate) fn name(&self) -> String {
        self.actor
            .clone()
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|name| !name.is_empty())
            .map_or_else(|| "cli".to_owned(), |name| format!("cli:{name}"))
    }
}

pub async fn run(config: Config, command: IntegrationsCommand) -> anyhow::Result<()> {
    let store = vitally_client::integrations::IntegrationStore::from_config(&config).await?;
    match command {
        IntegrationsCommand::Connect {
            workspace,
            api_url,
            auth_header_env,
            categories,
            no_push,
            no_update,
            sync_threads,
            auto_create_fields,
            budget,
            established_at,
            actor,
        } => {
            let auth_header = std::env::var(&auth_header_env).with_context(|| {
                format!("set {auth_header_env} to the Vitally Basic auth header")
            })?;
            let http = VitallyHttp::from_settings(&config.vitally, VitallyMetrics::unregistered())?;
            let connected = provision::connect(
                &http,
                &store,
                ConnectRequest {
                    workspace_id: workspace,
                    api_url,
                    auth_header: SecretString::from(auth_header),
                    categories,
                    push_requests: !no_push,
                    update_requests: !no_update,
                    sync_threads,
                    auto_create_fields,
                    rate_budget_per_min: budget.unwrap_or(config.vitally.default_budget_per_min),
                    established_at,
                },
                &actor.name(),
            )
            .await?;
            println!("{}", describe_connect(&connected));
            print_json(&connected.integration.redacted())
        }
        IntegrationsCommand::List => print_json(&serde_json::Value::Array(store.views().await?)),
        IntegrationsCommand::Show { workspace } => match store.get(&workspace).await {
            Ok(Some(integration)) => print_json(&integration.redacted()),
            Ok(None) => anyhow::bail!("workspace {workspace} is not connected"),
            Err(e) if e.is_undecryptable() => {
                anyhow::bail!("workspace {workspace} is paused: key_undecryptable ({e})")
            }
            Err(e) => Err(e.into()),
        },
        IntegrationsCommand::Set {
            workspace,
            push_requests,
            update_requests,
            sync_threads,
            auto_create_fields,
            budget,
            established_at,
            actor,
        } => {
            let toggles = Toggles {
                push_requests,
                update_requests,
                sync_threads,
                auto_create_fields,
                rate_budget_per_min: budget,
                established_at,
            };
            if toggles.is_empty() {
                println!("nothing to change: name a setting, e.g. --update-requests false");
                return Ok(());
            }
            let (integration, changes) =
                provision::set_toggles(&store, &workspace, toggles, &actor.name()).await?;
            match changes.as_object().filter(|c| !c.is_empty()) {
                Some(changes) => {
                    for (setting, change) in changes {
                        println!("{setting}: {} → {}", change["from"], change["to"]);
                    }
                }
                None => println!("nothing changed: {workspace} already has these settings"),
            }
            print_json(&integration.redacted())
        }
        IntegrationsCommand::Disconnect { workspace, actor } => {
            if provision::disconnect(&store, &workspace, &actor.name()).await? {
                println!("disconnected {workspace} (its established_at is kept for a reconnect)");
                Ok(())
            } else {
                anyhow::bail!("workspace {workspace} is not connected")
            }
        }
        IntegrationsCommand::History {
            workspace,
            limit,
            json,
        } => {
            let entries = store.history(&workspace, limit.clamp(1, 10_000)).await?;
            if entries.is_empty() {
                anyhow::bail!("workspace {workspace} has no history: it was never connected");
            }
            if json {
                return print_json(&serde_json::to_value(&entries)?);
            }
            for entry in entries {
                println!(
                    "{}  {:<16} {:<22} {}",
                    entry.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    entry.action,
                    entry.actor,
                    entry.changes
                );
            }
            Ok(())
        }
        IntegrationsCommand::Reencrypt { actor } => {
            let moved = store.reencrypt(&actor.name()).await?;
            println!(
                "re-sealed {moved} record(s) with key {}",
                store.keys().primary_id()
            );
            Ok(())
        }
    }
}

/// "Created the object …" / "Adopted …", and which traits were added.
fn describe_connect(connected: &provision::Connected) -> String {
    let ws = &connected.integration.workspace_id;
    let object = &connected.integration.custom_object_id;
    let what = match connected.object {
        provision::ObjectOutcome::Created => {
            format!("created the \"Thena Requests\" object {object}")
        }
        provision::ObjectOutcome::Adopted => format!("adopted the existing object {object}"),
    };
    let traits = match connected.traits_added.len() {
        0 => "no trait was missing".to_owned(),
        n => format!("{n} trait(s) added: {}", connected.traits_added.join(", ")),
    };
    format!("{} {ws}: {what}; {traits}", connected.action)
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
