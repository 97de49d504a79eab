//! Plain text for the terminal (`thena-vitally dlq`). Pure: the API answers JSON and the
//! console renders HTML from the same values.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use thena_store::dead_letters::{AuditEntry, DeadLetter, State};

use super::{Shown, transit::DlqEntry};

/// What every command says when no dead letter matches, whether the parked set is empty
/// or the filter matched nothing: there is nothing to do, which is success.
pub const NOTHING_TO_DO: &str = "no matching parked messages: nothing to do\n";

/// The same for a transit queue.
pub fn nothing_in(queue: super::DlqQueue) -> String {
    format!("no matching messages in the {queue} queue: nothing to do\n")
}

/// The parked set, one row per dead letter.
pub fn parked_table(letters: &[DeadLetter], now: DateTime<Utc>) -> String {
    let header = [
        "ID",
        "EVENT ID",
        "WORKSPACE",
        "REQUEST",
        "REASON",
        "ATTEMPTS",
        "FIRST FAILURE",
        "AGE",
        "STATE",
    ];
    let rows = letters.iter().map(|d| {
        vec![
            d.id.to_string(),
            d.event_id.clone().unwrap_or_else(|| "-".into()),
            d.workspace_id.clone().unwrap_or_else(|| "-".into()),
            match (d.request_id, d.version) {
                (Some(id), Some(v)) => format!("{id} v{v}"),
                (Some(id), None) => id.to_string(),
                (None, _) => "-".into(),
            },
            d.reason.clone(),
            d.attempts.to_string(),
            time(d.first_failure),
            (now - d.first_failure)
                .to_std()
                .map_or("-".into(), format_age),
            d.state.to_string(),
        ]
    });
    table(&header, rows)
}

/// A transit queue's messages.
pub fn transit_table(entries: &[DlqEntry]) -> String {
    let header = [
        "EVENT ID",
        "WORKSPACE",
        "REQUEST",
        "REASON",
        "CLASS",
        "ATTEMPTS",
        "FIRST FAILURE",
        "AGE",
    ];
    let rows = entries.iter().map(|e| {
        vec![
            e.event_id.clone(),
            e.workspace.clone(),
            e.request_id.map_or("-".into(), |id| id.to_string()),
            e.reason.clone(),
            e.class.map_or("-".into(), |c| c.to_string()),
            e.attempts.to_string(),
            e.first_failure.map_or("-".into(), time),
            e.age.map_or("-".into(), format_age),
        ]
    });
    table(&header, rows)
}

/// The audit trail, newest first.
pub fn audit_table(entries: &[AuditEntry]) -> String {
    let header = [
        "AUDIT", "AT", "ACTOR", "ACTION", "MATCHED", "DONE", "FAILED", "FILTER", "WHY",
    ];
    let rows = entries.iter().map(|a| {
        vec![
            a.id.to_string(),
            time(a.at),
            a.actor.clone(),
            match (a.dry_run, a.finished_at) {
                (true, _) => format!("{} (dry run)", a.action),
                (false, None) => format!("{} (running)", a.action),
                (false, Some(_)) => a.action.clone(),
            },
            a.matched.to_string(),
            a.done.to_string(),
            a.failed.to_string(),
            a.filter.to_string(),
            a.why.clone(),
        ]
    });
    table(&header, rows)
}

/// One dead letter: what it is, why it failed, its headers and its event.
pub fn shown(shown: &Shown, now: DateTime<Utc>) -> String {
    let d = &shown.dead_letter;
    let optional = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = format!("dead letter {} ({})\n", d.id, d.state);
    out.push_str(&format!("event_id: {}\n", optional(&d.event_id)));
    out.push_str(&format!("workspace: {}\n", optional(&d.workspace_id)));
    if let Some(request) = d.request_id {
        let version = d.version.map_or(String::new(), |v| format!(" v{v}"));
        out.push_str(&format!("request: {request}{version}\n"));
    }
    out.push_str(&format!(
        "reason: {} ({}), {} attempt(s)\n",
        d.reason,
        optional(&d.class),
        d.attempts
    ));
    out.push_str(&format!(
        "first failure: {} ({} ago)\nparked at: {}\n",
        time(d.first_failure),
        (now - d.first_failure)
            .to_std()
            .map_or("-".into(), format_age),
        time(d.parked_at)
    ));
    out.push_str(&format!("last error: {}\n", d.last_error));
    out.push_str(&format!(
        "route: {} / {}\n",
        d.original_exchange, d.original_routing_key
    ));
    if d.state != State::Parked {
        out.push_str(&format!(
            "{}: by {} at {}{}\n",
            d.state,
            optional(&d.state_by),
            d.state_at.map_or("-".into(), time),
            d.state_why
                .as_deref()
                .filter(|w| !w.is_empty())
                .map_or(String::new(), |w| format!(" because {w:?}"))
        ));
    }
    out.push_str(&headers_and_body(
        Some(&shown.headers),
        shown.body.as_deref(),
    ));
    out
}

