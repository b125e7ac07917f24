//! # passerelle-connectors
//!
//! Turns a [`SourceSpec`] (location + format) into a DataFusion `TableProvider` that reads the
//! raw data. It knows nothing of policy: the gateway hands every provider it opens straight to
//! `passerelle_policies::enforce::GuardedTable::new`, the only consumer of raw sources.
//!
//! ```text
//!  SourceSpec { location: file:///…/ | s3://… , format } ──► listing::open ──► ListingTable
//! ```

pub mod error;
pub mod listing;
pub mod spec;

pub use error::{Error, Result};
pub use listing::open;
pub use spec::{Format, SourceSpec};
