//! `serve --demo`: a deterministic synthetic health dataset for member state FR, its manifest,
//! consent records, principals and a permit, so a newcomer can pull a governed stream at once.
//!
//! Files (under the data directory): `demo/patients/patients.parquet`, `demo/consent.csv`,
//! `demo/demo_patients.toml`, and `demo-keys.json` (the demo principals' keys, mode 0600).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use passerelle_policies::{DatasetId, Permit, Principal, Purpose, Role};
use serde_json::json;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::node::Node;

/// The demo's consent registry.
pub const DEMO_REGISTRY: &str = "aphp-patients";
/// The organisation that controls the demo dataset.
pub const DEMO_CONTROLLER: &str = "aphp";
/// The demo dataset.
pub const DEMO_DATASET: &str = "demo_patients";

fn mix(mut z: u64) -> u64 {
    // splitmix64: deterministic, well spread, no dependency.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const FIRST: &[&str] = &[
    "Marie", "Jean", "Camille", "Lucas", "Léa", "Hugo", "Chloé", "Louis", "Emma", "Gabriel", "Inès", "Arthur",
];
const LAST: &[&str] = &[
    "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau", "Simon",
    "Laurent",
];
const DIAGNOSES: &[&str] = &["E11.9", "E10.9", "E11.65", "I10", "E78.5", "N18.3", "E66.9", "R73.03"];

/// Number of subjects for `rows` rows (about two admissions each).
pub fn subjects_for(rows: usize) -> u64 {
    (rows as u64 / 2).max(1)
}

fn batch(schema: &Arc<Schema>, start: usize, len: usize, subjects: u64) -> Result<RecordBatch> {
    const EPOCH_2018_US: i64 = 1_514_764_800_000_000;
    const SIX_YEARS_US: u64 = 6 * 365 * 86_400 * 1_000_000;
    let ids: Vec<i64> = (start..start + len)
        .map(|i| (mix(i as u64) % subjects) as i64 + 1)
        .collect();
    let names: Vec<String> = ids
        .iter()
        .map(|&s| {
            let h = mix(s as u64 ^ 0xA11CE);
            format!(
                "{} {}",
                FIRST[(h % FIRST.len() as u64) as usize],
                LAST[((h >> 8) % LAST.len() as u64) as usize]
            )
        })
        .collect();
    // Born 1930-01-01 .. 2009-12-31 (days since epoch -14610 .. 14609).
    let births: Vec<i32> = ids
        .iter()
        .map(|&s| (mix(s as u64 ^ 0xB1B) % 29_220) as i32 - 14_610)
        .collect();
    let postcodes: Vec<String> = ids
        .iter()
        .map(|&s| format!("{:05}", 1_000 + mix(s as u64 ^ 0x9057) % 94_000))
        .collect();
    let diagnoses: Vec<&str> = (start..start + len)
        .map(|i| DIAGNOSES[(mix(i as u64 ^ 0xD1A) % DIAGNOSES.len() as u64) as usize])
        .collect();
    let hba1c: Vec<f64> = (start..start + len)
        .map(|i| (45 + mix(i as u64 ^ 0x4BA) % 80) as f64 / 10.0)
        .collect();
    let admitted: Vec<i64> = (start..start + len)
        .map(|i| EPOCH_2018_US + (mix(i as u64 ^ 0xADD) % SIX_YEARS_US) as i64)
        .collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(StringArray::from(names)),
        Arc::new(Date32Array::from(births)),
        Arc::new(StringArray::from(postcodes)),
        Arc::new(StringArray::from(diagnoses)),
        Arc::new(Float64Array::from(hba1c)),
        Arc::new(TimestampMicrosecondArray::from(admitted).with_timezone("UTC")),
    ];
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// The demo's raw schema.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("full_name", DataType::Utf8, false),
        Field::new("birth_date", DataType::Date32, false),
        Field::new("postcode", DataType::Utf8, false),
        Field::new("diagnosis", DataType::Utf8, false),
        Field::new("hba1c", DataType::Float64, false),
        Field::new(
            "admitted_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Writes `rows` deterministic rows to a Parquet file.
pub fn write_parquet(path: &Path, rows: usize) -> Result<()> {
    let io = |op: &'static str| {
        move |source| Error::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        crate::data_dir::create_private_dirs(dir)?;
    }
    let tmp = path.with_extension("parquet.tmp");
    let file = crate::data_dir::create_private_file(&tmp)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(128 * 1024))
        .build();
    let schema = schema();
    let pq = |e: parquet::errors::ParquetError| Error::Internal(format!("write demo parquet: {e}"));
    let mut w = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props)).map_err(pq)?;
    let subjects = subjects_for(rows);
    let mut start = 0;
    while start < rows {
        let len = (rows - start).min(64 * 1024);
        w.write(&batch(&schema, start, len, subjects)?).map_err(pq)?;
        start += len;
    }
    w.close().map_err(pq)?;
    std::fs::rename(&tmp, path).map_err(io("install file"))?;
    Ok(())
}

