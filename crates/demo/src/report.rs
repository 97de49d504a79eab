//! What the demo prints: each request and where it went, the fleet's counters, and the
//! URLs to read the metrics from.

use std::{collections::BTreeMap, fmt};

use fake_vitally::{CallCounts, StateDump};
use thena_sync::outcome::Outcome;

use crate::customers::{Expect, Persona};

/// One demo request and its final outcome.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub request_id: u64,
    pub persona: Persona,
    pub outcome: Outcome,
    /// Events in its lifecycle (the last version).
    pub versions: u64,
}

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub rows: Vec<RequestRow>,
    /// Where each synced request's instance is, by request id: (account, organization).
    pub links: BTreeMap<u64, (Option<String>, Option<String>)>,
    names: BTreeMap<String, String>,
    /// `thena_vitally_events_total` summed over every role: (outcome, reason) → count.
    pub counters: BTreeMap<(String, String), u64>,
    pub vitally_calls: BTreeMap<String, u64>,
    pub urls: Vec<String>,
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
                let id = i.external_id.rsplit(':').next()?.parse().ok()?;
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
        Self {
            rows,
            links,
            names,
            counters,
            vitally_calls: calls.by_route.clone(),
            urls: Vec::new(),
            metrics: Vec::new(),
        }
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
                (!matches).then(|| {
                    format!(
                        "request {} ({}): got {actual:?}",
                        row.request_id, row.persona.case
                    )
                })
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

#[derive(Debug, PartialEq, Eq)]
enum Actual {
    Linked(Option<String>, Option<String>),
    Skipped(String),
    Other(String),
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\n{:<8} {:<62} {:<26} {:<20} {:<18}",
            "request",
            "case (product doc linking table / domain fallback)",
            "requestor",
            "organization",
            "account / result"
        )?;
        writeln!(f, "{}", "─".repeat(138))?;
        for row in &self.rows {
            let requestor = row.persona.email.unwrap_or("(no email)");
            let (org, account) = match self.actual(row) {
                Actual::Linked(account, org) => (self.name(&org), self.name(&account)),
                Actual::Skipped(reason) => ("—".into(), format!("no sync: {reason}")),
                Actual::Other(what) => ("?".into(), what),
            };
            writeln!(
                f,
                "{:<8} {:<62} {:<26} {:<20} {:<18}",
                row.request_id, row.persona.case, requestor, org, account
            )?;
        }
        writeln!(f, "\nfleet counters (thena_vitally_events_total):")?;
        for ((outcome, reason), count) in &self.counters {
            writeln!(f, "  {outcome:<9} {reason:<40} {count:>5}")?;
        }
        let total: u64 = self.vitally_calls.values().sum();
        writeln!(f, "\nVitally calls ({total} in all):")?;
        for (route, count) in &self.vitally_calls {
            writeln!(f, "  {route:<60} {count:>5}")?;
        }
        if !self.urls.is_empty() {
            writeln!(
                f,
                "\nmetrics and APIs (live while the demo runs; `demo --serve` keeps them up):"
            )?;
            for url in &self.urls {
                writeln!(f, "  {url}")?;
            }
        }
        Ok(())
    }
}
