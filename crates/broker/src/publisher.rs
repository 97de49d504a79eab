//! Publishing that only reports success after RabbitMQ confirmed the message.
//!
//! A small pool of confirm-mode channels, each carrying one publish at a time: lapin
//! pairs a returned (unroutable) message with "the next ack" on its channel, which is
//! only exact when that channel has a single publish in flight.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use thena_events::RequestChanged;
use tokio::sync::Mutex;

use crate::{
    broker::{Broker, BrokerError},
    failure::{
        BACKFILL_JOB_HEADER, DEAD_LETTERED_AT_HEADER, Failure, PARKED_AT_HEADER, WORKSPACE_HEADER,
        rfc3339,
    },
    topology::{Topology, Wake},
};

/// RabbitMQ's per-delivery counter; meaningless on a republished message.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
const PERSISTENT: u8 = 2;

#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Confirm channels, i.e. publishes in flight at once.
    pub channels: usize,
    /// How long to wait for the broker's confirm before answering "failed".
    pub confirm_timeout: Duration,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            channels: 16,
            confirm_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot encode the event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the broker rejected (nacked) the message for {exchange:?} / {routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("the message for {exchange:?} / {routing_key:?} was unroutable ({reply})")]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    #[error("the channel failed while publishing: {0}")]
    Channel(#[source] lapin::Error),
}

/// Clone freely: clones share the channel pool.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Broker,
    slots: Vec<Mutex<Option<Channel>>>,
    next: AtomicUsize,
    confirm_timeout: Duration,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("broker", &self.inner.broker)
            .field("channels", &self.inner.slots.len())
            .field("confirm_timeout", &self.inner.confirm_timeout)
            .finish()
    }
}

impl Publisher {
    pub(crate) fn new(broker: Broker, options: PublisherOptions) -> Publisher {
        Publisher {
            inner: Arc::new(Inner {
                broker,
                slots: (0..options.channels.max(1))
                    .map(|_| Mutex::new(None))
                    .collect(),
                next: AtomicUsize::new(0),
                confirm_timeout: options.confirm_timeout,
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        self.inner.broker.topology()
    }

    /// Closes the pool's channels and waits for the broker to confirm each close. Call it
    /// before [`Broker::close`]: a channel merely dropped closes itself in the background
    /// and, if the connection is closing by then, lapin logs that as a connection error.
    /// Publishing afterwards opens fresh channels.
    pub async fn close(&self) {
        for slot in &self.inner.slots {
            let channel = slot.lock().await.take();
            if let Some(channel) = channel
                && channel.status().connected()
            {
                // Bounded like the connection's close: shutdown must not hang on it.
                let closing = channel.close(200, "publisher closed".into());
                match tokio::time::timeout(std::time::Duration::from_secs(3), closing).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "closing a publisher channel failed")
                    }
                    Err(_) => tracing::warn!("the broker did not answer a channel close"),
                }
            }
        }
    }

    /// Publishes an accepted event for the consumers. `Ok` only after the broker's ack.
    pub async fn publish_event(&self, event: &RequestChanged) -> Result<(), PublishError> {
        self.publish_snapshot(event, &Topology::routing_key(&event.workspace_id), None)
            .await
    }

    /// Publishes a historical snapshot of backfill `job` on the backfill lane.
    pub async fn publish_backfill(
        &self,
        event: &RequestChanged,
        job: &str,
    ) -> Result<(), PublishError> {
        let routing_key = Topology::backfill_routing_key(&event.workspace_id);
        self.publish_snapshot(event, &routing_key, Some(job)).await
    }

