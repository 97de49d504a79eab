//! The `dlq` operations against the real local RabbitMQ.

#[path = "../../broker/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use thena_broker::{Broker, Failure, FailureClass, Topology, WORKSPACE_HEADER};
use thena_events::RequestChanged;
use thena_replayer::dlq::{
    self, DlqError, DlqFilter, DlqQueue, Page, REPLAYED_AT_HEADER, REPLAYED_BY_HEADER,
    ReplayOptions,
};

const WAIT: Duration = Duration::from_secs(5);

/// Parks `event` the way the replayer does, with a permanent failure of `reason`.
async fn park(broker: &Broker, event: &RequestChanged, reason: &str) {
    let publisher = broker.publisher().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        WORKSPACE_HEADER.into(),
        AMQPValue::LongString(event.workspace_id.as_str().into()),
    );
    let props = BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    let failure = Failure::new(
        FailureClass::Permanent,
        reason,
        format!("{reason} happened"),
        broker.topology().exchange(),
        Topology::routing_key(&event.workspace_id),
        Utc::now(),
    );
    publisher
        .park(&serde_json::to_vec(event).unwrap(), &props, &failure)
        .await
        .unwrap();
}

fn by_workspace(workspace: &str) -> DlqFilter {
    DlqFilter {
        workspace: Some(workspace.into()),
        ..DlqFilter::default()
    }
}

fn options(dry_run: bool) -> ReplayOptions {
    ReplayOptions {
        dry_run,
        rate_per_sec: Some(20.0),
        actor: "ops@thena.ai".into(),
        reason: "INC-42 Vitally outage over".into(),
    }
}

#[tokio::test]
async fn list_and_show_read_parked_messages_without_losing_them() {
    with_broker(test_topology(), |broker| async move {
        let a1 = thena_events::sample::event("WA", 1, 1, None);
        let a2 = thena_events::sample::event("WA", 2, 1, None);
        let b1 = thena_events::sample::event("WB", 3, 1, None);
        park(&broker, &a1, "no_integration").await;
        park(&broker, &a2, "no_integration").await;
        park(&broker, &b1, "vitally_404").await;

        let all = dlq::list(&broker, &DlqFilter::default(), Page::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 3);
        let first = all
            .iter()
            .find(|e| e.event_id == a1.event_id.to_string())
            .unwrap();
        assert_eq!(first.workspace, "WA");
        assert_eq!(first.request_id, Some(1));
        assert_eq!(first.reason, "no_integration");
        assert_eq!(first.class, Some(FailureClass::Permanent));
        assert!(first.age.is_some());

        let only_a = dlq::list(&broker, &by_workspace("WA"), Page::default())
            .await
            .unwrap();
        assert_eq!(only_a.len(), 2);
        let by_reason = DlqFilter {
            reason: Some("vitally_404".into()),
            ..DlqFilter::default()
        };
        let b = dlq::list(&broker, &by_reason, Page::default())
            .await
            .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].event_id, b1.event_id.to_string());
        let page = dlq::list(
            &broker,
            &DlqFilter::default(),
            Page {
                offset: 1,
                limit: 1,
            },
        )
        .await
        .unwrap();
        assert_eq!(page.len(), 1);
        let by_id = DlqFilter {
            ids: vec![a2.event_id.to_string()],
            ..DlqFilter::default()
        };
        assert_eq!(
            dlq::list(&broker, &by_id, Page::default()).await.unwrap()[0].request_id,
            Some(2)
        );
        let table = dlq::render_table(&all);
        assert_eq!(table.lines().count(), 4, "{table}");

        let shown = dlq::show(&broker, &b1.event_id.to_string()).await.unwrap();
        assert!(shown.starts_with("queue: parked\n"), "{shown}");
        assert!(shown.contains("x-thena-reason: vitally_404"), "{shown}");
        assert!(shown.contains("\"workspace_id\": \"WB\""), "{shown}");
        let missing = dlq::show(&broker, "no-such-event").await.unwrap_err();
        assert!(matches!(missing, DlqError::NotFound(_)), "{missing}");

        // Looking changed nothing.
        let channel = broker.channel().await.unwrap();
        assert!(
            eventually(WAIT, || async {
                depth(&channel, &broker.topology().parked_queue()).await == 3
            })
            .await
        );
    })
    .await;
}

