//! TLS with OpenSSL for both listeners, and identities from client certificates.
//!
//! Member-state authorities issue X.509 certificates; a node trusts the CA bundle of its
//! configuration (`[tls] client_ca`), each of whose certificates the configuration binds to one
//! member state by its SHA-256 fingerprint (`[tls.anchors]`), and maps a verified client
//! certificate to a registered principal: subject CN = principal name, O = organisation,
//! C = member state, and the member state must be that of the anchor the verified chain ends
//! at. No `C` of an issuer or intermediate counts: an intermediate labelled `C=DE` under the
//! French anchor still makes French principals only. CRL files (`crl`) are checked for client
//! certificates and reloaded like the other files.
//!
//! ```text
//!  TcpListener ─accept─► handshake task (10 s, 256 at once) ─► TlsConn{SslStream, PeerInfo} ─► tonic / axum
//!                                                          │
//!  every request of the connection runs inside PEER.scope(cert identity) ─► Node::authenticate
//! ```
//!
//! Handshakes run in their own tasks so that one slow client cannot hold up `accept`. The
//! acceptor is rebuilt when the certificate, key, CA or CRL files change; a file that does not
//! load leaves the previous acceptor in force.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::http;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{AlpnError, Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion, select_next_proto};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509, X509NameRef, X509Ref};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_openssl::SslStream;

use crate::error::{Error, Result};

/// `[tls]`: serve both ports over TLS, optionally verifying client certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// Server certificate, PEM (the chain may follow the leaf).
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// Trust anchors for client certificates (PEM bundle). Without it, no client certificate is
    /// requested and callers use bearer keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// The member state of each certificate of `client_ca`, by SHA-256 fingerprint
    /// (`FR = "AB:CD:…"` or a list of them): a client certificate's member state is that of the
    /// anchor its verified chain ends at. Required with `client_ca`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub anchors: BTreeMap<String, Fingerprints>,
    /// Certificate revocation lists (PEM files) for client certificates. With any, every CA
    /// that issues client certificates needs a current CRL here (OpenSSL refuses a certificate
    /// whose issuer's CRL is missing or expired).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crl: Vec<PathBuf>,
    /// Refuse the handshake of a client without a valid certificate.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Accept bearer keys (and basic-auth handshakes) from clients without a certificate.
    #[serde(default = "yes")]
    pub allow_bearer: bool,
    /// How often the certificate, key and CA files are checked for changes, in seconds.
    #[serde(default = "default_reload_secs")]
    pub reload_secs: u64,
}

/// One fingerprint or several (`FR = "AB:…"` or `FR = ["AB:…", "CD:…"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Fingerprints {
    /// One anchor.
    One(String),
    /// Several anchors of the same member state (e.g. during a root rollover).
    Many(Vec<String>),
}

impl Fingerprints {
    fn iter(&self) -> impl Iterator<Item = &String> {
        match self {
            Self::One(f) => std::slice::from_ref(f).iter(),
            Self::Many(v) => v.iter(),
        }
    }
}

