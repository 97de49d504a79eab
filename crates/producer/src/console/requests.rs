//! Requests: look one up by id or requestor email; its ledger row, its history as a
//! timeline, its Vitally instance; Explain (reads only) and Resync.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thena_store::ledger::{Filter, RequestRecord};
use thena_sync::{
    explain::{ExplainError, Explanation, describe_link, explain_request},
    resync,
};

use super::{
    Operator, Posted, console, not_found, respond,
    session::Nothing,
    unavailable,
    views::{self, Section, ago, outcome_tag},
};
use crate::{admin::store_error, app::AppState};

/// Most requests one email lookup lists.
const EMAIL_MATCHES: i64 = 50;
/// A console resync sends one request; the CLI's default rate.
const RESYNC_RATE: f64 = 10.0;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LookupQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    workspace: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Lookup {
    pub query: String,
    pub workspace: Option<String>,
    pub workspaces: Vec<String>,
    pub requests: Vec<RequestRecord>,
    pub now: DateTime<Utc>,
}

/// What the search box holds: a request id or an email.
enum Wanted {
    Nothing,
    Id(u64),
    Email(String),
    Unreadable,
}

fn wanted(q: &str) -> Wanted {
    let q = q.trim().trim_start_matches('#');
    if q.is_empty() {
        Wanted::Nothing
    } else if let Ok(id) = q.parse::<u64>() {
        Wanted::Id(id)
    } else if q.contains('@') {
        Wanted::Email(q.to_owned())
    } else {
        Wanted::Unreadable
    }
}

pub(crate) async fn lookup(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Query(query): Query<LookupQuery>,
) -> Response {
    let connected = match state.integrations().views().await {
        Ok(views) => views,
        Err(e) => return store_error(&e).into_response(),
    };
    let workspaces = operator.visible(connected.iter().filter_map(|v| v["workspace_id"].as_str()));
    let chosen = Some(query.workspace.trim())
        .filter(|w| !w.is_empty() && workspaces.iter().any(|v| v == w))
        .map(str::to_owned);
    let scope: Vec<String> = match &chosen {
        Some(ws) => vec![ws.clone()],
        None => workspaces.clone(),
    };
    let ledger = state.ledger();
    let requests = match wanted(&query.q) {
        Wanted::Nothing | Wanted::Unreadable => Ok(Vec::new()),
        Wanted::Email(email) => {
            ledger
                .find_by_email(Some(&scope), &email, EMAIL_MATCHES)
                .await
        }
        Wanted::Id(id) => {
            let filter = Filter {
                ids: vec![id],
                ..Filter::default()
            };
            let mut found = Vec::new();
            let mut failed = None;
            for ws in &scope {
                match ledger.list(ws, &filter, 1).await {
                    Ok(page) => found.extend(page.requests),
                    Err(e) => failed = Some(e),
                }
            }
            failed.map_or(Ok(found), Err)
        }
    };
    let requests = match requests {
        Ok(requests) => requests,
        Err(e) => return unavailable(&e),
    };
    if let ([only], Wanted::Id(_), false) = (
        requests.as_slice(),
        wanted(&query.q),
        super::wants_json(&headers),
    ) {
        return Redirect::to(&request_path(&only.workspace_id, only.request_id)).into_response();
    }
    let unreadable = matches!(wanted(&query.q), Wanted::Unreadable);
    let data = Lookup {
        query: query.q.trim().to_owned(),
        workspace: chosen,
        workspaces,
        requests,
        now: Utc::now(),
    };
    respond(&headers, StatusCode::OK, &data, None, |data| {
        lookup_page(&operator, data, unreadable)
    })
}

fn request_path(workspace: &str, request_id: u64) -> String {
    format!("/console/requests/{workspace}/{request_id}")
}

