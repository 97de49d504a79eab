//! The operator console under `/console`: server-rendered pages (maud) over the same
//! library calls as the CLI and the admin API — integrations with their health, budget
//! and last day, the setup modal of the product doc, request lookup with explain and
//! resync. It has no logic of its own: every page also answers `Accept:
//! application/json` with the data it shows.
//!
//! Security: an admin token signs in once for an HttpOnly, SameSite=Strict session
//! cookie (PostgreSQL, expiring); every state-changing form carries the session's CSRF
//! token; a strict Content-Security-Policy (no script, styles from our stylesheet only);
//! the token is never in a URL, a page or a log.

mod chart;
mod dead_letters;
mod integrations;
mod requests;
mod session;
mod setup;
mod views;

use std::time::Duration;

use axum::{
    Router,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::Markup;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thena_store::sessions::{Session, Sessions};
use vitally_client::{limiter::RateLimiter, mapping::MappingOptions};

use crate::app::AppState;

/// Everything the console needs beyond the producer's own handles.
#[derive(Clone)]
pub struct Console {
    sessions: Sessions,
    session_ttl: Duration,
    redis: ConnectionManager,
    redis_prefix: String,
    limiter: RateLimiter,
    free_mail_domains: Vec<String>,
    mapping: MappingOptions,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("session_ttl", &self.session_ttl)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// The console as configured; its sessions live next to the integrations.
    pub async fn from_config(
        config: &thena_runtime::Config,
        db: thena_store::Db,
    ) -> anyhow::Result<Console> {
        use anyhow::Context;
        let redis = thena_runtime::redis::connect(&config.redis_url)
            .await
            .context("cannot connect to Redis (REDIS_URL) for the console")?;
        Ok(Console {
            sessions: Sessions::new(db),
            session_ttl: config.console.session_ttl,
            limiter: RateLimiter::new(
                redis.clone(),
                &config.redis_prefix,
                config.vitally.limiter_fallback_share,
            ),
            redis,
            redis_prefix: config.redis_prefix.clone(),
            free_mail_domains: config.free_mail_domains.clone(),
            mapping: MappingOptions {
                textarea_limit: config.vitally.textarea_limit,
            },
        })
    }
}

/// Where the console lives.
pub const BASE: &str = "/console";

/// The console's routes, to be merged into a router (the API's or one of its own).
pub fn router() -> Router<AppState> {
    let pages = Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/integrations") }),
        )
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/integrations") }),
        )
        .route(
            "/console/sign-in",
            get(session::sign_in_page).post(session::sign_in),
        )
        .route("/console/sign-out", post(session::sign_out))
        .route("/console/static/console.css", get(views::stylesheet))
        .route("/console/integrations", get(integrations::list))
        .route("/console/integrations/new", get(setup::connect_step))
        .route(
            "/console/integrations/new/credentials",
            get(setup::credentials_step).post(setup::check_credentials),
        )
        .route(
            "/console/integrations/new/settings",
            get(setup::settings_step).post(setup::connect),
        )
        .route("/console/integrations/{workspace}", get(integrations::show))
        .route(
            "/console/integrations/{workspace}/connected",
            get(setup::summary),
        )
        .route(
            "/console/integrations/{workspace}/settings",
            post(integrations::change_settings),
        )
        .route(
            "/console/integrations/{workspace}/disconnect",
            get(integrations::disconnect_page).post(integrations::disconnect),
        )
        .route("/console/requests", get(requests::lookup))
        .route(
            "/console/requests/{workspace}/{request_id}",
            get(requests::show),
        )
        .route(
            "/console/requests/{workspace}/{request_id}/explain",
            get(requests::explain),
        )
        .route(
            "/console/requests/{workspace}/{request_id}/resync",
            post(requests::resync),
        )
        .route("/console/dead-letters", get(dead_letters::list))
        .route("/console/dead-letters/replay", post(dead_letters::replay))
        .route(
            "/console/dead-letters/purge",
            get(dead_letters::purge_page).post(dead_letters::purge),
        )
        .route("/console/dead-letters/audit", get(dead_letters::audit))
        .route(
            "/console/dead-letters/audit/{id}",
            get(dead_letters::audit_entry),
        )
        .route("/console/dead-letters/{id}", get(dead_letters::show));
    pages.layer(middleware::from_fn(security_headers))
}