/// A SHA-256 fingerprint as lowercase hex without separators, from `AB:CD:…`, `abcd…` or
/// `sha256:…` (OpenSSL's `-fingerprint -sha256` output works as printed after the `=`).
fn normalise_fingerprint(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// SHA-256 of a certificate's DER, lowercase hex.
fn fingerprint(cert: &X509Ref) -> Option<String> {
    cert.digest(MessageDigest::sha256()).ok().map(|d| crate::auth::hex(&d))
}

/// `AB:CD:…`, as OpenSSL prints fingerprints.
fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// Trust-anchor fingerprint (lowercase hex) to member state.
pub type AnchorMap = HashMap<String, String>;

/// Binds every certificate of `client_ca` to its member state from `[tls.anchors]`, refusing a
/// bundle certificate without one, a binding naming no certificate of the bundle, and a
/// fingerprint bound to two member states. Without any binding, the error lists the lines to
/// add (with each anchor's own `C` as a suggestion to check, never used unchecked).
pub fn anchor_map(opts: &TlsOptions) -> Result<AnchorMap> {
    let Some(ca) = &opts.client_ca else {
        if !opts.anchors.is_empty() || !opts.crl.is_empty() {
            return Err(Error::invalid(
                "[tls] anchors and crl apply to client certificates, and client_ca is not set",
                "set client_ca to the bundle of trust anchors, or remove them",
            ));
        }
        return Ok(AnchorMap::new());
    };
    let pem = std::fs::read(ca).map_err(|e| tls_error("cannot read the client CA bundle", ca, e))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| tls_error("cannot load the client CA bundle", ca, e))?;
    let describe = |c: &X509Ref| -> (String, String) {
        let subject = c
            .subject_name()
            .entries()
            .filter_map(|e| {
                let v = String::from_utf8(e.data().as_slice().to_vec()).ok()?;
                Some(format!("{}={v}", e.object().nid().short_name().unwrap_or("?")))
            })
            .collect::<Vec<_>>()
            .join(",");
        (subject, fingerprint(c).map(|f| colon_hex(&f)).unwrap_or_default())
    };
    if opts.anchors.is_empty() {
        let lines = certs
            .iter()
            .map(|c| {
                let (subject, fp) = describe(c);
                let state = entry(c.subject_name(), Nid::COUNTRYNAME).unwrap_or_else(|| "XX".into());
                format!("{state} = \"{fp}\"   # {subject}")
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Error::invalid(
            format!(
                "[tls] client_ca `{}` needs [tls.anchors], the member state each trust anchor vouches for, by SHA-256 fingerprint; check each anchor's member state (the C shown is only the certificate's own claim) and add:\n[tls.anchors]\n{lines}\n",
                ca.display()
            ),
            "a client certificate's member state is its trust anchor's; see the README's Security section",
        ));
    }
    let mut bound = AnchorMap::new();
    for (state, fps) in &opts.anchors {
        passerelle_policies::MemberState::parse(state).map_err(|e| {
            Error::invalid(
                format!("[tls.anchors] `{state}`: {e}"),
                "key each binding by a member state, e.g. FR = \"AB:CD:…\"",
            )
        })?;
        for fp in fps.iter() {
            let hex = normalise_fingerprint(fp).ok_or_else(|| {
                Error::invalid(
                    format!("[tls.anchors] {state} = `{fp}` is not a SHA-256 fingerprint"),
                    "print it with `openssl x509 -noout -fingerprint -sha256 -in CA.crt`",
                )
            })?;
            if let Some(other) = bound.insert(hex, state.clone()).filter(|o| o != state) {
                return Err(Error::invalid(
                    format!("[tls.anchors] fingerprint `{fp}` is bound to both {other} and {state}"),
                    "a trust anchor vouches for one member state",
                ));
            }
        }
    }
    let in_bundle: Vec<String> = certs.iter().filter_map(|c| fingerprint(c)).collect();
    for c in &certs {
        let (subject, fp) = describe(c);
        if fingerprint(c).is_none_or(|f| !bound.contains_key(&f)) {
            return Err(Error::invalid(
                format!(
                    "[tls] client_ca `{}` holds `{subject}` (SHA-256 {fp}), which no [tls.anchors] entry binds to a member state",
                    ca.display()
                ),
                "bind it (e.g. FR = \"<fingerprint>\") or remove it from the bundle",
            ));
        }
    }
    if let Some((fp, state)) = bound.iter().find(|(f, _)| !in_bundle.contains(f)) {
        return Err(Error::invalid(
            format!(
                "[tls.anchors] {state} = `{}` names no certificate of client_ca `{}`",
                colon_hex(fp),
                ca.display()
            ),
            "check the fingerprint, or add that anchor to the bundle",
        ));
    }
    Ok(bound)
}

fn yes() -> bool {
    true
}
fn default_reload_secs() -> u64 {
    10
}

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener (see [`accept_loop`]).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// Subject CN: the principal's name.
    pub common_name: String,
    /// Subject O: the organisation.
    pub organisation: Option<String>,
    /// Subject C: the member state the certificate claims.
    pub country: Option<String>,
    /// The member state of the trust anchor the verified chain ends at ([tls.anchors]): the
    /// only authority that vouches for the holder. `None` when the anchor is bound to none.
    pub member_state: Option<String>,
    /// SHA-256 of the DER certificate, hex (for logs and the audit).
    pub fingerprint: String,
}

impl CertIdentity {
    fn from_cert(cert: &X509Ref, member_state: Option<String>) -> Option<Self> {
        let name = cert.subject_name();
        let fingerprint = cert
            .digest(MessageDigest::sha256())
            .map(|d| crate::auth::hex(&d))
            .unwrap_or_default();
        Some(Self {
            common_name: entry(name, Nid::COMMONNAME)?,
            organisation: entry(name, Nid::ORGANIZATIONNAME),
            country: entry(name, Nid::COUNTRYNAME),
            member_state,
            fingerprint,
        })
    }
}

