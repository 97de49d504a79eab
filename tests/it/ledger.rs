//! The request ledger over the wire: every outcome lands in PostgreSQL with its reason
//! and linking decision, `requests show/list/resync` answer "where did request 135 go?",
//! and returning messages coalesce to their request's latest snapshot.

use std::{process::Command, time::Duration};

use chrono::Utc;
use thena_demo::customers::{Expect, PERSONAS};
use thena_events::sample;
use thena_store::ledger::{Entry, Ledger, RequestRecord};
use thena_testkit::wait_until;
use vitally_client::limiter::RateLimiter;

use fake_vitally::FakeConfig;
use thena_testkit::TestEnv;

use crate::support::{Fleet, WS, versioned, wait_all_at};

fn ledger(fleet: &Fleet) -> Ledger {
    Ledger::read_only(fleet.store.db().clone())
}

async fn record(fleet: &Fleet, id: u64) -> RequestRecord {
    ledger(fleet)
        .show(WS, id, 50)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("request {id} is in the ledger"))
}

/// Waits until the ledger records `version` as synced for every request: Vitally has a
/// version a moment before PostgreSQL says so.
async fn synced_in_ledger(fleet: &Fleet, ids: &[u64], version: u64) {
    for id in ids {
        wait_until(
            &format!("request {id} synced at v{version} in the ledger"),
            Duration::from_secs(10),
            || async { (record(fleet, *id).await.synced_version == Some(version)).then_some(()) },
        )
        .await;
    }
}