    async fn publish_snapshot(
        &self,
        event: &RequestChanged,
        routing_key: &str,
        backfill_job: Option<&str>,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event)?;
        let mut headers = FieldTable::default();
        headers.insert(
            WORKSPACE_HEADER.into(),
            AMQPValue::LongString(LongString::from(event.workspace_id.as_str())),
        );
        if let Some(job) = backfill_job {
            headers.insert(
                BACKFILL_JOB_HEADER.into(),
                AMQPValue::LongString(LongString::from(job)),
            );
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(event.event_id.to_string().into())
            .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or(0))
            .with_headers(headers);
        self.publish(&self.topology().exchange(), routing_key, &body, properties)
            .await
    }

    /// Any message, with the same confirm semantics (mandatory, `Ok` only after an ack).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish(exchange, routing_key, body, props).await
    }

    /// Hands a failed message to the replayer (through the DLX), with the failure in its
    /// headers. The consumer acks the original only after this returned `Ok`.
    pub async fn dead_letter(
        &self,
        body: &[u8],
        props: &BasicProperties,
        failure: &Failure,
    ) -> Result<(), PublishError> {
        let mut headers = failure.merge_into(props.headers().as_ref());
        headers.insert(DEAD_LETTERED_AT_HEADER.into(), now_header());
        let topology = self.topology();
        self.publish(
            &topology.dlx(),
            &failure.original_routing_key,
            body,
            republished(props, headers),
        )
        .await
    }

    /// Sets a message aside for humans (the `dlq` CLI), with the failure in its headers.
    pub async fn park(
        &self,
        body: &[u8],
        props: &BasicProperties,
        failure: &Failure,
    ) -> Result<(), PublishError> {
        let mut headers = failure.merge_into(props.headers().as_ref());
        headers.insert(PARKED_AT_HEADER.into(), now_header());
        let topology = self.topology();
        self.publish(
            "",
            &topology.parked_queue(),
            body,
            republished(props, headers),
        )
        .await
    }

    /// Sends a message back to the sync queue through the delay tier `wake` picks (see
    /// [`Wake`]), keeping its original routing key.
    pub async fn defer(
        &self,
        body: &[u8],
        props: &BasicProperties,
        original_routing_key: &str,
        wake: Wake,
        failure: Option<&Failure>,
    ) -> Result<(), PublishError> {
        let headers = match failure {
            Some(failure) => failure.merge_into(props.headers().as_ref()),
            None => without(props.headers().as_ref(), &[DEAD_LETTERED_AT_HEADER]),
        };
        let topology = self.topology();
        let tier = topology.tier_to_wake(wake);
        self.publish(
            &topology.delay_queue(tier),
            original_routing_key,
            body,
            republished(props, headers),
        )
        .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let slots = &self.inner.slots;
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        // A free channel if there is one, else wait for our round-robin turn.
        let free = (0..slots.len()).find_map(|i| slots[(start + i) % slots.len()].try_lock().ok());
        let mut slot = match free {
            Some(slot) => slot,
            None => slots[start].lock().await,
        };
        let channel = match slot.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            // First use, or the channel/connection died (broker restart, channel error):
            // open a fresh confirm channel before publishing.
            None => {
                *slot = None;
                let channel = self.inner.broker.channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(PublishError::Channel)?;
                *slot = Some(channel.clone());
                channel
            }
        };

        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmed = tokio::time::timeout(self.inner.confirm_timeout, async {
            channel
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    options,
                    body,
                    props,
                )
                .await?
                .await
        })
        .await;
        let failure_route = || (exchange.to_owned(), routing_key.to_owned());
        match confirmed {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                let (exchange, routing_key) = failure_route();
                Err(PublishError::Unroutable {
                    exchange,
                    routing_key,
                    reply: format!("{} {}", returned.reply_code, returned.reply_text),
                })
            }
            Ok(Ok(Confirmation::Nack(_))) => {
                let (exchange, routing_key) = failure_route();
                Err(PublishError::Nacked {
                    exchange,
                    routing_key,
                })
            }
            Ok(Ok(Confirmation::NotRequested)) => {
                // Cannot happen on a confirm channel; never count it as a success.
                *slot = None;
                Err(PublishError::NotConfirmed)
            }
            Ok(Err(error)) => {
                *slot = None;
                Err(PublishError::Channel(error))
            }
            Err(_elapsed) => {
                // The confirm may still come; this channel's pairing is no longer exact.
                *slot = None;
                Err(PublishError::Timeout(self.inner.confirm_timeout))
            }
        }
    }
}

fn now_header() -> AMQPValue {
    AMQPValue::LongString(LongString::from(rfc3339(Utc::now())))
}

fn without(headers: Option<&FieldTable>, keys: &[&str]) -> FieldTable {
    let map: std::collections::BTreeMap<ShortString, AMQPValue> = headers
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(key, _)| !keys.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    FieldTable::from(map)
}

/// The original properties (message id, content type, ...) with new headers, persistent.
fn republished(props: &BasicProperties, headers: FieldTable) -> BasicProperties {
    props
        .clone()
        .with_headers(without(Some(&headers), &[DELIVERY_COUNT_HEADER]))
        .with_delivery_mode(PERSISTENT)
}
