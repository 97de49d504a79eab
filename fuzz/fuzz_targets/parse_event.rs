//! Arbitrary bytes through the producer's strict parser and the consumer's tolerant decoder.
//!
//! Properties: neither panics; whatever `parse_event` accepts, `decode_event` accepts as the
//! same event, unless the body repeats a key (see docs/fuzzing.md); and an accepted event
//! serialized and parsed again is equal (the producer publishes the re-serialized event, so
//! that is what consumers see).
#![no_main]

use std::{collections::BTreeSet, fmt};

use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use thena_events::{Limits, decode_event, parse_event};

fuzz_target!(|bytes: &[u8]| {
    let limits = Limits::default();
    let decoded = decode_event(bytes);
    let Ok(event) = parse_event(bytes, &limits) else {
        return;
    };

    // The strict parser accepted it, so the tolerant decoder must too, with the same
    // content (`event_id` is generated independently when absent).
    match decoded {
        Ok(mut decoded) => {
            decoded.event_id = event.event_id;
            assert_eq!(decoded, event, "parse_event and decode_event disagree");
        }
        // Known and accepted: a JSON value keeps the last of repeated keys, serde's derive
        // refuses a repeated field. The producer publishes the re-serialized event, which
        // has no repeats, so consumers never see such a body.
        Err(e) => assert!(
            serde_json::from_slice::<NoRepeatedKeys>(bytes).is_err(),
            "parse_event accepted what decode_event rejects: {e}"
        ),
    }

    let json = match serde_json::to_vec(&event) {
        Ok(json) => json,
        Err(e) => panic!("an accepted event does not serialize: {e}"),
    };
    match parse_event(&json, &limits) {
        Ok(again) => assert_eq!(again, event, "round trip changed the event"),
        Err(e) => panic!(
            "an accepted event, serialized, is rejected: {e}\n{}",
            String::from_utf8_lossy(&json)
        ),
    }
    match decode_event(&json) {
        Ok(again) => assert_eq!(again, event, "decode after round trip changed the event"),
        Err(e) => panic!("an accepted event, serialized, does not decode: {e}"),
    }
});

/// Any JSON in which no object repeats a key; deserializing fails on the first repeat.
struct NoRepeatedKeys;

impl<'de> Deserialize<'de> for NoRepeatedKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoRepeatedKeys)
    }
}

impl<'de> Visitor<'de> for NoRepeatedKeys {
    type Value = NoRepeatedKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoRepeatedKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("repeated key {key:?}")));
            }
            map.next_value::<NoRepeatedKeys>()?;
        }
        Ok(self)
    }
}