/// Consent events for `subjects` subjects: about 70 % may be used for `research/ai-training`
/// (granted there or on `research`), some of them withdrew later, some granted only
/// `research/epidemiology`, the rest never answered.
pub fn consent_csv(subjects: u64) -> String {
    let mut out = String::from("subject_id,purpose,status,timestamp\n");
    for s in 1..=subjects {
        let r = mix(s ^ 0xC0_5E17) % 100;
        let day = 1 + (mix(s ^ 0xDA7) % 28);
        let t0 = format!("2023-03-{day:02}T09:00:00Z");
        let t1 = format!("2024-06-{day:02}T17:30:00Z");
        match r {
            0..=4 => {
                let _ = writeln!(out, "{s},research/ai-training,granted,{t0}");
                let _ = writeln!(out, "{s},research/ai-training,withdrawn,{t1}");
            }
            5..=69 => {
                let _ = writeln!(out, "{s},research/ai-training,granted,{t0}");
            }
            70..=79 => {
                let _ = writeln!(out, "{s},research/epidemiology,granted,{t0}");
            }
            80..=84 => {
                let _ = writeln!(out, "{s},research,granted,{t0}");
            }
            85..=86 => {
                let _ = writeln!(out, "{s},research,granted,{t0}");
                let _ = writeln!(out, "{s},research/ai-training,withdrawn,{t1}");
            }
            _ => {}
        }
    }
    out
}

pub(crate) fn manifest_toml(location: &str) -> String {
    format!(
        r#"name = "{DEMO_DATASET}"
location = "{location}"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
consent_registry = "{DEMO_REGISTRY}"
purposes = ["research/ai-training", "research/epidemiology"]

[columns]
patient_id  = {{ class = "identifier" }}
full_name   = {{ class = "direct-identifier" }}
birth_date  = {{ class = "quasi-identifier", generalise = "year" }}
postcode    = {{ class = "quasi-identifier", generalise = "prefix:2" }}
diagnosis   = {{ class = "sensitive" }}
hba1c       = {{ class = "sensitive" }}
admitted_at = {{ class = "non-personal" }}
"#
    )
}

/// Writes a demo file (mode 0600, as every file of the data directory).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    crate::data_dir::create_private_file(path)?
        .write_all(bytes)
        .map_err(|source| Error::Io {
            op: "write",
            path: path.display().to_string(),
            source,
        })
}