fn lookup_page(operator: &Operator, data: &Lookup, unreadable: bool) -> Markup {
    let body = html! {
        h1 { "Requests" }
        form.card.search method="get" action="/console/requests" role="search" {
            div {
                label for="q" { "Request id or requestor email" }
                input #q type="search" name="q" value=(data.query) placeholder="135 or alice@acme.com" autofocus;
            }
            div {
                label for="workspace" { "Workspace" }
                select #workspace name="workspace" {
                    option value="" { "every workspace" }
                    @for ws in &data.workspaces {
                        option value=(ws) selected[data.workspace.as_deref() == Some(ws.as_str())] { (ws) }
                    }
                }
            }
            button.primary type="submit" { "Look up" }
        }
        @if unreadable {
            p.error role="alert" { "Type a request id (e.g. 135) or the requestor's email address." }
        } @else if !data.query.is_empty() && data.requests.is_empty() {
            p.card { "No request matches " strong { (data.query) } ". A request the fleet never received an event for is not in the ledger." }
        }
        @if !data.requests.is_empty() {
            h2 { (data.requests.len()) " request(s)" }
            div.scroll {
                table {
                    tr { th { "workspace" } th { "request" } th { "latest" } th { "in Vitally" } th { "outcome" } th { "when" } }
                    @for r in &data.requests {
                        tr {
                            td { (r.workspace_id) }
                            td { a href=(request_path(&r.workspace_id, r.request_id)) { (r.request_id) } }
                            td { (version(r.latest_version)) }
                            td { (version(r.synced_version)) }
                            td { (outcome_tag(r.outcome.as_deref(), r.reason.as_deref())) }
                            td { @if let Some(at) = r.outcome_at { (ago(data.now, at)) } }
                        }
                    }
                }
            }
        }
        p.small.muted { "The ledger over the admin API: " code { "GET /v1/integrations/{workspace}/requests?outcome=skipped&reason=domain_unknown" } "." }
    };
    views::page(operator, Section::Requests, "Requests", body)
}

