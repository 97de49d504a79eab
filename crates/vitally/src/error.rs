//! A failed Vitally call and its class: retry, wait for the rate-limit window, or give up.
//!
//! The class is decided in one exhaustive `match` on where the failure was born, so a new
//! kind of failure cannot slip through unclassified.

use std::{fmt, time::Duration};

/// How long to pause after a 429 whose response carried no usable `RateLimit-Reset`.
pub const DEFAULT_RATE_LIMIT_RESET: Duration = Duration::from_secs(5);

/// Error bodies are kept for diagnosis only, cut to this many characters.
pub const MAX_BODY_CHARS: usize = 300;

/// Where a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No complete answer within the client timeout.
    Timeout,
    /// The connection could not be established (DNS, refused, TLS handshake).
    Connect,
    /// The connection broke while sending or receiving.
    Transport,
    /// Vitally answered with a non-2xx status.
    Status(u16),
    /// A 2xx answer whose body is not what the API documents.
    Decode,
    /// The request could not be built (for example an auth header that is not a valid
    /// HTTP header value, or an unusable base URL); never sent.
    InvalidRequest,
    /// The URL, or an address its host resolved to, is not one Vitally calls may go to
    /// (`VITALLY_ALLOWED_HOSTS`); never sent.
    Refused,
}

/// What the caller should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying with backoff.
    Transient,
    /// Vitally's budget for this key is spent; retry once `reset` has passed.
    RateLimited { reset: Duration },
    /// Retrying the same request cannot succeed.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::RateLimited { .. } => "rate_limited",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// A failed call to one Vitally endpoint. Carries no request headers and no URL, so it is
/// safe to log, to put in a message header, or to show an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VitallyError {
    kind: ErrorKind,
    endpoint: &'static str,
    body: String,
    reset: Option<Duration>,
}

impl VitallyError {
    /// `endpoint` is a stable name such as `"users.search"`; `body` is the response body
    /// (or a short reason for failures without one) and is truncated here.
    pub fn new(endpoint: &'static str, kind: ErrorKind, body: &str) -> Self {
        Self {
            kind,
            endpoint,
            body: thena_runtime::clip(body.trim(), MAX_BODY_CHARS),
            reset: None,
        }
    }

    /// The `RateLimit-Reset` Vitally sent with this answer, used when it is a 429.
    pub fn with_reset(mut self, reset: Option<Duration>) -> Self {
        self.reset = reset;
        self
    }

