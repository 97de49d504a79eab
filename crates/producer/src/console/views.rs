//! The page frame and the small pieces every page uses.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::Operator;

const STYLESHEET: &str = include_str!("console.css");

pub(crate) async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// Which part of the console a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Integrations,
    Requests,
    DeadLetters,
}

/// A page without navigation (sign-in, errors).
pub(crate) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · thena-vitally" }
                link rel="stylesheet" href="/console/static/console.css";
            }
            body { (body) }
        }
    }
}

/// A signed-in page: the bar with the sections and sign-out, then `body`.
pub(crate) fn page(operator: &Operator, section: Section, title: &str, body: Markup) -> Markup {
    let tab = |s: Section, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(s == section).then_some("page")] { (label) }
        }
    };
    bare(
        title,
        html! {
            header.bar {
                a.brand href="/console/integrations" { "thena" span { "→" } "vitally" }
                nav {
                    (tab(Section::Integrations, "/console/integrations", "Integrations"))
                    (tab(Section::Requests, "/console/requests", "Requests"))
                    (tab(Section::DeadLetters, "/console/dead-letters", "Dead letters"))
                }
                form.signout method="post" action="/console/sign-out" {
                    (csrf_field(operator))
                    @if let Some(ws) = &operator.session.scope {
                        span.muted { (ws) " " }
                    }
                    button.link type="submit" { "Sign out" }
                }
            }
            main { (body) }
        },
    )
}

/// The hidden CSRF field every state-changing form carries.
pub(crate) fn csrf_field(operator: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf()); }
}

pub(crate) fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        main.narrow {
            h1 { (title) }
            p { (message) }
            p { a href="/console/integrations" { "Back to the console" } }
        }
    };
    (status, bare(title, body)).into_response()
}

/// "3 min ago", with the exact time on hover.
pub(crate) fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) title=(utc(at)) { (relative(now, at)) } }
}

pub(crate) fn utc(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago `at` was, in the largest unit that fits.
pub(crate) fn relative(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    match secs {
        s if s < 0 => "just now".to_owned(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3_600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3_600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// An outcome as a coloured tag: `synced`, `skipped: domain_unknown`, …
pub(crate) fn outcome_tag(outcome: Option<&str>, reason: Option<&str>) -> Markup {
    let class = match outcome {
        Some("synced") => "tag ok",
        Some("skipped") => "tag muted",
        Some("retried" | "parked") => "tag bad",
        Some("deferred" | "held") => "tag warn",
        _ => "tag",
    };
    html! {
        span class=(class) {
            (outcome.unwrap_or("—"))
            @if let Some(reason) = reason { ": " (reason) }
        }
    }
}

/// A duration in ms as people read it.
pub(crate) fn millis(ms: u64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{} min", ms / 60_000),
        ms => format!("{} h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_in_the_largest_unit_that_fits() {
        let now = Utc::now();
        assert_eq!(relative(now, now - chrono::Duration::seconds(5)), "5 s ago");
        assert_eq!(
            relative(now, now - chrono::Duration::minutes(3)),
            "3 min ago"
        );
        assert_eq!(relative(now, now - chrono::Duration::hours(5)), "5 h ago");
        assert_eq!(relative(now, now - chrono::Duration::days(2)), "2 days ago");
        assert_eq!(
            relative(now, now + chrono::Duration::seconds(2)),
            "just now"
        );
        assert_eq!(millis(250), "250 ms");
        assert_eq!(millis(2_500), "2.5 s");
        assert_eq!(millis(120_000), "2 min");
    }

    #[test]
    fn text_is_escaped_in_pages() {
        let markup = outcome_tag(Some("skipped"), Some("<script>alert(1)</script>"));
        let text = markup.into_string();
        assert!(!text.contains("<script>"), "{text}");
        assert!(text.contains("&lt;script&gt;"), "{text}");
    }
}