#[tokio::test]
async fn replay_republishes_to_the_original_route_once_with_an_audit_trail() {
    with_broker(test_topology(), |broker| async move {
        let topology = broker.topology().clone();
        let a1 = thena_events::sample::event("WA", 1, 1, None);
        let a2 = thena_events::sample::event("WA", 2, 1, None);
        let b1 = thena_events::sample::event("WB", 3, 1, None);
        park(&broker, &a1, "no_integration").await;
        park(&broker, &a2, "no_integration").await;
        park(&broker, &b1, "vitally_404").await;
        let channel = broker.channel().await.unwrap();

        // Dry run: reports, moves nothing.
        let dry = dlq::replay(&broker, &by_workspace("WA"), &options(true), |_, _| {})
            .await
            .unwrap();
        assert_eq!((dry.matched, dry.replayed, dry.skipped), (2, 0, 1));
        assert_eq!(dry.audit.len(), 2);
        assert!(dry.audit.iter().all(|line| line.dry_run));
        assert!(dry.render().contains("would replay"), "{}", dry.render());
        assert_eq!(depth(&channel, &topology.sync_queue()).await, 0);

        // For real, rate limited to 20/s.
        let mut progress = Vec::new();
        let started = Instant::now();
        let report = dlq::replay(
            &broker,
            &by_workspace("WA"),
            &options(false),
            |done, total| progress.push((done, total)),
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "rate limited"
        );
        assert_eq!((report.matched, report.replayed, report.skipped), (2, 2, 1));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(progress, vec![(1, 2), (2, 2)]);
        let audit = &report.audit[0];
        assert_eq!(audit.actor, "ops@thena.ai");
        assert_eq!(audit.why, "INC-42 Vitally outage over");
        assert_eq!(audit.to_exchange, topology.exchange());
        assert_eq!(audit.to_routing_key, "request.WA");

        let mut replayed = Vec::new();
        for _ in 0..2 {
            let message = take(&channel, &topology.sync_queue(), WAIT)
                .await
                .expect("replayed onto the sync queue");
            assert_eq!(message.delivery.routing_key.as_str(), "request.WA");
            let headers = message.delivery.properties.headers().clone().unwrap();
            assert!(Failure::from_headers(&headers).is_none());
            assert!(!headers.contains_key("x-thena-reason"));
            assert_eq!(
                header(&message, REPLAYED_BY_HEADER).as_deref(),
                Some("ops@thena.ai")
            );
            assert!(header(&message, REPLAYED_AT_HEADER).is_some());
            assert_eq!(header(&message, WORKSPACE_HEADER).as_deref(), Some("WA"));
            replayed.push(
                thena_events::decode_event(&message.delivery.data)
                    .unwrap()
                    .request
                    .id,
            );
        }
        replayed.sort_unstable();
        assert_eq!(replayed, vec![1, 2]);

        // A second replay finds nothing to do; the other workspace's message is untouched.
        let again = dlq::replay(&broker, &by_workspace("WA"), &options(false), |_, _| {})
            .await
            .unwrap();
        assert_eq!((again.matched, again.replayed, again.skipped), (0, 0, 1));
        assert_eq!(depth(&channel, &topology.sync_queue()).await, 0);
        assert!(
            eventually(WAIT, || async {
                depth(&channel, &topology.parked_queue()).await == 1
            })
            .await
        );
    })
    .await;
}

