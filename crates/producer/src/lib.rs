//! thena-producer
