//! A cloneable handle on one lazily (re)established AMQP connection.

use std::{fmt, sync::Arc, time::Duration};

use lapin::{Channel, Connection, ConnectionProperties, uri::AMQPUri};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use crate::{
    publisher::{Publisher, PublisherOptions},
    redact::scrub_secrets,
    topology::Topology,
};

/// How long one connection attempt (TCP + AMQP handshake + topology) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a readiness probe waits for the broker.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors name the host (`host:port`) but never the credentials.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    #[error("cannot connect to RabbitMQ at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("cannot declare the RabbitMQ topology at {endpoint}: {reason}")]
    Declare { endpoint: String, reason: String },
    #[error("cannot open a channel on RabbitMQ at {endpoint}: {reason}")]
    Channel { endpoint: String, reason: String },
}

/// Longest wait for the broker to acknowledge a connection close.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Clone freely: clones share the connection.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: SecretString,
    /// `host:port`, safe to print.
    endpoint: String,
    connection_name: String,
    topology: Topology,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("endpoint", &self.inner.endpoint)
            .field("connection_name", &self.inner.connection_name)
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Connects and declares the topology, so a misconfigured URL fails at start.
    pub async fn connect(
        amqp_url: SecretString,
        connection_name: &str,
        topology: Topology,
    ) -> Result<Broker, BrokerError> {
        let endpoint = endpoint_of(&amqp_url)?;
        let broker = Broker {
            inner: Arc::new(Inner {
                url: amqp_url,
                endpoint,
                connection_name: connection_name.to_owned(),
                topology,
                connection: Mutex::new(None),
            }),
        };
        broker.connection().await?;
        Ok(broker)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// `host:port` of the broker, without credentials.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// A new channel; reconnects (and redeclares the topology) if the connection died.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let connection = self.connection().await?;
        match connection.create_channel().await {
            Ok(channel) => Ok(channel),
            Err(first) => {
                // The connection may have died between the check and the call: one retry
                // on a fresh connection, then give up.
                tracing::debug!(error = %first, "channel creation failed, reconnecting");
                self.forget(&connection).await;
                let connection = self.connection().await?;
                connection
                    .create_channel()
                    .await
                    .map_err(|e| BrokerError::Channel {
                        endpoint: self.inner.endpoint.clone(),
                        reason: scrub_secrets(&e.to_string()),
                    })
            }
        }
    }

    /// Broker reachable (reconnecting if needed, within a short timeout).
    pub async fn is_healthy(&self) -> bool {
        matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, self.connection()).await,
            Ok(Ok(_))
        )
    }

    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        self.publisher_with(PublisherOptions::default()).await
    }

    pub async fn publisher_with(
        &self,
        options: PublisherOptions,
    ) -> Result<Publisher, BrokerError> {
        // Fail early if the broker is unreachable; channels themselves are opened lazily.
        self.connection().await?;
        Ok(Publisher::new(self.clone(), options))
    }

    /// Closes the current connection (graceful shutdown). A later call reconnects.
    /// Bounded: a broker that never answers the close (seen about once in 50 test runs)
    /// must not hang a shutdown; the connection is then dropped, which closes its socket.
    pub async fn close(&self) {
        let connection = self.inner.connection.lock().await.take();
        if let Some(connection) = connection
            && connection.status().connected()
        {
            match tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "closing".into())).await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "closing the AMQP connection failed"),
                Err(_) => tracing::warn!(
                    timeout = ?CLOSE_TIMEOUT,
                    "the broker did not answer the close; dropping the connection"
                ),
            }
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.status().connected()
        {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.open().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn forget(&self, dead: &Arc<Connection>) {
        let mut slot = self.inner.connection.lock().await;
        if slot
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, dead))
        {
            *slot = None;
        }
    }

    async fn open(&self) -> Result<Connection, BrokerError> {
        let endpoint = &self.inner.endpoint;
        let connect_error = |reason: String| BrokerError::Connect {
            endpoint: endpoint.clone(),
            reason: scrub_secrets(&reason),
        };
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.connection_name.as_str().into());
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(self.inner.url.expose_secret(), properties),
        )
        .await
        .map_err(|_| connect_error(format!("timed out after {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| connect_error(e.to_string()))?;

        let declare_error = |reason: String| BrokerError::Declare {
            endpoint: endpoint.clone(),
            reason: scrub_secrets(&reason),
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| declare_error(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, self.inner.topology.declare(&channel))
            .await
            .map_err(|_| declare_error(format!("timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| declare_error(e.to_string()))?;
        if let Err(error) = channel.close(200, "declared".into()).await {
            tracing::debug!(%error, "closing the declaring channel failed");
        }
        tracing::info!(endpoint = %endpoint, connection = %self.inner.connection_name, "connected to RabbitMQ");
        Ok(connection)
    }
}

fn endpoint_of(url: &SecretString) -> Result<String, BrokerError> {
    let parsed: AMQPUri = url
        .expose_secret()
        .parse()
        .map_err(|e: String| BrokerError::InvalidUrl(redact_password(&e, url)))?;
    Ok(format!(
        "{}:{}",
        parsed.authority.host, parsed.authority.port
    ))
}

/// The URL parser quotes the URL in some errors: mask its password even if it is not in
/// `user:password@` form.
fn redact_password(message: &str, url: &SecretString) -> String {
    let scrubbed = scrub_secrets(message);
    match url.expose_secret().parse::<AMQPUri>() {
        Ok(uri) if !uri.authority.userinfo.password.is_empty() => {
            scrubbed.replace(&uri.authority.userinfo.password, "***")
        }
        _ => scrubbed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_names_host_and_port_without_credentials() {
        let url = SecretString::from("amqp://user:hunter2@rabbit.internal:5673/%2f");
        assert_eq!(endpoint_of(&url).unwrap(), "rabbit.internal:5673");
    }

    #[test]
    fn an_unparseable_url_error_does_not_echo_the_password() {
        let url = SecretString::from("amqp://user:hunter2@host:notaport/");
        let error = endpoint_of(&url).unwrap_err().to_string();
        assert!(error.starts_with("invalid AMQP URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
