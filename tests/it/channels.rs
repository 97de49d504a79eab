//! Requests from every channel the product doc names — Slack, Email, Web, Microsoft Teams —
//! over the wire (issue 21): each linking outcome per channel, the Source trait, the
//! Permalink rule, one Vitally user per person whatever the channel, and events of the
//! contract's first revision (no `source`) still accepted and synced as Slack requests.

use std::time::Duration;

use fake_vitally::{Fault, FaultKind, Instance};
use serde_json::{Value, json};
use thena_events::{RequestChanged, Source, sample};
use thena_testkit::{TestEnv, wait_until};

use crate::support::{Fleet, WS, trait_of};

/// Where a request must end up.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Linked to this account and/or organization (the demo fixture's ids).
    Linked {
        account: Option<&'static str>,
        organization: Option<&'static str>,
        /// The externalId of the user the domain fallback creates, if it creates one.
        created_user: Option<&'static str>,
        /// The Permalink trait (`None`: not written, or cleared).
        permalink: Option<&'static str>,
    },
    /// Not synced: no email to link by.
    NoEmail,
}

struct Case {
    id: u64,
    source: Source,
    email: Option<&'static str>,
    permalink: Option<&'static str>,
    expect: Expect,
}

const SLACK_LINK: &str = "https://acme.slack.com/archives/C0CUSTOMER/p1795000000000100";
const TEAMS_LINK: &str =
    "https://teams.microsoft.com/l/message/19:c0ffee@thread.tacv2/1795000000000";
const MID: &str = "mid:CAF=302.1795000000@mail.acme.com";
const PAGE: &str = "https://help.acme.com/contact?request=303";

/// A request raised in `source` the way Thena sends one: Slack names the requestor by the
/// older `slack_user_id` only (a revision 1.0 sender), web and Teams by `external_id`,
/// email by the address.
fn raised(source: Source, id: u64, email: Option<&str>, permalink: Option<&str>) -> RequestChanged {
    let mut event = sample::event(WS, id, 1, email);
    let request = &mut event.request;
    request.source = source;
    request.permalink = permalink.map(str::to_owned);
    let requestor = &mut request.requestor;
    requestor.slack_user_id = None;
    match source {
        Source::Slack => requestor.slack_user_id = Some(format!("U{id}")),
        Source::Email => {}
        Source::Web => requestor.external_id = Some(format!("portal-{id}")),
        Source::MsTeams => requestor.external_id = Some(format!("aad-{id}")),
    }
    event
}

fn cases() -> Vec<Case> {
    let known = |permalink| Expect::Linked {
        account: Some("acc-acme-eu"),
        organization: Some("org-acme"),
        created_user: None,
        permalink,
    };
    let at_initech = |user, permalink| Expect::Linked {
        account: Some("acc-initech"),
        organization: None,
        created_user: Some(user),
        permalink,
    };
    let at_wayne = |user, permalink| Expect::Linked {
        account: None,
        organization: Some("org-wayne"),
        created_user: Some(user),
        permalink,
    };
    let case = |id, source, email, permalink, expect| Case {
        id,
        source,
        email,
        permalink,
        expect,
    };
    use Source::*;
    vec![
        // A user Vitally knows (1 organization × 1 account), from each channel, each with
        // its channel's own link.
        case(
            301,
            Slack,
            Some("alice@acme.com"),
            Some(SLACK_LINK),
            known(Some(SLACK_LINK)),
        ),
        case(
            302,
            Email,
            Some("alice@acme.com"),
            Some(MID),
            known(Some(MID)),
        ),
        case(
            303,
            Web,
            Some("alice@acme.com"),
            Some(PAGE),
            known(Some(PAGE)),
        ),
        case(
            304,
            MsTeams,
            Some("alice@acme.com"),
            Some(TEAMS_LINK),
            known(Some(TEAMS_LINK)),
        ),
        // A stranger at a customer's domain: created there, with an externalId from their
        // own id in the channel. An email carrying Thena's Slack copy as its link, and a
        // web form without a page, leave Permalink empty.
        case(
            311,
            Slack,
            Some("first@initech.com"),
            Some(SLACK_LINK),
            at_initech("thena:T-ACME:U311", Some(SLACK_LINK)),
        ),
        case(
            312,
            Email,
            Some("second@wayne.com"),
            Some(SLACK_LINK),
            at_wayne("thena:T-ACME:second@wayne.com", None),
        ),
        case(
            313,
            Web,
            Some("third@initech.com"),
            None,
            at_initech("thena:T-ACME:web:portal-313", None),
        ),
        case(
            314,
            MsTeams,
            Some("fourth@wayne.com"),
            Some(TEAMS_LINK),
            at_wayne("thena:T-ACME:ms_teams:aad-314", Some(TEAMS_LINK)),
        ),
        // No email shared: nothing to link by (an email request always has one).
        case(321, Slack, None, Some(SLACK_LINK), Expect::NoEmail),
        case(323, Web, None, Some(PAGE), Expect::NoEmail),
        case(324, MsTeams, None, Some(TEAMS_LINK), Expect::NoEmail),
    ]
}

