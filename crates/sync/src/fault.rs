//! Panics never strand a delivery. A panic inside an event's work is caught where it
//! happens and becomes an outcome like any failure; [`FaultHook`] lets a test panic at a
//! named point of a real consumer to show it.
//!
//! The hook is compiled in but only set through `Worker::with_fault_hook`, which the
//! consumer's own start-up never calls and no configuration reaches.

use std::{any::Any, future::Future, panic::AssertUnwindSafe, sync::Arc};

use futures_util::FutureExt;
use thena_events::RequestChanged;

/// Where in an event's handling a [`FaultHook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// In the pipeline, with the request's lock held, after linking and before the write.
    Locked,
    /// In the worker, after the ledger line and before the hand-off and the ack.
    Settling,
}

/// A test's fault, called at each [`FaultPoint`] of every decoded event.
pub type FaultHook = Arc<dyn Fn(FaultPoint, &RequestChanged) + Send + Sync>;

/// Runs `work`; a panic inside it is returned as its message instead of unwinding.
/// The work is boxed: an event's work is a large future, and keeping it (and the frames
/// that poll it) off the stack keeps debug builds inside a worker thread's stack.
pub async fn catch<T>(work: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(Box::pin(work))
        .catch_unwind()
        .await
        .map_err(|panic| message(&*panic))
}

/// What a panic said (its payload is a `&str` or a `String` for every `panic!`).
fn message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_its_message_and_a_result_passes_through() {
        assert_eq!(catch(async { 7 }).await, Ok(7));
        let literal = catch(async { panic!("boom") }).await;
        assert_eq!(literal, Err::<(), _>("boom".to_owned()));
        let id = 42;
        let formatted = catch(async move { panic!("request {id}") }).await;
        assert_eq!(formatted, Err::<(), _>("request 42".to_owned()));
    }
}
