//! Where a request goes in Vitally: the product doc's linking table and the email-domain
//! fallback, as pure functions over ids. The I/O that feeds them lives in `resolve`.

use std::collections::BTreeSet;

use thena_events::Source;
use vitally_client::client::Link;

/// The Vitally customer records an instance is attached to (Vitally ids).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub account_id: Option<String>,
    pub organization_id: Option<String>,
}

impl Target {
    pub fn account(id: &str) -> Self {
        Self {
            account_id: Some(id.to_string()),
            organization_id: None,
        }
    }

    pub fn organization(id: &str) -> Self {
        Self {
            account_id: None,
            organization_id: Some(id.to_string()),
        }
    }

    pub fn both(account: &str, organization: &str) -> Self {
        Self {
            account_id: Some(account.to_string()),
            organization_id: Some(organization.to_string()),
        }
    }
}

/// Why a request is deliberately not linked anywhere ("No sync" in the product doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoLink {
    /// No organization, many accounts.
    ManyAccounts,
    /// Many organizations, no account.
    ManyOrganizations,
    /// Many organizations and many accounts.
    ManyOrganizationsAndAccounts,
    /// The requestor shared no email address, so there is nothing to fall back on.
    NoEmail,
    /// A free-mail domain says nothing about the customer: linking by it would leak data.
    FreeMailDomain,
    /// Nobody at the email domain belongs to any Vitally account or organization.
    DomainUnknown,
    /// Users at the email domain belong to several customers: no safe choice.
    DomainAmbiguous,
}

impl NoLink {
    pub fn as_str(self) -> &'static str {
        match self {
            NoLink::ManyAccounts => "user_in_many_accounts",
            NoLink::ManyOrganizations => "user_in_many_organizations",
            NoLink::ManyOrganizationsAndAccounts => "user_in_many_organizations_and_accounts",
            NoLink::NoEmail => "no_email",
            NoLink::FreeMailDomain => "free_mail_domain",
            NoLink::DomainUnknown => "domain_unknown",
            NoLink::DomainAmbiguous => "domain_ambiguous",
        }
    }
}

/// The product doc's linking-table row for these memberships, as the ledger shows it:
/// `"1 organization × many accounts"`.
pub fn table_row(organization_ids: &[String], account_ids: &[String]) -> String {
    fn count(ids: &[String], one: &str, many: &str) -> String {
        let distinct: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        match distinct.len() {
            0 => format!("no {one}"),
            1 => format!("1 {one}"),
            _ => format!("many {many}"),
        }
    }
    format!(
        "{} × {}",
        count(organization_ids, "organization", "organizations"),
        count(account_ids, "account", "accounts")
    )
}

/// What the linking table says for one user's memberships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserLink {
    Link(Target),
    /// Many organizations + one account: the account and *its* organization, which needs
    /// one more lookup (the account's `organizationId`).
    AccountAndItsOrganization(String),
    NoSync(NoLink),
    /// Linked nowhere: try the email-domain fallback.
    Unlinked,
}

enum Presence<'a> {
    None,
    One(&'a str),
    Many,
}

fn presence<'a>(ids: &BTreeSet<&'a str>) -> Presence<'a> {
    let mut iter = ids.iter();
    match (iter.next(), iter.next()) {
        (None, _) => Presence::None,
        (Some(&id), None) => Presence::One(id),
        (Some(_), Some(_)) => Presence::Many,
    }
}

