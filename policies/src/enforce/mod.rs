//! The single enforcement gate: `GuardedTable -> EnforceExec -> EnforceStream`.
//!
//! ```text
//!  user plan (filter, projection, limit, SQL)      <- user expressions live only up here
//!        │
//!  EnforceExec        consent mask, column actions (pseudonymise / generalise), drop hidden
//!        │
//!  raw scan (connectors)  no user filters, no limit: only the columns the gate needs
//! ```
//!
//! The gate reports `Unsupported` for every filter, so DataFusion places user predicates above
//! it: no user expression is evaluated on a row the caller may not see.

pub mod barrier;
pub mod exec;
pub mod fallible;
pub mod grant;
pub mod kernels;
pub mod provider;
pub mod pseudonymise;
pub mod release;
mod sha256x4;
pub mod stream;

pub use barrier::{ReleaseBarrier, ReleaseBarrierExec, query_planner};
pub use exec::EnforceExec;
pub use fallible::check_fallible;
pub use grant::{ColumnAction, EnforceCounters, Grant};
pub use provider::GuardedTable;
pub use pseudonymise::Pseudonymiser;
pub use release::{enforce_release, k_floor, k_floor_scans};
pub use stream::EnforceStream;
