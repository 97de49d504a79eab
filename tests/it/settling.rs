//! Every delivery is settled, whatever happens (issue 14, item 8): a panic inside a real
//! consumer's work — injected through the worker's fault hook — becomes a retry or a
//! requeue, frees the request's lock and the in-flight count; an ack RabbitMQ cannot take
//! (the channel closed under it) is counted, and the message comes back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fake_vitally::{Fault, FaultKind};
use secrecy::{ExposeSecret, SecretString};
use thena_events::sample;
use thena_store::ledger::Ledger;
use thena_sync::fault::{FaultHook, FaultPoint};
use thena_testkit::{proxy::TcpProxy, wait_until};

use crate::support::{Fleet, WS, authority};

/// A hook that panics once, at `point`, in the work of request `request_id`.
fn panic_once(point: FaultPoint, request_id: u64) -> FaultHook {
    let armed = AtomicBool::new(true);
    Arc::new(move |at, event| {
        if at == point && event.request.id == request_id && armed.swap(false, Ordering::SeqCst) {
            panic!("injected panic at {at:?} in request {request_id}");
        }
    })
}

async fn wait_idle(fleet: &Fleet) {
    wait_until("no delivery in flight", Duration::from_secs(20), || async {
        (fleet.gauge("thena_vitally_consumer_in_flight") == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_the_locked_work_is_retried_frees_the_lock_and_syncs_once() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    let config = fleet.config.clone();
    fleet
        .spawn_consumer_with_fault(&config, panic_once(FaultPoint::Locked, 71))
        .await;
    fleet.spawn_replayer().await;
    for id in [71, 72] {
        fleet
            .publish(&sample::event(WS, id, 1, Some("alice@acme.com")))
            .await;
    }
    wait_until("both synced", Duration::from_secs(20), || async {
        (fleet.count("synced", None) == 2).then_some(())
    })
    .await;
    wait_idle(&fleet).await;

    assert_eq!(fleet.count("retried", Some("panic")), 1);
    assert_eq!(
        fleet.count("deferred", Some("request_busy")),
        0,
        "the lock was released at the panic, not left to expire"
    );
    for id in [71, 72] {
        assert_eq!(fleet.instances_for(WS, id).len(), 1, "request {id}");
    }
    let row = Ledger::read_only(fleet.store.db().clone())
        .show(WS, 71, 50)
        .await
        .unwrap()
        .expect("in the ledger");
    let history: Vec<(&str, &str)> = row
        .history
        .iter()
        .map(|h| (h.outcome.as_str(), h.reason.as_str()))
        .collect();
    assert_eq!(history, [("retried", "panic"), ("synced", "created")]);
    assert!(
        row.history[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("injected panic at Locked in request 71")),
        "{:?}",
        row.history[0]
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_settling_requeues_the_delivery_instead_of_stranding_it() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    let config = fleet.config.clone();
    fleet
        .spawn_consumer_with_fault(&config, panic_once(FaultPoint::Settling, 73))
        .await;
    for id in [73, 74] {
        fleet
            .publish(&sample::event(WS, id, 1, Some("alice@acme.com")))
            .await;
    }
    // Vitally had 73 before the panic (its ledger line too); the requeued delivery comes
    // back and is recognised as applied.
    wait_until(
        "the requeued delivery settled",
        Duration::from_secs(20),
        || async {
            (fleet.count("skipped", Some("already_applied")) == 1
                && fleet.count("synced", None) == 1)
                .then_some(())
        },
    )
    .await;
    wait_idle(&fleet).await;
    assert_eq!(fleet.count("requeued", Some("panic")), 1);
    for id in [73, 74] {
        assert_eq!(fleet.instances_for(WS, id).len(), 1, "request {id}");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_a_channel_that_closed_meanwhile_is_counted_and_the_event_comes_back() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    let proxy = TcpProxy::start(authority(&thena_testkit::amqp_url()))
        .await
        .unwrap();
    let mut config = fleet.config.clone();
    let via = proxy.url_via(config.amqp_url.expose_secret()).unwrap();
    config.amqp_url = SecretString::from(via);
    fleet.spawn_consumer_with(&config, Default::default()).await;
    // Vitally is slow: the broker connection is cut while the event is being written.
    fleet.fake.inject(Fault::NextN {
        method: None,
        path_prefix: "/resources/customObjects".into(),
        count: 1,
        kind: FaultKind::Latency(Duration::from_secs(3)),
    });
    fleet
        .publish(&sample::event(WS, 75, 1, Some("alice@acme.com")))
        .await;
    wait_until("the event in flight", Duration::from_secs(20), || async {
        (fleet.gauge("thena_vitally_consumer_in_flight") >= 1).then_some(())
    })
    .await;
    proxy.cut().await;
    wait_until(
        "the refused ack counted",
        Duration::from_secs(20),
        || async { (fleet.counter("thena_vitally_settle_failures_total") >= 1).then_some(()) },
    )
    .await;
    proxy.restore().await.unwrap();
    // RabbitMQ kept the unacked message and delivers it again after the reconnect.
    wait_until(
        "the redelivery settled",
        Duration::from_secs(30),
        || async { (fleet.count("skipped", Some("already_applied")) == 1).then_some(()) },
    )
    .await;
    assert_eq!(fleet.instances_for(WS, 75).len(), 1);
    fleet.stop().await;
}