/// The product doc's table: organization presence × account presence.
pub fn link_user(organization_ids: &[String], account_ids: &[String]) -> UserLink {
    let orgs: BTreeSet<&str> = organization_ids.iter().map(String::as_str).collect();
    let accounts: BTreeSet<&str> = account_ids.iter().map(String::as_str).collect();
    match (presence(&orgs), presence(&accounts)) {
        (Presence::None, Presence::None) => UserLink::Unlinked,
        (Presence::None, Presence::One(account)) => UserLink::Link(Target::account(account)),
        (Presence::None, Presence::Many) => UserLink::NoSync(NoLink::ManyAccounts),
        (Presence::One(org), Presence::None) => UserLink::Link(Target::organization(org)),
        (Presence::One(org), Presence::One(account)) => UserLink::Link(Target::both(account, org)),
        (Presence::One(org), Presence::Many) => UserLink::Link(Target::organization(org)),
        (Presence::Many, Presence::None) => UserLink::NoSync(NoLink::ManyOrganizations),
        (Presence::Many, Presence::One(account)) => {
            UserLink::AccountAndItsOrganization(account.to_string())
        }
        (Presence::Many, Presence::Many) => UserLink::NoSync(NoLink::ManyOrganizationsAndAccounts),
    }
}

/// Memberships of one Vitally user, as far as linking cares.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Memberships {
    pub organization_ids: Vec<String>,
    pub account_ids: Vec<String>,
}

/// Where the email-domain fallback puts a new user (and so the request).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DomainChoice {
    Account(String),
    Organization(String),
    NoSync(DomainNoSync),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DomainNoSync {
    Unknown,
    Ambiguous,
}

impl From<DomainNoSync> for NoLink {
    fn from(reason: DomainNoSync) -> Self {
        match reason {
            DomainNoSync::Unknown => NoLink::DomainUnknown,
            DomainNoSync::Ambiguous => NoLink::DomainAmbiguous,
        }
    }
}

/// Is the requestor's domain one the fallback must never use?
pub fn is_free_mail(domain: &str, free_mail_domains: &[String]) -> bool {
    free_mail_domains
        .iter()
        .any(|d| d.eq_ignore_ascii_case(domain))
}

/// The fallback over the users found at the requestor's email domain: exactly one account
/// among them wins; else exactly one organization; none or several is no sync.
pub fn choose_by_domain(users_at_domain: &[Memberships]) -> DomainChoice {
    let accounts: BTreeSet<&str> = users_at_domain
        .iter()
        .flat_map(|u| u.account_ids.iter().map(String::as_str))
        .collect();
    if let Presence::One(account) = presence(&accounts) {
        return DomainChoice::Account(account.to_string());
    }
    let orgs: BTreeSet<&str> = users_at_domain
        .iter()
        .flat_map(|u| u.organization_ids.iter().map(String::as_str))
        .collect();
    match (presence(&orgs), presence(&accounts)) {
        (Presence::One(org), _) => DomainChoice::Organization(org.to_string()),
        (Presence::None, Presence::None) => DomainChoice::NoSync(DomainNoSync::Unknown),
        (Presence::Many, _) | (Presence::None, Presence::Many | Presence::One(_)) => {
            DomainChoice::NoSync(DomainNoSync::Ambiguous)
        }
    }
}

/// The externalId of a requestor the domain fallback creates as a Vitally user, from
/// their id in the request's channel: every consumer creating the same person from the
/// same channel then upserts one user. Slack ids keep the form used before other channels
/// existed (`thena:{ws}:{slack id}`), so users created then are matched, not doubled; an
/// email requestor, or one whose channel id is unknown, is known by the address. (Across
/// channels a person is one user because the user is looked up by email first.)
pub fn user_external_id(ws: &str, source: Source, channel_id: Option<&str>, email: &str) -> String {
    match (source, channel_id) {
        (Source::Slack, Some(id)) => format!("thena:{ws}:{id}"),
        (Source::Web | Source::MsTeams, Some(id)) => format!("thena:{ws}:{}:{id}", source.as_str()),
        (Source::Email, _) | (_, None) => format!("thena:{ws}:{email}"),
    }
}