/// `headers:` one per line, then `body:` pretty-printed when it is JSON.
pub fn headers_and_body(headers: Option<&Value>, body: Option<&[u8]>) -> String {
    let mut out = String::from("headers:\n");
    if let Some(Value::Object(headers)) = headers {
        for (key, value) in headers {
            let value = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("  {key}: {value}\n"));
        }
    }
    out.push_str("body:\n");
    match body {
        None => out.push_str("(purged)"),
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(json) => out.push_str(&serde_json::to_string_pretty(&json).unwrap_or_default()),
            Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
        },
    }
    out.push('\n');
    out
}

/// `59s`, `4m05s`, `2h03m`, `3d04h`.
pub fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3_600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3_600..86_400 => format!("{}h{:02}m", secs / 3_600, secs % 3_600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3_600),
    }
}

pub fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn letter(id: i64, workspace: &str, reason: &str, age: TimeDelta) -> DeadLetter {
        letter_at(Utc::now(), id, workspace, reason, age)
    }

    fn letter_at(
        now: DateTime<Utc>,
        id: i64,
        workspace: &str,
        reason: &str,
        age: TimeDelta,
    ) -> DeadLetter {
        DeadLetter {
            id,
            event_id: Some(format!("ev-{id}")),
            workspace_id: Some(workspace.into()),
            request_id: Some(7),
            version: Some(3),
            reason: reason.into(),
            class: Some("permanent".into()),
            attempts: 2,
            first_failure: now - age,
            parked_at: now - age,
            last_error: "400 Bad Request".into(),
            original_exchange: "p.requests".into(),
            original_routing_key: format!("request.{workspace}"),
            state: State::Parked,
            state_by: None,
            state_at: None,
            state_why: None,
        }
    }

    #[test]
    fn the_parked_table_has_a_header_and_aligned_rows() {
        let now = Utc::now();
        let table = parked_table(
            &[
                letter_at(now, 1, "W1", "no_integration", TimeDelta::seconds(65)),
                letter_at(now, 12, "WORKSPACE-LONG", "too_old", TimeDelta::hours(25)),
            ],
            now,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("ID  EVENT ID  WORKSPACE       REQUEST"),
            "{table}"
        );
        assert!(lines[1].contains("no_integration") && lines[1].contains("1m05s"));
        assert!(lines[1].ends_with("parked"), "{table}");
        assert!(lines[2].contains("1d01h"));
        let reason_column = lines[0].find("REASON").unwrap();
        assert_eq!(&lines[2][reason_column..reason_column + 7], "too_old");
        assert!(lines[2].contains("7 v3"));
    }

    #[test]
    fn ages_are_short_and_readable() {
        assert_eq!(format_age(Duration::from_secs(59)), "59s");
        assert_eq!(format_age(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_age(Duration::from_secs(7_380)), "2h03m");
        assert_eq!(format_age(Duration::from_secs(273_600)), "3d04h");
    }

    #[test]
    fn a_shown_dead_letter_has_its_failure_headers_and_pretty_event() {
        let now = Utc::now();
        let event = thena_events::sample::event("W1", 7, 3, None);
        let mut d = letter(5, "W1", "vitally_400", TimeDelta::minutes(3));
        d.state = State::Replayed;
        d.state_by = Some("ana".into());
        d.state_at = Some(now);
        d.state_why = Some("INC-7".into());
        let text = shown(
            &Shown {
                dead_letter: d,
                headers: serde_json::json!({"x-thena-reason": "vitally_400", "x-thena-attempts": 2}),
                body: Some(serde_json::to_vec(&event).unwrap()),
            },
            now,
        );
        assert!(text.starts_with("dead letter 5 (replayed)\n"), "{text}");
        assert!(text.contains("request: 7 v3\n"), "{text}");
        assert!(text.contains("  x-thena-reason: vitally_400\n"), "{text}");
        assert!(text.contains("  x-thena-attempts: 2\n"), "{text}");
        assert!(text.contains("replayed: by ana at"), "{text}");
        assert!(text.contains("\"workspace_id\": \"W1\""), "{text}");
        assert!(headers_and_body(None, None).ends_with("body:\n(purged)\n"));
    }
}
