//! `thena-vitally demo`: every role in one process against the local RabbitMQ and Redis
//! and an embedded fake Vitally, with a customer base covering every linking case.

pub mod customers;
