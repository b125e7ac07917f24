//! Bounds on Arrow IPC read from outside: parameters a client binds (DoPut) and the streams
//! peers send for federated SQL.
//!
//! arrow-ipc trusts what a message says about itself: a compressed buffer starts with its
//! uncompressed length, and the reader allocates that much before decompressing (an LZ4 body
//! of a few bytes may claim 2^45); a buffer's offset and length are sliced from the body with
//! an assertion (a panic when out of range); a row count sizes the arrays built from it later
//! (null columns, casts). arrow has no reader option for any of this, so every message is
//! checked here, from its flatbuffer header, before a byte of it is decoded.

use arrow::ipc::{MessageHeader, root_as_message};
use arrow_flight::FlightData;

/// Most bytes one message's buffers may hold once decompressed: what this node itself may send
/// in one gRPC message.
pub const MAX_DECOMPRESSED_MESSAGE: u64 = 64 * 1024 * 1024;

/// Most rows one message may carry (a batch is 8192 rows here; other writers use up to ~1M).
pub const MAX_MESSAGE_ROWS: i64 = 16 * 1024 * 1024;

/// Checks one Flight message against the bounds: `max_decompressed` bytes of buffers once
/// decompressed, [`MAX_MESSAGE_ROWS`] rows, every buffer inside the body. The error says which
/// bound was crossed.
pub fn check(data: &FlightData, max_decompressed: u64) -> Result<(), String> {
    if data.data_header.is_empty() {
        return Ok(());
    }
    let message =
        root_as_message(&data.data_header).map_err(|e| format!("the message header is not Arrow IPC: {e}"))?;
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => message.header_as_dictionary_batch().and_then(|d| d.data()),
        // Schemas carry no buffers; the decoder refuses other kinds.
        _ => return Ok(()),
    };
    let Some(batch) = batch else {
        return Err("the message header names a batch but holds none".into());
    };
    let too_many_rows = |n: i64| !(0..=MAX_MESSAGE_ROWS).contains(&n);
    if too_many_rows(batch.length())
        || batch
            .nodes()
            .is_some_and(|n| n.iter().any(|n| too_many_rows(n.length())))
    {
        return Err(format!(
            "a batch claims {} rows, more than the {MAX_MESSAGE_ROWS} one message may carry",
            batch.length()
        ));
    }
    let body = &data.data_body[..];
    let compressed = batch.compression().is_some();
    let mut total: u64 = 0;
    for buf in batch.buffers().iter().flatten() {
        let (Ok(offset), Ok(len)) = (usize::try_from(buf.offset()), usize::try_from(buf.length())) else {
            return Err("a buffer has a negative offset or length".into());
        };
        let Some(bytes) = offset.checked_add(len).and_then(|end| body.get(offset..end)) else {
            return Err(format!(
                "a buffer ({len} bytes at {offset}) lies outside the {}-byte body",
                body.len()
            ));
        };
        let size = match (compressed, bytes.first_chunk::<8>()) {
            (false, _) | (true, None) => len as u64,
            // -1: stored uncompressed after the prefix.
            (true, Some(prefix)) => match i64::from_le_bytes(*prefix) {
                -1 => len as u64,
                n => u64::try_from(n).map_err(|_| format!("a compressed buffer claims {n} bytes"))?,
            },
        };
        total = total.saturating_add(size);
        if total > max_decompressed {
            return Err(format!(
                "the message's buffers claim at least {total} bytes uncompressed, more than the {max_decompressed}-byte limit"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
    use std::sync::Arc;

    fn messages(options: &IpcWriteOptions) -> Vec<FlightData> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1; 1000])),
                Arc::new(StringArray::from(vec![Some("x"); 1000])),
            ],
        )
        .unwrap();
        let (_, encoded) = IpcDataGenerator::default()
            .encode(
                &batch,
                &mut DictionaryTracker::new(false),
                options,
                &mut Default::default(),
            )
            .unwrap();
        vec![encoded.into()]
    }

    #[test]
    fn honest_messages_pass_and_the_limit_is_the_decompressed_size() {
        let plain = messages(&IpcWriteOptions::default());
        check(&plain[0], MAX_DECOMPRESSED_MESSAGE).unwrap();
        let lz4 = messages(
            &IpcWriteOptions::default()
                .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
                .unwrap(),
        );
        check(&lz4[0], MAX_DECOMPRESSED_MESSAGE).unwrap();
        // 1000 Int64 = 8000 bytes once decompressed, whatever the compressed size.
        let err = check(&lz4[0], 4000).unwrap_err();
        assert!(err.contains("4000-byte limit"), "{err}");
    }

    #[test]
    fn a_buffer_claiming_two_to_the_45_bytes_is_refused_before_decoding() {
        let mut lz4 = messages(
            &IpcWriteOptions::default()
                .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
                .unwrap(),
        )
        .remove(0);
        let message = root_as_message(&lz4.data_header).unwrap();
        let buffers: Vec<_> = message
            .header_as_record_batch()
            .unwrap()
            .buffers()
            .unwrap()
            .iter()
            .collect();
        let data = buffers.iter().find(|b| b.length() >= 8).unwrap();
        let mut body = lz4.data_body.to_vec();
        let at = data.offset() as usize;
        body[at..at + 8].copy_from_slice(&(1i64 << 45).to_le_bytes());
        lz4.data_body = body.into();
        let err = check(&lz4, MAX_DECOMPRESSED_MESSAGE).unwrap_err();
        assert!(err.contains("35184372088832"), "{err}");
    }

    #[test]
    fn buffers_outside_the_body_are_refused() {
        let mut plain = messages(&IpcWriteOptions::default()).remove(0);
        plain.data_body = plain.data_body.slice(0..16);
        assert!(check(&plain, MAX_DECOMPRESSED_MESSAGE).unwrap_err().contains("outside"));
        let garbage = FlightData {
            data_header: vec![1, 2, 3].into(),
            ..Default::default()
        };
        assert!(check(&garbage, MAX_DECOMPRESSED_MESSAGE).is_err());
    }
}
