//! Vitally's per-key sliding-window rate limit and the headers that report it.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Remembers when each key's accepted requests arrived, for the last `window`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: u32,
    window: Duration,
    accepted: HashMap<String, VecDeque<Instant>>,
}

/// What the `RateLimit-*` headers of one response say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Quota {
    pub limit: u32,
    pub window: Duration,
    pub remaining: u32,
    /// Until the oldest counted request leaves the window; zero when none is counted.
    pub reset: Duration,
}

impl RateLimiter {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            accepted: HashMap::new(),
        }
    }

    /// Takes effect for the next request; requests already counted stay counted.
    pub(crate) fn reconfigure(&mut self, limit: u32, window: Duration) {
        self.limit = limit;
        self.window = window;
    }

    /// Counts a request by `key` at `now` if the window has room (`Ok`); otherwise
    /// rejects it without consuming budget (`Err`). Both carry the quota to report.
    pub(crate) fn admit(&mut self, key: &str, now: Instant) -> Result<Quota, Quota> {
        let window = self.window;
        let accepted = self.accepted.entry(key.to_owned()).or_default();
        while accepted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            accepted.pop_front();
        }
        let admitted = accepted.len() < self.limit as usize;
        if admitted {
            accepted.push_back(now);
        }
        let counted = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
        let quota = Quota {
            limit: self.limit,
            window,
            remaining: self.limit.saturating_sub(counted),
            reset: accepted
                .front()
                .map(|t| (*t + window).saturating_duration_since(now))
                .unwrap_or_default(),
        };
        if admitted { Ok(quota) } else { Err(quota) }
    }
}

fn whole_seconds_up(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000_000)
}

impl Quota {
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        let limit = self.limit;
        let window = whole_seconds_up(self.window);
        let values = [
            (&LIMIT, format!("{limit}, {limit};window={window}")),
            (&REMAINING, self.remaining.to_string()),
            (&RESET, whole_seconds_up(self.reset).to_string()),
        ];
        for (name, value) in values {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name.clone(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_window_slides_per_key_and_rejections_are_free() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(2, Duration::from_secs(10));

        let first = limiter.admit("a", t0).expect("room");
        assert_eq!((first.remaining, first.reset), (1, Duration::from_secs(10)));
        let second = limiter.admit("a", t0 + 4000 * MS).expect("room");
        assert_eq!((second.remaining, second.reset), (0, 6000 * MS));

        let rejected = limiter.admit("a", t0 + 5000 * MS).expect_err("full");
        assert_eq!((rejected.remaining, rejected.reset), (0, 5000 * MS));
        // Another key has its own window.
        assert!(limiter.admit("b", t0 + 5000 * MS).is_ok());

        // The first request leaves the window at t0 + 10 s; the rejected one never
        // counted, so exactly one slot opens.
        let third = limiter.admit("a", t0 + 10_000 * MS).expect("room again");
        assert_eq!((third.remaining, third.reset), (0, 4000 * MS));
        assert!(limiter.admit("a", t0 + 10_001 * MS).is_err());
    }

    #[test]
    fn headers_round_seconds_up() {
        let mut headers = HeaderMap::new();
        Quota {
            limit: 5,
            window: Duration::from_millis(1500),
            remaining: 3,
            reset: Duration::from_millis(1),
        }
        .apply(&mut headers);
        assert_eq!(headers["ratelimit-limit"], "5, 5;window=2");
        assert_eq!(headers["ratelimit-remaining"], "3");
        assert_eq!(headers["ratelimit-reset"], "1");
    }
}
