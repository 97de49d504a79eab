//! Dead letters: the parked set (PostgreSQL, paged, never the whole queue in memory) with
//! filters; one message with its headers and event; replay of a selection or of
//! everything matching, previewed first ("47 messages would be replayed"), at a rate;
//! purge behind a typed confirmation; the audit trail. All through `thena_replayer::dlq`,
//! as `dlq` and the admin API.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use thena_replayer::dlq::{DlqError, DlqFilter, PurgeOptions, ReplayOptions, Shown};
use thena_store::dead_letters::{AuditEntry, AuditPage, Page};

use super::{
    Operator, Posted, respond,
    views::{self, Section, ago},
};
use crate::{app::AppState, dead_letters::dlq_error};

/// Dead letters per page.
const PAGE: i64 = 50;
/// A console replay's default pace, messages per second.
const DEFAULT_RATE: f64 = 20.0;

/// The filter as the form and the query string carry it (empty fields match all).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct FilterForm {
    #[serde(default)]
    workspace: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    request_id: String,
    /// An age: `15m`, `2h`, `1d`.
    #[serde(default)]
    older_than: String,
    /// Comma-separated dead letter ids (a selection).
    #[serde(default)]
    ids: String,
}

impl FilterForm {
    /// The library's filter; a workspace-scoped session is held to its workspace.
    fn filter(&self, operator: &Operator) -> Result<DlqFilter, String> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let request_id = text(&self.request_id)
            .map(|id| {
                id.parse::<u64>()
                    .map_err(|_| format!("request {id:?} is not a number"))
            })
            .transpose()?;
        let older_than = text(&self.older_than)
            .map(|age| thena_runtime::config::parse_duration(&age))
            .transpose()
            .map_err(|e| format!("older than: {e}"))?;
        let ids = self
            .ids
            .split(',')
            .filter(|id| !id.trim().is_empty())
            .map(|id| {
                id.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("id {id:?} is not a number"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DlqFilter {
            workspace: operator.session.scope.clone().or(text(&self.workspace)),
            reason: text(&self.reason),
            request_id,
            older_than,
            ids,
            ..DlqFilter::default()
        })
    }

    fn query(&self) -> String {
        serde_urlencoded::to_string(self).unwrap_or_default()
    }

    /// The filter as hidden fields, so a replay or purge acts on what the page showed.
    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="workspace" value=(self.workspace);
            input type="hidden" name="reason" value=(self.reason);
            input type="hidden" name="request_id" value=(self.request_id);
            input type="hidden" name="older_than" value=(self.older_than);
            input type="hidden" name="ids" value=(self.ids);
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(flatten)]
    filter: FilterForm,
    /// The previous page's `next` (a string: flattened query fields arrive as text).
    after: Option<String>,
}

/// A page of the parked set (also its JSON).
#[derive(Debug, Serialize)]
pub(crate) struct Listed {
    #[serde(flatten)]
    page: Page,
    filter: FilterForm,
}

pub(crate) async fn list(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let filter = match query.filter.filter(&operator) {
        Ok(filter) => filter,
        Err(e) => return views::error_page(StatusCode::BAD_REQUEST, "Bad filter", &e),
    };
    let after = query
        .after
        .as_deref()
        .and_then(|a| a.trim().parse::<i64>().ok());
    let page = match state.dlq().list(&filter, after, PAGE).await {
        Ok(page) => page,
        Err(e) => return dlq_error(e).into_response(),
    };
    let data = Listed {
        page,
        filter: query.filter,
    };
    respond(
        &headers,
        StatusCode::OK,
        &data,
        Some("/v1/dead-letters"),
        |data| list_page(&operator, data),
    )
}

