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
pub mod local;
pub mod location;
pub mod spec;
pub mod stores;

pub use error::{Error, Result};
pub use listing::{open, verify};
pub use local::ConfinedFileSystem;
pub use location::{CanonicalLocation, LocationOptions, Locations, NotInALocation, Scheme};
pub use spec::{CsvColumn, CsvOptions, Format, SourceSpec};
pub use stores::{Secret, StoreKind, StoreOptions, Stores};
