//! A small Vitally customer base that exercises every row of the product doc's linking
//! table and every branch of the email-domain fallback. The demo seeds it into the fake;
//! the integration tests assert each persona lands exactly where [`Expect`] says.

use serde_json::{Value, json};

/// Where a persona's request must end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Linked to this account and/or organization (fixture ids).
    Linked {
        account: Option<&'static str>,
        organization: Option<&'static str>,
    },
    /// Not synced, counted under this skip reason.
    Skipped(&'static str),
}

/// A requestor and the linking case it demonstrates.
#[derive(Debug, Clone, Copy)]
pub struct Persona {
    /// The case, as the product doc or the fallback names it.
    pub case: &'static str,
    pub name: &'static str,
    pub email: Option<&'static str>,
    pub expect: Expect,
}

const fn linked(account: Option<&'static str>, organization: Option<&'static str>) -> Expect {
    Expect::Linked {
        account,
        organization,
    }
}

pub const PERSONAS: &[Persona] = &[
    Persona {
        case: "1 org × 1 account → org + account",
        name: "Alice",
        email: Some("alice@acme.com"),
        expect: linked(Some("acc-acme-eu"), Some("org-acme")),
    },
    Persona {
        case: "1 org × 0 accounts → org",
        name: "Bob",
        email: Some("bob@globex.com"),
        expect: linked(None, Some("org-globex")),
    },
    Persona {
        case: "1 org × many accounts → org",
        name: "Carol",
        email: Some("carol@acme.com"),
        expect: linked(None, Some("org-acme")),
    },
    Persona {
        case: "0 orgs × 1 account → account",
        name: "Dave",
        email: Some("dave@solo.io"),
        expect: linked(Some("acc-solo"), None),
    },
    Persona {
        case: "0 orgs × many accounts → no sync",
        name: "Gina",
        email: Some("gina@multi.co"),
        expect: Expect::Skipped("user_in_many_accounts"),
    },
    Persona {
        case: "many orgs × 0 accounts → no sync",
        name: "Hank",
        email: Some("hank@conglo.com"),
        expect: Expect::Skipped("user_in_many_organizations"),
    },
    Persona {
        case: "many orgs × 1 account → account + its org",
        name: "Ivy",
        email: Some("ivy@conglo.com"),
        expect: linked(Some("acc-globex"), Some("org-globex")),
    },
    Persona {
        case: "many orgs × many accounts → no sync",
        name: "Jack",
        email: Some("jack@conglo.com"),
        expect: Expect::Skipped("user_in_many_organizations_and_accounts"),
    },
    Persona {
        case: "0 orgs × 0 accounts → domain fallback (one account)",
        name: "Erin",
        email: Some("erin@umbrella.com"),
        expect: linked(Some("acc-umbrella"), None),
    },
    Persona {
        case: "unknown user → domain has one account → user created there",
        name: "Newbie",
        email: Some("newbie@initech.com"),
        expect: linked(Some("acc-initech"), None),
    },
    Persona {
        case: "unknown user → domain has one organization → user created there",
        name: "Stranger",
        email: Some("stranger@wayne.com"),
        expect: linked(None, Some("org-wayne")),
    },
    Persona {
        case: "unknown user → nobody at the domain → no sync",
        name: "Nobody",
        email: Some("nobody@unknown-corp.com"),
        expect: Expect::Skipped("domain_unknown"),
    },
    Persona {
        case: "unknown user → several customers at the domain → no sync",
        name: "Pat",
        email: Some("pat@shared.io"),
        expect: Expect::Skipped("domain_ambiguous"),
    },
    Persona {
        case: "unknown user at a free-mail domain → no sync",
        name: "Gmail User",
        email: Some("someone@gmail.com"),
        expect: Expect::Skipped("free_mail_domain"),
    },
    Persona {
        case: "no email shared → no sync",
        name: "Anonymous",
        email: None,
        expect: Expect::Skipped("no_email"),
    },
];

/// The fake Vitally's seed (`POST /_fake/seed` body, or `FakeVitally::seed`).
pub fn fixture() -> Value {
    let user = |id: &str, email: &str, orgs: &[&str], accounts: &[&str]| {
        json!({"id": id, "externalId": format!("crm-{id}"), "name": id, "email": email,
               "organizationIds": orgs, "accountIds": accounts})
    };
    json!({
        "organizations": [
            {"id": "org-acme", "externalId": "acme", "name": "Acme Corp"},
            {"id": "org-globex", "externalId": "globex", "name": "Globex"},
            {"id": "org-wayne", "externalId": "wayne", "name": "Wayne Enterprises"},
            {"id": "org-initech", "externalId": "initech", "name": "Initech Holdings"},
        ],
        "accounts": [
            {"id": "acc-acme-eu", "externalId": "acme-eu", "name": "Acme EU", "organizationId": "org-acme"},
            {"id": "acc-acme-us", "externalId": "acme-us", "name": "Acme US", "organizationId": "org-acme"},
            {"id": "acc-globex", "externalId": "globex-main", "name": "Globex Main", "organizationId": "org-globex"},
            {"id": "acc-solo", "externalId": "solo", "name": "Solo IO"},
            {"id": "acc-multi-a", "externalId": "multi-a", "name": "Multi A"},
            {"id": "acc-multi-b", "externalId": "multi-b", "name": "Multi B"},
            {"id": "acc-umbrella", "externalId": "umbrella", "name": "Umbrella"},
            {"id": "acc-initech", "externalId": "initech-main", "name": "Initech", "organizationId": "org-initech"},
            {"id": "acc-shared-1", "externalId": "shared-1", "name": "Shared One"},
            {"id": "acc-shared-2", "externalId": "shared-2", "name": "Shared Two"},
        ],
        "users": [
            user("u-alice", "alice@acme.com", &["org-acme"], &["acc-acme-eu"]),
            user("u-bob", "bob@globex.com", &["org-globex"], &[]),
            user("u-carol", "carol@acme.com", &["org-acme"], &["acc-acme-eu", "acc-acme-us"]),
            user("u-dave", "dave@solo.io", &[], &["acc-solo"]),
            user("u-gina", "gina@multi.co", &[], &["acc-multi-a", "acc-multi-b"]),
            user("u-hank", "hank@conglo.com", &["org-acme", "org-globex"], &[]),
            user("u-ivy", "ivy@conglo.com", &["org-acme", "org-globex"], &["acc-globex"]),
            user("u-jack", "jack@conglo.com", &["org-acme", "org-globex"], &["acc-acme-eu", "acc-globex"]),
            user("u-erin", "erin@umbrella.com", &[], &[]),
            user("u-frank", "frank@umbrella.com", &[], &["acc-umbrella"]),
            user("u-ken", "ken@initech.com", &["org-initech"], &["acc-initech"]),
            user("u-leo", "leo@wayne.com", &["org-wayne"], &[]),
            user("u-nina", "nina@shared.io", &[], &["acc-shared-1"]),
            user("u-oscar", "oscar@shared.io", &[], &["acc-shared-2"]),
        ],
    })
}
