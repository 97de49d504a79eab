//! Integration tests over the wire: real RabbitMQ and Redis on this machine, the
//! project's fake Vitally over real HTTP, consumers built as the binary builds them.

mod backfill;
mod browser;
mod channels;
mod chaos;
mod cli;
mod config_cli;
mod console;
mod consumer;
mod control;
mod delivery;
mod demo;
mod docs;
mod duplicates;
mod fidelity;
mod ledger;
mod linking;
mod logs;
mod manifests;
mod settling;
mod support;
mod unconnected;
