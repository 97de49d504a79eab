//! thena-demo
