//! What the demo prints: each request and where it went, the fleet's counters, and the
//! URLs to read the metrics from.

use std::{collections::BTreeMap, fmt, time::Duration};

use fake_vitally::{CallCounts, StateDump};
use thena_events::Source;
use thena_sync::outcome::Outcome;

use crate::customers::{Expect, Persona};

/// One demo request and its final outcome.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub request_id: u64,
    /// The channel it came from.
    pub source: Source,
    pub persona: Persona,
    pub outcome: Outcome,
    /// Events in its lifecycle (the last version).
    pub versions: u64,
}

/// How the fleet came through the demo's Vitally outage, measured from what the
/// consumers reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Events that met a 503 and took the retry path.
    pub retried: usize,
    /// Retries in all (an event may meet the outage more than once).
    pub retries: usize,
    /// Of those, synced in the end.
    pub synced: usize,
    /// Of those, skipped in the end because a newer version of the request had landed
    /// while they waited (`stale_version`): nothing lost, the newer one is in Vitally.
    pub superseded: usize,
    /// From the last 503 to the last retried event settling.
    pub after: Duration,
}

/// One instance of the "Thena Requests" object as the fake Vitally holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub request_id: u64,
    pub name: String,
    pub external_id: String,
    pub organization: Option<String>,
    pub account: Option<String>,
    /// (trait label, value), a few of them.
    pub traits: Vec<(String, String)>,
}

/// The traits [`InstanceView`] shows, in this order.
const SHOWN_TRAITS: &[&str] = &[
    "Source",
    "Title",
    "Status",
    "Urgency",
    "Assigned To",
    "CSAT",
    "Requestor",
    "Request Closed At",
    "Product",
];

/// What the skip and defer reasons that vary between runs mean.
pub const REASONS: &[(&str, &str)] = &[
    (
        "stale_version",
        "an older version arrived after a newer one had synced: skipped, the newer one is in Vitally",
    ),
    (
        "already_applied",
        "a redelivery of a version Vitally already has: skipped without a Vitally call",
    ),
    (
        "request_busy",
        "another consumer held this request's lock: deferred briefly so the two never race",
    ),
    (
        "rate_budget",
        "the integration's fleet-wide Vitally budget was spent: deferred, not an attempt",
    ),
    (
        "held",
        "the integration was paused (key rejected, object gone): waits, flows again once it heals",
    ),
    (
        "redis_data_lost",
        "Redis lost its data (locks too): no locks for one REQUEST_LOCK_TTL, events deferred",
    ),
];

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rows: Vec<RequestRow>,
    /// Where each synced request's instance is, by request id: (account, organization).
    pub links: BTreeMap<u64, (Option<String>, Option<String>)>,
    /// Each synced request's Source trait, as Vitally holds it.
    pub sources: BTreeMap<u64, String>,
    names: BTreeMap<String, String>,
    /// `thena_vitally_events_total` summed over every role: (outcome, reason) → count.
    pub counters: BTreeMap<(String, String), u64>,
    pub vitally_calls: BTreeMap<String, u64>,
    /// Calls the fake Vitally answered 503 (the injected outage).
    pub vitally_503: u64,
    pub recovery: Recovery,
    /// The first linked request's instance, as Vitally holds it.
    pub instance: Option<InstanceView>,
    pub urls: Vec<String>,
    /// The URLs are printed only while they answer (`demo --serve`).
    pub serving: bool,
    /// From the start of the run until every event settled (not counting `--serve`).
    pub elapsed: Duration,
    /// Each role's `/metrics` text at the end of the run: (role, Prometheus text format).
    pub metrics: Vec<(String, String)>,
}