fn entry(name: &X509NameRef, nid: Nid) -> Option<String> {
    name.entries_by_nid(nid)
        .next()
        .and_then(|e| String::from_utf8(e.data().as_slice().to_vec()).ok())
}

/// The peer of a TLS connection, handed to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's identity, if one was presented.
    pub cert: Option<Arc<CertIdentity>>,
}

tokio::task_local! {
    static PEER: Option<Arc<CertIdentity>>;
}

/// The client certificate of the connection the current request came on. Outside a TLS
/// connection (plain listeners, in-process calls) there is none.
pub fn current_peer_cert() -> Option<Arc<CertIdentity>> {
    PEER.try_with(Clone::clone).ok().flatten()
}

/// Runs `fut` as a request of a connection whose peer presented `cert`.
pub async fn with_peer<F: Future>(cert: Option<Arc<CertIdentity>>, fut: F) -> F::Output {
    PEER.scope(cert, fut).await
}

/// Protocols a listener speaks (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// REST: HTTP/1.1 or HTTP/2.
    Http,
}

impl Protocol {
    fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Grpc => b"\x02h2",
            Protocol::Http => b"\x02h2\x08http/1.1",
        }
    }
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(
        format!("[tls] {what} `{}`: {e}", path.display()),
        "check the [tls] paths and that the files are PEM; see deploy/certs/gen.sh",
    )
}

/// An OpenSSL acceptor with the member states of its trust anchors.
pub struct Acceptor {
    ssl: SslAcceptor,
    anchors: AnchorMap,
}

/// Builds an acceptor: Mozilla's intermediate profile (TLS 1.2 and 1.3, forward-secret AEAD
/// ciphers), the server certificate, client verification against `client_ca` and its CRLs, and
/// the anchors' member states.
pub fn build_acceptor(opts: &TlsOptions, protocol: Protocol) -> Result<Acceptor> {
    let anchors = anchor_map(opts)?;
    Ok(Acceptor {
        ssl: build_ssl(opts, protocol)?,
        anchors,
    })
}

fn build_ssl(opts: &TlsOptions, protocol: Protocol) -> Result<SslAcceptor> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| Error::Internal(format!("openssl: {e}")))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| Error::Internal(format!("openssl: {e}")))?;
    b.set_certificate_chain_file(&opts.cert)
        .map_err(|e| tls_error("cannot load the certificate", &opts.cert, e))?;
    b.set_private_key_file(&opts.key, SslFiletype::PEM)
        .map_err(|e| tls_error("cannot load the private key", &opts.key, e))?;
    b.check_private_key()
        .map_err(|e| tls_error("the private key does not match the certificate", &opts.key, e))?;
    if let Some(ca) = &opts.client_ca {
        b.set_ca_file(ca)
            .map_err(|e| tls_error("cannot load the client CA bundle", ca, e))?;
        let names = openssl::x509::X509Name::load_client_ca_file(ca)
            .map_err(|e| tls_error("cannot load the client CA bundle", ca, e))?;
        b.set_client_ca_list(names);
        if !opts.crl.is_empty() {
            let store = b.cert_store_mut();
            let lookup = store
                .add_lookup(X509Lookup::file())
                .map_err(|e| Error::Internal(format!("openssl: {e}")))?;
            for path in &opts.crl {
                // The binding panics on paths that are not UTF-8 or hold NUL: refuse them first.
                let name = path
                    .to_str()
                    .filter(|p| !p.contains('\0'))
                    .ok_or_else(|| tls_error("cannot load the CRL", path, "the path is not valid UTF-8"))?;
                lookup
                    .load_crl_file(name, SslFiletype::PEM)
                    .map_err(|e| tls_error("cannot load the CRL", path, e))?;
            }
            store
                .set_flags(X509VerifyFlags::CRL_CHECK)
                .map_err(|e| Error::Internal(format!("openssl: {e}")))?;
        }
        let mut mode = SslVerifyMode::PEER;
        if opts.require_client_cert {
            mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
        }
        b.set_verify(mode);
    } else if opts.require_client_cert {
        return Err(Error::invalid(
            "[tls] require_client_cert = true needs client_ca",
            "name the CA bundle that issues client certificates",
        ));
    }
    let ours = protocol.alpn();
    b.set_alpn_select_callback(move |_, client| select_next_proto(ours, client).ok_or(AlpnError::NOACK));
    Ok(b.build())
}

