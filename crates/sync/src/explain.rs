//! `requests explain`: the decision for a request's latest snapshot, re-evaluated against
//! live Vitally step by step, **without writing anything** — no instance, no user, no
//! cache entry. Only reads (users, an account, the instance search) reach Vitally.

use serde::Serialize;
use serde_json::{Map, Value};
use thena_events::RequestChanged;
use thena_store::ledger::Ledger;
use vitally_client::{
    client::{VitallyClient, VitallyHttp},
    error::VitallyError,
    integrations::{Integration, IntegrationStore},
    mapping::{MappingOptions, map_instance},
};

use crate::{
    linking::{
        DomainChoice, Memberships, NoLink, Relink, Target, UserLink, choose_by_domain,
        is_free_mail, link_user, relink, table_row, user_external_id,
    },
    pipeline::{memberships_of, merge_memberships},
    policy::{self, PolicyDecision, Toggles},
};

/// What syncing the snapshot now would do, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// Each step, as a sentence.
    pub steps: Vec<String>,
    /// Where the instance would go, or why nowhere.
    pub verdict: String,
    pub target: Option<Target>,
    /// The traits that would be written (by Vitally path).
    pub traits: Map<String, Value>,
}

/// Why a stored request could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("request {request_id} of workspace {workspace} never reached the fleet")]
    NeverSeen { workspace: String, request_id: u64 },
    #[error("workspace {0} is not connected")]
    NotConnected(String),
    #[error("the stored snapshot of request {request_id} does not decode: {reason}")]
    Snapshot { request_id: u64, reason: String },
    #[error("the ledger: {0}")]
    Ledger(#[from] thena_store::DbError),
    #[error(transparent)]
    Store(#[from] vitally_client::integrations::StoreError),
    #[error("Vitally: {0}")]
    Vitally(#[from] VitallyError),
}

/// [`explain`] for the latest snapshot the ledger holds of a request: what `requests
/// explain`, the console and their API run. Returns the version explained.
pub async fn explain_request(
    ledger: &Ledger,
    store: &IntegrationStore,
    http: &VitallyHttp,
    workspace: &str,
    request_id: u64,
    free_mail_domains: &[String],
    options: &MappingOptions,
) -> Result<(u64, Explanation), ExplainError> {
    let Some((version, snapshot)) = ledger.latest_snapshot(workspace, request_id).await? else {
        return Err(ExplainError::NeverSeen {
            workspace: workspace.to_owned(),
            request_id,
        });
    };
    let event = decode_snapshot(request_id, &snapshot)?;
    let Some(integration) = store.get(workspace).await? else {
        return Err(ExplainError::NotConnected(workspace.to_owned()));
    };
    let explanation = explain(
        &integration.client(http),
        &integration,
        &event,
        free_mail_domains,
        options,
    )
    .await?;
    Ok((version, explanation))
}

/// How the ledger says a request was linked, in one line: `organization + account
/// (1 org × 1 account) → organization org-1, account acc-1 (user created)`.
pub fn describe_link(link: &Value) -> String {
    let rule = link["rule"].as_str().unwrap_or("?");
    match link["no_sync"].as_str() {
        Some(reason) => format!("{rule} → no sync: {reason}"),
        None => format!(
            "{rule} → organization {}, account {}{}",
            link["organization_id"].as_str().unwrap_or("—"),
            link["account_id"].as_str().unwrap_or("—"),
            if link["user_created"] == true {
                " (user created)"
            } else {
                ""
            }
        ),
    }
}

/// A stored snapshot as the event it was.
pub fn decode_snapshot(request_id: u64, snapshot: &Value) -> Result<RequestChanged, ExplainError> {
    let bytes = serde_json::to_vec(snapshot).unwrap_or_default();
    thena_events::decode_event(&bytes).map_err(|e| ExplainError::Snapshot {
        request_id,
        reason: e.to_string(),
    })
}

struct Steps(Vec<String>);

impl Steps {
    fn say(&mut self, step: impl Into<String>) {
        self.0.push(step.into());
    }
}

/// Explains `event` for `integration`, reading from Vitally through `client`.
pub async fn explain(
    client: &VitallyClient,
    integration: &Integration,
    event: &RequestChanged,
    free_mail_domains: &[String],
    options: &MappingOptions,
) -> Result<Explanation, VitallyError> {
    let mut steps = Steps(Vec::new());
    let toggles = Toggles {
        push_requests: integration.push_requests,
        update_requests: integration.update_requests,
        sync_threads: integration.sync_threads,
        established_at: integration.established_at,
    };
    let may_update = match policy::decide(event, &toggles, policy::Lane::Live) {
        PolicyDecision::Skip(reason) => {
            steps.say(format!("policy: skip ({})", reason.as_str()));
            return Ok(done(steps, format!("no sync: {}", reason.as_str()), None));
        }
        PolicyDecision::Sync { may_update } => {
            steps.say(format!(
                "policy: sync (push on, created after {}, updates {})",
                integration.established_at.to_rfc3339(),
                if may_update { "allowed" } else { "off" }
            ));
            may_update
        }
    };
    let linked = resolve(client, event, free_mail_domains, &mut steps).await?;
    if let Ok(target) = &linked {
        steps.say(format!(
            "target: organization {}, account {}",
            target.organization_id.as_deref().unwrap_or("—"),
            target.account_id.as_deref().unwrap_or("—")
        ));
    }
    let mapped = map_instance(event, &integration.fields, options);
    if !mapped.dropped_categories.is_empty() {
        steps.say(format!(
            "custom categories without a trait (dropped): {}",
            mapped.dropped_categories.join(", ")
        ));
    }
    let existing = client
        .find_instance(&integration.custom_object_id, &mapped.external_id)
        .await?;
    let relinked = relink(
        linked.as_ref().map_err(|no_link| *no_link),
        existing.is_some(),
    );
    let verdict = match (relinked, existing, may_update) {
        (Relink::Skip(no_link), _, _) => {
            return Ok(done(steps, format!("no sync: {}", no_link.as_str()), None));
        }
        (Relink::Link { .. } | Relink::KeepLast(_), Some(instance), false) => {
            format!(
                "no sync: instance {} exists and updates are off",
                instance.id
            )
        }
        (Relink::Link { .. }, Some(instance), true) => {
            format!("would update instance {}", instance.id)
        }
        (Relink::KeepLast(no_link), Some(instance), true) => format!(
            "would update instance {}'s traits and keep its last link (organization {}, \
             account {}): link_lost ({})",
            instance.id,
            instance.organization_id.as_deref().unwrap_or("—"),
            instance.customer_id.as_deref().unwrap_or("—"),
            no_link.as_str()
        ),
        (Relink::Link { .. }, None, _) => {
            format!("would create instance {}", mapped.external_id)
        }
        (Relink::KeepLast(no_link), None, _) => {
            return Ok(done(steps, format!("no sync: {}", no_link.as_str()), None));
        }
    };
    steps.say(format!("{} trait(s) would be written", mapped.traits.len()));
    let mut explanation = done(steps, verdict, linked.ok());
    explanation.traits = mapped.traits;
    Ok(explanation)
}

fn done(steps: Steps, verdict: String, target: Option<Target>) -> Explanation {
    Explanation {
        steps: steps.0,
        verdict,
        target,
        traits: Map::new(),
    }
}

/// The linking table, then the domain fallback, narrated.
async fn resolve(
    client: &VitallyClient,
    event: &RequestChanged,
    free_mail_domains: &[String],
    steps: &mut Steps,
) -> Result<Result<Target, NoLink>, VitallyError> {
    let Some(email) = event.request.requestor.normalized_email() else {
        steps.say("requestor: no email shared");
        return Ok(Err(NoLink::NoEmail));
    };
    let users = client.users_by_email(&email).await?;
    let memberships = merge_memberships(&users);
    let link = match &memberships {
        Some(m) => {
            steps.say(format!(
                "user {email}: found ({} user(s)), organizations {:?}, accounts {:?}",
                users.len(),
                m.organization_ids,
                m.account_ids
            ));
            steps.say(format!(
                "linking table row: {}",
                table_row(&m.organization_ids, &m.account_ids)
            ));
            link_user(&m.organization_ids, &m.account_ids)
        }
        None => {
            steps.say(format!("user {email}: not in Vitally"));
            UserLink::Unlinked
        }
    };
    match link {
        UserLink::Link(target) => Ok(Ok(target)),
        UserLink::NoSync(reason) => {
            steps.say(format!("linking table: no sync ({})", reason.as_str()));
            Ok(Err(reason))
        }
        UserLink::AccountAndItsOrganization(account) => {
            let organization = client
                .account(&account)
                .await?
                .and_then(|a| a.organization_id);
            steps.say(format!(
                "account {account} belongs to organization {}",
                organization.as_deref().unwrap_or("—")
            ));
            Ok(Ok(Target {
                account_id: Some(account),
                organization_id: organization,
            }))
        }
        UserLink::Unlinked => {
            let Some(domain) = event.request.requestor.email_domain() else {
                return Ok(Err(NoLink::NoEmail));
            };
            if is_free_mail(&domain, free_mail_domains) {
                steps.say(format!("domain fallback: {domain} is a free-mail domain"));
                return Ok(Err(NoLink::FreeMailDomain));
            }
            let at_domain = client.users_by_email_domain(&domain).await?;
            let members: Vec<Memberships> = at_domain.iter().map(memberships_of).collect();
            steps.say(format!(
                "domain fallback: {} user(s) at {domain}",
                at_domain.len()
            ));
            let create = if memberships.is_none() {
                let request = &event.request;
                let external_id = user_external_id(
                    &event.workspace_id,
                    request.source,
                    request.requestor_channel_id(),
                    &email,
                );
                format!(" (the requestor would be created there as user {external_id})")
            } else {
                String::new()
            };
            match choose_by_domain(&members) {
                DomainChoice::Account(account) => {
                    steps.say(format!("domain fallback: one account, {account}{create}"));
                    Ok(Ok(Target::account(&account)))
                }
                DomainChoice::Organization(org) => {
                    steps.say(format!("domain fallback: one organization, {org}{create}"));
                    Ok(Ok(Target::organization(&org)))
                }
                DomainChoice::NoSync(reason) => {
                    let no_link = NoLink::from(reason);
                    steps.say(format!("domain fallback: no sync ({})", no_link.as_str()));
                    Ok(Err(no_link))
                }
            }
        }
    }
}