impl DemoReport {
    pub(crate) fn new(
        rows: Vec<RequestRow>,
        dump: &StateDump,
        registries: &[prometheus::Registry],
        calls: &CallCounts,
    ) -> Self {
        let names = dump
            .organizations
            .iter()
            .map(|o| (o.id.clone(), o.name.clone()))
            .chain(dump.accounts.iter().map(|a| (a.id.clone(), a.name.clone())))
            .collect();
        let links = dump
            .instances
            .iter()
            .filter_map(|i| {
                let id = request_id(i)?;
                Some((id, (i.customer_id.clone(), i.organization_id.clone())))
            })
            .collect();
        let mut counters = BTreeMap::new();
        for family in registries.iter().flat_map(|r| r.gather()) {
            if family.name() != "thena_vitally_events_total" {
                continue;
            }
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or(String::new(), |l| l.value().to_string())
                };
                *counters
                    .entry((label("outcome"), label("reason")))
                    .or_insert(0) += metric.get_counter().get_value() as u64;
            }
        }
        let instance = instance_view(&rows, dump, &names);
        Self {
            rows,
            links,
            sources: sources(dump),
            names,
            counters,
            vitally_calls: calls.by_route.clone(),
            vitally_503: calls.by_status.get(&503).copied().unwrap_or(0),
            recovery: Recovery::default(),
            instance,
            urls: Vec::new(),
            serving: false,
            elapsed: Duration::ZERO,
            metrics: Vec::new(),
        }
    }

    /// The outage and its recovery, in one line.
    pub fn outage_line(&self) -> String {
        let r = &self.recovery;
        let mut line = format!(
            "Vitally answered 503 for {} call(s); {} event(s) retried",
            self.vitally_503, r.retried
        );
        if r.retries > r.retried {
            line.push_str(&format!(" ({} retries)", r.retries));
        }
        if r.retried > 0 {
            line.push_str(&format!(
                ", all settled {:.1} s after the last 503 ({} synced",
                r.after.as_secs_f64(),
                r.synced
            ));
            if r.superseded > 0 {
                line.push_str(&format!(
                    ", {} skipped as stale_version: a newer version had synced meanwhile",
                    r.superseded
                ));
            }
            line.push(')');
        }
        line
    }

    /// Rows whose outcome differs from what the product doc says for their case.
    pub fn mismatches(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter_map(|row| {
                let actual = self.actual(row);
                let matches = match row.persona.expect {
                    Expect::Linked {
                        account,
                        organization,
                    } => {
                        actual
                            == Actual::Linked(
                                account.map(str::to_string),
                                organization.map(str::to_string),
                            )
                    }
                    Expect::Skipped(reason) => actual == Actual::Skipped(reason.to_string()),
                };
                let source = self.sources.get(&row.request_id);
                let wrong_source = matches!(actual, Actual::Linked(..))
                    && source.map(String::as_str) != Some(row.source.label());
                if !matches {
                    Some(format!(
                        "request {} ({}): got {actual:?}",
                        row.request_id, row.persona.case
                    ))
                } else if wrong_source {
                    Some(format!(
                        "request {} from {}: Source is {source:?}",
                        row.request_id,
                        row.source.label()
                    ))
                } else {
                    None
                }
            })
            .collect()
    }

    fn actual(&self, row: &RequestRow) -> Actual {
        match &row.outcome {
            Outcome::Synced { .. } => match self.links.get(&row.request_id) {
                Some((account, organization)) => {
                    Actual::Linked(account.clone(), organization.clone())
                }
                None => Actual::Other("synced but no instance".into()),
            },
            Outcome::Skipped(skip) => Actual::Skipped(skip.as_str().to_string()),
            other => Actual::Other(format!("{other:?}")),
        }
    }

    fn name(&self, id: &Option<String>) -> String {
        id.as_ref()
            .map(|id| self.names.get(id).cloned().unwrap_or_else(|| id.clone()))
            .unwrap_or_else(|| "—".into())
    }
}

/// The first request linked to both an organization and an account (else any linked
/// one), read back from the fake with trait labels instead of field paths.
fn instance_view(
    rows: &[RequestRow],
    dump: &StateDump,
    names: &BTreeMap<String, String>,
) -> Option<InstanceView> {
    let by_request: BTreeMap<u64, &fake_vitally::Instance> = dump
        .instances
        .iter()
        .filter_map(|i| Some((request_id(i)?, i)))
        .collect();
    let synced = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Synced { .. }))
        .filter_map(|r| by_request.get(&r.request_id).map(|i| (r.request_id, *i)));
    let (request_id, instance) = synced
        .clone()
        .find(|(_, i)| i.customer_id.is_some() && i.organization_id.is_some())
        .or_else(|| synced.clone().next())?;
    let labels: BTreeMap<&str, &str> = dump
        .custom_objects
        .iter()
        .filter(|o| o.id == instance.custom_object_id)
        .flat_map(|o| &o.custom_fields)
        .map(|f| (f.path.as_str(), f.label.as_str()))
        .collect();
    let by_label: BTreeMap<&str, &serde_json::Value> = instance
        .traits
        .iter()
        .filter_map(|(path, value)| Some((*labels.get(path.as_str())?, value)))
        .collect();
    let traits = SHOWN_TRAITS
        .iter()
        .filter_map(|label| {
            let value = by_label.get(label)?;
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return None,
                other => other.to_string(),
            };
            Some((label.to_string(), shorten(&text, 60)))
        })
        .collect();
    let name = |id: &Option<String>| {
        id.as_ref()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
    };
    Some(InstanceView {
        request_id,
        name: instance.name.clone(),
        external_id: instance.external_id.clone(),
        organization: name(&instance.organization_id),
        account: name(&instance.customer_id),
        traits,
    })
}