fn users_with_email(fleet: &Fleet, email: &str) -> Vec<fake_vitally::User> {
    fleet
        .fake
        .dump()
        .users
        .into_iter()
        .filter(|u| u.email.as_deref() == Some(email))
        .collect()
}

/// The request's one instance, once it exists.
async fn instance(fleet: &Fleet, request_id: u64) -> Instance {
    wait_until(
        &format!("request {request_id}'s instance"),
        Duration::from_secs(20),
        || async {
            let found = fleet.instances_for(WS, request_id);
            (found.len() == 1).then(|| found[0].clone())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_each_channel_goes_through_every_linking_outcome_that_applies() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let cases = cases();
    for case in &cases {
        let event = raised(case.source, case.id, case.email, case.permalink);
        fleet.publish(&event).await;
    }
    fleet.wait_settled(cases.len() as u64).await;

    for case in &cases {
        let what = format!("request {} from {:?}", case.id, case.source);
        match case.expect {
            Expect::Linked {
                account,
                organization,
                created_user,
                permalink,
            } => {
                let instance = instance(&fleet, case.id).await;
                assert_eq!(instance.customer_id.as_deref(), account, "{what}");
                assert_eq!(instance.organization_id.as_deref(), organization, "{what}");
                assert_eq!(
                    trait_of(&instance, "source"),
                    Some(json!(case.source.label())),
                    "{what}"
                );
                assert_eq!(
                    trait_of(&instance, "permalink"),
                    permalink.map(Value::from),
                    "{what}"
                );
                let email = case.email.expect("a linked case has an email");
                let users = users_with_email(&fleet, email);
                assert_eq!(users.len(), 1, "{what}: one user with {email}");
                if let Some(external_id) = created_user {
                    assert_eq!(users[0].external_id, external_id, "{what}");
                    assert_eq!(
                        users[0].account_ids,
                        Vec::from_iter(account.map(String::from))
                    );
                    assert_eq!(
                        users[0].organization_ids,
                        Vec::from_iter(organization.map(String::from))
                    );
                }
            }
            Expect::NoEmail => {
                assert!(fleet.instances_for(WS, case.id).is_empty(), "{what}");
            }
        }
    }
    // The counters move just after Vitally has the instance.
    wait_until("every outcome counted", Duration::from_secs(10), || async {
        (fleet.count("synced", None) >= 8).then_some(())
    })
    .await;
    assert_eq!(fleet.count("skipped", Some("no_email")), 3);
    assert_eq!(fleet.count("synced", None), 8);
    assert_eq!(fleet.fake.calls().route("POST /resources/users"), 4);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_person_by_slack_then_by_email_is_one_vitally_user_with_two_requests() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let zoe = "zoe@initech.com";

    fleet
        .publish(&raised(Source::Slack, 331, Some(zoe), Some(SLACK_LINK)))
        .await;
    let by_slack = instance(&fleet, 331).await;
    assert_eq!(
        users_with_email(&fleet, zoe).len(),
        1,
        "created by the fallback"
    );
    // Forget the cached lookup, as after CACHE_TTL_USER: Vitally itself, asked by email,
    // must know her.
    let cached = thena_testkit::delete_redis_prefix(
        &thena_testkit::redis_url(),
        &format!("{}:cache:user", fleet.env.redis_prefix),
    )
    .await
    .unwrap();
    assert!(cached >= 1, "the user was cached");

    fleet
        .publish(&raised(Source::Email, 332, Some(zoe), Some(MID)))
        .await;
    let by_email = instance(&fleet, 332).await;

    let users = users_with_email(&fleet, zoe);
    assert_eq!(users.len(), 1, "one Vitally user: {users:?}");
    assert_eq!(users[0].external_id, "thena:T-ACME:U331");
    assert_eq!(fleet.fake.calls().route("POST /resources/users"), 1);
    for (instance, source) in [(&by_slack, Source::Slack), (&by_email, Source::Email)] {
        assert_eq!(instance.customer_id.as_deref(), Some("acc-initech"));
        assert_eq!(instance.organization_id, None);
        assert_eq!(trait_of(instance, "source"), Some(json!(source.label())));
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_new_person_by_slack_and_by_email_at_once_is_created_once() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Both requests find no user and reach the fallback while the first creation is
    // still on its way: the two would create the person twice, under two externalIds.
    fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/users".into(),
        count: 2,
        kind: FaultKind::Latency(Duration::from_millis(800)),
    });
    let yuri = "yuri@initech.com";
    fleet
        .publish(&raised(Source::Slack, 341, Some(yuri), None))
        .await;
    fleet
        .publish(&raised(Source::Email, 342, Some(yuri), None))
        .await;
    fleet.spawn_consumer().await;
    fleet.wait_settled(2).await;

    let users = users_with_email(&fleet, yuri);
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(fleet.fake.calls().route("POST /resources/users"), 1);
    for id in [341, 342] {
        let instance = instance(&fleet, id).await;
        assert_eq!(instance.customer_id.as_deref(), Some("acc-initech"), "{id}");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_whose_creation_answer_was_lost_is_not_created_again_from_another_channel() {
    // Retries wait 4 s, long enough for the email request to come first.
    let env = TestEnv::with_tiers(vec![Duration::from_secs(4)]);
    let mut fleet = Fleet::start_in(env, Default::default(), &[("VITALLY_TIMEOUT", "1s")]).await;
    fleet.connect(WS, |_| {}).await;
    // Vitally applies the Slack request's user creation but answers too late: the consumer
    // does not know the user exists, and its lookup cached "not found".
    fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/users".into(),
        count: 1,
        kind: FaultKind::AnswerLate(Duration::from_millis(2_500)),
    });
    let xena = "xena@initech.com";
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    fleet
        .publish(&raised(Source::Slack, 361, Some(xena), None))
        .await;
    wait_until(
        "the create applied, its answer lost",
        Duration::from_secs(20),
        || async {
            let lost = fleet.count("retried", Some("vitally_timeout")) >= 1;
            (lost && users_with_email(&fleet, xena).len() == 1).then_some(())
        },
    )
    .await;

    // Her email arrives while the Slack request waits for its retry.
    fleet
        .publish(&raised(Source::Email, 362, Some(xena), None))
        .await;
    let by_email = instance(&fleet, 362).await;
    assert_eq!(by_email.customer_id.as_deref(), Some("acc-initech"));
    let users = users_with_email(&fleet, xena);
    assert_eq!(
        users.len(),
        1,
        "not created again under her address: {users:?}"
    );
    assert_eq!(users[0].external_id, "thena:T-ACME:U361");

    let by_slack = instance(&fleet, 361).await;
    assert_eq!(by_slack.customer_id.as_deref(), Some("acc-initech"));
    assert_eq!(users_with_email(&fleet, xena).len(), 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_source_is_accepted_by_the_api_and_synced_as_slack() {
    let mut fleet = Fleet::start_with(
        Default::default(),
        &[("PRODUCER_TOKEN", "t-channels-token-0123456789")],
    )
    .await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    // Exactly what a sender of the contract's first revision posts.
    let mut old = serde_json::to_value(sample::event(WS, 351, 1, Some("alice@acme.com"))).unwrap();
    let request = old["request"].as_object_mut().unwrap();
    request.remove("source");
    request["requestor"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");
    request.insert("permalink".into(), json!(SLACK_LINK));
    assert!(!old.to_string().contains("source") && !old.to_string().contains("external_id"));

    let producer = fleet.spawn_producer().await;
    let (status, body) = producer.post_events(&old).await;
    assert_eq!(status, 202, "{body}");
    // A source this service does not know is refused, naming its path.
    let mut unknown = old.clone();
    unknown["request"]["source"] = json!("fax");
    let (status, body) = producer.post_events(&unknown).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["problems"][0]["path"], "request.source");

    let instance = instance(&fleet, 351).await;
    assert_eq!(trait_of(&instance, "source"), Some(json!("Slack")));
    assert_eq!(trait_of(&instance, "permalink"), Some(json!(SLACK_LINK)));
    assert_eq!(instance.customer_id.as_deref(), Some("acc-acme-eu"));
    assert_eq!(instance.organization_id.as_deref(), Some("org-acme"));
    fleet.stop().await;
}