/// Runs the binary against this fleet's prefixes, schema and broker.
fn cli(fleet: &Fleet, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .args(args)
        .envs(fleet.variables())
        .env("LOG_FORMAT", "json")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.success(), format!("{stdout}{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_linking_case_and_policy_skip_is_in_the_ledger_with_its_reason_and_decision() {
    let mut fleet = Fleet::start().await;
    let integration = fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    for (i, persona) in PERSONAS.iter().enumerate() {
        let mut event = sample::event(WS, 1000 + i as u64, 1, persona.email);
        event.request.requestor.name = Some(persona.name.to_string());
        fleet.publish(&event).await;
    }
    // A request created before the integration: forward-only skips it.
    let mut old = sample::event(WS, 2000, 1, Some("alice@acme.com"));
    old.request.created_at = integration.established_at - chrono::Duration::days(1);
    fleet.publish(&old).await;
    fleet.wait_settled(PERSONAS.len() as u64 + 1).await;

    for (i, persona) in PERSONAS.iter().enumerate() {
        let row = record(&fleet, 1000 + i as u64).await;
        let link = row.link.clone().unwrap_or_default();
        println!(
            "{:<6} {:<58} {:<9} {:<26} {}",
            row.request_id,
            persona.case,
            row.outcome.as_deref().unwrap_or("—"),
            row.reason.as_deref().unwrap_or("—"),
            link["rule"].as_str().unwrap_or("—")
        );
        // One outcome; a wait for budget on a busy machine may come before it.
        let (last, before) = row.history.split_last().expect("a history");
        assert_eq!(last.outcome, row.outcome.clone().unwrap_or_default());
        assert!(
            before.iter().all(|h| h.outcome == "deferred"),
            "{}: one outcome, {:?}",
            persona.case,
            row.history
        );
        match persona.expect {
            Expect::Linked {
                account,
                organization,
            } => {
                assert_eq!(row.outcome.as_deref(), Some("synced"), "{}", persona.case);
                assert_eq!(row.reason.as_deref(), Some("created"), "{}", persona.case);
                assert_eq!(link["account_id"].as_str(), account, "{}", persona.case);
                assert_eq!(
                    link["organization_id"].as_str(),
                    organization,
                    "{}",
                    persona.case
                );
                assert_eq!(row.synced_version, Some(1));
                assert!(row.instance_id.is_some(), "{}: instance id", persona.case);
            }
            Expect::Skipped(reason) => {
                assert_eq!(row.outcome.as_deref(), Some("skipped"), "{}", persona.case);
                assert_eq!(row.reason.as_deref(), Some(reason), "{}", persona.case);
                assert_eq!(link["no_sync"].as_str(), Some(reason), "{}", persona.case);
                assert_eq!(row.synced_version, None);
            }
        }
        assert!(
            link["rule"].as_str().is_some_and(|r| !r.is_empty()),
            "{}",
            persona.case
        );
    }
    let old = record(&fleet, 2000).await;
    assert_eq!(
        (old.outcome.as_deref(), old.reason.as_deref()),
        (Some("skipped"), Some("before_integration"))
    );
    // The snapshot is kept, for resync and coalescing.
    let snapshot = ledger(&fleet)
        .latest_snapshot(WS, 2000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.0, 1);
    assert_eq!(snapshot.1["request"]["id"], 2000);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_unknown_request_syncs_exactly_once_after_a_user_appears_and_a_resync() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet
        .publish(&sample::event(WS, 3000, 1, Some("newbie@newcorp.io")))
        .await;
    fleet.wait_settled(1).await;
    let before = record(&fleet, 3000).await;
    assert_eq!(before.reason.as_deref(), Some("domain_unknown"));

    let (ok, shown) = cli(&fleet, &["requests", "show", WS, "3000"]);
    println!("{shown}");
    assert!(ok, "{shown}");
    assert!(shown.contains("skipped: domain_unknown"), "{shown}");
    assert!(
        shown.contains("domain fallback on newcorp.io → no sync: domain_unknown"),
        "{shown}"
    );
    let (ok, listed) = cli(
        &fleet,
        &[
            "requests",
            "list",
            WS,
            "--outcome",
            "skipped",
            "--since",
            "1h",
        ],
    );
    assert!(ok && listed.contains("3000"), "{listed}");
    let (ok, none) = cli(&fleet, &["requests", "list", WS, "--outcome", "parked"]);
    assert!(ok && none.contains("no request of"), "{none}");

    // The customer adds a colleague at that domain, in an account, in Vitally.
    fleet
        .fake
        .seed(
            serde_json::from_value(serde_json::json!({
                "accounts": [{"id": "acc-newcorp", "externalId": "newcorp", "name": "NewCorp"}],
                "users": [{"id": "u-boss", "externalId": "crm-boss", "name": "Boss",
                           "email": "boss@newcorp.io", "organizationIds": [],
                           "accountIds": ["acc-newcorp"]}],
            }))
            .unwrap(),
        )
        .unwrap();
    let (ok, dry) = cli(
        &fleet,
        &[
            "requests",
            "resync",
            WS,
            "--reason",
            "domain_unknown",
            "--dry-run",
        ],
    );
    assert!(ok && dry.contains("1 request(s) would be resent"), "{dry}");
    let (ok, resent) = cli(
        &fleet,
        &[
            "requests",
            "resync",
            WS,
            "--reason",
            "domain_unknown",
            "--rate",
            "100",
            "--actor",
            "csm",
        ],
    );
    println!("{resent}");
    assert!(ok && resent.contains("resent 1 request(s)"), "{resent}");
    assert!(
        resent.contains("\"actor\":\"csm\""),
        "the audit line names the actor: {resent}"
    );

    // The ledger is written before the ack, after Vitally answered: wait for it.
    let after = wait_until(
        "the resynced request synced",
        Duration::from_secs(20),
        || async {
            let row = record(&fleet, 3000).await;
            (row.outcome.as_deref() == Some("synced")).then_some(row)
        },
    )
    .await;
    let link = after.link.unwrap();
    assert_eq!(link["account_id"], "acc-newcorp");
    assert_eq!(link["user_created"], true);
    assert_eq!(fleet.instances_for(WS, 3000).len(), 1, "exactly once");
    assert_eq!(after.history.len(), 2);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_that_waited_for_budget_costs_far_fewer_writes_than_changes() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |r| r.rate_budget_per_min = 300).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let ids: Vec<u64> = (4000..4010).collect();
    let started = Utc::now();
    for version in 1..=10 {
        for id in &ids {
            fleet.publish(&versioned(WS, *id, version)).await;
        }
    }
    wait_all_at(&fleet, &ids, 10, Duration::from_secs(90)).await;
    let calls = fleet.fake.calls();
    let writes = calls.route("POST /resources/customObjects/:id/instances")
        + calls.route("PUT /resources/customObjects/:id/instances/:id");
    let coalesced: u64 = fleet.count("skipped", Some("already_applied"))
        + fleet.count("skipped", Some("stale_version"));
    println!(
        "{} requests × 10 changes: {writes} instance writes, {} deferred, {coalesced} skipped without a call, {:.1} s",
        ids.len(),
        fleet.count("deferred", None),
        (Utc::now() - started).num_milliseconds() as f64 / 1000.0
    );
    assert!(
        fleet.count("deferred", Some("rate_budget")) > 0,
        "the budget was the limit"
    );
    // One write per change would be 100; changes that waited cost none of their own.
    assert!(
        writes < 50,
        "{writes} writes for {} changes: changes that waited were not coalesced",
        ids.len() * 10
    );
    assert!(fleet.count("skipped", Some("already_applied")) > 0);
    synced_in_ledger(&fleet, &ids, 10).await;
    fleet.stop().await;
}

