//! Integration tests over the wire: real RabbitMQ and Redis on this machine, the
//! project's fake Vitally over real HTTP, consumers built as the binary builds them.

mod consumer;
mod delivery;
mod demo;
mod manifests;
mod support;
