//! Builds and runs a node: binds both listeners, writes `serve.json`, serves Flight and REST
//! until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::GatewayConfig;
use crate::error::{Error, Result};
use crate::flight::FlightHandler;
use crate::node::Node;

/// Largest gRPC message accepted from clients (requests are small; this bounds abuse).
const MAX_DECODING_MESSAGE: usize = 4 * 1024 * 1024;
/// Largest gRPC message sent (batches are ~8k rows; leave room for wide rows).
const MAX_ENCODING_MESSAGE: usize = 64 * 1024 * 1024;

/// The configuration's locations, plus, for `serve --demo`, one for the demo's own data
/// (controller `aphp`) unless a declared location already holds it.
fn locations_with_demo(cfg: &GatewayConfig, data_dir: &std::path::Path) -> Result<passerelle_connectors::Locations> {
    let declared = cfg.checked_locations()?;
    if !cfg.demo.enabled {
        return Ok(declared);
    }
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let url = format!("file://{}/demo/", dir.display());
    let demo = passerelle_connectors::CanonicalLocation::lexical(&url)?;
    let held = declared
        .sections()
        .values()
        .any(|l| passerelle_connectors::CanonicalLocation::lexical(&l.url).is_ok_and(|l| l.overlaps(&demo)));
    if held {
        return Ok(declared);
    }
    let mut sections = declared.sections().clone();
    sections.insert(
        "demo".to_string(),
        passerelle_connectors::LocationOptions {
            url,
            controllers: vec![crate::demo::DEMO_CONTROLLER.to_string()],
            store: None,
        },
    );
    Ok(passerelle_connectors::Locations::new(sections)?)
}

/// A bound, ready-to-run gateway.
#[derive(Debug)]
pub struct Application {
    node: Arc<Node>,
    tls: Option<crate::tls::TlsOptions>,
    flight: TcpListener,
    http: TcpListener,
    flight_addr: SocketAddr,
    http_addr: SocketAddr,
    /// Held until the server has stopped: one server per data directory.
    serve_lock: Option<crate::data_dir::ServeLock>,
}