fn list_page(operator: &Operator, data: &Listed) -> Markup {
    let f = &data.filter;
    let now = Utc::now();
    let body = html! {
        div.head {
            h1 { "Dead letters" }
            a.button href="/console/dead-letters/audit" { "Audit trail" }
        }
        form.card.search method="get" action="/console/dead-letters" {
            @if operator.session.scope.is_none() {
                div { label for="workspace" { "Workspace" } input #workspace type="text" name="workspace" value=(f.workspace); }
            }
            div { label for="reason" { "Reason" } input #reason type="text" name="reason" value=(f.reason) placeholder="vitally_400"; }
            div { label for="request_id" { "Request" } input #request_id type="text" name="request_id" value=(f.request_id); }
            div { label for="older_than" { "Older than" } input #older_than type="text" name="older_than" value=(f.older_than) placeholder="15m"; }
            button.primary type="submit" { "Filter" }
        }
        @if data.page.dead_letters.is_empty() {
            p.card { "No parked message matches: nothing to do." }
        } @else {
            div.scroll {
                table {
                    tr { th { "id" } th { "workspace" } th { "request" } th { "reason" } th { "attempts" } th { "first failure" } th { "last error" } }
                    @for d in &data.page.dead_letters {
                        tr {
                            td { a href=(format!("/console/dead-letters/{}", d.id)) { (d.id) } }
                            td { (d.workspace_id.as_deref().unwrap_or("—")) }
                            td { @match d.request_id { Some(id) => (id), None => "—" } }
                            td { span.tag.bad { (d.reason) } }
                            td { (d.attempts) }
                            td { (ago(now, d.first_failure)) }
                            td.small { (thena_runtime::clip(&d.last_error, 120)) }
                        }
                    }
                }
            }
            @if let Some(next) = data.page.next {
                p { a href=(format!("/console/dead-letters?{}&after={next}", f.query())) { "Next page →" } }
            }
            section.card {
                h2 { "Replay everything matching" }
                p.muted { "Sends each message back to where it was first published, at the rate you choose; the consumers skip versions Vitally already has. Preview first: nothing is sent." }
                (replay_form(operator, f, true))
                p { a href=(format!("/console/dead-letters/purge?{}", f.query())) { "Purge everything matching…" } }
            }
        }
    };
    views::page(operator, Section::DeadLetters, "Dead letters", body)
}

/// The replay form for the filter `f`; `preview` sends a dry run.
fn replay_form(operator: &Operator, f: &FilterForm, preview: bool) -> Markup {
    html! {
        form method="post" action="/console/dead-letters/replay" {
            (views::csrf_field(operator))
            (f.hidden())
            input type="hidden" name="dry_run" value=(preview);
            label for="rate" { "Rate (messages per second)" }
            input #rate type="number" name="rate" min="1" max="10000" value=(DEFAULT_RATE);
            label for="why" { "Why (for the audit trail)" }
            input #why type="text" name="why" placeholder="INC-123 trait restored";
            div.actions {
                @if preview { button type="submit" { "Preview replay" } }
                @else { button.primary type="submit" { "Replay" } }
            }
        }
    }
}

pub(crate) async fn show(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let shown = match state
        .dlq()
        .show(&id, operator.session.scope.as_deref())
        .await
    {
        Ok(shown) => shown,
        Err(e) => return dlq_error(e).into_response(),
    };
    respond(
        &headers,
        StatusCode::OK,
        &shown,
        Some(&format!("/v1/dead-letters/{id}")),
        |shown| show_page(&operator, shown),
    )
}

fn show_page(operator: &Operator, shown: &Shown) -> Markup {
    let d = &shown.dead_letter;
    let event = shown
        .body
        .as_deref()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
    let only_this = FilterForm {
        ids: d.id.to_string(),
        ..FilterForm::default()
    };
    let body = html! {
        div.head {
            h1 { "Dead letter " (d.id) }
            span.tag.bad { (d.state.as_str()) ": " (d.reason) }
        }
        section.card {
            dl.figures {
                dt { "Workspace" } dd { (d.workspace_id.as_deref().unwrap_or("—")) }
                dt { "Request" }
                dd {
                    @match (&d.workspace_id, d.request_id) {
                        (Some(ws), Some(id)) => a href=(format!("/console/requests/{ws}/{id}")) { (id) " v" (d.version.unwrap_or(0)) },
                        _ => "—",
                    }
                }
                dt { "Event" } dd { code { (d.event_id.as_deref().unwrap_or("—")) } }
                dt { "Attempts" } dd { (d.attempts) }
                dt { "First failure" } dd { (views::utc(d.first_failure)) }
                dt { "Parked" } dd { (views::utc(d.parked_at)) }
                dt { "Last error" } dd { (d.last_error) }
                dt { "Goes back to" } dd { code { (d.original_exchange) " / " (d.original_routing_key) } }
            }
            @if d.state.as_str() == "parked" {
                h2 { "Replay this message" }
                (replay_form(operator, &only_this, false))
            }
        }
        section.card {
            details open {
                summary { "Event" }
                pre { (event.as_ref().map_or("(purged)".to_owned(), |e| serde_json::to_string_pretty(e).unwrap_or_default())) }
            }
            details {
                summary { "Headers" }
                pre { (serde_json::to_string_pretty(&shown.headers).unwrap_or_default()) }
            }
        }
    };
    views::page(
        operator,
        Section::DeadLetters,
        &format!("Dead letter {}", d.id),
        body,
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReplayForm {
    #[serde(flatten)]
    filter: FilterForm,
    dry_run: String,
    rate: Option<String>,
    #[serde(default)]
    why: String,
}

/// Preview (a dry run: "47 messages would be replayed", with the button to go on), or
/// start the replay in the background and show its audit line's progress.
pub(crate) async fn replay(State(state): State<AppState>, posted: Posted<ReplayForm>) -> Response {
    let Posted { operator, form } = posted;
    let filter = match form.filter.filter(&operator) {
        Ok(filter) => filter,
        Err(e) => return views::error_page(StatusCode::BAD_REQUEST, "Bad filter", &e),
    };
    let rate = match form
        .rate
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        None => Some(DEFAULT_RATE),
        Some(r) => match r.parse::<f64>() {
            Ok(rate) => Some(rate),
            Err(_) => return views::error_page(StatusCode::BAD_REQUEST, "Bad rate", r),
        },
    };
    let options = ReplayOptions {
        dry_run: form.dry_run == "true",
        rate_per_sec: rate,
        actor: operator.actor(),
        why: form.why.trim().to_owned(),
    };
    let dlq = state.dlq().clone();
    let job = match dlq.prepare_replay(&filter, &options).await {
        Ok(job) => job,
        Err(e) => return failed(e),
    };
    if job.matched == 0 {
        return views::error_page(
            StatusCode::OK,
            "Nothing to replay",
            "No parked message matches: nothing to do.",
        );
    }
    if options.dry_run {
        let matched = job.matched;
        if let Err(e) = dlq.preview(job, |_| {}).await {
            return failed(e);
        }
        let body = html! {
            section.card {
                h1 { (matched) " message(s) would be replayed" }
                p.muted { "Nothing was sent. The preview is in the audit trail." }
                (replay_form(&operator, &form.filter, false))
                p { a href=(format!("/console/dead-letters?{}", form.filter.query())) { "Back to the list" } }
            }
        };
        return views::page(&operator, Section::DeadLetters, "Replay preview", body)
            .into_response();
    }
    let Some(audit) = job.audit_id else {
        return views::error_page(
            StatusCode::OK,
            "Nothing to replay",
            "No parked message matches.",
        );
    };
    let publisher = state.publisher().clone();
    // A replay at a rate outlives this request: it runs on, its audit line shows progress.
    tokio::spawn(async move {
        if let Err(e) = dlq.replay(&publisher, job, |_| {}).await {
            tracing::error!(error = %e, audit, "console replay failed");
        }
    });
    Redirect::to(&format!("/console/dead-letters/audit/{audit}")).into_response()
}

fn failed(error: DlqError) -> Response {
    let status = dlq_error_status(&error);
    views::error_page(status, "Refused", &error.to_string())
}

fn dlq_error_status(error: &DlqError) -> StatusCode {
    match error {
        DlqError::BadFilter(_) | DlqError::BadOption(_) | DlqError::TransitIsReadOnly(_) => {
            StatusCode::BAD_REQUEST
        }
        DlqError::NotFound(_) => StatusCode::NOT_FOUND,
        DlqError::ConfirmRequired { .. } => StatusCode::CONFLICT,
        DlqError::Db(_) | DlqError::Broker(_) | DlqError::Amqp { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The purge's confirmation: how many, and the words to type.
pub(crate) async fn purge_page(
    State(state): State<AppState>,
    operator: Operator,
    Query(form): Query<FilterForm>,
) -> Response {
    confirm_purge(&state, &operator, &form, None).await
}

async fn confirm_purge(
    state: &AppState,
    operator: &Operator,
    form: &FilterForm,
    error: Option<&str>,
) -> Response {
    let filter = match form.filter(operator) {
        Ok(filter) => filter,
        Err(e) => return views::error_page(StatusCode::BAD_REQUEST, "Bad filter", &e),
    };
    // Without confirmation the library counts and refuses: that is the preview.
    let options = PurgeOptions {
        confirm: false,
        actor: operator.actor(),
        why: String::new(),
    };
    let matched = match state.dlq().purge(&filter, &options).await {
        Ok(report) => report.matched,
        Err(DlqError::ConfirmRequired { matched }) => matched,
        Err(e) => return failed(e),
    };
    let words = format!("purge {matched}");
    let body = html! {
        section.card {
            h1 { "Purge " (matched) " parked message(s)?" }
            p { "Their events are deleted for good; who purged them, when and why stays in the audit trail." }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            @if matched > 0 {
                form method="post" action="/console/dead-letters/purge" {
                    (views::csrf_field(operator))
                    (form.hidden())
                    label for="why" { "Why (for the audit trail)" }
                    input #why type="text" name="why" required;
                    label for="confirm" { "Type " code { (words) } " to confirm" }
                    input #confirm type="text" name="confirm" autocomplete="off" required;
                    div.actions { button.danger type="submit" { "Purge" } }
                }
            }
            p { a href=(format!("/console/dead-letters?{}", form.query())) { "Back to the list" } }
        }
    };
    views::page(operator, Section::DeadLetters, "Purge", body).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct PurgeForm {
    #[serde(flatten)]
    filter: FilterForm,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    why: String,
}

pub(crate) async fn purge(State(state): State<AppState>, posted: Posted<PurgeForm>) -> Response {
    let Posted { operator, form } = posted;
    let filter = match form.filter.filter(&operator) {
        Ok(filter) => filter,
        Err(e) => return views::error_page(StatusCode::BAD_REQUEST, "Bad filter", &e),
    };
    // The typed count must be what matches now: a purge never covers more than was read.
    let counted = PurgeOptions {
        confirm: false,
        actor: operator.actor(),
        why: form.why.clone(),
    };
    let matched = match state.dlq().purge(&filter, &counted).await {
        Ok(report) => report.matched,
        Err(DlqError::ConfirmRequired { matched }) => matched,
        Err(e) => return failed(e),
    };
    if form.confirm.trim() != format!("purge {matched}") {
        let error = format!("Type exactly \"purge {matched}\": nothing was purged.");
        return confirm_purge(&state, &operator, &form.filter, Some(&error)).await;
    }
    let options = PurgeOptions {
        confirm: true,
        ..counted
    };
    match state.dlq().purge(&filter, &options).await {
        Ok(report) => match report.audit_id {
            Some(audit) => {
                Redirect::to(&format!("/console/dead-letters/audit/{audit}")).into_response()
            }
            None => Redirect::to("/console/dead-letters").into_response(),
        },
        Err(e) => failed(e),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    before: Option<i64>,
}

pub(crate) async fn audit(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Response {
    let scope = operator.session.scope.as_deref();
    let page = match state.dlq().audit(scope, query.before, PAGE).await {
        Ok(page) => page,
        Err(e) => return dlq_error(e).into_response(),
    };
    respond(
        &headers,
        StatusCode::OK,
        &page,
        Some("/v1/dead-letters/audit"),
        |page| audit_page(&operator, page),
    )
}

fn audit_rows(entries: &[AuditEntry]) -> Markup {
    html! {
        div.scroll {
            table {
                tr { th { "#" } th { "when" } th { "who" } th { "what" } th { "matched" } th { "done" } th { "failed" } th { "why" } }
                @for a in entries {
                    tr {
                        td { a href=(format!("/console/dead-letters/audit/{}", a.id)) { (a.id) } }
                        td { (views::utc(a.at)) }
                        td { (a.actor) }
                        td { (a.action) @if a.dry_run { " (preview)" } }
                        td { (a.matched) }
                        td { (a.done) @if a.finished_at.is_none() && !a.dry_run { " …" } }
                        td { (a.failed) }
                        td.small { (a.why) }
                    }
                }
            }
        }
    }
}

fn audit_page(operator: &Operator, page: &AuditPage) -> Markup {
    let body = html! {
        div.head { h1 { "Dead-letter audit trail" } a.button href="/console/dead-letters" { "Dead letters" } }
        @if page.audit.is_empty() { p.card { "No replay or purge yet." } } @else { (audit_rows(&page.audit)) }
        @if let Some(before) = page.next {
            p { a href=(format!("/console/dead-letters/audit?before={before}")) { "Older →" } }
        }
    };
    views::page(operator, Section::DeadLetters, "Audit trail", body)
}

pub(crate) async fn audit_entry(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let scope = operator.session.scope.as_deref();
    let entry = match state.dlq().audit_entry(id, scope).await {
        Ok(entry) => entry,
        Err(e) => return dlq_error(e).into_response(),
    };
    respond(
        &headers,
        StatusCode::OK,
        &entry,
        Some(&format!("/v1/dead-letters/audit/{id}")),
        |entry| {
            let running = entry.finished_at.is_none() && !entry.dry_run;
            let body = html! {
                div.head { h1 { (entry.action) " #" (entry.id) } a.button href="/console/dead-letters" { "Dead letters" } }
                p.notice role="status" {
                    @if running { "Running: " (entry.done) " of " (entry.matched) " done so far (reload to follow)." }
                    @else { "Finished: " (entry.done) " of " (entry.matched) " done, " (entry.failed) " failed." }
                }
                @if let Some(error) = &entry.error { p.error { (error) } }
                (audit_rows(std::slice::from_ref(entry)))
                pre { (serde_json::to_string_pretty(&entry.filter).unwrap_or_default()) }
            };
            views::page(&operator, Section::DeadLetters, "Audit", body)
        },
    )
}
