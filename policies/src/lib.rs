//! # passerelle-policies
//!
//! Owns every decision about what leaves a Passerelle node: purposes and their hierarchy, column
//! classification, casbin authorisation, consent (durable events and the in-memory index) and
//! the vectorised enforcement core.
//!
//! It must never speak Flight, HTTP or object stores, and never import `passerelle-connectors`
//! or `passerelle`: it sees sources only as DataFusion `TableProvider`s.
//!
//! ```text
//!  Flight / SQL request ──► authz::Authorizer::decide ──► Decision
//!                                                          │ allow
//!                          enforce::Grant::new(decision, policy, raw schema, purpose, key, consent)
//!                                                          │
//!  DataFusion plan:  user ops ─► EnforceExec ─► raw scan   (GuardedTable::scan)
//!                                    │
//!                      EnforceStream: consent mask ─► filter ─► pseudonymise / generalise
//! ```

pub mod authz;
pub mod classification;
pub mod consent;
pub mod enforce;
pub mod error;
pub mod purpose;

pub use authz::{Authorizer, Decision, Permit, Principal, Role};
pub use classification::{
    ColumnClass, ColumnPolicy, DEFAULT_MIN_GROUP_SIZE, DatasetId, DatasetPolicy, Generalisation, LegalBasis, Mask,
    MemberState, Release, Treatment,
};
pub use error::{Error, Result};
pub use purpose::Purpose;
