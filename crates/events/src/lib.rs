//! The wire contract between Thena and the fleet: `thena.request.changed/v1`.
//!
//! Pure: no I/O. The producer validates with [`parse_event`] (every problem, with its field
//! path), the consumer decodes with [`decode_event`] (tolerant of fields added later).

mod model;
mod validate;

pub mod sample;

pub use model::{Change, Request, RequestChanged, Requestor, SCHEMA_V1, Source, ThreadMessage};
pub use validate::{
    Limits, Problem, ValidationError, kind as json_kind, parse_event, parse_value, validate_value,
};

/// Decodes an event taken off the queue. Producers already validated it strictly, so this
/// only needs the shape; unknown fields (a newer producer) are ignored.
pub fn decode_event(bytes: &[u8]) -> Result<RequestChanged, serde_json::Error> {
    let event: RequestChanged = serde_json::from_slice(bytes)?;
    if event.schema != SCHEMA_V1 {
        return Err(serde::de::Error::custom(format!(
            "unknown schema {:?}, expected {SCHEMA_V1:?}",
            event.schema
        )));
    }
    Ok(event)
}

/// The JSON Schema of the event, generated from the types (checked into `docs/`).
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(RequestChanged)).expect("schema serializes")
}
