//! What an allowed request may receive: the column plan derived from the dataset's classification,
//! the recipient's pseudonymiser and the consent view. A `Grant` can only be made from an allowing
//! [`Decision`], so no code path builds a gate without a decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::authz::Decision;
use crate::classification::{DatasetPolicy, Generalisation, Treatment, is_supported_subject_type};
use crate::consent::index::KeyKind;
use crate::consent::{ConsentIndex, ConsentView};
use crate::enforce::pseudonymise::Pseudonymiser;
use crate::error::{Error, Result};
use crate::purpose::Purpose;

/// What the gate does to one column on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnAction {
    /// Sent as is.
    Keep,
    /// Replaced by the recipient's keyed pseudonym (Utf8).
    Pseudonymise,
    /// Generalised by the rule.
    Generalise(Generalisation),
    /// Sent as nulls of the column's type.
    Nullify,
}

/// Counters a stream updates as it goes, read by the audit at completion. Shared by every
/// partition of one request.
#[derive(Debug, Default)]
pub struct EnforceCounters {
    /// Rows read from the source.
    pub input_rows: AtomicU64,
    /// Rows the gate let through.
    pub output_rows: AtomicU64,
    /// Rows dropped for lack of consent (or null subject).
    pub dropped_no_consent: AtomicU64,
    /// First consent version used (0 until the first batch).
    pub first_consent_version: AtomicU64,
    /// Last consent version used.
    pub last_consent_version: AtomicU64,
}

impl EnforceCounters {
    pub(crate) fn saw_version(&self, v: u64) {
        let _ = self
            .first_consent_version
            .compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
        self.last_consent_version.fetch_max(v, Ordering::Relaxed);
    }
    /// Snapshot `(input, output, dropped)`.
    pub fn rows(&self) -> (u64, u64, u64) {
        (
            self.input_rows.load(Ordering::Relaxed),
            self.output_rows.load(Ordering::Relaxed),
            self.dropped_no_consent.load(Ordering::Relaxed),
        )
    }
}

/// An allowed request's enforcement context.
#[derive(Debug)]
pub struct Grant {
    pub(crate) policy: Arc<DatasetPolicy>,
    pub(crate) purpose: Purpose,
    pub(crate) pseudonymiser: Pseudonymiser,
    pub(crate) consent: ConsentView,
    /// Post-policy schema: one field per sent column, in source order.
    pub(crate) schema: SchemaRef,
    /// For each post-policy column: its index in the raw schema and its action.
    pub(crate) columns: Vec<(usize, ColumnAction)>,
    pub(crate) subject_index: usize,
    pub(crate) counters: Arc<EnforceCounters>,
}

impl Grant {
    /// Builds the grant for an allowed decision. Fails with `AccessDenied` if the decision denies,
    /// and with `InvalidManifest` if the source no longer matches the classification.
    pub fn new(
        decision: &Decision,
        policy: Arc<DatasetPolicy>,
        raw_schema: SchemaRef,
        purpose: Purpose,
        pseudonymiser: Pseudonymiser,
        consent: Arc<ConsentIndex>,
    ) -> Result<Self> {
        if !decision.allow {
            return Err(Error::AccessDenied {
                reason: decision.reason.clone(),
            });
        }
        policy.validate(&raw_schema)?;
        let subject_index = raw_schema
            .index_of(&policy.subject_column)
            .map_err(|_| Error::InvalidManifest {
                dataset: policy.name.to_string(),
                reason: format!("subject column `{}` is missing from the source", policy.subject_column),
            })?;
        let subject_type = raw_schema.field(subject_index).data_type();
        if !is_supported_subject_type(subject_type) {
            return Err(Error::Unsupported {
                what: format!("subject column of type {subject_type}"),
            });
        }
        let kind = KeyKind::of(subject_type);
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (i, field) in raw_schema.fields().iter().enumerate() {
            let action = match policy.treatment(field.name(), decision.special_category) {
                Treatment::Drop => continue,
                Treatment::Keep => ColumnAction::Keep,
                Treatment::Nullify => ColumnAction::Nullify,
                Treatment::Pseudonymise => ColumnAction::Pseudonymise,
                Treatment::Generalise(g) => ColumnAction::Generalise(g),
            };
            let out = match action {
                ColumnAction::Pseudonymise => Field::new(field.name(), DataType::Utf8, true),
                _ => field.as_ref().clone().with_nullable(true),
            };
            fields.push(out);
            columns.push((i, action));
        }
        let consent = ConsentView::new(
            consent,
            policy.consent_registry.clone(),
            purpose.clone(),
            policy.legal_basis,
            kind,
        );
        Ok(Self {
            policy,
            purpose,
            pseudonymiser,
            consent,
            schema: Arc::new(Schema::new(fields)),
            columns,
            subject_index,
            counters: Arc::new(EnforceCounters::default()),
        })
    }

    /// The post-policy schema clients see.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    /// Counters shared by every stream of this grant.
    pub fn counters(&self) -> Arc<EnforceCounters> {
        Arc::clone(&self.counters)
    }
    /// The dataset policy.
    pub fn policy(&self) -> &DatasetPolicy {
        &self.policy
    }
    /// The purpose.
    pub fn purpose(&self) -> &Purpose {
        &self.purpose
    }
    /// Current consent version of the dataset's registry.
    pub fn consent_version(&self) -> u64 {
        self.consent.version()
    }
}
