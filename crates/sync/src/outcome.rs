//! How one event ended. Every delivery ends in exactly one of these, and each is counted.

use thena_broker::Wake;

use crate::{linking::NoLink, policy::PolicySkip};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Vitally answered 2xx.
    Synced { write: Write },
    /// Deliberately not synced; acked and counted by reason.
    Skipped(Skip),
    /// The integration is out of budget (or paused after a 429), or another consumer holds
    /// the request: come back later through a delay queue, freeing the slot now.
    Deferred { wake: Wake, reason: &'static str },
    /// The integration is paused (Vitally rejects its key, its object is gone, or this
    /// replica cannot decrypt its header): the event waits in a delay queue, costs no
    /// attempt and no Vitally call, and flows again once the integration heals.
    Held { reason: &'static str },
    /// A transient failure: dead-lettered for the replayer's backoff.
    Retry { reason: String, error: String },
    /// A permanent failure: parked for a human.
    Park { reason: String, error: String },
}

/// What a sync wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Created,
    Updated,
    /// Updated the traits of an instance whose request links nowhere now (the requestor
    /// joined a second account, say): it keeps its last link.
    LinkKept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    Policy(PolicySkip),
    NoLink(NoLink),
    /// A newer version of the request was already applied.
    StaleVersion,
    /// This very version was already applied (a redelivery).
    AlreadyApplied,
    /// The instance exists and `update_requests` is off.
    UpdateDisabled,
    /// The workspace was never connected (read from PostgreSQL past every cache).
    NeverConnected,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Policy(reason) => reason.as_str(),
            Skip::NoLink(reason) => reason.as_str(),
            Skip::StaleVersion => "stale_version",
            Skip::AlreadyApplied => "already_applied",
            Skip::UpdateDisabled => "update_disabled",
            Skip::NeverConnected => "never_connected",
        }
    }
}

impl Outcome {
    /// The metric label pair (outcome, reason).
    pub fn labels(&self) -> (&'static str, String) {
        match self {
            Outcome::Synced {
                write: Write::Created,
            } => ("synced", "created".into()),
            Outcome::Synced {
                write: Write::Updated,
            } => ("synced", "updated".into()),
            Outcome::Synced {
                write: Write::LinkKept,
            } => ("synced", "link_lost".into()),
            Outcome::Skipped(skip) => ("skipped", skip.as_str().into()),
            Outcome::Deferred { reason, .. } => ("deferred", (*reason).into()),
            Outcome::Held { reason } => ("held", (*reason).into()),
            Outcome::Retry { reason, .. } => ("retried", reason.clone()),
            Outcome::Park { reason, .. } => ("parked", reason.clone()),
        }
    }
}