/// Every console answer: no framing, no sniffing, no referrer to other sites (a
/// same-origin one keeps the `Origin` header on our own forms), no caching, and a policy
/// that allows nothing but our own stylesheet and same-origin forms.
/// Also says how long the page took (`Server-Timing`, read by the benchmark).
async fn security_headers(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let headers = response.headers_mut();
    if let Ok(timing) = HeaderValue::from_str(&format!("console;dur={took:.2}")) {
        headers.insert("server-timing", timing);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Whether the client asked for JSON rather than a page.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json") && !accept.contains("text/html"))
}

/// The page, or its data as JSON, as the client asked; `api` names the admin API's
/// equivalent (a `Link` header) where there is one.
pub(crate) fn respond<T: Serialize>(
    headers: &HeaderMap,
    status: StatusCode,
    data: &T,
    api: Option<&str>,
    page: impl FnOnce(&T) -> Markup,
) -> Response {
    let mut response = if wants_json(headers) {
        (status, axum::Json(data)).into_response()
    } else {
        (status, page(data)).into_response()
    };
    if let Some(api) = api
        && let Ok(link) = HeaderValue::from_str(&format!(
            "<{api}>; rel=\"alternate\"; type=\"application/json\""
        ))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

/// A signed-in operator (the extractor redirects everyone else to the sign-in page).
#[derive(Debug, Clone)]
pub(crate) struct Operator {
    pub session: Session,
}

impl Operator {
    /// Who changed something, in histories and audit lines.
    pub fn actor(&self) -> String {
        match &self.session.scope {
            None => "console".to_owned(),
            Some(workspace) => format!("console:{workspace}"),
        }
    }

    pub fn csrf(&self) -> &str {
        self.session.csrf_token()
    }

    /// The workspaces this operator may see, of `all`.
    pub fn visible<'a>(&self, all: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        all.into_iter()
            .filter(|ws| self.session.sees(ws))
            .map(str::to_owned)
            .collect()
    }

    /// A workspace outside this session's scope reads as not found (its existence is not
    /// this session's business).
    pub fn check_sees(&self, workspace: &str) -> Result<(), NotFound> {
        if self.session.sees(workspace) {
            Ok(())
        } else {
            Err(NotFound(format!("workspace {workspace} is not connected")))
        }
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let console = state
            .console()
            .ok_or_else(|| not_found("no console here"))?;
        let Some(cookie) = session::cookie_value(&parts.headers) else {
            return Err(sign_in_first(parts));
        };
        match console.sessions.get(&cookie).await {
            Ok(Some(session)) => Ok(Operator { session }),
            Ok(None) => Err(sign_in_first(parts)),
            Err(e) => Err(unavailable(&e)),
        }
    }
}

/// Signed out: a page goes to the sign-in form (and comes back after); JSON gets 401.
fn sign_in_first(parts: &Parts) -> Response {
    if wants_json(&parts.headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": "sign in first: POST /console/sign-in"})),
        )
            .into_response();
    }
    let back = match parts.method {
        axum::http::Method::GET => parts
            .uri
            .path_and_query()
            .map_or(BASE.to_owned(), |p| p.as_str().to_owned()),
        _ => BASE.to_owned(),
    };
    let target = serde_urlencoded::to_string([("next", back.as_str())]).unwrap_or_default();
    Redirect::to(&format!("/console/sign-in?{target}")).into_response()
}

/// A form posted by a signed-in operator, refused unless it carries the session's CSRF
/// token.
pub(crate) struct Posted<T> {
    pub operator: Operator,
    pub form: T,
}

#[derive(Deserialize)]
struct CsrfField {
    csrf: Option<String>,
}

impl<T: DeserializeOwned> FromRequest<AppState> for Posted<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let operator = Operator::from_request_parts(&mut parts, state).await?;
        let bytes = axum::body::Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let presented = serde_urlencoded::from_bytes::<CsrfField>(&bytes)
            .ok()
            .and_then(|f| f.csrf);
        if !presented.is_some_and(|token| operator.session.csrf_matches(&token)) {
            return Err(views::error_page(
                StatusCode::FORBIDDEN,
                "This form was refused",
                "It did not carry this session's CSRF token (it was not sent from a console \
                 page, or it is from an older session). Reload the page and try again.",
            ));
        }
        let form = serde_urlencoded::from_bytes::<T>(&bytes).map_err(|e| {
            views::error_page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "This form could not be read",
                &e.to_string(),
            )
        })?;
        Ok(Posted { operator, form })
    }
}

pub(crate) fn not_found(message: &str) -> Response {
    views::error_page(StatusCode::NOT_FOUND, "Not found", message)
}

/// PostgreSQL or Redis did not answer: say so, log the details.
pub(crate) fn unavailable(error: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %error, "console: a store did not answer");
    views::error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Temporarily unavailable",
        "The control plane's database did not answer; try again in a few seconds.",
    )
}

/// The console of `state`, which has one whenever these routes are mounted.
pub(crate) fn console(state: &AppState) -> Result<&Console, NotFound> {
    state
        .console()
        .ok_or_else(|| NotFound("no console here".to_owned()))
}

/// A page that is not there (or not this session's to see).
#[derive(Debug)]
pub(crate) struct NotFound(pub String);

impl IntoResponse for NotFound {
    fn into_response(self) -> Response {
        not_found(&self.0)
    }
}