impl Application {
    /// Opens the node, creates demo data if asked, loads metadata and consent, binds listeners
    /// and writes `<data-dir>/serve.json`.
    pub async fn build(cfg: &GatewayConfig) -> Result<Self> {
        cfg.validate()?;
        let data_dir = cfg.data_dir.clone().unwrap_or_else(|| "passerelle-data".into());
        // Before anything is written (demo data, serve.json): a second server stops here.
        crate::data_dir::prepare(&data_dir)?;
        let serve_lock = crate::data_dir::ServeLock::acquire(&data_dir)?;
        let mut node = Node::open_with(&data_dir, cfg.policy.clone()).await?;
        {
            // Every setting applies or the start fails: a shared node would keep its defaults
            // (API keys allowed, no locations) without a word.
            let n = Arc::get_mut(&mut node)
                .ok_or_else(|| Error::Internal("the node was shared before its configuration was applied".into()))?;
            n.ticket_ttl = Duration::from_secs(cfg.tickets.ttl_secs);
            n.sql = cfg.sql.clone();
            n.stores = passerelle_connectors::Stores::new(cfg.stores.clone());
            n.locations = locations_with_demo(cfg, &n.data_dir)?;
            n.source_ttl = Duration::from_secs(cfg.sources.cache_ttl_secs);
            n.allow_bearer = cfg.tls.as_ref().is_none_or(|t| t.allow_bearer);
            n.limits = Arc::new(crate::limits::Limits::new(cfg.limits.clone()));
            n.peers = crate::federation::Peers::new(&cfg.peers)?;
            n.federation = cfg.federation.clone();
            n.client_tls = cfg.tls.as_ref().map(|t| crate::federation::ClientTls {
                cert: t.cert.clone(),
                key: t.key.clone(),
            });
            if let Some(id) = &cfg.node_id {
                n.tickets = crate::ticket::TicketSigner::new(Arc::clone(&n.node_key), id.clone());
            }
        }
        if let Some(tls) = &cfg.tls {
            // Fail at start, naming the file, rather than at the first handshake.
            crate::tls::build_acceptor(tls, crate::tls::Protocol::Grpc)?;
        }
        if cfg.demo.enabled {
            crate::demo::ensure_demo(&node, cfg.demo.rows).await?;
        }
        node.refresh().await?;
        // Streams cut short by a crash or a forced stop never completed their entries.
        let failed = node
            .audit
            .fail_dangling("the node stopped while this stream was open")
            .await?;
        if failed > 0 {
            tracing::warn!(entries = failed, "audit entries of interrupted streams marked failed");
        }
        let bind = |addr: String| async move {
            TcpListener::bind(&addr).await.map_err(|source| Error::Io {
                op: "bind",
                path: addr,
                source,
            })
        };
        let flight = bind(cfg.server.flight_addr.clone()).await?;
        let http = bind(cfg.server.http_addr.clone()).await?;
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| Error::Io {
                op: "local address",
                path: String::new(),
                source,
            })
        };
        let (flight_addr, http_addr) = (local(&flight)?, local(&http)?);
        let advertise = cfg.federation.advertise_flight_url.clone().unwrap_or_else(|| {
            let scheme = if cfg.tls.is_some() { "grpc+tls" } else { "grpc" };
            format!("{scheme}://{flight_addr}")
        });
        let _ = node.advertise_url.set(advertise);
        let serve_json = serde_json::json!({ "flight_addr": flight_addr.to_string(), "http_addr": http_addr.to_string(), "tls": cfg.tls.is_some() });
        let path = data_dir.join("serve.json");
        let tmp = data_dir.join("serve.json.tmp");
        {
            use std::io::Write as _;
            crate::data_dir::create_private_file(&tmp)?
                .write_all(serve_json.to_string().as_bytes())
                .map_err(|source| Error::Io {
                    op: "write",
                    path: tmp.display().to_string(),
                    source,
                })?;
        }
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
            op: "write",
            path: path.display().to_string(),
            source,
        })?;
        tracing::info!(%flight_addr, %http_addr, data_dir = %data_dir.display(), "listening");
        Ok(Self {
            node,
            tls: cfg.tls.clone(),
            flight,
            http,
            flight_addr,
            http_addr,
            serve_lock: Some(serve_lock),
        })
    }

    /// The Flight address actually bound.
    pub fn flight_addr(&self) -> SocketAddr {
        self.flight_addr
    }
    /// The REST address actually bound.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    /// The node (for tests and the CLI).
    pub fn node(&self) -> Arc<Node> {
        Arc::clone(&self.node)
    }

    /// Serves until `shutdown` becomes true.
    pub async fn run_until_stopped(mut self, shutdown: watch::Receiver<bool>) -> Result<()> {
        // Released last, once this server's audit entries are settled, so a next server on the
        // data directory cannot start before (its streams would be failed as this one's).
        let _serve_lock = self.serve_lock.take();
        let refresher = self.node.spawn_refresher(shutdown.clone());
        let svc = FlightServiceServer::new(FlightHandler::new(Arc::clone(&self.node)))
            .max_decoding_message_size(MAX_DECODING_MESSAGE)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE);
        let router = crate::admin::router(Arc::clone(&self.node));
        let mut stop = shutdown.clone();
        let grace = Duration::from_secs(self.node.limits.options().shutdown_grace_secs);
        let node = Arc::clone(&self.node);
        let serving = async move { self.serve(svc, router, shutdown.clone()).await };
        tokio::pin!(serving);
        let result = tokio::select! {
            r = &mut serving => r,
            _ = async {
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_secs = grace.as_secs(), "streams still open after the shutdown grace period; stopping them");
                Ok(())
            }
        };
        refresher.abort();
        match node
            .audit
            .fail_dangling("the node shut down while this stream was open")
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(entries = n, "audit entries of streams cut by shutdown marked failed"),
            Err(e) => tracing::error!(error = %e, "could not fail the audit entries of open streams"),
        }
        result
    }

    async fn serve(
        self,
        svc: FlightServiceServer<FlightHandler>,
        router: axum::Router,
        shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let wait = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let (f, h) = match &self.tls {
            None => {
                let flight = grpc_server()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(self.flight), wait(shutdown.clone()));
                let http = axum::serve(self.http, router).with_graceful_shutdown(wait(shutdown.clone()));
                tokio::join!(flight, async { http.await })
            }
            Some(tls) => {
                use crate::tls::{PeerInfo, PeerScopeLayer, Protocol, ReloadingAcceptor, TlsListener};
                let grpc = ReloadingAcceptor::start(tls, Protocol::Grpc, shutdown.clone())?;
                let rest = ReloadingAcceptor::start(tls, Protocol::Http, shutdown.clone())?;
                let conns = crate::tls::accept_loop(self.flight, grpc, shutdown.clone());
                let incoming = tokio_stream::wrappers::ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
                let flight = grpc_server()
                    .layer(PeerScopeLayer)
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, wait(shutdown.clone()));
                let listener = TlsListener::new(self.http, rest, shutdown.clone()).map_err(|source| Error::Io {
                    op: "tls listener",
                    path: String::new(),
                    source,
                })?;
                let app = router
                    .layer(axum::middleware::from_fn(crate::tls::scope_rest_peer))
                    .into_make_service_with_connect_info::<PeerInfo>();
                let http = axum::serve(listener, app).with_graceful_shutdown(wait(shutdown.clone()));
                tokio::join!(flight, async { http.await })
            }
        };

        f.map_err(|e| Error::Internal(format!("flight server: {e}")))?;
        h.map_err(|source| Error::Io {
            op: "http server",
            path: String::new(),
            source,
        })?;
        Ok(())
    }
}

/// The gRPC server settings both listeners share: HTTP/2 keepalives find peers that vanished
/// without closing their connections (their streams and stream slots are then released).
fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(256))
}
