//! vitally-client
