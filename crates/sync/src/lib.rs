//! thena-sync
