//! Per-principal request rates and open streams, and a node-wide budget for failed
//! authentications: one misbehaving client (or a flood of garbage) must not starve the others,
//! nor fill the audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOptions {
    /// Sustained requests per second per principal (every Flight, Flight SQL and REST call).
    pub requests_per_second: u32,
    /// Requests a principal may make at once above the sustained rate.
    pub burst: u32,
    /// Data streams (DoGet) a principal may have open at once (default 64: one training job
    /// with 64 data-loader workers, each holding a stream).
    pub max_streams_per_principal: u32,
    /// Failed authentications per second, node-wide, that are audited one by one; beyond it they
    /// are refused with RESOURCE_EXHAUSTED and counted in the next audited one.
    pub failed_auth_per_second: u32,
    /// Burst of failed authentications.
    pub failed_auth_burst: u32,
    /// On shutdown, how long streams in flight may take to finish before the node exits (their
    /// audit entries are then marked failed).
    pub shutdown_grace_secs: u64,
}

impl Default for LimitOptions {
    fn default() -> Self {
        Self {
            requests_per_second: 100,
            burst: 1000,
            max_streams_per_principal: 64,
            failed_auth_per_second: 50,
            failed_auth_burst: 200,
            shutdown_grace_secs: 30,
        }
    }
}

impl LimitOptions {
    /// Refuses values that would disable a limit by accident.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| {
            Error::invalid(
                format!("limits.{what} must be positive"),
                "see deploy/config/node.example.toml",
            )
        };
        if self.requests_per_second == 0 {
            return Err(bad("requests_per_second"));
        }
        if self.failed_auth_per_second == 0 {
            return Err(bad("failed_auth_per_second"));
        }
        if self.burst == 0 {
            return Err(bad("burst"));
        }
        if self.failed_auth_burst == 0 {
            return Err(bad("failed_auth_burst"));
        }
        if self.max_streams_per_principal == 0 {
            return Err(bad("max_streams_per_principal"));
        }
        Ok(())
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: u32) -> Self {
        Self {
            tokens: f64::from(capacity),
            at: Instant::now(),
        }
    }

    fn take(&mut self, rate: u32, capacity: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(capacity));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Buckets idle this long are forgotten (a full bucket and a missing one behave alike).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The node's limiters.
#[derive(Debug)]
pub struct Limits {
    opts: LimitOptions,
    requests: Mutex<HashMap<String, Bucket>>,
    streams: Mutex<HashMap<String, u32>>,
    failed: Mutex<(Bucket, u64)>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(LimitOptions::default())
    }
}

impl Limits {
    /// Limiters with these options.
    pub fn new(opts: LimitOptions) -> Self {
        let failed = Bucket::full(opts.failed_auth_burst);
        Self {
            opts,
            requests: Mutex::default(),
            streams: Mutex::default(),
            failed: Mutex::new((failed, 0)),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &LimitOptions {
        &self.opts
    }

    /// Counts one request of `principal`; refuses it above the rate.
    pub fn admit(&self, principal: &str) -> Result<()> {
        let now = Instant::now();
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, b| now.saturating_duration_since(b.at) < FORGET_AFTER);
        }
        let bucket = map
            .entry(principal.to_string())
            .or_insert_with(|| Bucket::full(self.opts.burst));
        if bucket.take(self.opts.requests_per_second, self.opts.burst, now) {
            Ok(())
        } else {
            Err(Error::ResourceExhausted {
                message: format!(
                    "principal `{principal}` exceeds limits.requests_per_second = {}; slow down and retry",
                    self.opts.requests_per_second
                ),
            })
        }
    }

    /// Whether a failed authentication may be audited now; `Some(n)` carries how many were
    /// refused unaudited since the last audited one.
    pub fn failed_auth(&self) -> Option<u64> {
        let mut guard = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let (bucket, suppressed) = &mut *guard;
        if bucket.take(
            self.opts.failed_auth_per_second,
            self.opts.failed_auth_burst,
            Instant::now(),
        ) {
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }

    /// Opens a stream slot for `principal`, released when the returned guard drops.
    pub fn open_stream(self: &Arc<Self>, principal: &str) -> Result<StreamSlot> {
        let mut map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let open = map.entry(principal.to_string()).or_insert(0);
        if *open >= self.opts.max_streams_per_principal {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "principal `{principal}` already has {open} streams open (limits.max_streams_per_principal = {}); finish or cancel one first, or ask the operator to raise the limit",
                    self.opts.max_streams_per_principal
                ),
            });
        }
        *open += 1;
        Ok(StreamSlot {
            limits: Arc::clone(self),
            principal: principal.to_string(),
        })
    }

    /// Streams `principal` has open.
    pub fn open_streams(&self, principal: &str) -> u32 {
        let map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        map.get(principal).copied().unwrap_or(0)
    }
}

/// An open stream, counted against its principal until dropped.
#[derive(Debug)]
pub struct StreamSlot {
    limits: Arc<Limits>,
    principal: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.limits.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.principal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_streams_and_failed_attempts_are_bounded() {
        let limits = Arc::new(Limits::new(LimitOptions {
            requests_per_second: 1,
            burst: 3,
            max_streams_per_principal: 2,
            failed_auth_per_second: 1,
            failed_auth_burst: 2,
            ..Default::default()
        }));
        for _ in 0..3 {
            limits.admit("a").unwrap();
        }
        let e = limits.admit("a").unwrap_err();
        assert_eq!(e.status(), crate::error::StatusClass::ResourceExhausted);
        assert!(e.to_string().contains("requests_per_second"));
        limits.admit("b").unwrap();

        let s1 = limits.open_stream("a").unwrap();
        let _s2 = limits.open_stream("a").unwrap();
        assert!(
            limits
                .open_stream("a")
                .unwrap_err()
                .to_string()
                .contains("2 streams open (limits.max_streams_per_principal = 2)")
        );
        let _other = limits.open_stream("b").unwrap();
        drop(s1);
        assert_eq!(limits.open_streams("a"), 1);
        let _s3 = limits.open_stream("a").unwrap();

        assert_eq!(limits.failed_auth(), Some(0));
        assert_eq!(limits.failed_auth(), Some(0));
        assert_eq!(limits.failed_auth(), None);
        assert_eq!(limits.failed_auth(), None);
        assert!(
            LimitOptions {
                burst: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
