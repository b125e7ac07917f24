//! `EnforceStream`: per batch, refresh consent if its version moved, build the keep-mask on the
//! subject column, filter only the columns that are sent, apply column actions.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::FilterBuilder;
use arrow::datatypes::SchemaRef;
use datafusion::error::Result as DfResult;
use datafusion::physical_plan::metrics::{BaselineMetrics, Count, ExecutionPlanMetricsSet, MetricBuilder};
use datafusion::physical_plan::{RecordBatchStream, SendableRecordBatchStream};
use futures::{Stream, StreamExt};

use crate::consent::SubjectSet;
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
    consent: Option<(u64, Arc<SubjectSet>)>,
    baseline: BaselineMetrics,
    dropped: Count,
}

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
            schema,
            consent: None,
            baseline: BaselineMetrics::new(metrics, partition),
            dropped: MetricBuilder::new(metrics).counter("dropped_no_consent", partition),
        }
    }

    fn current_consent(&mut self) -> Arc<SubjectSet> {
        let version = self.grant.consent.version();
        match &self.consent {
            Some((v, set)) if *v == version => Arc::clone(set),
            _ => {
                let (v, set) = self.grant.consent.snapshot();
                self.grant.counters.saw_version(v);
                self.consent = Some((v, Arc::clone(&set)));
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
            let polled = self.input.poll_next_unpin(cx);
            let batch = match polled {
                Poll::Ready(Some(Ok(b))) => b,
                other => return self.baseline.record_poll(other),
            };
            let elapsed = self.baseline.elapsed_compute().clone();
            let timer = elapsed.timer();
            let result = self.enforce(&batch);
            timer.done();
            match result {
                Ok(None) => continue,
                Ok(Some(out)) => return self.baseline.record_poll(Poll::Ready(Some(Ok(out)))),
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }
}

impl RecordBatchStream for EnforceStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}
