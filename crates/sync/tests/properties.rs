//! Properties of the product doc's rules (`linking`, `policy`) over generated inputs: the
//! table, the email-domain fallback, free-mail matching and the toggles.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use thena_events::{Change, sample};
use thena_sync::linking::{
    DomainChoice, DomainNoSync, Memberships, NoLink, Relink, Target, UserLink, choose_by_domain,
    is_free_mail, link_user, relink,
};
use thena_sync::policy::{Lane, PolicyDecision, PolicySkip, Toggles, decide};
use vitally_client::client::Link;

/// The product doc's linking table, verbatim (organization presence, account presence,
/// request sync status).
const PRODUCT_TABLE: [(&str, &str, &str); 9] = [
    (
        "Single Organization",
        "Single Account",
        "Sync request with Organization and Account",
    ),
    (
        "Single Organization",
        "No Account",
        "Sync request with only Organization",
    ),
    (
        "Single Organization",
        "Multiple Accounts",
        "Sync request with only Organization",
    ),
    (
        "No Organization",
        "Single Account",
        "Sync request with only Account",
    ),
    ("No Organization", "No Account", "No sync*"),
    ("No Organization", "Multiple Accounts", "No sync*"),
    (
        "Multiple Organizations",
        "Single Account",
        "Sync request with only Account and the Organization that the Account is linked to.",
    ),
    ("Multiple Organizations", "No Accounts", "No sync*"),
    ("Multiple Organizations", "Multiple Accounts", "No sync*"),
];

/// The doc's row (an index into [`PRODUCT_TABLE`]) for the counts of distinct ids.
fn doc_row_index(orgs: usize, accounts: usize) -> usize {
    let org_presence = match orgs {
        0 => "No Organization",
        1 => "Single Organization",
        _ => "Multiple Organizations",
    };
    let account_presence = match (orgs, accounts) {
        // The doc spells the same column two ways.
        (2.., 0) => "No Accounts",
        (_, 0) => "No Account",
        (_, 1) => "Single Account",
        (_, _) => "Multiple Accounts",
    };
    PRODUCT_TABLE
        .iter()
        .position(|(o, a, _)| *o == org_presence && *a == account_presence)
        .expect("the table covers every combination")
}

fn doc_row(orgs: usize, accounts: usize) -> &'static str {
    PRODUCT_TABLE[doc_row_index(orgs, accounts)].2
}

/// What `link_user` decided, in the doc's words.
fn status_of(link: &UserLink) -> &'static str {
    match link {
        UserLink::Link(Target {
            account_id: Some(_),
            organization_id: Some(_),
        }) => "Sync request with Organization and Account",
        UserLink::Link(Target {
            account_id: None,
            organization_id: Some(_),
        }) => "Sync request with only Organization",
        UserLink::Link(Target {
            account_id: Some(_),
            organization_id: None,
        }) => "Sync request with only Account",
        UserLink::Link(Target {
            account_id: None,
            organization_id: None,
        }) => "linked to nothing (never valid)",
        UserLink::AccountAndItsOrganization(_) => {
            "Sync request with only Account and the Organization that the Account is linked to."
        }
        // Unlinked goes on to the email-domain fallback (the doc's FAQ); if that finds
        // nothing either, the request is not synced.
        UserLink::NoSync(_) | UserLink::Unlinked => "No sync*",
    }
}

/// Ids from a small alphabet (including ""), so repeats and collisions are common.
fn id() -> impl Strategy<Value = String> {
    "[abc]{0,2}"
}

fn ids() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(id(), 0..7)
}

/// The same ids in another order, some of them repeated.
fn reordered_with_repeats(ids: Vec<String>) -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
    let copies = prop::collection::vec(any::<Index>(), 0..4);
    (copies, any::<Index>()).prop_flat_map(move |(copies, rotate)| {
        let mut other = ids.clone();
        if !ids.is_empty() {
            other.extend(copies.iter().map(|i| ids[i.index(ids.len())].clone()));
            let by = rotate.index(other.len());
            other.rotate_left(by);
        }
        (Just(ids.clone()), Just(other).prop_shuffle())
    })
}

fn distinct(ids: &[String]) -> BTreeSet<&str> {
    ids.iter().map(String::as_str).collect()
}

/// Lower-cased ASCII letters, byte by byte: the oracle does not reuse the std helper
/// the code under test calls.
fn lower(s: &str) -> Vec<u8> {
    s.bytes().map(|b| b.to_ascii_lowercase()).collect()
}

fn membership() -> impl Strategy<Value = Memberships> {
    (ids(), ids()).prop_map(|(organization_ids, account_ids)| Memberships {
        organization_ids,
        account_ids,
    })
}

