//! "Add integration", step by step as the product doc describes its modal: Connect →
//! the API URL and auth header → Continue (checked against Vitally) → the two toggles
//! (plus thread sync, auto-created traits, custom categories) → a summary of what was
//! created or adopted.
//!
//! Between Continue and the last step the header is kept in a cookie sealed with the
//! deployment's key ring (HttpOnly, SameSite=Strict, only sent to these steps, 15
//! minutes): it is never written into a page, not even as a hidden field.

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, TimeDelta, Utc};
use maud::{Markup, html};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vitally_client::{
    crypto::KeyRing,
    provision::{self, ConnectError, ConnectRequest},
};

use super::{
    Operator, Posted,
    integrations::{List, SettingsForm, cards, list_page, toggles},
    not_found, respond,
    session::{cookie_named, set_cookie},
    views,
};
use crate::{
    admin::{connect_error, store_error},
    app::AppState,
};

const DRAFT_COOKIE: &str = "thena_console_setup";
const DRAFT_PATH: &str = "/console/integrations/new";
const DRAFT_AAD: &str = "console-setup-draft";
const DRAFT_MINUTES: i64 = 15;

/// What Continue checked, carried to the last step. Deliberately not `Debug`: it holds
/// the auth header.
#[derive(Serialize, Deserialize)]
struct Draft {
    workspace_id: String,
    api_url: String,
    auth_header: String,
    object_exists: bool,
    expires_at: DateTime<Utc>,
}

fn seal(keys: &KeyRing, draft: &Draft) -> Option<String> {
    let plain = SecretString::from(serde_json::to_string(draft).ok()?);
    let (key_id, sealed) = keys.encrypt(&plain, DRAFT_AAD).ok()?;
    Some(format!("{key_id}:{sealed}"))
}

/// The draft in the request's cookie, if it opens and has not expired.
fn open(keys: &KeyRing, headers: &HeaderMap) -> Option<Draft> {
    let cookie = cookie_named(headers, DRAFT_COOKIE)?;
    let (key_id, sealed) = cookie.split_once(':')?;
    let plain = keys.decrypt(key_id, sealed, DRAFT_AAD).ok()?;
    let draft: Draft = serde_json::from_str(plain.expose_secret()).ok()?;
    (draft.expires_at > Utc::now()).then_some(draft)
}

/// The steps, with the current one marked.
fn stepper(current: usize) -> Markup {
    html! {
        ol.stepper aria-label="Steps" {
            @for (n, step) in ["Connect", "Credentials", "Settings", "Done"].iter().enumerate() {
                li aria-current=[(n == current).then_some("step")] { (n + 1) ". " (step) }
            }
        }
    }
}

/// The modal frame: a title, the top-right action, the content.
fn modal(title: &str, top_right: Markup, content: Markup) -> Markup {
    html! {
        div.backdrop {
            section.modal role="dialog" aria-modal="true" aria-labelledby="modal-title" {
                header {
                    h2 #modal-title { (title) }
                    (top_right)
                }
                div.content { (content) }
            }
        }
    }
}

fn close_link() -> Markup {
    html! { a.close href="/console/integrations" aria-label="Close" { "×" } }
}

/// The integrations page with `modal` over it.
async fn over_list(
    state: &AppState,
    operator: &Operator,
    status: StatusCode,
    modal: Markup,
) -> Response {
    match cards(state, operator, None).await {
        Ok(integrations) => {
            let data = List {
                now: Utc::now(),
                integrations,
                disconnected: None,
            };
            (status, list_page(operator, &data, Some(modal))).into_response()
        }
        Err(response) => response,
    }
}

/// Step 1: what the integration does, and Connect at the top right.
pub(crate) async fn connect_step(State(state): State<AppState>, operator: Operator) -> Response {
    let content = html! {
        (stepper(0))
        p { strong { "Sync Thena requests to Vitally." } " Every customer request from Slack, email, web and Teams appears under the customer's Organization or Account in Vitally, as an instance of the custom object \"Thena Requests\"." }
        ul {
            li { "You need the " strong { "API URL" } " and the " strong { "Basic auth header" } " from Vitally's REST API settings. If the REST API is already enabled, use the existing header: do not regenerate it." }
            li { "One Vitally instance can be integrated with a single Slack workspace." }
            li { "Requests created from now on sync, usually within seconds and at most 10 minutes." }
        }
    };
    let top_right = html! {
        a.button.primary href="/console/integrations/new/credentials" { "Connect" }
    };
    over_list(
        &state,
        &operator,
        StatusCode::OK,
        modal("Vitally", top_right, content),
    )
    .await
}