/// The scenario: every change of a burst arrives while the integration is out of
/// budget (paused after a 429). Each request takes one place in the integration's queue;
/// its later changes wait behind that place, and when it comes the request's latest
/// snapshot is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_arrive_while_the_budget_is_spent_cost_one_write_per_request() {
    // Tiers like production's in shape (a waiting event hops a few times, not hundreds).
    let tiers = [100, 1_000, 5_000].map(Duration::from_millis).to_vec();
    let mut fleet = Fleet::start_in(TestEnv::with_tiers(tiers), FakeConfig::default(), &[]).await;
    let integration = fleet.connect(WS, |r| r.rate_budget_per_min = 1000).await;
    let ids: Vec<u64> = (6000..6030).collect();
    for version in 1..=10 {
        for id in &ids {
            fleet.publish(&versioned(WS, *id, version)).await;
        }
    }
    // What a 429 does: every replica stops calling until Vitally's reset. Long enough
    // for a consumer to meet every change once before the first place comes due (it
    // takes ~1.5 s here; the margin is for a machine many times busier).
    let redis = thena_runtime::redis::connect(&fleet.env.redis_url())
        .await
        .unwrap();
    RateLimiter::new(redis, &fleet.env.redis_prefix, 0.25)
        .pause_as(integration.budget_key(), WS, Duration::from_secs(15))
        .await;
    let started = Utc::now();
    fleet.spawn_consumer().await;
    wait_all_at(&fleet, &ids, 10, Duration::from_secs(60)).await;
    let calls = fleet.fake.calls();
    let writes = calls.route("POST /resources/customObjects/:id/instances")
        + calls.route("PUT /resources/customObjects/:id/instances/:id");
    println!(
        "{} requests × 10 changes during a 15 s pause: {writes} instance writes, {} Vitally \
         calls, {} deferred, {} skipped without a call, all at v10 after {:.1} s",
        ids.len(),
        calls.total,
        fleet.count("deferred", Some("rate_budget")),
        fleet.count("skipped", Some("already_applied"))
            + fleet.count("skipped", Some("stale_version")),
        (Utc::now() - started).num_milliseconds() as f64 / 1000.0
    );
    assert!(
        writes <= ids.len() as u64 * 11 / 10,
        "{writes} writes for {} requests: the changes that waited were not coalesced",
        ids.len()
    );
    synced_in_ledger(&fleet, &ids, 10).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_narrates_each_step_against_live_vitally_and_writes_nothing() {
    let fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Snapshots the ledger received (no consumer ran: nothing was decided yet). An
    // unknown requestor at a domain with one account, and one at a free-mail domain.
    let writer = Ledger::start(fleet.store.db().clone());
    for (id, email) in [(5000, "newbie@initech.com"), (5001, "someone@gmail.com")] {
        let event = sample::event(WS, id, 1, Some(email));
        writer
            .record(Entry {
                workspace_id: WS.into(),
                request_id: id,
                version: 1,
                snapshot: Some(serde_json::to_value(&event).unwrap()),
                outcome: "deferred",
                reason: "rate_budget".into(),
                detail: None,
                link: None,
                instance_id: None,
                failed_attempt: false,
                backfill_job: None,
                age: None,
            })
            .await
            .unwrap();
    }
    fleet.fake.reset_calls();

    let (ok, explained) = cli(&fleet, &["requests", "explain", WS, "5000"]);
    println!("{explained}");
    assert!(ok, "{explained}");
    for step in [
        "user newbie@initech.com: not in Vitally",
        // sample::event is a Slack request by U5000: the user's externalId is that id.
        "domain fallback: one account, acc-initech (the requestor would be created there as \
         user thena:T-ACME:U5000)",
        "would create instance thena:T-ACME:5000",
    ] {
        assert!(explained.contains(step), "missing {step:?} in {explained}");
    }
    let (ok, free) = cli(&fleet, &["requests", "explain", WS, "5001", "--json"]);
    assert!(ok, "{free}");
    let free: serde_json::Value = serde_json::from_str(free.trim()).unwrap();
    assert_eq!(free["verdict"], "no sync: free_mail_domain");

    let calls = fleet.fake.calls();
    let writes: u64 = calls
        .by_route
        .iter()
        .filter(|(route, _)| !route.starts_with("GET "))
        .map(|(_, n)| n)
        .sum();
    assert!(calls.total > 0, "explain asked Vitally");
    assert_eq!(writes, 0, "explain wrote to Vitally: {:?}", calls.by_route);
    fleet.stop().await;
}