#[tokio::test]
async fn purge_needs_confirmation_and_an_empty_queue_is_nothing_to_do() {
    with_broker(test_topology(), |broker| async move {
        park(
            &broker,
            &thena_events::sample::event("WA", 1, 1, None),
            "no_integration",
        )
        .await;

        let refused = dlq::purge(&broker, DlqQueue::Parked, false)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, DlqError::ConfirmRequired { messages: 1, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("--yes-really"), "{refused}");
        assert_eq!(
            dlq::list(&broker, &DlqFilter::default(), Page::default())
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            eventually(WAIT, || async {
                dlq::purge(&broker, DlqQueue::Parked, true)
                    .await
                    .unwrap_or(0)
                    == 1
            })
            .await
        );

        // An empty queue is nothing to do, said like a filter that matches nothing.
        let empty = dlq::list(&broker, &DlqFilter::default(), Page::default())
            .await
            .unwrap();
        assert!(empty.is_empty());
        let nothing = dlq::replay(&broker, &DlqFilter::default(), &options(false), |_, _| {})
            .await
            .unwrap();
        assert_eq!((nothing.matched, nothing.replayed), (0, 0));
        assert_eq!(
            nothing.render(),
            "no matching messages in the parked queue: nothing to do\n"
        );
        assert_eq!(nothing.render(), dlq::nothing_to_do(DlqQueue::Parked));
        let dead = DlqFilter {
            queue: DlqQueue::Dead,
            ..DlqFilter::default()
        };
        assert!(
            dlq::list(&broker, &dead, Page::default())
                .await
                .unwrap()
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn bad_filters_and_options_are_refused_before_touching_the_queue() {
    with_broker(test_topology(), |broker| async move {
        let contradictory = DlqFilter {
            older_than: Some(dlq::parse_duration("2h").unwrap()),
            younger_than: Some(dlq::parse_duration("1h").unwrap()),
            ..DlqFilter::default()
        };
        let error = dlq::list(&broker, &contradictory, Page::default())
            .await
            .unwrap_err();
        assert!(error.to_string().starts_with("bad filter:"), "{error}");
        let no_rate = ReplayOptions {
            rate_per_sec: Some(0.0),
            ..options(false)
        };
        let error = dlq::replay(&broker, &DlqFilter::default(), &no_rate, |_, _| {})
            .await
            .unwrap_err();
        assert!(error.to_string().starts_with("bad option:"), "{error}");
        let anonymous = ReplayOptions {
            actor: " ".into(),
            ..options(false)
        };
        assert!(matches!(
            dlq::replay(&broker, &DlqFilter::default(), &anonymous, |_, _| {}).await,
            Err(DlqError::BadOption(_))
        ));
    })
    .await;
}

/// `x-delivery-count` of `message` (RabbitMQ adds it on quorum queues), 0 without one.
fn delivery_count(message: &lapin::message::BasicGetMessage) -> i64 {
    match message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(other) => panic!("unexpected x-delivery-count {other:?}"),
        None => 0,
    }
}

/// Issue 14, item 1: on RabbitMQ 4.x a quorum queue drops a message past 20 deliveries,
/// and browsing counted as delivering. Browsing must never count.
#[tokio::test]
async fn a_parked_message_survives_200_list_scans_and_30_minutes_of_replayer_peeks() {
    with_broker(test_topology(), |broker| async move {
        let event = thena_events::sample::event("WP", 1, 1, None);
        park(&broker, &event, "vitally_400").await;
        for scan in 0..200 {
            let listed = dlq::list(&broker, &DlqFilter::default(), Page::default())
                .await
                .unwrap_or_else(|e| panic!("scan {scan}: {e}"));
            assert_eq!(listed.len(), 1, "scan {scan}");
        }
        dlq::show(&broker, &event.event_id.to_string())
            .await
            .expect("shown");

        // The replayer peeks at the oldest parked message every 5 s: 360 peeks are 30
        // minutes, compressed by polling every 2 ms.
        let registry = prometheus::Registry::new();
        let metrics = thena_replayer::ReplayerMetrics::register(&registry).unwrap();
        let polls = metrics.broker.depth_polls.clone();
        let config = thena_replayer::ReplayerConfig {
            depth_poll_interval: Duration::from_millis(2),
            ..thena_replayer::ReplayerConfig::new(thena_replayer::RetrySchedule::for_topology(
                broker.topology(),
            ))
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let replayer = tokio::spawn(thena_replayer::run_replayer_with(
            broker.clone(),
            config,
            metrics,
            shutdown.clone(),
        ));
        assert!(
            eventually(Duration::from_secs(60), || async { polls.get() >= 360 }).await,
            "only {} peeks",
            polls.get()
        );
        shutdown.cancel();
        replayer.await.unwrap().unwrap();

        let channel = broker.channel().await.unwrap();
        let parked = take(&channel, &broker.topology().parked_queue(), WAIT)
            .await
            .expect("the parked message is still there");
        assert_eq!(
            delivery_count(&parked),
            0,
            "browsing counted as delivering the parked message"
        );
        assert_eq!(
            header(&parked, "x-thena-reason").as_deref(),
            Some("vitally_400")
        );
    })
    .await;
}