/// Step 2's form, filled with what was typed (never the header) and an error, if any.
fn credentials_form(
    operator: &Operator,
    workspace: &str,
    api_url: &str,
    error: Option<&str>,
) -> Markup {
    let fixed = operator.session.scope.as_deref();
    let content = html! {
        (stepper(1))
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action="/console/integrations/new/credentials" {
            (views::csrf_field(operator))
            label for="workspace_id" { "Slack workspace id" }
            input #workspace_id type="text" name="workspace_id" required placeholder="T024BE7LD"
                value=(fixed.unwrap_or(workspace)) readonly[fixed.is_some()];
            label for="api_url" { "API URL" }
            input #api_url type="text" name="api_url" required inputmode="url"
                placeholder="https://<subdomain>.rest.vitally.io" value=(api_url);
            p.small.muted { "US: https://<subdomain>.rest.vitally.io · EU: https://rest.vitally-eu.io" }
            label for="auth_header" { "Authentication header" }
            input #auth_header type="password" name="auth_header" required autocomplete="off"
                placeholder="Basic …";
            div.actions {
                button.primary type="submit" { "Continue" }
                a href="/console/integrations/new" { "Back" }
            }
        }
    };
    modal("Vitally: credentials", close_link(), content)
}

pub(crate) async fn credentials_step(
    State(state): State<AppState>,
    operator: Operator,
) -> Response {
    let form = credentials_form(&operator, "", "", None);
    over_list(&state, &operator, StatusCode::OK, form).await
}

/// `Debug` (through `SecretString`) never shows the header.
#[derive(Debug, Deserialize)]
pub(crate) struct CredentialsForm {
    workspace_id: String,
    api_url: String,
    auth_header: SecretString,
}

/// Continue: Vitally must accept the header before the settings step opens.
pub(crate) async fn check_credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
    posted: Posted<CredentialsForm>,
) -> Response {
    let Posted { operator, form } = posted;
    let workspace = form.workspace_id.trim().to_owned();
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let checked = provision::check(
        state.vitally(),
        state.integrations(),
        &workspace,
        &form.api_url,
        &form.auth_header,
    )
    .await;
    let checked = match checked {
        Ok(checked) => checked,
        Err(e) => {
            let status = connect_error(&e).status();
            let page = credentials_form(&operator, &workspace, &form.api_url, Some(&in_words(&e)));
            return over_list(&state, &operator, status, page).await;
        }
    };
    let draft = Draft {
        workspace_id: workspace,
        api_url: checked.api_url,
        auth_header: form.auth_header.expose_secret().trim().to_owned(),
        object_exists: checked.object_exists,
        expires_at: Utc::now() + TimeDelta::minutes(DRAFT_MINUTES),
    };
    let Some(sealed) = seal(state.integrations().keys(), &draft) else {
        return views::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Setup failed",
            "The credentials could not be sealed for the next step.",
        );
    };
    let mut response = Redirect::to("/console/integrations/new/settings").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(
            &headers,
            DRAFT_COOKIE,
            &sealed,
            DRAFT_PATH,
            DRAFT_MINUTES as u64 * 60,
        ),
    );
    response
}

/// A connect failure as the form says it: Vitally's verdict in words.
fn in_words(error: &ConnectError) -> String {
    match error {
        ConnectError::Unauthorized { .. } => format!(
            "Vitally rejected this authentication header. {}",
            "Copy the Basic auth header from Vitally's REST API settings (Settings → Integrations → REST API) and paste all of it, \"Basic\" included."
        ),
        ConnectError::Unreachable { .. } => "Vitally could not be reached at this API URL, or did not answer like Vitally. Check the URL (US: https://<subdomain>.rest.vitally.io, EU: https://rest.vitally-eu.io).".to_owned(),
        ConnectError::AlreadyConnected { workspace } => format!(
            "This Vitally instance is already connected to workspace {workspace}. One Vitally instance can be integrated with a single Slack workspace: disconnect it there first."
        ),
        other => other.to_string(),
    }
}

