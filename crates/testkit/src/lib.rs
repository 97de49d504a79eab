//! thena-testkit
