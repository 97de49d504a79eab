//! thena-runtime
