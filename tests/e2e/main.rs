//! End-to-end tests: one in-process gateway per test, real Flight clients over loopback.
//!
//! Run: `cargo test -p passerelle-tests --test e2e`

// Test code: panicking on unexpected results is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod config;
mod decoders;
mod flight;
mod policy;
mod reference;
mod sql;
mod withdrawal;
