//! The dead-letter operations against the real local RabbitMQ and PostgreSQL: parked
//! messages drained into the parked set, listed, shown, replayed, purged, audited.

#[path = "../../broker/tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{header, take};
use lapin::options::{BasicGetOptions, BasicQosOptions};
use support::*;
use thena_broker::{Failure, WORKSPACE_HEADER};
use thena_replayer::{
    dlq::{
        DlqError, DlqFilter, PurgeOptions, REPLAYED_AT_HEADER, REPLAYED_BY_HEADER, ReplayOptions,
        render,
    },
    parked::Parked,
};
use thena_store::{
    dead_letters::{DeadLetters, State},
    ledger::Ledger,
};
use thena_testkit::{TestEnv, wait_until};

const HOUR: Duration = Duration::from_secs(3_600);

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
        why: "INC-42 Vitally outage over".into(),
    }
}

fn purge(confirm: bool) -> PurgeOptions {
    PurgeOptions {
        confirm,
        actor: "ops@thena.ai".into(),
        why: "garbage from a test tenant".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_lands_in_postgresql_and_leaves_the_queue() {
    let mut h = Harness::new(TestEnv::new()).await;
    let event = thena_events::sample::event("WA", 1, 4, None);
    h.park(&event, "vitally_400").await;
    h.start_replayer(HOUR).await;

    let parked = h.wait_parked(1).await;
    let row = &parked[0];
    assert_eq!(row.event_id, Some(event.event_id.to_string()));
    assert_eq!(row.workspace_id.as_deref(), Some("WA"));
    assert_eq!((row.request_id, row.version), (Some(1), Some(4)));
    assert_eq!(row.reason, "vitally_400");
    assert_eq!(row.class.as_deref(), Some("permanent"));
    assert_eq!(row.last_error, "vitally_400 happened");
    assert_eq!(row.original_routing_key, "request.WA");
    assert_eq!(row.state, State::Parked);
    wait_until("the parked queue emptied", WAIT, || async {
        (h.depth(&h.topology().parked_queue()).await == 0).then_some(())
    })
    .await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_parked_message_makes_one_row() {
    let mut h = Harness::new(TestEnv::new()).await;
    let event = thena_events::sample::event("WR", 3, 1, None);
    h.park(&event, "vitally_422").await;

    // A drain stores it and dies before its ack: the broker delivers it again.
    let channel = h.broker.channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let first = wait_until("the parked message", WAIT, || async {
        channel
            .basic_get(
                h.topology().parked_queue().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
    })
    .await;
    let parked = Parked::read(
        &first.delivery.properties,
        &first.delivery.data,
        h.topology(),
        chrono::Utc::now(),
    );
    let store = DeadLetters::new(h.db.clone());
    assert!(store.insert(&parked.letter, None).await.unwrap().is_some());
    channel.close(200, "crash".into()).await.unwrap();

    h.start_replayer(HOUR).await;
    wait_until("the redelivery drained", WAIT, || async {
        (h.depth(&h.topology().parked_queue()).await == 0).then_some(())
    })
    .await;
    let rows = h.wait_parked(1).await;
    assert_eq!(rows[0].event_id, Some(event.event_id.to_string()));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_filters_the_parked_set_and_show_reads_one() {
    let mut h = Harness::new(TestEnv::new()).await;
    let a1 = thena_events::sample::event("WA", 1, 1, None);
    let a2 = thena_events::sample::event("WA", 2, 1, None);
    let b1 = thena_events::sample::event("WB", 3, 1, None);
    h.park(&a1, "no_integration").await;
    h.park(&a2, "no_integration").await;
    h.park(&b1, "vitally_404").await;
    h.start_replayer(HOUR).await;
    let all = h.wait_parked(3).await;
    let dlq = &h.dlq;

    let ids = |page: &thena_store::dead_letters::Page| -> Vec<i64> {
        page.dead_letters.iter().map(|d| d.id).collect()
    };
    let only_a = dlq.list(&by_workspace("WA"), None, 50).await.unwrap();
    assert_eq!(only_a.dead_letters.len(), 2);
    let by_reason = DlqFilter {
        reason: Some("vitally_404".into()),
        ..DlqFilter::default()
    };
    let b = dlq.list(&by_reason, None, 50).await.unwrap();
    assert_eq!(b.dead_letters[0].event_id, Some(b1.event_id.to_string()));
    let by_request = DlqFilter {
        workspace: Some("WA".into()),
        request_id: Some(2),
        ..DlqFilter::default()
    };
    let a = dlq.list(&by_request, None, 50).await.unwrap();
    assert_eq!(a.dead_letters.len(), 1);
    assert_eq!(a.dead_letters[0].request_id, Some(2));
    let young = DlqFilter {
        younger_than: Some(HOUR),
        ..DlqFilter::default()
    };
    assert_eq!(
        dlq.list(&young, None, 50).await.unwrap().dead_letters.len(),
        3
    );
    let old = DlqFilter {
        older_than: Some(HOUR),
        ..DlqFilter::default()
    };
    assert!(
        dlq.list(&old, None, 50)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
    let by_id = DlqFilter {
        ids: vec![all[1].id],
        ..DlqFilter::default()
    };
    assert_eq!(
        ids(&dlq.list(&by_id, None, 50).await.unwrap()),
        vec![all[1].id]
    );

    // Keyset pages: oldest first, each page continues after the previous one's last id.
    let first = dlq.list(&DlqFilter::default(), None, 2).await.unwrap();
    assert_eq!(ids(&first), vec![all[0].id, all[1].id]);
    assert_eq!(first.next, Some(all[1].id));
    let second = dlq
        .list(&DlqFilter::default(), first.next, 2)
        .await
        .unwrap();
    assert_eq!(ids(&second), vec![all[2].id]);
    assert_eq!(second.next, None);
    let table = render::parked_table(&all, chrono::Utc::now());
    assert_eq!(table.lines().count(), 4, "{table}");

    // The drain stores concurrently: ids follow storing, not parking, order.
    let b1_row = all
        .iter()
        .find(|d| d.event_id == Some(b1.event_id.to_string()))
        .unwrap();
    let shown = dlq.show(&b1_row.id.to_string(), None).await.unwrap();
    let text = render::shown(&shown, chrono::Utc::now());
    assert!(
        text.starts_with(&format!("dead letter {} (parked)\n", b1_row.id)),
        "{text}"
    );
    assert!(text.contains("x-thena-reason: vitally_404"), "{text}");
    assert!(text.contains("\"workspace_id\": \"WB\""), "{text}");
    let json = serde_json::to_value(&shown).unwrap();
    assert_eq!(json["event"]["workspace_id"], "WB");
    assert_eq!(json["headers"][WORKSPACE_HEADER], "WB");
    // By event id too; scoped to another workspace it is not there.
    let by_event = dlq.show(&b1.event_id.to_string(), None).await.unwrap();
    assert_eq!(by_event.dead_letter.id, b1_row.id);
    let elsewhere = dlq.show(&b1_row.id.to_string(), Some("WA")).await;
    assert!(
        matches!(elsewhere, Err(DlqError::NotFound(_))),
        "{elsewhere:?}"
    );
    let missing = dlq.show("no-such-event", None).await.unwrap_err();
    assert!(matches!(missing, DlqError::NotFound(_)), "{missing}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_to_the_original_route_once_with_an_audit_trail() {
    let mut h = Harness::new(TestEnv::new()).await;
    let topology = h.topology().clone();
    let a1 = thena_events::sample::event("WA", 1, 1, None);
    let a2 = thena_events::sample::event("WA", 2, 1, None);
    let b1 = thena_events::sample::event("WB", 3, 1, None);
    h.park(&a1, "no_integration").await;
    h.park(&a2, "no_integration").await;
    h.park(&b1, "vitally_404").await;
    h.start_replayer(HOUR).await;
    h.wait_parked(3).await;
    let channel = h.broker.channel().await.unwrap();

    // Dry run: counts and lists, sends nothing, leaves a dry-run audit line.
    let job = h
        .dlq
        .prepare_replay(&by_workspace("WA"), &options(true))
        .await
        .unwrap();
    assert_eq!((job.matched, job.dry_run), (2, true));
    let mut previewed = Vec::new();
    let dry = h
        .dlq
        .replay(&h.publisher, job, |line| previewed.push(line.to_string()))
        .await
        .unwrap();
    assert_eq!((dry.matched, dry.replayed), (2, 0));
    assert_eq!(previewed.len(), 2);
    assert!(
        previewed.iter().all(|l| l.contains("would replay event")),
        "{previewed:?}"
    );
    assert_eq!(
        dry.render(),
        format!(
            "dry run: 2 message(s) would be replayed (audit {})\n",
            dry.audit_id.unwrap()
        )
    );
    assert_eq!(h.depth(&topology.sync_queue()).await, 0);

    // For real, rate limited to 20/s.
    let started = Instant::now();
    let job = h
        .dlq
        .prepare_replay(&by_workspace("WA"), &options(false))
        .await
        .unwrap();
    let mut lines = Vec::new();
    let report = h
        .dlq
        .replay(&h.publisher, job, |line| lines.push(line.clone()))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "rate limited"
    );
    assert_eq!((report.matched, report.replayed, report.gone), (2, 2, 0));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(lines[0].actor, "ops@thena.ai");
    assert_eq!(lines[0].why, "INC-42 Vitally outage over");
    assert_eq!(lines[0].to_exchange, topology.exchange());
    assert_eq!(lines[0].to_routing_key, "request.WA");

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

    // Marked replayed, by whom and why; the request's history says so.
    let done = h.in_state(State::Replayed).await;
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|d| d.state_by.as_deref() == Some("ops@thena.ai"))
    );
    let record = Ledger::read_only(h.db.clone())
        .show("WA", 1, 10)
        .await
        .unwrap()
        .unwrap();
    let last = record.history.last().expect("a history line");
    assert_eq!(
        (last.outcome.as_str(), last.reason.as_str()),
        ("replayed", "no_integration")
    );
    assert!(
        last.detail.as_deref().unwrap().contains("INC-42"),
        "{last:?}"
    );

    // A second replay finds nothing to do; the other workspace's message is untouched.
    let again = h
        .dlq
        .prepare_replay(&by_workspace("WA"), &options(false))
        .await
        .unwrap();
    assert_eq!((again.matched, again.audit_id), (0, None));
    let again = h.dlq.replay(&h.publisher, again, |_| {}).await.unwrap();
    assert_eq!(again.render(), render::NOTHING_TO_DO);
    assert_eq!(h.depth(&topology.sync_queue()).await, 0);
    assert_eq!(h.in_state(State::Parked).await.len(), 1);

    // The audit trail: newest first, the real replay and the dry run, of workspace WA.
    let trail = h.dlq.audit(Some("WA"), None, 10).await.unwrap().audit;
    assert_eq!(trail.len(), 2);
    assert_eq!(
        (trail[0].action.as_str(), trail[0].dry_run),
        ("replay", false)
    );
    assert_eq!(
        (trail[0].matched, trail[0].done, trail[0].failed),
        (2, 2, 0)
    );
    assert!(trail[0].finished_at.is_some());
    assert_eq!(trail[0].filter["workspace"], "WA");
    assert!(trail[1].dry_run);
    assert!(
        h.dlq
            .audit(Some("WB"), None, 10)
            .await
            .unwrap()
            .audit
            .is_empty()
    );
    assert!(h.dlq.audit_entry(trail[0].id, Some("WB")).await.is_err());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_confirmation_and_keeps_the_rows_for_the_audit() {
    let mut h = Harness::new(TestEnv::new()).await;
    h.park(
        &thena_events::sample::event("WP", 1, 1, None),
        "no_integration",
    )
    .await;
    h.park(
        &thena_events::sample::event("WQ", 2, 1, None),
        "no_integration",
    )
    .await;
    h.start_replayer(HOUR).await;
    let parked = h.wait_parked(2).await;
    let wp = parked
        .iter()
        .find(|d| d.workspace_id.as_deref() == Some("WP"))
        .unwrap()
        .id;

    let refused = h
        .dlq
        .purge(&by_workspace("WP"), &purge(false))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, DlqError::ConfirmRequired { matched: 1 }),
        "{refused}"
    );
    assert_eq!(h.in_state(State::Parked).await.len(), 2);

    let report = h
        .dlq
        .purge(&by_workspace("WP"), &purge(true))
        .await
        .unwrap();
    assert_eq!((report.matched, report.purged), (1, 1));
    let left = h.in_state(State::Parked).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].workspace_id.as_deref(), Some("WQ"));
    let purged = h.dlq.show(&wp.to_string(), None).await.unwrap();
    assert_eq!(purged.dead_letter.state, State::Purged);
    assert_eq!(purged.dead_letter.state_by.as_deref(), Some("ops@thena.ai"));
    assert_eq!(purged.body, None, "the event is gone");
    // A purged dead letter cannot be replayed.
    let by_id = DlqFilter {
        ids: vec![wp],
        ..DlqFilter::default()
    };
    assert_eq!(
        h.dlq
            .prepare_replay(&by_id, &options(false))
            .await
            .unwrap()
            .matched,
        0
    );

    let trail = h.dlq.audit(None, None, 10).await.unwrap().audit;
    assert_eq!(trail.len(), 1, "a refused purge did nothing to record");
    assert_eq!((trail[0].action.as_str(), trail[0].done), ("purge", 1));
    assert_eq!(trail[0].why, "garbage from a test tenant");

    // An empty selection is nothing to do, for purge as for replay.
    let nothing = h
        .dlq
        .purge(&by_workspace("WP"), &purge(false))
        .await
        .unwrap();
    assert_eq!((nothing.matched, nothing.purged), (0, 0));
    h.finish().await;
}

#[tokio::test]
async fn bad_filters_and_options_are_refused_before_touching_anything() {
    let h = Harness::new(TestEnv::new()).await;
    let contradictory = DlqFilter {
        older_than: Some(Duration::from_secs(7_200)),
        younger_than: Some(HOUR),
        ..DlqFilter::default()
    };
    let error = h.dlq.list(&contradictory, None, 50).await.unwrap_err();
    assert!(error.to_string().starts_with("bad filter:"), "{error}");
    assert!(matches!(
        h.dlq.list(&DlqFilter::default(), None, 0).await,
        Err(DlqError::BadOption(_))
    ));
    let no_rate = ReplayOptions {
        rate_per_sec: Some(0.0),
        ..options(false)
    };
    let error = h
        .dlq
        .prepare_replay(&DlqFilter::default(), &no_rate)
        .await
        .unwrap_err();
    assert!(error.to_string().starts_with("bad option:"), "{error}");
    let anonymous = ReplayOptions {
        actor: " ".into(),
        ..options(false)
    };
    assert!(matches!(
        h.dlq
            .prepare_replay(&DlqFilter::default(), &anonymous)
            .await,
        Err(DlqError::BadOption(_))
    ));
    let replayed = DlqFilter {
        state: State::Replayed,
        ..DlqFilter::default()
    };
    assert!(matches!(
        h.dlq.prepare_replay(&replayed, &options(false)).await,
        Err(DlqError::BadFilter(_))
    ));
    assert!(h.dlq.audit(None, None, 10).await.unwrap().audit.is_empty());
    h.finish().await;
}

/// Issue 14, item 1, now by construction: nothing browses the parked queue, so listing
/// and the replayer's polls never deliver a parked message (RabbitMQ 4.x drops a quorum
/// queue's message past 20 deliveries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_survives_200_list_scans_and_30_minutes_of_replayer_polls() {
    let mut h = Harness::new(TestEnv::new()).await;
    let event = thena_events::sample::event("WS", 1, 1, None);
    h.park(&event, "vitally_400").await;
    // The replayer polls every 5 s: 360 polls are 30 minutes, compressed to 2 ms apart.
    let metrics = h
        .start_replayer_polling(HOUR, Duration::from_millis(2))
        .await;
    let id = h.wait_parked(1).await[0].id;
    let polls = metrics.broker.depth_polls.clone();
    for scan in 0..200 {
        let listed = h.dlq.list(&DlqFilter::default(), None, 50).await.unwrap();
        assert_eq!(listed.dead_letters.len(), 1, "scan {scan}");
        h.dlq.show(&id.to_string(), None).await.expect("shown");
    }
    wait_until("360 polls", Duration::from_secs(60), || async {
        (polls.get() >= 360).then_some(())
    })
    .await;
    assert_eq!(metrics.parked_messages.get(), 1);
    let shown = h.dlq.show(&id.to_string(), None).await.unwrap();
    assert_eq!(shown.dead_letter.state, State::Parked);
    assert_eq!(shown.headers["x-thena-reason"], "vitally_400");
    assert!(
        !shown
            .headers
            .as_object()
            .unwrap()
            .contains_key("x-delivery-count"),
        "the parked message was delivered more than once: {}",
        shown.headers
    );
    h.finish().await;
}
