//! `thena-vitally integrations …`: the operator's view of the integration records.

use anyhow::Context;
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
    /// Validate credentials, provision the "Thena Requests" object and store the record.
    Connect {
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
        #[arg(long)]
        no_push: bool,
        #[arg(long)]
        no_update: bool,
        #[arg(long)]
        sync_threads: bool,
        #[arg(long)]
        auto_create_fields: bool,
        /// Fleet-wide Vitally calls per minute for this integration.
        #[arg(long)]
        budget: Option<u32>,
    },
    /// Every connected workspace (credentials redacted).
    List,
    /// One workspace's record (credentials redacted).
    Show { workspace: String },
    /// Change toggles of a connected workspace.
    Set {
        workspace: String,
        #[arg(long)]
        push_requests: Option<bool>,
        #[arg(long)]
        update_requests: Option<bool>,
        #[arg(long)]
        sync_threads: Option<bool>,
        #[arg(long)]
        auto_create_fields: Option<bool>,
        #[arg(long)]
        budget: Option<u32>,
    },
    /// Remove the record (Vitally's object and instances stay).
    Disconnect { workspace: String },
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
        } => {
            let auth_header = std::env::var(&auth_header_env).with_context(|| {
                format!("set {auth_header_env} to the Vitally Basic auth header")
            })?;
            let http = VitallyHttp::new(config.vitally.timeout, VitallyMetrics::unregistered())?;
            let integration = provision::connect(
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
                },
            )
            .await?;
            print_json(&integration.redacted())
        }
        IntegrationsCommand::List => {
            let records: Vec<_> = store.list().await?.iter().map(|i| i.redacted()).collect();
            print_json(&serde_json::Value::Array(records))
        }
        IntegrationsCommand::Show { workspace } => match store.get(&workspace).await? {
            Some(integration) => print_json(&integration.redacted()),
            None => anyhow::bail!("workspace {workspace} is not connected"),
        },
        IntegrationsCommand::Set {
            workspace,
            push_requests,
            update_requests,
            sync_threads,
            auto_create_fields,
            budget,
        } => {
            let integration = provision::set_toggles(
                &store,
                &workspace,
                Toggles {
                    push_requests,
                    update_requests,
                    sync_threads,
                    auto_create_fields,
                    rate_budget_per_min: budget,
                },
            )
            .await?;
            print_json(&integration.redacted())
        }
        IntegrationsCommand::Disconnect { workspace } => {
            if provision::disconnect(&store, &workspace).await? {
                println!("disconnected {workspace}");
                Ok(())
            } else {
                anyhow::bail!("workspace {workspace} is not connected")
            }
        }
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
