//! # passerelle-connectors
//!
//! Turns a [`SourceSpec`] (location + format) into a DataFusion `TableProvider` that reads the
//! raw data. It knows nothing of policy: the gateway hands every provider it opens straight to
//! `passerelle_policies::enforce::GuardedTable::new`, the only consumer of raw sources.
//!
//! ```text
//!  SourceSpec { location: file:///…/ | s3://… , format, store } ──► listing::open ──► ListingTable
//!                                  stores::Stores::prepare ─► object_store client in the shared registry
//! ```

pub mod error;
pub mod listing;
pub mod spec;
pub mod stores;

pub use error::{Error, Result};
pub use listing::{open, verify};
pub use spec::{CsvColumn, CsvOptions, Format, SourceSpec};
pub use stores::{Secret, StoreKind, StoreOptions, Stores};
