//! Fixtures for Passerelle's end-to-end tests and benches: an in-process gateway on port 0 with
//! the demo data, stopped through a shutdown channel (no sleeps), and Flight clients for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::TryStreamExt;
use passerelle::config::GatewayConfig;
use passerelle::node::Node;
use passerelle::startup::Application;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub mod sql;

/// A running in-process gateway.
pub struct TestGateway {
    /// Flight address.
    pub flight_addr: SocketAddr,
    /// REST address.
    pub http_addr: SocketAddr,
    /// The node, for direct store access in tests.
    pub node: Arc<Node>,
    /// Demo principal name -> API key.
    pub keys: HashMap<String, String>,
    shutdown: watch::Sender<bool>,
    handle: JoinHandle<passerelle::Result<()>>,
    _dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
}

impl TestGateway {
    /// Starts a gateway with `rows` demo rows in a fresh temporary directory.
    pub async fn start(rows: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        let mut gw = Self::start_in(&path, rows).await?;
        gw._dir = Some(dir);
        Ok(gw)
    }

    /// Starts a gateway with `rows` demo rows and a configuration adjusted by `adjust`.
    pub async fn start_with(rows: usize, adjust: impl FnOnce(&mut GatewayConfig, &Path)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        let mut gw = Self::start_configured(&path, rows, adjust).await?;
        gw._dir = Some(dir);
        Ok(gw)
    }

    /// Starts a gateway on an existing data directory.
    pub async fn start_in(data_dir: &Path, rows: usize) -> anyhow::Result<Self> {
        Self::start_configured(data_dir, rows, |_, _| {}).await
    }

    async fn start_configured(
        data_dir: &Path,
        rows: usize,
        adjust: impl FnOnce(&mut GatewayConfig, &Path),
    ) -> anyhow::Result<Self> {
        let mut cfg = GatewayConfig {
            data_dir: Some(data_dir.to_path_buf()),
            ..Default::default()
        };
        cfg.server.flight_addr = "127.0.0.1:0".into();
        cfg.server.http_addr = "127.0.0.1:0".into();
        cfg.demo.enabled = true;
        cfg.demo.rows = rows;
        adjust(&mut cfg, data_dir);
        let app = Application::build(&cfg).await?;
        let (flight_addr, http_addr, node) = (app.flight_addr(), app.http_addr(), app.node());
        let keys_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data_dir.join("demo-keys.json"))?)?;
        let keys = keys_json
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v["key"].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let (shutdown, rx) = watch::channel(false);
        let handle = tokio::spawn(app.run_until_stopped(rx));
        Ok(Self {
            flight_addr,
            http_addr,
            node,
            keys,
            shutdown,
            handle,
            _dir: None,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A demo principal's key.
    pub fn key(&self, name: &str) -> String {
        self.keys.get(name).cloned().unwrap_or_default()
    }

    /// A Flight client with the given headers (`None` leaves one out).
    pub async fn client(&self, key: Option<&str>, purpose: Option<&str>) -> anyhow::Result<FlightClient> {
        let channel = Channel::from_shared(format!("http://{}", self.flight_addr))?
            .connect()
            .await?;
        let mut c = FlightClient::new(channel);
        if let Some(k) = key {
            c.add_header("authorization", &format!("Bearer {k}"))?;
        }
        if let Some(p) = purpose {
            c.add_header("x-passerelle-purpose", p)?;
        }
        Ok(c)
    }

    /// Stops the server and waits for it.
    pub async fn shutdown_and_wait(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.handle.await??;
        Ok(())
    }
}

/// GetFlightInfo then DoGet on every endpoint; returns all batches.
pub async fn pull(
    client: &mut FlightClient,
    descriptor: FlightDescriptor,
) -> Result<Vec<RecordBatch>, arrow_flight::error::FlightError> {
    let info = client.get_flight_info(descriptor).await?;
    let mut out = Vec::new();
    for ep in info.endpoint {
        let ticket = ep
            .ticket
            .ok_or_else(|| arrow_flight::error::FlightError::protocol("endpoint without ticket"))?;
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        out.extend(batches);
    }
    Ok(out)
}

/// A JSON command descriptor.
pub fn command(value: serde_json::Value) -> FlightDescriptor {
    FlightDescriptor::new_cmd(value.to_string())
}

/// The gRPC status code inside a Flight error, if any.
pub fn status_code(e: &arrow_flight::error::FlightError) -> Option<tonic::Code> {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => Some(s.code()),
        _ => None,
    }
}
