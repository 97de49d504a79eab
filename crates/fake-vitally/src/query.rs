//! Request parsing shared by the handlers: JSON bodies and query strings that fail
//! with Vitally-style 400s, and cursor pagination.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Query, Request},
    http::request::Parts,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::{
    error::{ApiError, bad_request},
    model::Page,
};

/// A JSON body; a malformed one is a 400 `{"error": ...}` rather than axum's
/// plain-text 422, so clients see what Vitally would send.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| bad_request(e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| bad_request(format!("invalid JSON body: {e}")))
    }
}

/// The query string as ordered pairs, so repeated and conflicting parameters can
/// be told apart.
pub(crate) struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| bad_request(e.body_text()))?;
        Ok(Self(pairs))
    }
}

impl Params {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The single search parameter among `names`, or a 400 when there is none or
    /// more than one (Vitally's search endpoints take exactly one).
    pub(crate) fn exactly_one(
        &self,
        names: &[&'static str],
    ) -> Result<(&'static str, &str), ApiError> {
        let mut present = self
            .0
            .iter()
            .filter_map(|(key, value)| Some((*names.iter().find(|n| *n == key)?, value.as_str())));
        match (present.next(), present.next()) {
            (Some(found), None) => Ok(found),
            _ => Err(bad_request(format!(
                "exactly one of {} is required",
                names.join(", ")
            ))),
        }
    }
}

pub(crate) const MAX_LIMIT: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SortBy {
    CreatedAt,
    UpdatedAt,
}

/// Position after which the next page starts. Records are never deleted, so a
/// record's index in its table is its creation order and never changes; sorting by
/// `updatedAt` breaks ties by that index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    updated_ms: i64,
    index: usize,
}

pub(crate) struct PageRequest {
    limit: usize,
    sort: SortBy,
    after: Option<SortKey>,
}

impl PageRequest {
    pub(crate) fn parse(params: &Params) -> Result<Self, ApiError> {
        let limit = match params.get("limit") {
            None => MAX_LIMIT,
            Some(raw) => match raw.parse::<usize>() {
                Ok(n @ 1..=MAX_LIMIT) => n,
                _ => {
                    return Err(bad_request(format!(
                        "limit must be an integer from 1 to {MAX_LIMIT}, got {raw:?}"
                    )));
                }
            },
        };
        let sort = match params.get("sortBy") {
            None | Some("createdAt") => SortBy::CreatedAt,
            Some("updatedAt") => SortBy::UpdatedAt,
            Some(other) => {
                return Err(bad_request(format!(
                    "sortBy must be createdAt or updatedAt, got {other:?}"
                )));
            }
        };
        let after = params
            .get("from")
            .map(|cursor| decode_cursor(cursor, sort))
            .transpose()?;
        Ok(Self { limit, sort, after })
    }

    /// One page of `records`, given with their index in their table.
    pub(crate) fn page<'a, T: Clone + 'a>(
        &self,
        records: impl IntoIterator<Item = (usize, &'a T)>,
        updated_at: impl Fn(&T) -> DateTime<Utc>,
    ) -> Page<T> {
        let key = |index: usize, record: &T| SortKey {
            updated_ms: match self.sort {
                SortBy::CreatedAt => 0,
                SortBy::UpdatedAt => updated_at(record).timestamp_millis(),
            },
            index,
        };
        let mut keyed: Vec<(SortKey, &T)> = records
            .into_iter()
            .map(|(index, record)| (key(index, record), record))
            .filter(|(k, _)| self.after.is_none_or(|after| *k > after))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        let more = keyed.len() > self.limit;
        keyed.truncate(self.limit);
        Page {
            next: more
                .then(|| keyed.last().map(|(k, _)| encode_cursor(*k, self.sort)))
                .flatten(),
            results: keyed.into_iter().map(|(_, r)| r.clone()).collect(),
        }
    }
}

fn encode_cursor(key: SortKey, sort: SortBy) -> String {
    let raw = match sort {
        SortBy::CreatedAt => format!("c:{}", key.index),
        SortBy::UpdatedAt => format!("u:{}:{}", key.updated_ms, key.index),
    };
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str, sort: SortBy) -> Result<SortKey, ApiError> {
    let invalid = || bad_request(format!("invalid cursor {cursor:?} for sortBy {sort:?}"));
    let raw = URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let parts: Vec<&str> = raw.split(':').collect();
    let key = match (sort, parts.as_slice()) {
        (SortBy::CreatedAt, ["c", index]) => index.parse().ok().map(|index| SortKey {
            updated_ms: 0,
            index,
        }),
        (SortBy::UpdatedAt, ["u", ms, index]) => ms
            .parse()
            .ok()
            .zip(index.parse().ok())
            .map(|(updated_ms, index)| SortKey { updated_ms, index }),
        _ => None,
    };
    key.ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_is_tied_to_its_sort_order() {
        let key = SortKey {
            updated_ms: 1_700_000_000_123,
            index: 7,
        };
        let cursor = encode_cursor(key, SortBy::UpdatedAt);
        assert_eq!(decode_cursor(&cursor, SortBy::UpdatedAt).ok(), Some(key));
        assert!(decode_cursor(&cursor, SortBy::CreatedAt).is_err());
        assert!(decode_cursor("not a cursor", SortBy::CreatedAt).is_err());
    }
}
