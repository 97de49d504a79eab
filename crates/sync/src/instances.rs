//! One instance per request, decided purely: which of several instances carrying a
//! request's externalId is kept, whether a failed create may still have been applied, and
//! what to do before creating again after such a create.
//!
//! A create whose answer is lost (a timeout, a broken connection, a 5xx) may have been
//! applied, and Vitally's search may not show it yet. The pipeline then marks the request
//! "create unconfirmed" and, until the mark is `settle` old, never creates again on an
//! empty search: it waits (retries) for the lost instance to surface. Whenever a search
//! finds several instances, the oldest is kept and the others are deleted.

use std::time::Duration;

use vitally_client::{
    client::Instance,
    error::{ErrorKind, VitallyError},
};

/// Whether a create that failed with `error` may nevertheless have been applied, so its
/// instance may exist (or appear later) in Vitally.
pub fn create_answer_lost(error: &VitallyError) -> bool {
    match error.kind() {
        // Sent, then no (readable) answer: Vitally may have applied it.
        ErrorKind::Timeout | ErrorKind::Transport | ErrorKind::Decode => true,
        // A server error or a gateway timeout may come after the write was applied.
        ErrorKind::Status(status) => status >= 500 || status == 408,
        // Never reached Vitally.
        ErrorKind::Connect | ErrorKind::InvalidRequest | ErrorKind::Refused => false,
    }
}

/// The instance to keep among those carrying one externalId, and the duplicates to delete.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen<'a> {
    pub keep: &'a Instance,
    pub duplicates: Vec<&'a Instance>,
}

/// The oldest instance is the one every earlier update went to (it was found first):
/// keep it, by `createdAt`, then id for a stable choice; one without a `createdAt` counts
/// as the newest. `None` when there is none.
pub fn choose(found: &[Instance]) -> Option<Chosen<'_>> {
    let mut sorted: Vec<&Instance> = found.iter().collect();
    sorted.sort_by(|a, b| {
        (a.created_at.is_none(), a.created_at, &a.id).cmp(&(
            b.created_at.is_none(),
            b.created_at,
            &b.id,
        ))
    });
    let (keep, duplicates) = sorted.split_first()?;
    Some(Chosen {
        keep,
        duplicates: duplicates.to_vec(),
    })
}

/// What to do when a request has an unconfirmed create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLostCreate {
    /// An instance is visible: use it (no create).
    Use {
        /// Every lost create has had time to surface: drop the mark.
        clear_mark: bool,
    },
    /// Nothing visible yet, and the lost create may still surface: retry later.
    Wait,
    /// Nothing visible long after the lost create: it was never applied; create.
    Create,
}

/// `found_any`: the search found an instance; `mark_age`: how long ago the create's answer
/// was lost; `settle`: how long a lost create may take to become searchable.
pub fn after_lost_create(found_any: bool, mark_age: Duration, settle: Duration) -> AfterLostCreate {
    match (found_any, mark_age >= settle) {
        (true, settled) => AfterLostCreate::Use {
            clear_mark: settled,
        },
        (false, false) => AfterLostCreate::Wait,
        (false, true) => AfterLostCreate::Create,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::Map;

    use super::*;

    fn instance(id: &str, created: Option<i64>) -> Instance {
        Instance {
            id: id.into(),
            external_id: "thena:T:1".into(),
            name: String::new(),
            customer_id: None,
            organization_id: None,
            traits: Map::new(),
            created_at: created.map(|s| Utc.timestamp_opt(s, 0).single().expect("valid")),
        }
    }

    #[test]
    fn the_oldest_instance_is_kept_and_every_other_is_a_duplicate() {
        assert_eq!(choose(&[]), None);
        let one = [instance("a", Some(5))];
        assert_eq!(choose(&one).map(|c| c.duplicates.len()), Some(0));

        let found = [
            instance("c", Some(30)),
            instance("x", None),
            instance("b", Some(10)),
            instance("a", Some(10)),
        ];
        let chosen = choose(&found).expect("some");
        assert_eq!(chosen.keep.id, "a", "oldest, then the smaller id");
        let ids: Vec<&str> = chosen.duplicates.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["b", "c", "x"]);
    }

    #[test]
    fn only_errors_after_the_request_was_sent_may_have_created_an_instance() {
        let lost = |kind| create_answer_lost(&VitallyError::new("instances.create", kind, ""));
        assert!(lost(ErrorKind::Timeout));
        assert!(lost(ErrorKind::Transport));
        assert!(lost(ErrorKind::Decode));
        assert!(lost(ErrorKind::Status(500)));
        assert!(lost(ErrorKind::Status(503)));
        assert!(lost(ErrorKind::Status(408)));
        assert!(!lost(ErrorKind::Status(400)));
        assert!(!lost(ErrorKind::Status(429)));
        assert!(!lost(ErrorKind::Status(404)));
        assert!(!lost(ErrorKind::Connect));
        assert!(!lost(ErrorKind::InvalidRequest));
        assert!(!lost(ErrorKind::Refused));
    }

    #[test]
    fn after_a_lost_create_an_empty_search_waits_until_the_create_settled() {
        let settle = Duration::from_secs(30);
        let young = Duration::from_secs(3);
        let old = Duration::from_secs(31);
        assert_eq!(
            after_lost_create(true, young, settle),
            AfterLostCreate::Use { clear_mark: false }
        );
        assert_eq!(
            after_lost_create(true, old, settle),
            AfterLostCreate::Use { clear_mark: true }
        );
        assert_eq!(
            after_lost_create(false, young, settle),
            AfterLostCreate::Wait
        );
        assert_eq!(
            after_lost_create(false, old, settle),
            AfterLostCreate::Create
        );
        assert_eq!(
            after_lost_create(false, settle, settle),
            AfterLostCreate::Create
        );
    }
}