/// An acceptor that follows its files: checked every `reload_secs`, swapped atomically when
/// they change and load; kept when they do not.
#[derive(Clone)]
pub struct ReloadingAcceptor {
    current: Arc<RwLock<Arc<Acceptor>>>,
}

impl std::fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadingAcceptor { .. }")
    }
}

fn stamps(opts: &TlsOptions) -> Vec<Option<(SystemTime, u64)>> {
    [Some(&opts.cert), Some(&opts.key), opts.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .chain(&opts.crl)
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl ReloadingAcceptor {
    /// Loads the files now (errors are the caller's) and watches them until `shutdown`.
    pub fn start(opts: &TlsOptions, protocol: Protocol, mut shutdown: watch::Receiver<bool>) -> Result<Self> {
        let current = Arc::new(RwLock::new(Arc::new(build_acceptor(opts, protocol)?)));
        let this = Self {
            current: Arc::clone(&current),
        };
        let opts = opts.clone();
        tokio::spawn(async move {
            let mut seen = stamps(&opts);
            let mut tick = tokio::time::interval(Duration::from_secs(opts.reload_secs.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                let now = stamps(&opts);
                if now == seen {
                    continue;
                }
                match build_acceptor(&opts, protocol) {
                    Ok(a) => {
                        *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(a);
                        seen = now;
                        tracing::info!(cert = %opts.cert.display(), "TLS certificates and CRLs reloaded");
                    }
                    // Files are often replaced one by one: retry at the next tick.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones")
                    }
                }
            }
        });
        Ok(this)
    }

    fn get(&self) -> Arc<Acceptor> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A TLS connection with its peer's identity.
pub struct TlsConn {
    inner: SslStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Handshakes in progress from one address; beyond, that address's oldest is dropped.
const MAX_PENDING_PER_ADDRESS: usize = 64;

/// Handshakes in progress, oldest first, each with the sender whose drop cancels it.
#[derive(Default)]
struct Pending {
    next: u64,
    tasks: BTreeMap<u64, (std::net::IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Pending {
    /// Registers a handshake from `ip`, first dropping the oldest one of `ip` when it has
    /// [`MAX_PENDING_PER_ADDRESS`], or the oldest of all at [`MAX_PENDING_HANDSHAKES`].
    fn admit(&mut self, ip: std::net::IpAddr) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let mut same = self.tasks.iter().filter(|(_, (a, _))| *a == ip);
        let evict = match same.clone().count() >= MAX_PENDING_PER_ADDRESS {
            true => same.next().map(|(id, _)| *id),
            false if self.tasks.len() >= MAX_PENDING_HANDSHAKES => self.tasks.keys().next().copied(),
            false => None,
        };
        if let Some((old, _)) = evict.and_then(|id| self.tasks.remove(&id)) {
            tracing::info!(remote = %old, "TLS handshake dropped for a newer connection (too many pending)");
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.tasks.insert(id, (ip, tx));
        (id, rx)
    }
}

/// Accepts TCP connections and hands over finished TLS connections. Failed handshakes (no
/// certificate, untrusted CA, expired, plain-text clients) are logged and dropped.
///
/// Handshakes are bounded in time ([`HANDSHAKE_TIMEOUT`]) and number: at most
/// [`MAX_PENDING_HANDSHAKES`] in progress, [`MAX_PENDING_PER_ADDRESS`] from one address. A new
/// connection past a bound replaces the oldest pending handshake instead of waiting for a slot,
/// so connections that never send a ClientHello cannot keep a real client waiting: holding
/// every slot would take that many new connections within one honest handshake's time.
pub fn accept_loop(
    listener: TcpListener,
    acceptor: ReloadingAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<TlsConn> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let Ok((id, cancelled)) = pending.lock().map(|mut p| p.admit(remote.ip())) else {
                break;
            };
            let acceptor = acceptor.get();
            let tx = tx.clone();
            let pending = Arc::clone(&pending);
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp, remote)) => Some(r),
                    // Dropped for a newer connection: the socket closes with this task.
                    _ = cancelled => None,
                };
                let admitted = pending.lock().is_ok_and(|mut p| p.tasks.remove(&id).is_some());
                match outcome {
                    Some(Ok(Ok(conn))) if admitted => {
                        let _ = tx.send(conn).await;
                    }
                    Some(Ok(Ok(_))) | None => {}
                    Some(Ok(Err(e))) => tracing::info!(%remote, error = %e, "TLS handshake refused"),
                    Some(Err(_)) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

async fn handshake(acceptor: &Acceptor, tcp: TcpStream, remote: SocketAddr) -> io::Result<TlsConn> {
    let _ = tcp.set_nodelay(true);
    let ssl = Ssl::new(acceptor.ssl.context()).map_err(io::Error::other)?;
    let mut stream = SslStream::new(ssl, tcp).map_err(io::Error::other)?;
    Pin::new(&mut stream).accept().await.map_err(|e| {
        let reason = e.ssl_error().map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
        io::Error::other(reason)
    })?;
    // The member state is the anchor's the verified chain ends at (the last certificate of the
    // chain OpenSSL built and verified), whatever the leaf's issuers say of themselves.
    let member_state = stream
        .ssl()
        .verified_chain()
        .and_then(|chain| chain.iter().last().and_then(fingerprint))
        .and_then(|fp| acceptor.anchors.get(&fp).cloned());
    let cert = stream
        .ssl()
        .peer_certificate()
        .and_then(|c| CertIdentity::from_cert(&c, member_state))
        .map(Arc::new);
    Ok(TlsConn {
        inner: stream,
        info: PeerInfo {
            remote: Some(remote),
            cert,
        },
    })
}

/// TLS connections as an axum listener.
pub struct TlsListener {
    rx: mpsc::Receiver<TlsConn>,
    local: SocketAddr,
}

impl TlsListener {
    /// Listens on `listener` with `acceptor` until `shutdown`.
    pub fn new(
        listener: TcpListener,
        acceptor: ReloadingAcceptor,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            rx: accept_loop(listener, acceptor, shutdown),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => {
                let info = conn.info.clone();
                (conn, info)
            }
            // The accept loop ended (shutdown): wait for axum's graceful shutdown to stop us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerInfo {
            remote: Some(self.local),
            cert: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for PeerInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// axum middleware: runs the request with its connection's client certificate in scope.
pub async fn scope_rest_peer(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let cert = req
        .extensions()
        .get::<axum::extract::ConnectInfo<PeerInfo>>()
        .and_then(|c| c.0.cert.clone());
    with_peer(cert, next.run(req)).await
}

/// tower layer for the gRPC server: the same for each gRPC call (tonic puts the connection's
/// [`PeerInfo`] in the request extensions).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerScopeLayer;

impl<S> tower::Layer<S> for PeerScopeLayer {
    type Service = PeerScope<S>;
    fn layer(&self, inner: S) -> PeerScope<S> {
        PeerScope(inner)
    }
}

/// See [`PeerScopeLayer`].
#[derive(Debug, Clone)]
pub struct PeerScope<S>(S);

impl<S, B> tower::Service<http::Request<B>> for PeerScope<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cert = req.extensions().get::<PeerInfo>().and_then(|p| p.cert.clone());
        let fut = self.0.call(req);
        Box::pin(with_peer(cert, fut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_in_openssl_and_plain_forms() {
        let hex = "5f".repeat(32);
        let colon = colon_hex(&hex);
        assert_eq!(colon.len(), 95);
        for text in [
            hex.clone(),
            colon.clone(),
            colon.to_lowercase(),
            format!("sha256:{hex}"),
            format!(" {colon} "),
        ] {
            assert_eq!(normalise_fingerprint(&text).as_deref(), Some(hex.as_str()), "{text}");
        }
        for bad in ["", "5f", &"5g".repeat(32), &"5f".repeat(33)] {
            assert!(normalise_fingerprint(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn anchors_and_crls_need_a_client_ca() {
        let opts = |anchors: BTreeMap<String, Fingerprints>, crl: Vec<PathBuf>| TlsOptions {
            cert: "c".into(),
            key: "k".into(),
            client_ca: None,
            anchors,
            crl,
            require_client_cert: false,
            allow_bearer: true,
            reload_secs: 10,
        };
        assert!(anchor_map(&opts(BTreeMap::new(), Vec::new())).unwrap().is_empty());
        let one = BTreeMap::from([("FR".to_string(), Fingerprints::One("5f".repeat(32)))]);
        assert!(
            anchor_map(&opts(one, Vec::new()))
                .unwrap_err()
                .to_string()
                .contains("client_ca")
        );
        assert!(anchor_map(&opts(BTreeMap::new(), vec!["x.pem".into()])).is_err());
    }
}
