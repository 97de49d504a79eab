//! thena-broker