/// How a request's instance follows its linking from one version to the next. The table
/// is applied at every version, and what it says now is written explicitly:
///
/// | before → now | write |
/// |---|---|
/// | no instance → linked | create with the target's links |
/// | no instance → no sync | nothing (skipped by the reason) |
/// | linked → linked (same, moved, or fewer links) | both links, each set or `null` |
/// | linked → no sync | traits only, links absent: the last link stays (`link_lost`) |
/// | link lost → linked again | both links, each set or `null` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relink {
    /// Create here, or move the instance here: a link the target lacks is cleared, never
    /// left behind from an earlier linking.
    Link { account: Link, organization: Link },
    /// Linking says no sync, but the request has an instance: it keeps its last link
    /// and its traits stay current. Counted as `link_lost`, with the reason.
    KeepLast(NoLink),
    /// No sync and nothing in Vitally to keep current.
    Skip(NoLink),
}

/// The write for a request linked as `linked` now; `has_instance`: an earlier version of
/// it reached Vitally. A target always names an account or an organization.
pub fn relink(linked: Result<&Target, NoLink>, has_instance: bool) -> Relink {
    match (linked, has_instance) {
        (Ok(target), _) => Relink::Link {
            account: Link::to(target.account_id.as_deref()),
            organization: Link::to(target.organization_id.as_deref()),
        },
        (Err(reason), true) => Relink::KeepLast(reason),
        (Err(reason), false) => Relink::Skip(reason),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_table_row_counts_distinct_memberships() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            table_row(&ids(&["o"]), &ids(&["a"])),
            "1 organization × 1 account"
        );
        assert_eq!(
            table_row(&ids(&[]), &ids(&["a", "b", "a"])),
            "no organization × many accounts"
        );
        assert_eq!(
            table_row(&ids(&["o", "o"]), &ids(&[])),
            "1 organization × no account"
        );
    }

    use super::*;

    fn ids(n: usize, prefix: &str) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn every_row_of_the_product_table() {
        use UserLink::*;
        let rows: [(usize, usize, UserLink); 9] = [
            (0, 0, Unlinked),
            (0, 1, Link(Target::account("a0"))),
            (0, 2, NoSync(NoLink::ManyAccounts)),
            (1, 0, Link(Target::organization("o0"))),
            (1, 1, Link(Target::both("a0", "o0"))),
            (1, 2, Link(Target::organization("o0"))),
            (2, 0, NoSync(NoLink::ManyOrganizations)),
            (2, 1, AccountAndItsOrganization("a0".into())),
            (2, 2, NoSync(NoLink::ManyOrganizationsAndAccounts)),
        ];
        for (orgs, accounts, expected) in rows {
            assert_eq!(
                link_user(&ids(orgs, "o"), &ids(accounts, "a")),
                expected,
                "{orgs} orgs × {accounts} accounts"
            );
        }
    }

    #[test]
    fn repeated_ids_count_once() {
        let twice = vec!["a0".to_string(), "a0".to_string()];
        assert_eq!(
            link_user(&[], &twice),
            UserLink::Link(Target::account("a0"))
        );
    }

    fn member(orgs: &[&str], accounts: &[&str]) -> Memberships {
        Memberships {
            organization_ids: orgs.iter().map(|s| s.to_string()).collect(),
            account_ids: accounts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_domain_fallback_prefers_one_account_then_one_organization() {
        assert_eq!(
            choose_by_domain(&[member(&[], &["a"]), member(&["o"], &["a"])]),
            DomainChoice::Account("a".into())
        );
        assert_eq!(
            choose_by_domain(&[member(&["o"], &["a", "b"])]),
            DomainChoice::Organization("o".into())
        );
        assert_eq!(
            choose_by_domain(&[member(&["o"], &[])]),
            DomainChoice::Organization("o".into())
        );
        assert_eq!(
            choose_by_domain(&[]),
            DomainChoice::NoSync(DomainNoSync::Unknown)
        );
        assert_eq!(
            choose_by_domain(&[member(&[], &[])]),
            DomainChoice::NoSync(DomainNoSync::Unknown)
        );
        assert_eq!(
            choose_by_domain(&[member(&[], &["a", "b"])]),
            DomainChoice::NoSync(DomainNoSync::Ambiguous)
        );
        assert_eq!(
            choose_by_domain(&[member(&["o", "p"], &["a", "b"])]),
            DomainChoice::NoSync(DomainNoSync::Ambiguous)
        );
    }

    /// The instance's link after a request's write, as Vitally applies it (an absent
    /// link is kept, a `null` one cleared); `None`: no instance.
    fn after(before: Option<&Target>, now: Result<&Target, NoLink>) -> Option<Target> {
        match relink(now, before.is_some()) {
            Relink::Link {
                account,
                organization,
            } => Some(Target {
                account_id: account.apply(before.and_then(|b| b.account_id.as_deref())),
                organization_id: organization
                    .apply(before.and_then(|b| b.organization_id.as_deref())),
            }),
            Relink::KeepLast(_) => before.cloned(),
            Relink::Skip(_) => None,
        }
    }

    type Transition<'a> = (
        &'a str,
        Option<&'a Target>,
        Result<&'a Target, NoLink>,
        Option<&'a Target>,
    );

    #[test]
    fn every_linking_transition_lands_where_the_table_says_now_or_keeps_the_last_link() {
        let a = Target::both("acc-a", "org-a");
        let b = Target::both("acc-b", "org-b");
        let account = Target::account("acc-a");
        let org = Target::organization("org-a");
        let lost = NoLink::ManyAccounts;
        // (case, instance linked before, linking now, instance linked after)
        let cases: [Transition; 9] = [
            ("never synced → linked", None, Ok(&a), Some(&a)),
            ("never synced → no sync", None, Err(lost), None),
            ("linked A → linked B", Some(&a), Ok(&b), Some(&b)),
            (
                "org + account → account only",
                Some(&a),
                Ok(&account),
                Some(&account),
            ),
            ("org + account → org only", Some(&a), Ok(&org), Some(&org)),
            (
                "account only → org + account",
                Some(&account),
                Ok(&a),
                Some(&a),
            ),
            (
                "org only → account only",
                Some(&org),
                Ok(&account),
                Some(&account),
            ),
            (
                "linked → no sync keeps the last link",
                Some(&a),
                Err(lost),
                Some(&a),
            ),
            ("unchanged", Some(&b), Ok(&b), Some(&b)),
        ];
        for (case, before, now, expected) in cases {
            assert_eq!(after(before, now), expected.cloned(), "{case}");
        }
        assert_eq!(relink(Err(lost), true), Relink::KeepLast(lost));
        assert_eq!(relink(Err(lost), false), Relink::Skip(lost));
        assert_eq!(
            relink(Ok(&account), true),
            Relink::Link {
                account: Link::Set("acc-a".into()),
                organization: Link::Clear,
            },
            "a dropped organization is cleared explicitly"
        );
    }

    #[test]
    fn a_created_user_s_external_id_comes_from_the_channel_s_own_identity() {
        let id = |source, channel_id| user_external_id("T1", source, channel_id, "h@thena.ai");
        assert_eq!(id(Source::Slack, Some("U123")), "thena:T1:U123");
        assert_eq!(id(Source::MsTeams, Some("8f6c")), "thena:T1:ms_teams:8f6c");
        assert_eq!(id(Source::Web, Some("portal-42")), "thena:T1:web:portal-42");
        assert_eq!(id(Source::Email, None), "thena:T1:h@thena.ai");
        assert_eq!(id(Source::Email, Some("ignored")), "thena:T1:h@thena.ai");
        for source in Source::ALL {
            assert_eq!(id(source, None), "thena:T1:h@thena.ai", "{source:?}");
        }
    }

    #[test]
    fn free_mail_is_matched_case_insensitively() {
        let list = vec!["gmail.com".to_string()];
        assert!(is_free_mail("GMail.com", &list));
        assert!(!is_free_mail("thena.ai", &list));
    }
}
