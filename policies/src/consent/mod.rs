//! Consent: durable events in SQLite ([`store`]) and the in-memory index the gate probes
//! ([`index`]). Events are append-only; the latest event for a subject among the requested purpose
//! and its ancestors decides.

pub mod event;
pub mod index;
pub mod store;

pub use event::{ConsentEvent, ConsentStatus};
pub use index::{Clock, ConsentIndex, ConsentSnapshot, ConsentView, SubjectSet, SystemClock};
pub use store::ConsentStore;
