//! Bearer-token check for ingest and admin: constant-time comparison, and it runs before
//! the body is read so an unauthenticated client cannot make us buffer a megabyte.

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::{app::AppState, config::ProducerConfig, error::ApiError};

/// RFC 6750 §3: the challenge of a request without a token.
const CHALLENGE: &str = "Bearer realm=\"thena-vitally\"";
/// RFC 6750 §3.1: the challenge of a token that is not valid.
const INVALID_TOKEN: &str = "Bearer realm=\"thena-vitally\", error=\"invalid_token\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credentials {
    Valid,
    /// No `Authorization: Bearer <token>` at all: 401 with a challenge.
    Missing,
    /// A bearer token that is not ours: 401 with `error="invalid_token"` (RFC 6750). The
    /// producer has one token with every right, so a valid token never lacks a scope and
    /// there is no 403.
    Wrong,
}

pub(crate) fn check(authorization: Option<&HeaderValue>, token: &SecretString) -> Credentials {
    let Some(presented) = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
    else {
        return Credentials::Missing;
    };
    // `ct_eq` on slices of different lengths returns false at once: that only reveals the
    // token's length, not its content.
    if bool::from(presented.as_bytes().ct_eq(token.expose_secret().as_bytes())) {
        Credentials::Valid
    } else {
        Credentials::Wrong
    }
}

/// The workspaces an admin token opens: `Some(None)` every one, `Some(Some(ws))` only
/// that one, `None` when it is not an admin token. The console's sign-in asks this.
pub(crate) fn admin_scope(config: &ProducerConfig, presented: &str) -> Option<Option<String>> {
    let presented = presented.trim();
    let matches = !presented.is_empty()
        && bool::from(
            presented
                .as_bytes()
                .ct_eq(config.token.expose_secret().as_bytes()),
        );
    matches.then_some(None)
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 7235), if non-empty.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub(crate) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match check(
        request.headers().get(header::AUTHORIZATION),
        &state.config().token,
    ) {
        Credentials::Valid => next.run(request).await,
        Credentials::Missing => unauthorized("missing bearer token", CHALLENGE),
        Credentials::Wrong => unauthorized("invalid token", INVALID_TOKEN),
    }
}

fn unauthorized(message: &str, challenge: &'static str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SecretString {
        SecretString::from("tok-123")
    }

    fn check_str(value: &str) -> Credentials {
        check(Some(&HeaderValue::from_str(value).unwrap()), &token())
    }

    #[test]
    fn the_right_bearer_token_passes_whatever_the_scheme_case() {
        assert_eq!(check_str("Bearer tok-123"), Credentials::Valid);
        assert_eq!(check_str("bearer tok-123"), Credentials::Valid);
        assert_eq!(check_str("BEARER  tok-123 "), Credentials::Valid);
    }

    #[test]
    fn no_header_another_scheme_or_an_empty_token_count_as_missing() {
        assert_eq!(check(None, &token()), Credentials::Missing);
        assert_eq!(check_str("Basic dG9rLTEyMzo="), Credentials::Missing);
        assert_eq!(check_str("Bearer"), Credentials::Missing);
        assert_eq!(check_str("Bearer   "), Credentials::Missing);
        assert_eq!(check_str("tok-123"), Credentials::Missing);
    }

    #[test]
    fn a_different_token_is_wrong() {
        assert_eq!(check_str("Bearer tok-124"), Credentials::Wrong);
        assert_eq!(check_str("Bearer tok-12"), Credentials::Wrong);
        assert_eq!(check_str("Bearer tok-1234"), Credentials::Wrong);
    }
}
