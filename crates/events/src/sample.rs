//! Ready-made events for tests, the demo and benchmarks.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::model::{Change, Request, RequestChanged, Requestor, SCHEMA_V1, Source, ThreadMessage};

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_795_000_000 + secs, 0)
        .single()
        .expect("valid timestamp")
}

/// `at(secs)` plus `millis` milliseconds.
fn at_ms(secs: i64, millis: i64) -> DateTime<Utc> {
    at(secs) + chrono::Duration::milliseconds(millis)
}

/// The blueprint's example event, every field filled: the golden mapping test pins it.
/// Some times carry milliseconds, as Thena sends them.
pub fn full_event() -> RequestChanged {
    RequestChanged {
        schema: SCHEMA_V1.to_string(),
        event_id: Uuid::from_u128(0x0193_c6e2_0000_7000_8000_0000_0000_0001),
        workspace_id: "T024BE7LD".into(),
        occurred_at: at(600),
        change: Change::Metadata,
        request: Request {
            id: 135,
            version: 7,
            source: Source::Slack,
            title: Some("SSO login fails for new users".into()),
            summary: Some("New users cannot log in through Okta since Monday.".into()),
            message_text: Some("Hi team, our new hires cannot log in with SSO.".into()),
            status: Some("open".into()),
            urgency: Some("high".into()),
            sentiment: Some("negative".into()),
            ai_tags: vec!["billing".into(), "sso".into()],
            assigned_to: Some("Jane Doe".into()),
            csat: Some("4 - Good".into()),
            customer_thread: vec![
                ThreadMessage::new(
                    "Harsh",
                    "Hi team, our new hires cannot log in with SSO.",
                    at(0),
                ),
                ThreadMessage::new("Jane Doe", "Looking into it now.", at_ms(120, 250)),
            ],
            internal_thread: vec![ThreadMessage::new(
                "Jane Doe",
                "Okta metadata expired, rotating.",
                at(300),
            )],
            permalink: Some("https://acme.slack.com/archives/C1/p1".into()),
            internal_notification_link: Some("https://acme.slack.com/archives/C9/p2".into()),
            web_link: Some("https://app.thena.ai/requests/135".into()),
            created_at: at(0),
            updated_at: at_ms(600, 125),
            closed_at: Some(at(600)),
            closed_by: Some("Jane Doe".into()),
            requestor: Requestor {
                name: Some("Harsh".into()),
                email: Some("harsh@thena.ai".into()),
                slack_user_id: Some("U123".into()),
                external_id: Some("U123".into()),
            },
            custom_fields: BTreeMap::from([("Product".into(), "Request Management".into())]),
        },
    }
}

/// [`full_event`] as raised in `source`: the channel's own permalink, requestor id and
/// customer thread (an email exchange with subjects and addresses, a Teams post with its
/// subject). The triage side (internal thread and link) stays in Slack.
pub fn full_event_from(source: Source) -> RequestChanged {
    let mut event = full_event();
    let request = &mut event.request;
    request.source = source;
    let requestor = &mut request.requestor;
    let harsh = |text: &str| ThreadMessage::new("Harsh", text, at(0));
    let jane = |text: &str| ThreadMessage::new("Jane Doe", text, at_ms(120, 250));
    match source {
        Source::Slack => {}
        Source::Email => {
            request.permalink = Some("mid:CAF=135.1795000000@mail.thena.ai".into());
            requestor.slack_user_id = None;
            requestor.external_id = None;
            request.customer_thread = vec![
                ThreadMessage {
                    author_email: Some("harsh@thena.ai".into()),
                    subject: Some("SSO login fails for new users".into()),
                    ..harsh(
                        "Hi team,\r\n\r\nour new hires cannot log in with SSO.\r\n\r\nHarsh\r\n",
                    )
                },
                ThreadMessage {
                    author_email: Some("jane@support.acme.io".into()),
                    subject: Some("RE: SSO login fails for new users".into()),
                    ..jane(
                        "Looking into it now.\r\n\r\nOn Wed, 18 Nov 2026 at 11:06, Harsh \
                         <harsh@thena.ai> wrote:\r\n> Hi team,\r\n>\r\n> our new hires cannot log \
                         in with SSO.\r\n",
                    )
                },
            ];
        }
        Source::MsTeams => {
            request.permalink = Some(
                "https://teams.microsoft.com/l/message/19:c0ffee@thread.tacv2/1795000000000".into(),
            );
            requestor.slack_user_id = None;
            requestor.external_id = Some("8f6c2e1a-5b7d-4e0f-9a3c-2d1b0e9f8a7c".into());
            request.customer_thread = vec![
                ThreadMessage {
                    subject: Some("SSO login fails for new users".into()),
                    ..harsh("Hi team, our new hires cannot log in with SSO.")
                },
                jane("Looking into it now."),
            ];
        }
        Source::Web => {
            request.permalink = Some("https://help.thena.ai/contact?request=135".into());
            requestor.slack_user_id = None;
            requestor.external_id = Some("portal-user-42".into());
            request.customer_thread = vec![
                harsh("Hi team, our new hires cannot log in with SSO."),
                jane("Looking into it now."),
            ];
        }
    }
    event
}

/// A minimal valid event for `workspace`/`request_id` at `version`, raised by `email`.
pub fn event(
    workspace: &str,
    request_id: u64,
    version: u64,
    email: Option<&str>,
) -> RequestChanged {
    let now = Utc::now();
    RequestChanged {
        schema: SCHEMA_V1.to_string(),
        event_id: Uuid::now_v7(),
        workspace_id: workspace.into(),
        occurred_at: now,
        change: if version <= 1 {
            Change::Created
        } else {
            Change::Metadata
        },
        request: Request {
            id: request_id,
            version,
            source: Source::Slack,
            title: Some(format!("Request {request_id}")),
            summary: None,
            message_text: Some("Something is not working".into()),
            status: Some("open".into()),
            urgency: Some("medium".into()),
            sentiment: Some("neutral".into()),
            ai_tags: vec![],
            assigned_to: None,
            csat: None,
            customer_thread: vec![],
            internal_thread: vec![],
            permalink: None,
            internal_notification_link: None,
            web_link: None,
            created_at: now,
            updated_at: now,
            closed_at: None,
            closed_by: None,
            requestor: Requestor {
                name: email.map(|e| e.split('@').next().unwrap_or(e).to_string()),
                email: email.map(str::to_string),
                slack_user_id: Some(format!("U{request_id}")),
                external_id: None,
            },
            custom_fields: BTreeMap::new(),
        },
    }
}