    pub fn class(&self) -> ErrorClass {
        match self.kind {
            ErrorKind::Timeout | ErrorKind::Connect | ErrorKind::Transport => ErrorClass::Transient,
            ErrorKind::Status(429) => ErrorClass::RateLimited {
                reset: self.reset.unwrap_or(DEFAULT_RATE_LIMIT_RESET),
            },
            // 408: the server gave up waiting on us; 5xx: Vitally's own trouble.
            ErrorKind::Status(408) => ErrorClass::Transient,
            ErrorKind::Status(code) if code >= 500 => ErrorClass::Transient,
            // 400/401/403/404/409/422, any other 4xx, and unexpected 1xx/3xx.
            ErrorKind::Status(_) => ErrorClass::Permanent,
            // A 2xx whose body we cannot read will read the same way next time; a
            // refused host stays refused until an operator changes the allow-list.
            ErrorKind::Decode | ErrorKind::InvalidRequest | ErrorKind::Refused => {
                ErrorClass::Permanent
            }
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn endpoint(&self) -> &'static str {
        self.endpoint
    }

    /// The HTTP status, when Vitally answered at all.
    pub fn status(&self) -> Option<u16> {
        match self.kind {
            ErrorKind::Status(code) => Some(code),
            ErrorKind::Timeout
            | ErrorKind::Connect
            | ErrorKind::Transport
            | ErrorKind::Decode
            | ErrorKind::InvalidRequest
            | ErrorKind::Refused => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::Status(404)
    }

    /// The truncated response body (or failure reason).
    pub fn body(&self) -> &str {
        &self.body
    }

    /// What failed, without a body the far end wrote: what a caller of the admin API
    /// may see (the full error, body included, is for the operator's log). Only our own
    /// reasons (an unbuildable request, a refused host) are kept.
    pub fn summary(&self) -> String {
        let own_reason = match self.kind {
            ErrorKind::InvalidRequest | ErrorKind::Refused => !self.body.is_empty(),
            ErrorKind::Status(_)
            | ErrorKind::Timeout
            | ErrorKind::Connect
            | ErrorKind::Transport
            | ErrorKind::Decode => false,
        };
        if own_reason {
            return self.to_string();
        }
        Self {
            body: String::new(),
            ..self.clone()
        }
        .to_string()
    }

    /// The label used for the `status` dimension of the request counter.
    pub fn status_label(&self) -> String {
        match self.kind {
            ErrorKind::Status(code) => code.to_string(),
            ErrorKind::Timeout => "timeout".to_owned(),
            ErrorKind::Connect => "connect".to_owned(),
            ErrorKind::Transport => "transport".to_owned(),
            ErrorKind::Decode => "decode".to_owned(),
            ErrorKind::InvalidRequest => "invalid_request".to_owned(),
            ErrorKind::Refused => "refused".to_owned(),
        }
    }
}

impl fmt::Display for VitallyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vitally {} failed: ", self.endpoint)?;
        match self.kind {
            ErrorKind::Status(code) => write!(f, "HTTP {code}")?,
            ErrorKind::Timeout => f.write_str("timeout")?,
            ErrorKind::Connect => f.write_str("connect error")?,
            ErrorKind::Transport => f.write_str("transport error")?,
            ErrorKind::Decode => f.write_str("undecodable response")?,
            ErrorKind::InvalidRequest => f.write_str("invalid request")?,
            ErrorKind::Refused => f.write_str("refused by VITALLY_ALLOWED_HOSTS")?,
        }
        if !self.body.is_empty() {
            write!(f, ": {}", self.body)?;
        }
        Ok(())
    }
}

impl std::error::Error for VitallyError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> VitallyError {
        VitallyError::new("users.search", ErrorKind::Status(code), "{}")
    }

    #[test]
    fn every_status_lands_in_the_documented_class() {
        for code in [408, 500, 502, 503, 504] {
            assert_eq!(status(code).class(), ErrorClass::Transient, "{code}");
        }
        for code in [300, 400, 401, 403, 404, 409, 410, 413, 422, 451] {
            assert_eq!(status(code).class(), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn a_429_waits_for_the_reset_vitally_sent_or_a_default() {
        let with = status(429).with_reset(Some(Duration::from_secs(17)));
        assert_eq!(
            with.class(),
            ErrorClass::RateLimited {
                reset: Duration::from_secs(17)
            }
        );
        assert_eq!(
            status(429).class(),
            ErrorClass::RateLimited {
                reset: DEFAULT_RATE_LIMIT_RESET
            }
        );
    }

    #[test]
    fn failures_without_an_answer_are_transient_and_bad_bodies_permanent() {
        for kind in [ErrorKind::Timeout, ErrorKind::Connect, ErrorKind::Transport] {
            let e = VitallyError::new("accounts.get", kind, "");
            assert_eq!(e.class(), ErrorClass::Transient);
            assert_eq!(e.status(), None);
        }
        let e = VitallyError::new("accounts.get", ErrorKind::Decode, "expected value");
        assert_eq!(e.class(), ErrorClass::Permanent);
    }

    #[test]
    fn the_body_is_truncated_and_the_display_names_the_endpoint() {
        let long = "é".repeat(1000);
        let e = VitallyError::new("instances.create", ErrorKind::Status(400), &long);
        assert_eq!(e.body().chars().count(), MAX_BODY_CHARS + 1);
        let shown = e.to_string();
        assert!(shown.starts_with("vitally instances.create failed: HTTP 400: éé"));
        assert_eq!(
            VitallyError::new("users.search", ErrorKind::Timeout, "").to_string(),
            "vitally users.search failed: timeout"
        );
    }

    #[test]
    fn class_names_are_stable_metric_labels() {
        assert_eq!(ErrorClass::Transient.as_str(), "transient");
        assert_eq!(
            ErrorClass::RateLimited {
                reset: Duration::ZERO
            }
            .as_str(),
            "rate_limited"
        );
        assert_eq!(ErrorClass::Permanent.as_str(), "permanent");
    }
}