/// Step 3's form.
fn settings_form(operator: &Operator, draft: &Draft, error: Option<&str>) -> Markup {
    let content = html! {
        (stepper(2))
        p.notice role="status" {
            "Vitally at " (draft.api_url) " accepted the header for workspace " strong { (draft.workspace_id) } "."
            @if draft.object_exists { " Its existing \"Thena Requests\" object will be adopted (only missing traits are added)." }
        }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action="/console/integrations/new/settings" {
            (views::csrf_field(operator))
            p.muted.small { "Enable both configurations to push requests and update existing requests on Vitally." }
            (toggles(true, true, false, false))
            label for="categories" { "Custom categories (comma-separated)" }
            input #categories type="text" name="categories" placeholder="Product, Region";
            p.small.muted { "Each becomes a String trait named like the category, next to the integration's own traits." }
            div.actions {
                button.primary type="submit" { "Finish" }
                a href="/console/integrations/new/credentials" { "Back" }
            }
        }
    };
    modal("Vitally: settings", close_link(), content)
}

/// Back to the credentials when the draft is gone (expired, or another browser).
async fn draft_expired(state: &AppState, operator: &Operator) -> Response {
    let form = credentials_form(
        operator,
        "",
        "",
        Some("The setup expired or was started elsewhere: enter the credentials again."),
    );
    over_list(state, operator, StatusCode::CONFLICT, form).await
}

pub(crate) async fn settings_step(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
) -> Response {
    match open(state.integrations().keys(), &headers) {
        Some(draft) => {
            let form = settings_form(&operator, &draft, None);
            over_list(&state, &operator, StatusCode::OK, form).await
        }
        None => draft_expired(&state, &operator).await,
    }
}

/// Finish: connect with the checked credentials and the chosen settings.
pub(crate) async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    posted: Posted<SettingsForm>,
) -> Response {
    let Posted { operator, form } = posted;
    let Some(draft) = open(state.integrations().keys(), &headers) else {
        return draft_expired(&state, &operator).await;
    };
    if let Err(response) = operator.check_sees(&draft.workspace_id) {
        return response.into_response();
    }
    let request = ConnectRequest {
        workspace_id: draft.workspace_id.clone(),
        api_url: draft.api_url.clone(),
        auth_header: SecretString::from(draft.auth_header.clone()),
        categories: form
            .categories
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect(),
        push_requests: form.push_requests,
        update_requests: form.update_requests,
        sync_threads: form.sync_threads,
        auto_create_fields: form.auto_create_fields,
        rate_budget_per_min: form
            .rate_budget_per_min
            .unwrap_or(state.config().default_budget_per_min),
        established_at: None,
    };
    let actor = operator.actor();
    match provision::connect(state.vitally(), state.integrations(), request, &actor).await {
        Ok(connected) => {
            tracing::info!(workspace_id = %draft.workspace_id, action = connected.action, actor, "integration connected");
            let mut response = Redirect::to(&format!(
                "/console/integrations/{}/connected",
                draft.workspace_id
            ))
            .into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                set_cookie(&headers, DRAFT_COOKIE, "", DRAFT_PATH, 0),
            );
            response
        }
        Err(e) => {
            let status = connect_error(&e).status();
            let form = settings_form(&operator, &draft, Some(&in_words(&e)));
            over_list(&state, &operator, status, form).await
        }
    }
}

/// What the summary shows (also its JSON): the connect's history row and the record.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub integration: Value,
    pub connect: Value,
}