/// The Thena request id of an instance (its externalId ends with it).
fn request_id(instance: &fake_vitally::Instance) -> Option<u64> {
    instance.external_id.rsplit(':').next()?.parse().ok()
}

/// Each instance's Source trait by request id, read under the path Vitally gave the label.
fn sources(dump: &StateDump) -> BTreeMap<u64, String> {
    let paths: Vec<&str> = dump
        .custom_objects
        .iter()
        .flat_map(|o| &o.custom_fields)
        .filter(|f| f.label == vitally_client::traits::label::SOURCE)
        .map(|f| f.path.as_str())
        .collect();
    dump.instances
        .iter()
        .filter_map(|i| {
            let (_, value) = i.traits.iter().find(|(p, _)| paths.contains(&p.as_str()))?;
            Some((request_id(i)?, value.as_str()?.to_owned()))
        })
        .collect()
}

fn shorten(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max - 1).collect::<String>())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Actual {
    Linked(Option<String>, Option<String>),
    Skipped(String),
    Other(String),
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = [
            "request",
            "source",
            "case (product doc linking table / domain fallback)",
            "requestor",
            "organization",
            "account / result",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|row| {
                let (org, account) = match self.actual(row) {
                    Actual::Linked(account, org) => (self.name(&org), self.name(&account)),
                    Actual::Skipped(reason) => ("—".into(), format!("no sync: {reason}")),
                    Actual::Other(what) => ("?".into(), what),
                };
                [
                    row.request_id.to_string(),
                    row.source.as_str().to_string(),
                    row.persona.case.to_string(),
                    row.persona.email.unwrap_or("(no email)").to_string(),
                    org,
                    account,
                ]
            })
            .collect();
        // Every column as wide as its widest cell, so no row pushes the next one out.
        let mut widths = header.map(|h| h.chars().count());
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(cell, width)| {
                    let pad = width.saturating_sub(cell.chars().count());
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(f, "\n{}", line(header))?;
        let total_width = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
        writeln!(f, "{}", "─".repeat(total_width))?;
        for row in &cells {
            writeln!(f, "{}", line(row.each_ref().map(String::as_str)))?;
        }

        if let Some(instance) = &self.instance {
            writeln!(
                f,
                "\nrequest {} as Vitally now holds it (\"Thena Requests\" instance):",
                instance.request_id
            )?;
            writeln!(f, "  {:<17} {}", "name", instance.name)?;
            writeln!(f, "  {:<17} {}", "externalId", instance.external_id)?;
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".into());
            writeln!(
                f,
                "  {:<17} {}",
                "organization",
                or_dash(&instance.organization)
            )?;
            writeln!(f, "  {:<17} {}", "account", or_dash(&instance.account))?;
            for (label, value) in &instance.traits {
                writeln!(f, "  {label:<17} {value}")?;
            }
        }

        writeln!(f, "\n{}", self.outage_line())?;

        writeln!(
            f,
            "\nfleet counters once every event settled (thena_vitally_events_total):"
        )?;
        for ((outcome, reason), count) in &self.counters {
            writeln!(f, "  {outcome:<9} {reason:<40} {count:>5}")?;
        }
        writeln!(f, "what the reasons that vary between runs mean:")?;
        for (reason, meaning) in REASONS {
            writeln!(f, "  {reason:<16} {meaning}")?;
        }
        let total: u64 = self.vitally_calls.values().sum();
        writeln!(f, "\nVitally calls ({total} in all):")?;
        for (route, count) in &self.vitally_calls {
            writeln!(f, "  {route:<60} {count:>5}")?;
        }
        if self.serving && !self.urls.is_empty() {
            writeln!(f, "\nmetrics and APIs (up until Ctrl-C):")?;
            for url in &self.urls {
                writeln!(f, "  {url}")?;
            }
        } else if !self.urls.is_empty() {
            writeln!(
                f,
                "\n(the metrics and API endpoints stopped with the demo; `demo --serve` keeps them up)"
            )?;
        }
        Ok(())
    }
}