/// Creates the demo in `node`'s data directory unless `demo-keys.json` already exists.
/// Returns whether it created anything.
pub async fn ensure_demo(node: &Node, rows: usize) -> Result<bool> {
    let dir = &node.data_dir;
    let keys_path = dir.join("demo-keys.json");
    if keys_path.exists() {
        return Ok(false);
    }
    let io = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { op, path, source }
    };
    let demo = dir.join("demo");
    let data = demo.join("patients");
    let started = std::time::Instant::now();
    write_parquet(&data.join("patients.parquet"), rows)?;
    let location = format!(
        "file://{}/",
        std::fs::canonicalize(&data).map_err(io("resolve", &data))?.display()
    );
    let toml = manifest_toml(&location);
    let manifest_path = demo.join("demo_patients.toml");
    write_private(&manifest_path, toml.as_bytes())?;
    let csv = consent_csv(subjects_for(rows));
    let csv_path = demo.join("consent.csv");
    write_private(&csv_path, csv.as_bytes())?;

    let manifest = Manifest::from_toml(&toml)?;
    node.register_dataset(&manifest).await?;
    node.append_consent(DEMO_REGISTRY, &crate::consent_file::parse_csv(&csv)?)
        .await?;
    let people = [
        ("steward-fr", "aphp", "FR", Role::Steward),
        ("trainer-de", "dkfz", "DE", Role::Trainer),
        ("auditor-eu", "eu-audit", "EU", Role::Auditor),
    ];
    let mut keys = serde_json::Map::new();
    for (name, org, ms, role) in people {
        let p = Principal {
            name: name.into(),
            org: org.into(),
            member_state: ms.into(),
            role,
        };
        let key = node.add_principal(&p).await.map_err(|e| match e {
            Error::AlreadyExists { .. } => Error::invalid(
                format!(
                    "the data directory `{}` holds part of an earlier demo but no demo-keys.json",
                    dir.display()
                ),
                "remove the data directory (or point --data-dir elsewhere) and start again",
            ),
            other => other,
        })?;
        keys.insert(
            name.into(),
            json!({ "key": key, "org": org, "member_state": ms, "role": role.as_str() }),
        );
    }
    node.add_permit(&Permit {
        dataset: DatasetId::parse(DEMO_DATASET)?,
        org: "dkfz".into(),
        purpose: Purpose::parse("research/ai-training")?,
        expires: None,
        special_category: false,
    })
    .await?;

    let body = serde_json::to_vec_pretty(&keys).map_err(|e| Error::Internal(e.to_string()))?;
    let tmp = keys_path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut f = crate::data_dir::create_private_file(&tmp)?;
        f.write_all(&body).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
    }
    std::fs::rename(&tmp, &keys_path).map_err(io("install", &keys_path))?;
    tracing::info!(
        rows,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "demo data created"
    );
    Ok(true)
}

/// The pyarrow and ADBC snippet `serve --demo` prints. With TLS the URL is `grpc+tls://` and the
/// client must trust the node's certificate authority (a comment says how).
pub fn snippet(flight_addr: &str, trainer_key: &str, tls: bool) -> String {
    let (scheme, trust) = match tls {
        true => (
            "grpc+tls",
            "\n# TLS: fl.connect(url, tls_root_certs=open(\"ca-bundle.pem\", \"rb\").read()); ADBC: \"adbc.flight.sql.client_option.tls_root_certs\"",
        ),
        false => ("grpc", ""),
    };
    format!(
        r#"
# Pull the governed demo stream with pyarrow (pip install pyarrow):{trust}
import pyarrow.flight as fl
client = fl.connect("{scheme}://{flight_addr}")
opts = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer {trainer_key}"),
                                     (b"x-passerelle-purpose", b"research/ai-training")])
info = client.get_flight_info(fl.FlightDescriptor.for_path("{DEMO_DATASET}"), opts)
table = client.do_get(info.endpoints[0].ticket, opts).read_all()
print(table.num_rows, table.schema)

# Or query it with SQL over Flight SQL (pip install adbc-driver-flightsql pyarrow):
import adbc_driver_flightsql.dbapi as flight_sql
conn = flight_sql.connect("{scheme}://{flight_addr}", db_kwargs={{
    "adbc.flight.sql.authorization_header": "Bearer {trainer_key}",
    "adbc.flight.sql.rpc.call_header.x-passerelle-purpose": "research/ai-training"}})
cur = conn.cursor()
cur.execute("SELECT diagnosis, count(*) AS n, avg(hba1c) FROM {DEMO_DATASET} GROUP BY diagnosis")
print(cur.fetch_arrow_table())
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_csv_parses_and_has_the_advertised_mix() {
        let csv = consent_csv(10_000);
        let events = crate::consent_file::parse_csv(&csv).unwrap();
        assert!(events.len() > 8_000);
    }

    #[test]
    fn batches_are_deterministic() {
        let s = schema();
        let a = batch(&s, 0, 100, 50).unwrap();
        let b = batch(&s, 0, 100, 50).unwrap();
        assert_eq!(a, b);
    }
}
