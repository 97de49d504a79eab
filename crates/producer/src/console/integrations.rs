//! Integrations: the list with each one's health, budget, last sync and last day; one
//! integration with its settings and history; disconnect behind a confirmation.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thena_store::ledger::hourly::Activity;
use vitally_client::{
    integrations::HistoryEntry,
    limiter::Usage,
    provision::{self, Toggles},
};

use super::{
    Operator, Posted, chart, console, not_found, respond, unavailable,
    views::{self, Section, ago, millis},
};
use crate::{
    admin::{connect_error, store_error},
    app::AppState,
};

/// Hours of activity the console shows.
pub(crate) const DAY: u32 = 24;

/// One integration as the list shows it (also its JSON).
#[derive(Debug, Serialize)]
pub(crate) struct Card {
    /// The admin API's redacted record.
    pub integration: Value,
    pub activity: Activity,
    /// Budget use, fleet-wide (`None` when Redis did not answer).
    pub usage: Option<Usage>,
    pub last_synced_at: Option<DateTime<Utc>>,
}

impl Card {
    fn workspace(&self) -> &str {
        self.integration["workspace_id"].as_str().unwrap_or("")
    }

    fn budget(&self) -> Option<u64> {
        self.integration["rate_budget_per_min"].as_u64()
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct List {
    pub now: DateTime<Utc>,
    pub integrations: Vec<Card>,
    /// A workspace just disconnected (the page says so).
    #[serde(skip)]
    pub disconnected: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    disconnected: Option<String>,
}

/// The cards of every integration `operator` may see (or only `only`).
pub(crate) async fn cards(
    state: &AppState,
    operator: &Operator,
    only: Option<&str>,
) -> Result<Vec<Card>, Response> {
    let console = console(state).map_err(IntoResponse::into_response)?;
    let store = state.integrations();
    let views = store
        .views()
        .await
        .map_err(|e| store_error(&e).into_response())?;
    let views: Vec<Value> = views
        .into_iter()
        .filter(|v| {
            let ws = v["workspace_id"].as_str().unwrap_or("");
            operator.session.sees(ws) && only.is_none_or(|only| only == ws)
        })
        .collect();
    let workspaces: Vec<String> = views
        .iter()
        .filter_map(|v| v["workspace_id"].as_str().map(str::to_owned))
        .collect();
    let now = Utc::now();
    let (activity, last_synced, keys) = tokio::join!(
        state.ledger().activity(&workspaces, now, DAY),
        state.ledger().last_synced(Some(&workspaces)),
        store.budget_keys(),
    );
    let activity = activity.map_err(|e| unavailable(&e))?;
    let last_synced = last_synced.map_err(|e| unavailable(&e))?;
    let keys = keys.map_err(|e| store_error(&e).into_response())?;
    let usage = join_all(workspaces.iter().map(|ws| async {
        match keys.get(ws) {
            Some(key) => console.limiter.usage(key).await,
            None => None,
        }
    }))
    .await;
    Ok(views
        .into_iter()
        .zip(activity)
        .zip(usage)
        .map(|((integration, activity), usage)| Card {
            last_synced_at: last_synced.get(&activity.workspace_id).copied(),
            integration,
            activity,
            usage,
        })
        .collect())
}

pub(crate) async fn list(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    match cards(&state, &operator, None).await {
        Ok(integrations) => {
            let data = List {
                now: Utc::now(),
                integrations,
                disconnected: query.disconnected,
            };
            respond(
                &headers,
                StatusCode::OK,
                &data,
                Some("/v1/integrations"),
                |data| list_page(&operator, data, None),
            )
        }
        Err(response) => response,
    }
}

/// The list, with `modal` (the setup steps) drawn over it.
pub(crate) fn list_page(operator: &Operator, data: &List, modal: Option<Markup>) -> Markup {
    let body = html! {
        div.head {
            h1 { "Integrations" }
            @if operator.session.scope.is_none() {
                a.button.primary href="/console/integrations/new" { "Add integration" }
            }
        }
        @if let Some(ws) = &data.disconnected {
            p.notice role="status" { "Disconnected " (ws) ". Its record and history are kept; connecting it again resumes where it stopped." }
        }
        @if data.integrations.is_empty() {
            div.card {
                p { "No Vitally integration yet." }
                p.muted { "Add one: it checks the API URL and auth header against Vitally, creates (or adopts) the \"Thena Requests\" object with its traits, and starts syncing requests created from now on." }
            }
        }
        div.integrations {
            @for card in &data.integrations {
                article.card.integration {
                    div.head {
                        h2 { a href=(format!("/console/integrations/{}", card.workspace())) { (card.workspace()) } }
                        (health_tag(&card.integration))
                    }
                    div.url { (card.integration["api_url"].as_str().unwrap_or("")) }
                    (figures(card, data.now))
                    (chart::hourly(&card.activity.hours))
                }
            }
        }
        @if let Some(modal) = modal { (modal) }
    };
    views::page(operator, Section::Integrations, "Integrations", body)
}

fn health_tag(integration: &Value) -> Markup {
    let health = integration["health"].as_str().unwrap_or("unknown");
    let class = if health == "healthy" {
        "tag ok"
    } else {
        "tag bad"
    };
    html! { span class=(class) { (health) } }
}

/// Health, budget, 429s, last sync and the last day, as a definition list.
fn figures(card: &Card, now: DateTime<Utc>) -> Markup {
    let activity = &card.activity;
    let total = |outcome: &str| activity.totals.get(outcome).copied().unwrap_or(0);
    html! {
        dl.figures {
            dt { "Health" }
            dd {
                @if let Some(detail) = card.integration["health_detail"].as_str() {
                    (detail)
                } @else {
                    "Vitally accepts the key"
                }
                @if let Some(since) = card.integration["health_changed_at"].as_str().and_then(|s| s.parse::<DateTime<Utc>>().ok()) {
                    span.muted { " · since " (ago(now, since)) }
                }
            }
            dt { "Budget" }
            dd { (budget(card)) }
            dt { "429s (24 h)" }
            dd { (activity.rate_limited) }
            dt { "Last sync" }
            dd {
                @match card.last_synced_at {
                    Some(at) => (ago(now, at)),
                    None => span.muted { "never" },
                }
            }
            dt { "Last 24 h" }
            dd {
                (total("synced")) " synced · " (total("skipped")) " skipped · "
                (total("retried") + total("parked")) " failed · "
                (total("deferred") + total("held")) " waiting"
            }
            dt { "p99 age (24 h)" }
            dd {
                @match activity.p99_age_ms {
                    Some(ms) => { "≤ " (millis(ms)) },
                    None => span.muted { "—" },
                }
            }
        }
    }
}

fn budget(card: &Card) -> Markup {
    let Some(per_min) = card.budget() else {
        return html! { span.muted { "—" } };
    };
    let Some(usage) = card.usage else {
        return html! { span.muted { "unknown (Redis did not answer) · budget " (per_min) "/min" } };
    };
    let busiest = usage.last_minute.max(usage.this_minute);
    let share = (busiest as f64 / per_min.max(1) as f64).min(1.0);
    html! {
        (usage.this_minute) " calls this minute · " (usage.last_minute) " last minute "
        span.muted { "(budget " (per_min) "/min)" }
        @if let Some(paused) = usage.paused_for {
            br; span.tag.warn { "paused by Vitally (429) for " (millis(paused.as_millis() as u64)) }
        }
        svg.meter viewBox="0 0 100 4" preserveAspectRatio="none" role="img" aria-label=(format!("{:.0}% of the budget", share * 100.0)) {
            rect.track x="0" y="0" width="100" height="4" {}
            rect.used x="0" y="0" width=(format!("{:.1}", share * 100.0)) height="4" {}
        }
    }
}

/// One integration (also its JSON).
#[derive(Debug, Serialize)]
pub(crate) struct Detail {
    pub now: DateTime<Utc>,
    #[serde(flatten)]
    pub card: Card,
    pub history: Vec<HistoryEntry>,
}

/// What a change did, for the page to say.
pub(crate) enum Notice {
    Saved(Value),
    Error(String),
}

pub(crate) async fn show(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path(workspace): Path<String>,
) -> Response {
    render_show(
        &state,
        &operator,
        &headers,
        &workspace,
        None,
        StatusCode::OK,
    )
    .await
}

async fn render_show(
    state: &AppState,
    operator: &Operator,
    headers: &HeaderMap,
    workspace: &str,
    notice: Option<Notice>,
    status: StatusCode,
) -> Response {
    if let Err(response) = operator.check_sees(workspace) {
        return response.into_response();
    }
    let mut cards = match cards(state, operator, Some(workspace)).await {
        Ok(cards) => cards,
        Err(response) => return response,
    };
    let Some(card) = cards.pop() else {
        return not_found(&format!("workspace {workspace} is not connected"));
    };
    let history = match state.integrations().history(workspace, 50).await {
        Ok(history) => history,
        Err(e) => return store_error(&e).into_response(),
    };
    let data = Detail {
        now: Utc::now(),
        card,
        history,
    };
    respond(
        headers,
        status,
        &data,
        Some(&format!("/v1/integrations/{workspace}")),
        |data| detail_page(operator, data, notice.as_ref()),
    )
}

fn detail_page(operator: &Operator, data: &Detail, notice: Option<&Notice>) -> Markup {
    let i = &data.card.integration;
    let ws = data.card.workspace();
    let on = |key: &str| i[key].as_bool().unwrap_or(false);
    let body = html! {
        div.head {
            h1 { (ws) " " (health_tag(i)) }
            a.button href=(format!("/console/integrations/{ws}/disconnect")) { "Disconnect…" }
        }
        @match notice {
            Some(Notice::Saved(changes)) => {
                p.notice role="status" {
                    @if changes.as_object().is_some_and(|c| c.is_empty()) { "Nothing changed." }
                    @else { "Saved: " (change_text(changes)) }
                }
            },
            Some(Notice::Error(message)) => p.error role="alert" { (message) },
            None => {},
        }
        section.card {
            h2 { "The last 24 hours" }
            (figures(&data.card, data.now))
            (chart::hourly(&data.card.activity.hours))
            @if !data.card.activity.reasons.is_empty() {
                details {
                    summary { "By outcome and reason" }
                    table {
                        tr { th { "outcome: reason" } th { "events" } }
                        @for (reason, n) in &data.card.activity.reasons {
                            tr { td { (reason) } td { (n) } }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Settings" }
            form method="post" action=(format!("/console/integrations/{ws}/settings")) {
                (views::csrf_field(operator))
                (toggles(on("push_requests"), on("update_requests"), on("sync_threads"), on("auto_create_fields")))
                label for="budget" { "Vitally budget (calls per minute, fleet-wide; Vitally allows 1000)" }
                input #budget type="number" name="rate_budget_per_min" min="1" max="1000"
                    value=(i["rate_budget_per_min"].as_u64().unwrap_or(600));
                div.actions { button.primary type="submit" { "Save" } }
            }
        }
        section.card {
            h2 { "Record" }
            dl.figures {
                dt { "API URL" } dd { (i["api_url"].as_str().unwrap_or("")) }
                dt { "Auth header" } dd { code { (i["auth_header"].as_str().unwrap_or("")) } }
                dt { "Object" } dd { code { (i["custom_object_id"].as_str().unwrap_or("")) } " (\"Thena Requests\")" }
                dt { "Traits" } dd { (i["fields"].as_object().map_or(0, |f| f.len())) " mapped" }
                dt { "Syncs requests created after" } dd { (i["established_at"].as_str().unwrap_or("")) }
                dt { "Connected" } dd { (i["connected_at"].as_str().unwrap_or("")) }
            }
            p.small.muted { "The same as JSON: " code { "GET /v1/integrations/" (ws) } " (admin API), or this page with " code { "Accept: application/json" } "." }
        }
        section.card {
            h2 { "History" }
            (history(&data.history))
        }
    };
    views::page(operator, Section::Integrations, ws, body)
}

/// The product doc's two toggles first, then the two this fleet adds.
pub(crate) fn toggles(push: bool, update: bool, threads: bool, auto_create: bool) -> Markup {
    let check = |name: &str, on: bool, title: &str, help: &str| {
        html! {
            label.check {
                input type="checkbox" name=(name) value="true" checked[on];
                span { strong { (title) } span.muted.small { (help) } }
            }
        }
    };
    html! {
        (check("push_requests", push, "Push requests to Vitally", "Off: nothing syncs."))
        (check("update_requests", update, "Update existing requests on Vitally", "Off: new requests are created, existing instances are left alone."))
        (check("sync_threads", threads, "Sync thread messages at once", "Off: new thread messages sync with the next change of status, CSAT or assignee (the product's default)."))
        (check("auto_create_fields", auto_create, "Create traits for new custom categories", "Off: a category without a trait in Vitally is dropped until someone creates the trait."))
    }
}

fn history(entries: &[HistoryEntry]) -> Markup {
    html! {
        @if entries.is_empty() {
            p.muted { "No history." }
        } @else {
            div.scroll {
                table {
                    tr { th { "when" } th { "who" } th { "what" } th { "changes" } }
                    @for e in entries.iter().rev() {
                        tr {
                            td { (views::utc(e.at)) }
                            td { (e.actor) }
                            td { (e.action) }
                            td.small { (change_text(&e.changes)) }
                        }
                    }
                }
            }
        }
    }
}

/// `update_requests: true → false; object: created` — field maps and trait lists shortened.
pub(crate) fn change_text(changes: &Value) -> String {
    let Some(map) = changes.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(key, value)| match (value.get("from"), value.get("to")) {
            (Some(_), Some(_)) if key == "fields" => "trait map updated".to_owned(),
            (Some(from), Some(to)) => format!("{key}: {} → {}", short(from), short(to)),
            _ => format!("{key}: {}", short(value)),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("{} item(s)", items.len()),
        Value::Object(map) => format!("{} entr(ies)", map.len()),
        other => other.to_string(),
    }
}

/// What the settings forms send (an integration's page, and the setup's last step with
/// its categories): unchecked boxes are not sent, so absent means off.
#[derive(Debug, Deserialize)]
pub(crate) struct SettingsForm {
    #[serde(default)]
    pub push_requests: bool,
    #[serde(default)]
    pub update_requests: bool,
    #[serde(default)]
    pub sync_threads: bool,
    #[serde(default)]
    pub auto_create_fields: bool,
    pub rate_budget_per_min: Option<u32>,
    /// Comma-separated custom categories (the setup only).
    #[serde(default)]
    pub categories: String,
}

pub(crate) async fn change_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(workspace): Path<String>,
    posted: Posted<SettingsForm>,
) -> Response {
    let Posted { operator, form } = posted;
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let toggles = Toggles {
        push_requests: Some(form.push_requests),
        update_requests: Some(form.update_requests),
        sync_threads: Some(form.sync_threads),
        auto_create_fields: Some(form.auto_create_fields),
        rate_budget_per_min: form.rate_budget_per_min,
        established_at: None,
    };
    let actor = operator.actor();
    let (notice, status) = match provision::set_toggles(
        state.integrations(),
        &workspace,
        toggles,
        &actor,
    )
    .await
    {
        Ok((_, changes)) => {
            tracing::info!(workspace_id = %workspace, %changes, actor, "integration settings changed");
            (Notice::Saved(changes), StatusCode::OK)
        }
        Err(e) => (Notice::Error(e.to_string()), connect_error(&e).status()),
    };
    render_show(
        &state,
        &operator,
        &headers,
        &workspace,
        Some(notice),
        status,
    )
    .await
}

pub(crate) async fn disconnect_page(operator: Operator, Path(workspace): Path<String>) -> Response {
    confirm_page(&operator, &workspace, None, StatusCode::OK)
}

fn confirm_page(
    operator: &Operator,
    workspace: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    if let Err(response) = operator.check_sees(workspace) {
        return response.into_response();
    }
    let body = html! {
        div.card {
            h1 { "Disconnect " (workspace) "?" }
            p { "Requests of this workspace stop syncing at once. Vitally keeps the \"Thena Requests\" object and its instances; the record and its history are kept here, and connecting again resumes with the same start date." }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form method="post" action=(format!("/console/integrations/{workspace}/disconnect")) {
                (views::csrf_field(operator))
                label for="confirm" { "Type the workspace id " code { (workspace) } " to confirm" }
                input #confirm type="text" name="confirm" autocomplete="off" required;
                div.actions {
                    button.danger type="submit" { "Disconnect" }
                    a href=(format!("/console/integrations/{workspace}")) { "Cancel" }
                }
            }
        }
    };
    (
        status,
        views::page(operator, Section::Integrations, "Disconnect", body),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConfirmForm {
    #[serde(default)]
    confirm: String,
}

pub(crate) async fn disconnect(
    State(state): State<AppState>,
    Path(workspace): Path<String>,
    posted: Posted<ConfirmForm>,
) -> Response {
    let Posted { operator, form } = posted;
    if form.confirm.trim() != workspace {
        return confirm_page(
            &operator,
            &workspace,
            Some("The workspace id you typed does not match; nothing was disconnected."),
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    match provision::disconnect(state.integrations(), &workspace, &operator.actor()).await {
        Ok(true) => {
            tracing::info!(workspace_id = %workspace, actor = operator.actor(), "integration disconnected");
            let query = serde_urlencoded::to_string([("disconnected", workspace.as_str())])
                .unwrap_or_default();
            Redirect::to(&format!("/console/integrations?{query}")).into_response()
        }
        Ok(false) => not_found(&format!("workspace {workspace} is not connected")),
        Err(e) => connect_error(&e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn changes_read_as_from_and_to_with_long_values_shortened() {
        let text = change_text(&json!({
            "update_requests": {"from": true, "to": false},
            "fields": {"from": {}, "to": {"A": {}}},
            "object": "created",
            "traits_added": ["Title", "Status"],
        }));
        assert_eq!(
            text,
            "trait map updated; object: created; traits_added: 2 item(s); \
             update_requests: true → false"
        );
    }
}