/// Where the table links a user with these memberships now (the "many organizations ×
/// one account" row's organization is the account's, looked up: here `of-{account}`).
fn linked(m: &Memberships) -> Result<Target, NoLink> {
    match link_user(&m.organization_ids, &m.account_ids) {
        UserLink::Link(target) => Ok(target),
        UserLink::AccountAndItsOrganization(account) => Ok(Target {
            organization_id: Some(format!("of-{account}")),
            account_id: Some(account),
        }),
        UserLink::NoSync(reason) => Err(reason),
        // The domain fallback's no-sync, for this property.
        UserLink::Unlinked => Err(NoLink::DomainUnknown),
    }
}

/// What Vitally holds after the write: an absent link is kept, a `null` one cleared.
fn vitally_after(before: Option<&Target>, write: &Relink) -> Option<Target> {
    match write {
        Relink::Link {
            account,
            organization,
        } => Some(Target {
            account_id: account.apply(before.and_then(|b| b.account_id.as_deref())),
            organization_id: organization.apply(before.and_then(|b| b.organization_id.as_deref())),
        }),
        Relink::KeepLast(_) => before.cloned(),
        Relink::Skip(_) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Over any history of a requestor's memberships, one version after another, the
    /// instance is linked exactly where the latest linking that said "sync" put it —
    /// never a mix of two linkings, never frozen by a "no sync" in between — and exists
    /// from the first version that linked.
    #[test]
    fn an_instance_follows_the_latest_linking_and_keeps_its_last_link_through_no_sync(
        history in prop::collection::vec(membership(), 1..8),
    ) {
        let mut instance: Option<Target> = None;
        let mut latest_link: Option<Target> = None;
        for memberships in &history {
            let now = linked(memberships);
            let write = relink(now.as_ref().map_err(|r| *r), instance.is_some());
            match (&write, &now) {
                (Relink::Link { account, organization }, Ok(_)) => {
                    prop_assert!(!account.is_keep() && !organization.is_keep(), "both said");
                    prop_assert!(
                        !(*account == Link::Clear && *organization == Link::Clear),
                        "Vitally refuses an instance linked nowhere"
                    );
                }
                (Relink::KeepLast(reason) | Relink::Skip(reason), Err(no_link)) => {
                    prop_assert_eq!(reason, no_link)
                }
                (write, now) => prop_assert!(false, "{:?} for {:?}", write, now),
            }
            prop_assert_eq!(matches!(write, Relink::KeepLast(_)), instance.is_some() && now.is_err());
            instance = vitally_after(instance.as_ref(), &write);
            if let Ok(target) = now {
                latest_link = Some(target);
            }
            prop_assert_eq!(&instance, &latest_link);
        }
    }

    #[test]
    fn linking_follows_the_product_table_over_distinct_ids(orgs in ids(), accounts in ids()) {
        let link = link_user(&orgs, &accounts);
        let (o, a) = (distinct(&orgs), distinct(&accounts));
        prop_assert_eq!(status_of(&link), doc_row(o.len(), a.len()), "{:?}", link);

        // The "No sync" rows carry the reason that names the row.
        let expected_reason = match (o.len(), a.len()) {
            (0, 0) => None,
            (0, 2..) => Some(NoLink::ManyAccounts),
            (2.., 0) => Some(NoLink::ManyOrganizations),
            (2.., 2..) => Some(NoLink::ManyOrganizationsAndAccounts),
            _ => None,
        };
        match &link {
            UserLink::NoSync(reason) => prop_assert_eq!(Some(*reason), expected_reason),
            UserLink::Unlinked => prop_assert_eq!((o.len(), a.len()), (0, 0)),
            UserLink::Link(_) | UserLink::AccountAndItsOrganization(_) => {
                prop_assert_eq!(expected_reason, None)
            }
        }
    }

    #[test]
    fn linking_only_ever_names_ids_it_was_given(orgs in ids(), accounts in ids()) {
        let (o, a) = (distinct(&orgs), distinct(&accounts));
        match link_user(&orgs, &accounts) {
            UserLink::Link(target) => {
                if let Some(account) = &target.account_id {
                    prop_assert!(a.contains(account.as_str()));
                    // A lone account is the one account there is.
                    prop_assert_eq!(a.len(), 1);
                }
                if let Some(org) = &target.organization_id {
                    prop_assert!(o.contains(org.as_str()));
                    prop_assert_eq!(o.len(), 1);
                }
            }
            UserLink::AccountAndItsOrganization(account) => {
                prop_assert!(a.contains(account.as_str()));
                prop_assert_eq!(a.len(), 1);
            }
            UserLink::NoSync(_) | UserLink::Unlinked => {}
        }
    }

    #[test]
    fn linking_ignores_order_and_repeats(
        (orgs, orgs_again) in ids().prop_flat_map(reordered_with_repeats),
        (accounts, accounts_again) in ids().prop_flat_map(reordered_with_repeats),
    ) {
        prop_assert_eq!(
            link_user(&orgs, &accounts),
            link_user(&orgs_again, &accounts_again)
        );
    }

    #[test]
    fn the_domain_fallback_picks_one_account_else_one_organization(
        users in prop::collection::vec(membership(), 0..5),
    ) {
        let accounts: BTreeSet<&str> =
            users.iter().flat_map(|u| u.account_ids.iter().map(String::as_str)).collect();
        let orgs: BTreeSet<&str> =
            users.iter().flat_map(|u| u.organization_ids.iter().map(String::as_str)).collect();
        let expected = if accounts.len() == 1 {
            DomainChoice::Account(accounts.iter().next().unwrap().to_string())
        } else if orgs.len() == 1 {
            DomainChoice::Organization(orgs.iter().next().unwrap().to_string())
        } else if accounts.is_empty() && orgs.is_empty() {
            DomainChoice::NoSync(DomainNoSync::Unknown)
        } else {
            DomainChoice::NoSync(DomainNoSync::Ambiguous)
        };
        prop_assert_eq!(choose_by_domain(&users), expected);
    }

    #[test]
    fn the_domain_fallback_ignores_the_order_of_users_and_repeated_users(
        (users, order) in prop::collection::vec(membership(), 0..5)
            .prop_flat_map(|users| (Just(users.clone()), Just(users).prop_shuffle())),
        repeat in prop::collection::vec(any::<Index>(), 0..3),
    ) {
        let mut again = order;
        if !users.is_empty() {
            again.extend(repeat.iter().map(|i| users[i.index(users.len())].clone()));
        }
        prop_assert_eq!(choose_by_domain(&users), choose_by_domain(&again));
    }

    #[test]
    fn free_mail_matching_ignores_ascii_case(
        domain in "[a-zA-Z0-9.-]{1,12}",
        others in prop::collection::vec("[a-zA-Z0-9.-]{1,12}", 0..4),
        flips in prop::collection::vec(any::<bool>(), 12),
        listed in any::<bool>(),
        at in any::<Index>(),
    ) {
        // The domain as the list spells it: same letters, any case.
        let respelled: String = domain
            .chars()
            .zip(flips.iter().cycle())
            .map(|(c, flip)| if *flip { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect();
        let mut list = others.clone();
        if listed {
            list.insert(at.index(list.len() + 1), respelled.clone());
        }
        let expected = list.iter().any(|d| lower(d) == lower(&domain));
        prop_assert_eq!(is_free_mail(&domain, &list), expected);
        prop_assert_eq!(is_free_mail(&respelled, &list), expected);
        prop_assert_eq!(is_free_mail(&domain.to_ascii_uppercase(), &list), expected);
        if listed {
            prop_assert!(expected);
        }
    }

    #[test]
    fn policy_applies_the_toggles_in_order(
        push_requests in any::<bool>(),
        update_requests in any::<bool>(),
        sync_threads in any::<bool>(),
        // Established this many seconds after the request was created (negative: before).
        established_after in prop_oneof![Just(0i64), Just(1), Just(-1), -864_000i64..864_000],
        change in prop_oneof![Just(Change::Created), Just(Change::Metadata), Just(Change::Thread)],
        backfill in any::<bool>(),
    ) {
        let lane = if backfill { Lane::Backfill } else { Lane::Live };
        let mut event = sample::full_event();
        event.change = change;
        let established_at: DateTime<Utc> =
            event.request.created_at + TimeDelta::seconds(established_after);
        let toggles = Toggles { push_requests, update_requests, sync_threads, established_at };

        let expected = if !push_requests {
            PolicyDecision::Skip(PolicySkip::PushDisabled)
        } else if !backfill && event.request.created_at < established_at {
            PolicyDecision::Skip(PolicySkip::BeforeIntegration)
        } else if change == Change::Thread && !sync_threads {
            PolicyDecision::Skip(PolicySkip::ThreadOnly)
        } else {
            PolicyDecision::Sync { may_update: update_requests }
        };
        prop_assert_eq!(decide(&event, &toggles, lane), expected);

        // Spelled as the product doc says it (a backfill is the explicit exception to
        // forward-only).
        match decide(&event, &toggles, lane) {
            PolicyDecision::Sync { may_update } => {
                prop_assert!(push_requests);
                prop_assert!(backfill || established_after <= 0, "forward-only: created before established");
                prop_assert!(change != Change::Thread || sync_threads);
                prop_assert_eq!(may_update, update_requests);
            }
            PolicyDecision::Skip(_) => prop_assert!(
                !push_requests
                    || (!backfill && established_after > 0)
                    || (change == Change::Thread && !sync_threads)
            ),
        }
    }
}

#[test]
fn the_oracle_maps_each_presence_pair_to_its_own_row_of_the_product_table() {
    // Guards the oracle itself: 0/1/many × 0/1/many hit the nine rows, one each.
    let rows: BTreeSet<usize> = (0..3)
        .flat_map(|orgs| (0..3).map(move |accounts| doc_row_index(orgs, accounts)))
        .collect();
    assert_eq!(rows, (0..9).collect());
    assert_eq!(doc_row(0, 0), "No sync*");
    assert_eq!(doc_row(1, 1), "Sync request with Organization and Account");
    assert_eq!(doc_row(5, 1), PRODUCT_TABLE[6].2);
}
