//! A request's instance follows its requestor's linking from version to version (issue 14,
//! item 4): a relink moves it and clears the link the new target lacks; a requestor who
//! links nowhere now (joined a second customer) keeps the last link and current traits.

use std::time::Duration;

use serde_json::json;
use thena_store::ledger::Ledger;
use thena_testkit::wait_until;

use crate::support::{Fleet, WS, status_of, versioned};

/// Alice (`u-alice`, the demo's "1 organization × 1 account") as a CSM re-files her in
/// Vitally: these organizations and accounts, nothing else. The workspace's cached
/// lookups are then forgotten (as `requests resync` does first), so the next version
/// sees the change rather than waiting out `CACHE_TTL_USER`.
async fn file_alice(fleet: &Fleet, organizations: &[&str], accounts: &[&str]) {
    let reply = reqwest::Client::new()
        .put(format!("{}/resources/users/u-alice", fleet.fake.base_url()))
        .header("Authorization", fleet.fake.auth_header())
        .json(&json!({"organizationIds": organizations, "accountIds": accounts}))
        .send()
        .await
        .expect("the fake answers");
    assert!(reply.status().is_success(), "{}", reply.status());
    let mut redis = thena_runtime::redis::connect(&fleet.config.redis_url)
        .await
        .unwrap();
    let pattern = format!("{}:cache:*:{WS}:*", fleet.config.redis_prefix);
    thena_runtime::redis::delete_matching(&mut redis, &pattern)
        .await
        .unwrap();
}

/// Publishes version `v` of request `id` (requestor Alice) and waits until its one
/// instance carries it; returns (account, organization) as Vitally holds them.
async fn sync_version(fleet: &Fleet, id: u64, v: u64) -> (Option<String>, Option<String>) {
    fleet.publish(&versioned(WS, id, v)).await;
    let want = format!("v{v}");
    wait_until(
        &format!("request {id} at {want}"),
        Duration::from_secs(20),
        || async {
            let instances = fleet.instances_for(WS, id);
            (instances.len() == 1 && status_of(&instances[0]) == want).then(|| {
                (
                    instances[0].customer_id.clone(),
                    instances[0].organization_id.clone(),
                )
            })
        },
    )
    .await
}

/// One version: how Alice is filed, and where her request's instance must then be.
struct Step {
    filed: (&'static [&'static str], &'static [&'static str]),
    expect: (Option<&'static str>, Option<&'static str>),
    case: &'static str,
}

fn link(account: Option<&str>, organization: Option<&str>) -> (Option<String>, Option<String>) {
    (account.map(str::to_owned), organization.map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relink_moves_the_instance_and_clears_the_link_the_new_target_lacks() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;

    // (organizations, accounts) as filed in Vitally → (account, organization) expected.
    let steps: [Step; 4] = [
        Step {
            filed: (&["org-acme"], &["acc-acme-eu"]),
            expect: (Some("acc-acme-eu"), Some("org-acme")),
            case: "org + account",
        },
        Step {
            filed: (&["org-globex"], &["acc-globex"]),
            expect: (Some("acc-globex"), Some("org-globex")),
            case: "moved to another org + account",
        },
        Step {
            filed: (&[], &["acc-solo"]),
            expect: (Some("acc-solo"), None),
            case: "account only: the organization is cleared",
        },
        Step {
            filed: (&["org-wayne"], &[]),
            expect: (None, Some("org-wayne")),
            case: "organization only: the account is cleared",
        },
    ];
    for (v, step) in (1u64..).zip(steps.iter()) {
        file_alice(&fleet, step.filed.0, step.filed.1).await;
        let got = sync_version(&fleet, 61, v).await;
        assert_eq!(
            got,
            link(step.expect.0, step.expect.1),
            "v{v}: {}",
            step.case
        );
    }
    // Counted once settled: Vitally has each version a moment before its ack.
    fleet.wait_settled(4).await;
    assert_eq!(fleet.count("synced", Some("updated")), 3);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requestor_who_joins_another_customer_keeps_the_last_link_and_current_traits() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;

    let acme = link(Some("acc-acme-eu"), Some("org-acme"));
    assert_eq!(sync_version(&fleet, 62, 1).await, acme);

    // Alice now also works for Globex: many organizations × many accounts, "no sync".
    file_alice(
        &fleet,
        &["org-acme", "org-globex"],
        &["acc-acme-eu", "acc-globex"],
    )
    .await;
    assert_eq!(
        sync_version(&fleet, 62, 2).await,
        acme,
        "the traits are current, the last link kept"
    );
    // The ledger and the counters are written once Vitally answered: wait for them.
    fleet.wait_settled(2).await;
    assert_eq!(fleet.count("synced", Some("link_lost")), 1);
    let row = Ledger::read_only(fleet.store.db().clone())
        .show(WS, 62, 50)
        .await
        .unwrap()
        .expect("in the ledger");
    println!("{row:#?}");
    assert_eq!(
        (row.outcome.as_deref(), row.reason.as_deref()),
        (Some("synced"), Some("link_lost"))
    );
    let decision = row.link.expect("the linking decision");
    assert_eq!(
        decision["no_sync"],
        "user_in_many_organizations_and_accounts"
    );
    assert_eq!(
        decision["kept_last_link"],
        json!({"organization_id": "org-acme", "account_id": "acc-acme-eu"})
    );
    assert_eq!(row.synced_version, Some(2));

    // She leaves Acme: linked again, and moved.
    file_alice(&fleet, &["org-globex"], &["acc-globex"]).await;
    assert_eq!(
        sync_version(&fleet, 62, 3).await,
        link(Some("acc-globex"), Some("org-globex"))
    );
    fleet.stop().await;
}