/// The last step: what was created or adopted, from the connect's own history row.
pub(crate) async fn summary(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Path(workspace): Path<String>,
) -> Response {
    if let Err(response) = operator.check_sees(&workspace) {
        return response.into_response();
    }
    let store = state.integrations();
    let (integration, history) =
        match tokio::try_join!(store.get(&workspace), store.history(&workspace, 50)) {
            Ok(found) => found,
            Err(e) => return store_error(&e).into_response(),
        };
    let (Some(integration), Some(connect)) = (
        integration,
        history
            .iter()
            .rev()
            .find(|e| e.action == "connected" || e.action == "reconnected"),
    ) else {
        return not_found(&format!("workspace {workspace} is not connected"));
    };
    let data = Summary {
        integration: integration.redacted(),
        connect: json!(connect),
    };
    if super::wants_json(&headers) {
        return respond(&headers, StatusCode::OK, &data, None, |_| html! {});
    }
    let changes = &connect.changes;
    let traits: Vec<&str> = changes["traits_added"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let object = changes["object"].as_str().unwrap_or("");
    let on = |key: &str| {
        if integration_flag(&data.integration, key) {
            "on"
        } else {
            "off"
        }
    };
    let content = html! {
        (stepper(3))
        p.notice role="status" {
            @if connect.action == "reconnected" { "Reconnected " } @else { "Connected " }
            strong { (workspace) } " to Vitally at " (integration.api_url) "."
        }
        dl.figures {
            dt { "Object" }
            dd {
                @if object == "created" { "Created \"Thena Requests\"" } @else { "Adopted the existing \"Thena Requests\"" }
                " (" code { (integration.custom_object_id) } ")"
            }
            dt { "Traits added" }
            dd { (traits.len()) @if traits.is_empty() { " — every trait was already there" } }
            dt { "Push requests" } dd { (on("push_requests")) }
            dt { "Update existing requests" } dd { (on("update_requests")) }
            dt { "Thread sync" } dd { (on("sync_threads")) }
            dt { "Auto-create traits" } dd { (on("auto_create_fields")) }
            dt { "Syncs requests created after" } dd { (views::utc(integration.established_at)) }
        }
        @if !traits.is_empty() {
            ul.traits { @for t in &traits { li { (t) } } }
        }
        div.actions {
            a.button.primary href=(format!("/console/integrations/{workspace}")) { "Done" }
        }
    };
    over_list(
        &state,
        &operator,
        StatusCode::OK,
        modal("Vitally: connected", close_link(), content),
    )
    .await
}

fn integration_flag(record: &Value, key: &str) -> bool {
    record[key].as_bool().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeyRing {
        KeyRing::single(&SecretString::from(
            "dGVzdC1rZXktdGhhdC1pcy0zMi1ieXRlcy1sb25nISE=",
        ))
        .unwrap()
    }

    fn draft(expires_in: i64) -> Draft {
        Draft {
            workspace_id: "T1".into(),
            api_url: "http://127.0.0.1:1".into(),
            auth_header: "Basic c2VjcmV0Og==".into(),
            object_exists: false,
            expires_at: Utc::now() + TimeDelta::minutes(expires_in),
        }
    }

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("{DRAFT_COOKIE}={value}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn a_draft_is_sealed_without_the_header_in_clear_and_opens_again() {
        let sealed = seal(&keys(), &draft(5)).unwrap();
        assert!(!sealed.contains("c2VjcmV0Og"), "{sealed}");
        let opened = open(&keys(), &with_cookie(&sealed)).unwrap();
        assert_eq!(opened.auth_header, "Basic c2VjcmV0Og==");
        assert_eq!(opened.workspace_id, "T1");
    }

    #[test]
    fn an_expired_or_tampered_draft_does_not_open() {
        let expired = seal(&keys(), &draft(-1)).unwrap();
        assert!(open(&keys(), &with_cookie(&expired)).is_none());
        let mut tampered = seal(&keys(), &draft(5)).unwrap();
        tampered.pop();
        tampered.push('A');
        assert!(open(&keys(), &with_cookie(&tampered)).is_none());
        assert!(open(&keys(), &HeaderMap::new()).is_none());
    }

    #[test]
    fn vitally_errors_read_as_words() {
        let text = in_words(&ConnectError::Unauthorized { status: 401 });
        assert!(text.starts_with("Vitally rejected this authentication header."));
        let text = in_words(&ConnectError::AlreadyConnected {
            workspace: "T9".into(),
        });
        assert!(text.contains("already connected to workspace T9"));
    }
}
