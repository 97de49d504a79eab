//! Integration health: a paused integration (Vitally rejected its key, or its object is
//! gone) is probed every `HEALTH_PROBE_INTERVAL` with one cheap call, and resumed as soon
//! as Vitally accepts it again. Its held events then flow by themselves.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vitally_client::{
    client::VitallyHttp,
    integrations::{Health, Integration, IntegrationStore},
    limiter::{Admission, RateLimiter},
};

pub struct HealthProbe {
    pub store: IntegrationStore,
    pub http: VitallyHttp,
    pub limiter: RateLimiter,
    pub interval: Duration,
    pub metrics: crate::metrics::SyncMetrics,
}

/// What one probe of a paused integration says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Heals,
    StillPaused,
}

/// Pure: does this answer to "list the custom objects" heal this pause?
pub fn verdict(health: Health, object_id: &str, listed: Option<&[String]>) -> Verdict {
    match (health, listed) {
        (Health::Healthy, _) | (_, None) => Verdict::StillPaused,
        (Health::AuthRejected, Some(_)) => Verdict::Heals,
        (Health::ObjectMissing, Some(ids)) if ids.iter().any(|id| id == object_id) => {
            Verdict::Heals
        }
        (Health::ObjectMissing, Some(_)) => Verdict::StillPaused,
    }
}

impl HealthProbe {
    pub const ACTOR: &'static str = "health-probe";

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            if let Err(e) = self.probe_all().await {
                tracing::warn!(error = %e, "health probe could not list integrations");
            }
        }
    }

    /// Probes every paused integration once and reports those still paused; returns how
    /// many resumed.
    pub async fn probe_all(&self) -> anyhow::Result<usize> {
        let mut resumed = 0;
        let mut still_paused = Vec::new();
        for integration in self.store.paused().await? {
            if self.probe(&integration).await {
                resumed += 1;
            } else {
                still_paused.push(integration);
            }
        }
        let gauge = &self.metrics.integration_paused;
        gauge.reset();
        for integration in &still_paused {
            gauge
                .with_label_values(&[&integration.workspace_id, integration.health.as_str()])
                .set(1);
        }
        Ok(resumed)
    }

    async fn probe(&self, integration: &Integration) -> bool {
        let admitted = self
            .limiter
            .acquire_as(
                integration.budget_key(),
                &integration.workspace_id,
                integration.rate_budget_per_min,
                Duration::from_secs(1),
            )
            .await;
        if !matches!(admitted, Admission::Granted) {
            return false;
        }
        let listed = integration
            .client(&self.http)
            .custom_objects()
            .await
            .map(|objects| objects.into_iter().map(|o| o.id).collect::<Vec<_>>());
        let ids = listed.as_ref().ok().map(Vec::as_slice);
        if verdict(integration.health, &integration.custom_object_id, ids) == Verdict::StillPaused {
            return false;
        }
        match self
            .store
            .set_health(
                &integration.workspace_id,
                Some(integration.revision),
                Health::Healthy,
                None,
                Self::ACTOR,
            )
            .await
        {
            Ok(changed) => {
                if changed {
                    tracing::info!(workspace = %integration.workspace_id, "integration healed; its held events flow again");
                }
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the resume");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepted_key_heals_a_rejected_one_and_only_the_object_heals_its_absence() {
        let ids = vec!["co1".to_owned()];
        assert_eq!(
            verdict(Health::AuthRejected, "co1", Some(&ids)),
            Verdict::Heals
        );
        assert_eq!(
            verdict(Health::AuthRejected, "co1", None),
            Verdict::StillPaused
        );
        assert_eq!(
            verdict(Health::ObjectMissing, "co1", Some(&ids)),
            Verdict::Heals
        );
        assert_eq!(
            verdict(Health::ObjectMissing, "co2", Some(&ids)),
            Verdict::StillPaused
        );
        assert_eq!(
            verdict(Health::Healthy, "co1", Some(&ids)),
            Verdict::StillPaused
        );
    }
}
