//! Sign-in and sign-out: the admin token is exchanged once for a session cookie.

use axum::{
    Form,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use maud::html;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Operator, Posted, console, unavailable, views, wants_json};
use crate::{app::AppState, auth};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "thena_console";

/// The value of our cookie in a request, if any.
pub(crate) fn cookie_value(headers: &HeaderMap) -> Option<String> {
    cookie_named(headers, COOKIE)
}

/// The value of cookie `name` in a request, if any.
pub(crate) fn cookie_named(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
}

/// `Set-Cookie` for a console cookie: HttpOnly, SameSite=Strict, on `path`, for
/// `max_age` seconds (0 removes it); `Secure` when the client came over HTTPS (a TLS
/// proxy says so with `X-Forwarded-Proto`).
pub(crate) fn set_cookie(
    request: &HeaderMap,
    name: &str,
    value: &str,
    path: &str,
    max_age: u64,
) -> HeaderValue {
    let secure = request
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Next {
    next: Option<String>,
}

/// Only a console path: never an open redirect to another site.
fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| n.starts_with("/console") && !n.contains("//") && !n.contains('\\'))
        .unwrap_or("/console/integrations")
}

pub(crate) async fn sign_in_page(Query(query): Query<Next>) -> Response {
    sign_in_form(StatusCode::OK, safe_next(query.next.as_deref()), None)
}

fn sign_in_form(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let body = html! {
        main.signin {
            h1 { "thena-vitally console" }
            p.muted { "Sign in with an admin token (the producer's " code { "PRODUCER_TOKEN" } ")." }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form method="post" action="/console/sign-in" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button.primary type="submit" { "Sign in" }
            }
        }
    };
    (status, views::bare("Sign in", body)).into_response()
}

/// `Debug` (through `SecretString`) never shows the token.
#[derive(Debug, Deserialize)]
pub(crate) struct SignIn {
    token: SecretString,
    next: Option<String>,
}

pub(crate) async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    let console = match console(&state) {
        Ok(console) => console,
        Err(response) => return response.into_response(),
    };
    let next = safe_next(form.next.as_deref()).to_owned();
    if !same_origin(&headers) {
        return sign_in_form(
            StatusCode::FORBIDDEN,
            &next,
            Some("This sign-in did not come from the console's own page."),
        );
    }
    let Some(scope) = auth::admin_scope(state.config(), form.token.expose_secret()) else {
        tracing::warn!("console sign-in refused: not an admin token");
        return sign_in_form(
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That is not an admin token."),
        );
    };
    let opened = match console
        .sessions
        .open(scope.as_deref(), console.session_ttl)
        .await
    {
        Ok(opened) => opened,
        Err(e) => return unavailable(&e),
    };
    tracing::info!(scope = scope.as_deref().unwrap_or("all"), "console sign-in");
    let cookie = set_cookie(
        &headers,
        COOKIE,
        opened.cookie.expose_secret(),
        super::BASE,
        console.session_ttl.as_secs(),
    );
    let mut response = if wants_json(&headers) {
        axum::Json(serde_json::json!({
            "scope": scope,
            "expires_at": opened.session.expires_at,
        }))
        .into_response()
    } else {
        Redirect::to(&next).into_response()
    };
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// A browser names the page a form came from; one from another site is refused (a
/// forged sign-in). Clients that send no `Origin` (curl) are not browsers being tricked.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    host.is_some_and(|host| host == origin_host)
}

#[derive(Debug, Deserialize)]
pub(crate) struct Nothing {}

pub(crate) async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    posted: Posted<Nothing>,
) -> Response {
    let Posted {
        operator: Operator { .. },
        ..
    } = posted;
    if let (Ok(console), Some(cookie)) = (console(&state), cookie_value(&headers))
        && let Err(e) = console.sessions.close(&cookie).await
    {
        return unavailable(&e);
    }
    let mut response = Redirect::to("/console/sign-in").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&headers, COOKIE, "", super::BASE, 0),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_followed_after_sign_in() {
        assert_eq!(
            safe_next(Some("/console/requests?q=1")),
            "/console/requests?q=1"
        );
        assert_eq!(
            safe_next(Some("https://evil.example")),
            "/console/integrations"
        );
        assert_eq!(
            safe_next(Some("/console//evil.example")),
            "/console/integrations"
        );
        assert_eq!(safe_next(Some("/v1/integrations")), "/console/integrations");
        assert_eq!(safe_next(None), "/console/integrations");
    }

    #[test]
    fn cookies_are_found_among_others_and_set_http_only_and_strict() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; thena_console=abc; b=2"),
        );
        assert_eq!(cookie_value(&headers).as_deref(), Some("abc"));
        let set = set_cookie(&HeaderMap::new(), COOKIE, "abc", "/console", 60);
        assert_eq!(
            set.to_str().unwrap(),
            "thena_console=abc; Path=/console; Max-Age=60; HttpOnly; SameSite=Strict"
        );
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(
            set_cookie(&headers, COOKIE, "abc", "/console", 60)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
    }

    #[test]
    fn a_sign_in_from_another_site_is_not_same_origin() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }
}
