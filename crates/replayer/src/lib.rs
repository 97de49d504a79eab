//! thena-replayer
