//! # passerelle
//!
//! The gateway a member state runs: Arrow Flight and REST in front of its datasets, every data
//! path through the single gate in `passerelle-policies`, every access in the audit log.
//!
//! ```text
//!  client ──Flight──► flight::FlightHandler ──► catalog::plan ──► GuardedTable ─► EnforceExec ─► raw scan
//!         ──Flight SQL► flight_sql::SqlService ──► sql::plan_sql ──► (same GuardedTable per dataset)
//!         ──REST────► admin::router ──► node::Node (MetaStore, ConsentStore, AuditLog, ConsentIndex)
//!  CLI    ──────────► cli::run_admin ──► node::Node (same operations, same SQLite data directory)
//! ```
//!
//! It must never register a raw source in a query context: `catalog::guarded_context` takes only
//! `GuardedTable`s.

pub mod admin;
pub mod audit;
pub mod audit_table;
pub mod auth;
#[cfg(feature = "bench")]
pub mod bench_support;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consent_file;
pub mod data_dir;
pub mod demo;
pub mod error;
pub mod explain;
pub mod federated_sql;
pub mod federation;
pub mod flight;
pub mod flight_sql;
pub mod ipc;
pub mod limits;
pub mod manifest;
pub mod meta;
pub mod nesting;
pub mod node;
pub mod signing;
pub mod sql;
pub mod startup;
pub mod ticket;
pub mod tls;

pub use error::{Error, Result};
