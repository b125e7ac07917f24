//! `EnforceStream`: per batch, refresh consent if its version moved, build the keep-mask on the
//! subject column, filter only the columns that are sent, apply column actions.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::{BatchCoalescer, FilterBuilder};
use arrow::datatypes::SchemaRef;
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::metrics::{BaselineMetrics, Count, ExecutionPlanMetricsSet, MetricBuilder};
use datafusion::physical_plan::{RecordBatchStream, SendableRecordBatchStream};
use futures::{Stream, StreamExt};

use crate::consent::{ConsentSnapshot, SubjectSet};
use crate::enforce::grant::{ColumnAction, Grant};
use crate::enforce::kernels::{consent_mask, generalise};
use crate::error::Result;

/// Streams the input through the gate. Consent is re-read at every batch boundary, so a
/// withdrawal reaches a stream that is already open.
pub struct EnforceStream {
    input: SendableRecordBatchStream,
    grant: Arc<Grant>,
    outputs: Vec<(usize, ColumnAction)>,
    subject: usize,
    schema: SchemaRef,
    consent: Option<ConsentSnapshot>,
    /// Gathers small filtered batches into training-sized ones; large ones pass through.
    coalescer: BatchCoalescer,
    input_done: bool,
    baseline: BaselineMetrics,
    dropped: Count,
}

/// Rows per output batch the coalescer aims for.
const TARGET_BATCH_ROWS: usize = 8192;

impl EnforceStream {
    pub(crate) fn new(
        input: SendableRecordBatchStream,
        grant: Arc<Grant>,
        outputs: Vec<(usize, ColumnAction)>,
        subject: usize,
        schema: SchemaRef,
        metrics: &ExecutionPlanMetricsSet,
        partition: usize,
    ) -> Self {
        Self {
            input,
            grant,
            outputs,
            subject,
            schema: Arc::clone(&schema),
            consent: None,
            coalescer: BatchCoalescer::new(Arc::clone(&schema), TARGET_BATCH_ROWS)
                .with_biggest_coalesce_batch_size(Some(TARGET_BATCH_ROWS / 2)),
            input_done: false,
            baseline: BaselineMetrics::new(metrics, partition),
            dropped: MetricBuilder::new(metrics).counter("dropped_no_consent", partition),
        }
    }

    fn current_consent(&mut self) -> Arc<SubjectSet> {
        match &self.consent {
            Some(snap) if self.grant.consent.is_current(snap) => Arc::clone(&snap.set),
            _ => {
                let snap = self.grant.consent.snapshot();
                self.grant.counters.saw_version(snap.version);
                let set = Arc::clone(&snap.set);
                self.consent = Some(snap);
                set
            }
        }
    }

    /// Applies the gate to one batch; `None` when no row survives (empty batches are not sent).
    fn enforce(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let n = batch.num_rows();
        let counters = Arc::clone(&self.grant.counters);
        counters.input_rows.fetch_add(n as u64, Ordering::Relaxed);
        if n == 0 {
            return Ok(None);
        }
        let set = self.current_consent();
        let mask = consent_mask(
            batch.column(self.subject).as_ref(),
            &set,
            self.grant.consent.keep_members(),
        )?;
        let kept = mask.true_count();
        let dropped = (n - kept) as u64;
        counters.dropped_no_consent.fetch_add(dropped, Ordering::Relaxed);
        self.dropped.add(n - kept);
        if kept == 0 {
            return Ok(None);
        }
        let filter = (kept < n).then(|| FilterBuilder::new(&mask).optimize().build());
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.outputs.len());
        for (pos, action) in &self.outputs {
            let col = batch.column(*pos);
            let col = match &filter {
                Some(f) => f.filter(col.as_ref())?,
                None => Arc::clone(col),
            };
            columns.push(match action {
                ColumnAction::Keep => col,
                ColumnAction::Pseudonymise => self.grant.pseudonymiser.apply(&col)?,
                ColumnAction::Generalise(g) => generalise(&col, *g)?,
                ColumnAction::Nullify => arrow::array::new_null_array(col.data_type(), col.len()),
            });
        }
        let out = RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(kept)),
        )?;
        counters.output_rows.fetch_add(kept as u64, Ordering::Relaxed);
        Ok(Some(out))
    }
}

impl Stream for EnforceStream {
    type Item = DfResult<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(done) = self.coalescer.next_completed_batch() {
                return self.baseline.record_poll(Poll::Ready(Some(Ok(done))));
            }
            if self.input_done {
                return self.baseline.record_poll(Poll::Ready(None));
            }
            let batch = match self.input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => b,
                Poll::Ready(Some(Err(e))) => {
                    // Errors from below the gate can quote raw rows (CSV parse errors print the
                    // row): log them, send a masked error.
                    let dataset = self.grant.policy.name.to_string();
                    tracing::error!(%dataset, error = %e, "source failed below the gate");
                    return Poll::Ready(Some(Err(crate::error::Error::SourceRead { dataset }.into())));
                }
                Poll::Ready(None) => {
                    self.input_done = true;
                    if let Err(e) = self.coalescer.finish_buffered_batch() {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            let elapsed = self.baseline.elapsed_compute().clone();
            let timer = elapsed.timer();
            let result = self.enforce(&batch).and_then(|out| match out {
                Some(out) => self.coalescer.push_batch(out).map_err(Into::into),
                None => Ok(()),
            });
            timer.done();
            if let Err(e) = result {
                return Poll::Ready(Some(Err(e.into())));
            }
        }
    }
}

impl RecordBatchStream for EnforceStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}
