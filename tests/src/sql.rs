//! Flight SQL fixtures: two more datasets next to the demo (for joins across registries and the
//! aggregates-only release), a principal with no permit, and a Flight SQL client.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use passerelle::manifest::Manifest;
use passerelle_policies::consent::ConsentEvent;
use passerelle_policies::{DatasetId, Permit, Principal, Purpose, Role};
use tonic::transport::Channel;

use crate::TestGateway;

/// Two visits per demo subject; `cost = subject * 10 + visit` is unique per row.
pub const VISITS: &str = "demo_visits";
/// The same file released as aggregates only, groups of at least [`MIN_GROUP`] rows.
pub const VISITS_AGG: &str = "visits_agg";
/// Minimum group size of [`VISITS_AGG`].
pub const MIN_GROUP: u32 = 5;
/// Consent registry of the visits: even subjects granted `research/ai-training`.
pub const VISITS_REGISTRY: &str = "aphp-visits";
/// Wards, assigned `(subject + visit) % 4`.
pub const WARDS: [&str; 4] = ["cardiology", "endocrinology", "nephrology", "oncology"];
/// A trainer of another organisation and member state, with no permit.
pub const OUTSIDER: &str = "outsider";

fn visits_batch(subjects: u64) -> anyhow::Result<RecordBatch> {
    let n = subjects as usize * 2;
    let (mut ids, mut wards, mut costs) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for s in 0..subjects as i64 {
        for v in 0..2i64 {
            ids.push(s);
            wards.push(WARDS[((s + v) % 4) as usize]);
            costs.push((s * 10 + v) as f64);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("ward", DataType::Utf8, false),
        Field::new("cost", DataType::Float64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(wards)),
            Arc::new(Float64Array::from(costs)),
        ],
    )?)
}

fn manifest(name: &str, location: &str, extra: &str) -> anyhow::Result<Manifest> {
    Ok(Manifest::from_toml(&format!(
        r#"name = "{name}"
location = "{location}"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
consent_registry = "{VISITS_REGISTRY}"
purposes = ["research/ai-training"]
{extra}
[columns]
patient_id = {{ class = "identifier" }}
ward       = {{ class = "non-personal" }}
cost       = {{ class = "non-personal" }}
"#
    ))?)
}

/// Registers [`VISITS`] and [`VISITS_AGG`] for the demo's `subjects`, grants consent to even
/// subjects in [`VISITS_REGISTRY`], permits `dkfz`, and adds [`OUTSIDER`]. Returns the
/// outsider's key.
pub async fn add_sql_fixtures(gw: &TestGateway, subjects: u64) -> anyhow::Result<String> {
    // Under `demo/`: the only part of a data directory open to registration.
    let dir = gw.data_dir().join("demo").join("visits");
    std::fs::create_dir_all(&dir)?;
    let batch = visits_batch(subjects)?;
    let file = std::fs::File::create(dir.join("visits.parquet"))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    let location = format!("{}/", dir.display());
    gw.node.register_dataset(&manifest(VISITS, &location, "")?).await?;
    gw.node
        .register_dataset(&manifest(
            VISITS_AGG,
            &location,
            &format!("release = \"aggregates\"\nmin_group_size = {MIN_GROUP}"),
        )?)
        .await?;
    let events = (0..subjects)
        .filter(|s| s % 2 == 0)
        .map(|s| {
            ConsentEvent::parse(
                &s.to_string(),
                "research/ai-training",
                "granted",
                "2024-01-01T00:00:00Z",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    gw.node.append_consent(VISITS_REGISTRY, &events).await?;
    for ds in [VISITS, VISITS_AGG] {
        gw.node
            .add_permit(&Permit {
                dataset: DatasetId::parse(ds)?,
                org: "dkfz".into(),
                purpose: Purpose::parse("research/ai-training")?,
                expires: None,
                special_category: false,
            })
            .await?;
    }
    let key = gw
        .node
        .add_principal(&Principal {
            name: OUTSIDER.into(),
            org: "other".into(),
            member_state: "IT".into(),
            role: Role::Trainer,
        })
        .await?;
    gw.node.refresh().await?;
    Ok(key)
}

/// A Flight SQL client sending a bearer key and a purpose on every call.
pub async fn sql_client(gw: &TestGateway, key: &str, purpose: &str) -> anyhow::Result<FlightSqlServiceClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{}", gw.flight_addr))?
        .connect()
        .await?;
    let mut c = FlightSqlServiceClient::new(channel);
    c.set_header("authorization", format!("Bearer {key}"));
    c.set_header("x-passerelle-purpose", purpose);
    Ok(c)
}

/// Runs a statement (GetFlightInfo, then DoGet on every endpoint) and returns all batches.
pub async fn query(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Vec<RecordBatch>, FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    let mut out = Vec::new();
    for ep in info.endpoint {
        let ticket = ep
            .ticket
            .ok_or_else(|| FlightError::protocol("endpoint without ticket"))?;
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        out.extend(batches);
    }
    Ok(out)
}
