//! fake-vitally