fn version(v: Option<u64>) -> String {
    v.map_or("—".to_owned(), |v| format!("v{v}"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ShowQuery {
    resent: Option<u64>,
}

/// One request (also its JSON): the ledger row with snapshot and history, and where
/// its instance can be read in Vitally.
#[derive(Debug, Serialize)]
pub(crate) struct Shown {
    #[serde(flatten)]
    pub record: RequestRecord,
    pub vitally_instance_url: Option<String>,
    #[serde(skip)]
    pub now: DateTime<Utc>,
}

pub(crate) async fn show(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path((workspace, request_id)): Path<(String, u64)>,
    Query(query): Query<ShowQuery>,
) -> Response {
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let (record, integration) = tokio::join!(
        state.ledger().show(&workspace, request_id, 50),
        state.integrations().get(&workspace),
    );
    let record = match record {
        Ok(Some(record)) => record,
        Ok(None) => {
            return not_found(&format!(
                "request {request_id} of workspace {workspace} never reached the fleet"
            ));
        }
        Err(e) => return unavailable(&e),
    };
    // The REST resource, found by externalId: it answers whether or not the instance id
    // is cached anywhere.
    let vitally_instance_url = integration.ok().flatten().map(|i| {
        let external_id = format!("thena:{workspace}:{request_id}");
        format!(
            "{}/resources/customObjects/{}/instances/search?{}",
            i.api_url,
            i.custom_object_id,
            serde_urlencoded::to_string([("externalId", external_id)]).unwrap_or_default()
        )
    });
    let data = Shown {
        record,
        vitally_instance_url,
        now: Utc::now(),
    };
    respond(
        &headers,
        StatusCode::OK,
        &data,
        Some(&format!(
            "/v1/integrations/{workspace}/requests/{request_id}"
        )),
        |data| show_page(&operator, data, query.resent),
    )
}

fn show_page(operator: &Operator, data: &Shown, resent: Option<u64>) -> Markup {
    let r = &data.record;
    let request = r.snapshot.as_ref().map(|s| &s["request"]);
    let text = |key: &str| request.and_then(|q| q[key].as_str()).map(str::to_owned);
    let requestor = request.map(|q| {
        let who = &q["requestor"];
        match (who["name"].as_str(), who["email"].as_str()) {
            (Some(name), Some(email)) => format!("{name} <{email}>"),
            (None, Some(email)) => email.to_owned(),
            (Some(name), None) => format!("{name} (no email shared)"),
            (None, None) => "—".to_owned(),
        }
    });
    let base = request_path(&r.workspace_id, r.request_id);
    let body = html! {
        div.head {
            h1 { "Request " (r.request_id) span.muted { " · " (r.workspace_id) } }
            (outcome_tag(r.outcome.as_deref(), r.reason.as_deref()))
        }
        @if let Some(version) = resent {
            p.notice role="status" { "Resent v" (version) " through the pipeline. Its outcome appears in the timeline within seconds: reload this page." }
        }
        section.card {
            @if let Some(title) = text("title") { p { strong { (title) } } }
            dl.figures {
                dt { "Requestor" } dd { (requestor.unwrap_or_else(|| "—".to_owned())) }
                dt { "Latest version" } dd { (version(r.latest_version)) }
                dt { "In Vitally" }
                dd {
                    @match (r.synced_version, r.synced_at) {
                        (Some(v), Some(at)) => { "v" (v) " since " (ago(data.now, at)) },
                        _ => span.muted { "never synced" },
                    }
                }
                dt { "Outcome" }
                dd {
                    (outcome_tag(r.outcome.as_deref(), r.reason.as_deref()))
                    @if let Some(at) = r.outcome_at { " " (ago(data.now, at)) }
                }
                dt { "Linking" } dd { (r.link.as_ref().map_or("—".to_owned(), describe_link)) }
                dt { "Instance" }
                dd {
                    @match &r.instance_id { Some(id) => code { (id) }, None => span.muted { "none yet" } }
                    @if let Some(url) = &data.vitally_instance_url {
                        " · " a href=(url) rel="noreferrer" { "in Vitally's API" }
                    }
                }
                dt { "Failed attempts" } dd { (r.attempts) }
                dt { "First seen" } dd { (ago(data.now, r.first_seen_at)) }
            }
            div.actions {
                a.button href=(format!("{base}/explain")) { "Explain" }
                form method="post" action=(format!("{base}/resync")) {
                    (views::csrf_field(operator))
                    button type="submit" { "Resync" }
                }
                span.small.muted { "Explain re-evaluates the latest snapshot against Vitally, writing nothing. Resync sends it through the pipeline again (after a fix in Vitally)." }
            }
        }
        section.card {
            h2 { "Timeline" }
            @if r.history.is_empty() {
                p.muted { "No outcome recorded yet." }
            } @else {
                ol.timeline {
                    @for h in r.history.iter().rev() {
                        li class=(timeline_class(&h.outcome)) {
                            (outcome_tag(Some(&h.outcome), Some(&h.reason))) " v" (h.version) " · "
                            time datetime=(h.at.to_rfc3339()) { (views::utc(h.at)) }
                            @if let Some(detail) = &h.detail { span.detail { (detail) } }
                        }
                    }
                }
            }
        }
        @if let Some(snapshot) = &r.snapshot {
            section.card {
                details {
                    summary { "Latest snapshot received" }
                    pre { (serde_json::to_string_pretty(snapshot).unwrap_or_default()) }
                }
            }
        }
    };
    views::page(
        operator,
        Section::Requests,
        &format!("Request {}", r.request_id),
        body,
    )
}

fn timeline_class(outcome: &str) -> &'static str {
    match outcome {
        "synced" => "ok",
        "retried" | "parked" => "bad",
        "deferred" | "held" => "warn",
        _ => "",
    }
}

/// What Explain shows (also its JSON).
#[derive(Debug, Serialize)]
pub(crate) struct Explained {
    pub workspace_id: String,
    pub request_id: u64,
    pub version: u64,
    #[serde(flatten)]
    pub explanation: Explanation,
}

pub(crate) async fn explain(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path((workspace, request_id)): Path<(String, u64)>,
) -> Response {
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let console = match console(&state) {
        Ok(console) => console,
        Err(response) => return response.into_response(),
    };
    let result = explain_request(
        state.ledger(),
        state.integrations(),
        state.vitally(),
        &workspace,
        request_id,
        &console.free_mail_domains,
        &console.mapping,
    )
    .await;
    let (version, explanation) = match result {
        Ok(done) => done,
        Err(e @ (ExplainError::NeverSeen { .. } | ExplainError::NotConnected(_))) => {
            return not_found(&e.to_string());
        }
        Err(e @ ExplainError::Vitally(_)) => {
            return views::error_page(
                StatusCode::BAD_GATEWAY,
                "Vitally did not answer",
                &e.to_string(),
            );
        }
        Err(e @ ExplainError::Snapshot { .. }) => {
            return views::error_page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Cannot explain",
                &e.to_string(),
            );
        }
        Err(e @ (ExplainError::Ledger(_) | ExplainError::Store(_))) => return unavailable(&e),
    };
    let data = Explained {
        workspace_id: workspace,
        request_id,
        version,
        explanation,
    };
    respond(&headers, StatusCode::OK, &data, None, |data| {
        explain_page(&operator, data)
    })
}

fn explain_page(operator: &Operator, data: &Explained) -> Markup {
    let base = request_path(&data.workspace_id, data.request_id);
    let body = html! {
        div.head {
            h1 { "Explain request " (data.request_id) span.muted { " · " (data.workspace_id) } }
            a.button href=(base) { "Back to the request" }
        }
        section.card {
            p.muted { "The decision for v" (data.version) ", re-evaluated against Vitally now. Nothing was written: no instance, no user, no cache entry." }
            ol.steps { @for step in &data.explanation.steps { li { (step) } } }
            p.verdict { "→ " (data.explanation.verdict) }
            @if !data.explanation.traits.is_empty() {
                details {
                    summary { (data.explanation.traits.len()) " trait(s) would be written" }
                    pre { (serde_json::to_string_pretty(&Value::Object(data.explanation.traits.clone())).unwrap_or_default()) }
                }
            }
        }
        p.small.muted { "The same from the command line: " code { "thena-vitally requests explain " (data.workspace_id) " " (data.request_id) } }
    };
    views::page(operator, Section::Requests, "Explain", body)
}

pub(crate) async fn resync(
    State(state): State<AppState>,
    Path((workspace, request_id)): Path<(String, u64)>,
    posted: Posted<Nothing>,
) -> Response {
    let Posted { operator, .. } = posted;
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let console = match console(&state) {
        Ok(console) => console,
        Err(response) => return response.into_response(),
    };
    let mut redis = console.redis.clone();
    if let Err(e) =
        resync::clear_cached_lookups(&mut redis, &console.redis_prefix, &workspace).await
    {
        // The resend is still worth it: cached lookups expire on their own.
        tracing::warn!(error = %e, "console resync: could not clear cached lookups");
    }
    let filter = Filter {
        ids: vec![request_id],
        ..Filter::default()
    };
    let mut version = None;
    let sent = resync::resync(
        state.ledger(),
        Some(state.publisher()),
        &workspace,
        filter,
        RESYNC_RATE,
        |resent| version = Some(resent.version),
    )
    .await;
    match (sent, version) {
        (Ok(_), Some(version)) => {
            let actor = operator.actor();
            tracing::info!(target: "thena::audit", actor, workspace, request_id, version, "requests resync");
            Redirect::to(&format!(
                "{}?resent={version}",
                request_path(&workspace, request_id)
            ))
            .into_response()
        }
        (Ok(_), None) => not_found(&format!(
            "request {request_id} of workspace {workspace} has no stored snapshot to resend"
        )),
        (Err(e), _) => views::error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Resync failed",
            &format!("{e}; nothing was lost, try again in a moment."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_box_takes_an_id_or_an_email() {
        assert!(matches!(wanted(" 135 "), Wanted::Id(135)));
        assert!(matches!(wanted("#135"), Wanted::Id(135)));
        assert!(matches!(wanted("Alice@Acme.com"), Wanted::Email(e) if e == "Alice@Acme.com"));
        assert!(matches!(wanted(""), Wanted::Nothing));
        assert!(matches!(wanted("acme"), Wanted::Unreadable));
    }
}
