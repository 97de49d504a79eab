//! The integration's toggles and the forward-only rule, as one pure decision.

use chrono::{DateTime, Utc};
use thena_events::{Change, RequestChanged};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySkip {
    /// `push_requests` is off for the workspace.
    PushDisabled,
    /// The request was created before the integration was established (forward-only).
    BeforeIntegration,
    /// Only thread messages changed and the integration syncs threads with the next
    /// metadata change (the product doc's behaviour).
    ThreadOnly,
}

impl PolicySkip {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicySkip::PushDisabled => "push_disabled",
            PolicySkip::BeforeIntegration => "before_integration",
            PolicySkip::ThreadOnly => "thread_only",
        }
    }
}

/// Which queue an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Thena's live changes.
    Live,
    /// Historical snapshots an operator imported (`backfill`): past the forward-only rule
    /// by that explicit choice, on slots and a share of the budget of their own.
    Backfill,
}

/// The part of an integration record policy reads.
#[derive(Debug, Clone, Copy)]
pub struct Toggles {
    pub push_requests: bool,
    pub update_requests: bool,
    pub sync_threads: bool,
    pub established_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyDecision {
    /// Sync it; existing instances are updated only when `may_update`.
    Sync {
        may_update: bool,
    },
    Skip(PolicySkip),
}

pub fn decide(event: &RequestChanged, toggles: &Toggles, lane: Lane) -> PolicyDecision {
    if !toggles.push_requests {
        return PolicyDecision::Skip(PolicySkip::PushDisabled);
    }
    let forward_only = match lane {
        Lane::Live => true,
        Lane::Backfill => false,
    };
    if forward_only && event.request.created_at < toggles.established_at {
        return PolicyDecision::Skip(PolicySkip::BeforeIntegration);
    }
    let thread_only = match event.change {
        Change::Thread => true,
        Change::Created | Change::Metadata => false,
    };
    if thread_only && !toggles.sync_threads {
        return PolicyDecision::Skip(PolicySkip::ThreadOnly);
    }
    PolicyDecision::Sync {
        may_update: toggles.update_requests,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use thena_events::sample;

    use super::*;

    fn toggles() -> Toggles {
        Toggles {
            push_requests: true,
            update_requests: true,
            sync_threads: false,
            established_at: sample::full_event().request.created_at - Duration::hours(1),
        }
    }

    #[test]
    fn each_toggle_decides() {
        let event = sample::full_event();
        assert_eq!(
            decide(&event, &toggles(), Lane::Live),
            PolicyDecision::Sync { may_update: true }
        );
        let off = Toggles {
            push_requests: false,
            ..toggles()
        };
        assert_eq!(
            decide(&event, &off, Lane::Live),
            PolicyDecision::Skip(PolicySkip::PushDisabled)
        );
        let no_update = Toggles {
            update_requests: false,
            ..toggles()
        };
        assert_eq!(
            decide(&event, &no_update, Lane::Live),
            PolicyDecision::Sync { may_update: false }
        );
        let later = Toggles {
            established_at: event.request.created_at + Duration::seconds(1),
            ..toggles()
        };
        assert_eq!(
            decide(&event, &later, Lane::Live),
            PolicyDecision::Skip(PolicySkip::BeforeIntegration)
        );
    }

    #[test]
    fn a_backfilled_snapshot_passes_the_forward_only_rule_and_nothing_else() {
        let event = sample::full_event();
        let later = Toggles {
            established_at: event.request.created_at + Duration::days(30),
            ..toggles()
        };
        assert_eq!(
            decide(&event, &later, Lane::Backfill),
            PolicyDecision::Sync { may_update: true }
        );
        let off = Toggles {
            push_requests: false,
            ..later
        };
        assert_eq!(
            decide(&event, &off, Lane::Backfill),
            PolicyDecision::Skip(PolicySkip::PushDisabled)
        );
        let mut thread = event.clone();
        thread.change = Change::Thread;
        assert_eq!(
            decide(&thread, &later, Lane::Backfill),
            PolicyDecision::Skip(PolicySkip::ThreadOnly)
        );
    }

    #[test]
    fn thread_only_changes_wait_for_metadata_unless_threads_sync() {
        let mut event = sample::full_event();
        event.change = Change::Thread;
        assert_eq!(
            decide(&event, &toggles(), Lane::Live),
            PolicyDecision::Skip(PolicySkip::ThreadOnly)
        );
        let threads = Toggles {
            sync_threads: true,
            ..toggles()
        };
        assert_eq!(
            decide(&event, &threads, Lane::Live),
            PolicyDecision::Sync { may_update: true }
        );
    }
}
