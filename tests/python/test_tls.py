"""TLS on both ports and identities from client certificates (`[tls]` in the configuration).

Certificates come from deploy/certs/gen.sh, run into a temporary directory: one root CA per member state (FR, DE,
IT) with `ca-bundle.pem` holding the three, gateway certificates and client certificates of the demo principals
(CN = principal name, O = organisation, C = member state). The tests issue more with the openssl CLI (`openssl ca`
and a minimal configuration, see `Pki.issue`):

    rogue-trainer-de   CN=trainer-de, O=dkfz, C=DE from a self-signed CA that is not in the bundle
    expired-trainer-de CN=trainer-de, O=dkfz, C=DE from the DE CA, valid 2020-01-01 .. 2021-01-01
    ghost              CN=ghost, O=dkfz, C=DE from the DE CA (no such principal)
    evil-org           CN=trainer-de, O=evil, C=DE from the DE CA (trainer-de's organisation is dkfz)
    wrong-state        CN=trainer-de, O=dkfz, C=FR from the FR CA (trainer-de's member state is DE)

Three demo gateways, each with its own copy of gw-fr's certificate and key and the CA bundle as `client_ca`:

    tls_gw       require_client_cert = false, allow_bearer = true    bearer keys over TLS, or certificates
    certonly_gw  require_client_cert = false, allow_bearer = false   certificates only (refused by the application)
    required_gw  require_client_cert = true                          no certificate: the TLS handshake fails

A handshake the server refuses: with TLS 1.3 the client finishes its side of the handshake before the server has
checked the client certificate, so `flight.connect` succeeds and the first RPC fails (`FlightUnavailableError`), and
an https request fails with an ssl or connection error instead of an HTTP status.
"""

from __future__ import annotations

from http.client import HTTPException
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pyarrow.flight as flight
import pytest

from conftest import (DATASET, PSEUDONYM_RE, PURPOSE, RELEASED_COLUMNS, Gateway, HttpResponse, assert_json_error,
                      assert_same_multiset, call_options, command_descriptor, dataset_names, expect_status, http,
                      listed_datasets, output_row, path_descriptor, poll_until, pull, released_row, run_cli,
                      start_gateway, stop_process)

REPO = Path(__file__).resolve().parents[2]
GEN_SH = REPO / "deploy" / "certs" / "gen.sh"
OPENSSL_TIMEOUT = 60.0
# A refused handshake fails at once; the deadline only keeps a hanging server from hanging the test.
HANDSHAKE_RPC_TIMEOUT = 15.0
# `[tls]` files are checked every 10 s: the new certificate must be served within that plus some slack.
RELOAD_DEADLINE = 25.0
AUDIT_DEADLINE = 10.0
DEMO_ROWS = 20000
SMALL_DEMO_ROWS = 2000
GATEWAY_SUBJECT = "/C=FR/O=passerelle/CN=gw-fr"
DEMO_IDENTITIES = {  # principal -> (organisation, member state, issuing CA), as gen.sh makes them
    "trainer-de": ("dkfz", "DE", "DE"),
    "auditor-eu": ("eu-audit", "EU", "EU"),
    "steward-fr": ("aphp", "FR", "FR"),
}


# ======================================================================================================================
# The PKI (openssl CLI only)
# ======================================================================================================================

def openssl(*args: Any, cwd: Path | None = None) -> str:
    cmd = ["openssl", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT, cwd=cwd,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# One configuration for the test-issued certificates: `req` for keys' requests and self-signed CAs, `ca` for
# signing with any start and end date (`openssl x509 -req` of OpenSSL 3.0 has no -not_before/-not_after).
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
string_mask = utf8only
[dn]
CN = placeholder

[ca]
default_ca = ca_default
[ca_default]
database = {workdir}/index.txt
new_certs_dir = {workdir}
rand_serial = yes
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[policy_any]
countryName = optional
organizationName = optional
commonName = supplied

[ca_ext]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[client_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost, DNS:gw-fr, IP:127.0.0.1
"""


@dataclass
class Pki:
    """gen.sh's output directory, plus what the tests issue into it. Names are file stems: `trainer-de`,
    `ca-DE`, ..."""
    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def bundle(self) -> Path:
        return self.dir / "ca-bundle.pem"

    def fingerprint(self, name: str) -> str:
        """SHA-256 fingerprint of `name`'s certificate as `openssl x509 -fingerprint -sha256` prints it (AB:CD:...)."""
        return openssl("x509", "-in", self.crt(name), "-noout", "-fingerprint", "-sha256").strip().split("=", 1)[1]

    def anchors_toml(self, bindings: dict[str, list[str]] | None = None) -> str:
        """`[tls.anchors]` binding trust anchors (file stems) to member states; by default each gen.sh root
        `ca-XX` to XX. Fingerprints are computed here with the openssl CLI, independently of gen.sh's anchors.toml."""
        bindings = bindings or {cc: [f"ca-{cc}"] for cc in ("FR", "DE", "IT", "EU")}
        lines = ["[tls.anchors]"]
        for state, cas in bindings.items():
            lines.append(f"{state} = {json.dumps([self.fingerprint(ca) for ca in cas])}")
        return "\n".join(lines) + "\n"

    def identity(self, name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) of `name`."""
        return self.crt(name).read_bytes(), self.key(name).read_bytes()

    def _workdir(self, name: str) -> Path:
        workdir = self.dir / f".issue-{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        (workdir / "index.txt").write_text("")
        (workdir / "openssl.cnf").write_text(OPENSSL_CNF.format(workdir=workdir))
        return workdir

    def new_key(self, name: str) -> Path:
        key = self.key(name)
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        key.chmod(0o600)
        return key

    def self_signed_ca(self, name: str, subject: str, days: int = 30) -> Path:
        workdir = self._workdir(name)
        key = self.new_key(name)
        openssl("req", "-x509", "-new", "-config", workdir / "openssl.cnf", "-extensions", "ca_ext", "-key", key,
                "-subj", subject, "-days", days, "-sha256", "-out", self.crt(name))
        return self.crt(name)

    def issue(self, name: str, subject: str, ca: str, *, ext: str = "client_ext", days: int | None = 30,
              start: str | None = None, end: str | None = None, key: Path | None = None) -> Path:
        """Sign a certificate for `subject` (openssl's /C=../O=../CN=.. form) with CA `ca` (a file stem: ca-DE),
        valid for `days` from now or from `start` to `end` (YYYYMMDDHHMMSSZ). A new key unless `key` is given."""
        workdir = self._workdir(name)
        if key is None:
            key = self.new_key(name)
        csr = workdir / "req.csr"
        openssl("req", "-new", "-config", workdir / "openssl.cnf", "-key", key, "-subj", subject, "-out", csr)
        validity = ["-startdate", start, "-enddate", end] if start else ["-days", days]
        openssl("ca", "-batch", "-config", workdir / "openssl.cnf", "-cert", self.crt(ca), "-keyfile", self.key(ca),
                "-in", csr, "-out", self.crt(name), "-notext", "-preserveDN", "-extensions", ext, *validity)
        return self.crt(name)

    def chain(self, name: str, subject: str, intermediates: list[str]) -> Path:
        """A leaf for `subject` issued by the first of `intermediates` (each issued by the next, the last by a root),
        its .crt holding the leaf followed by the intermediates, as a client sends them."""
        self.issue(name, subject, intermediates[0])
        leaf = self.crt(name).read_bytes()
        self.crt(name).write_bytes(leaf + b"".join(self.crt(i).read_bytes() for i in intermediates))
        return self.crt(name)


def cert_field(path: Path, *options: str) -> str:
    return openssl("x509", "-in", path, "-noout", "-nameopt", "RFC2253", *options).strip()


def cert_serial(path: Path) -> int:
    return int(cert_field(path, "-serial").split("=", 1)[1], 16)


def run_gen_sh(outdir: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(GEN_SH), str(outdir)], capture_output=True, text=True,
                          timeout=OPENSSL_TIMEOUT * 3, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"gen.sh exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    run_gen_sh(out)
    p = Pki(out)
    p.self_signed_ca("rogue-ca", "/C=DE/O=rogue/CN=Rogue CA DE")
    p.issue("rogue-trainer-de", "/C=DE/O=dkfz/CN=trainer-de", "rogue-ca")
    p.issue("expired-trainer-de", "/C=DE/O=dkfz/CN=trainer-de", "ca-DE", start="20200101000000Z",
            end="20210101000000Z")
    p.issue("ghost", "/C=DE/O=dkfz/CN=ghost", "ca-DE")
    p.issue("evil-org", "/C=DE/O=evil/CN=trainer-de", "ca-DE")
    p.issue("wrong-state", "/C=FR/O=dkfz/CN=trainer-de", "ca-FR")
    # the right subject, from a trusted CA of another member state: FR cannot vouch for a German trainer
    p.issue("foreign-ca", "/C=DE/O=dkfz/CN=trainer-de", "ca-FR")
    # An intermediate labelled C=DE under the FR anchor, issuing trainer-de: still FR's word, not DE's.
    p.issue("int-de-under-fr", "/C=DE/O=rogue/CN=Intermediate labelled DE", "ca-FR", ext="ca_ext")
    p.chain("laundered-trainer-de", "/C=DE/O=dkfz/CN=trainer-de", ["int-de-under-fr"])
    # And the converse: an intermediate labelled C=FR under the DE anchor makes DE principals.
    p.issue("int-fr-under-de", "/C=FR/O=dkfz/CN=Intermediate labelled FR", "ca-DE", ext="ca_ext")
    p.chain("chained-trainer-de", "/C=DE/O=dkfz/CN=trainer-de", ["int-fr-under-de"])
    return p


# ======================================================================================================================
# The gateways
# ======================================================================================================================

@dataclass
class TlsGateway:
    gw: Gateway
    pki: Pki
    cert: Path  # this gateway's own copy of its certificate and key (replaced by the reload test)
    key: Path

    @property
    def flight_port(self) -> int:
        return int(self.gw.flight_addr.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.gw.http_addr.rsplit(":", 1)[1])

    def connect(self, identity: str | None = None, *, host: str = "localhost",
                roots: Path | None = None) -> flight.FlightClient:
        """A grpc+tls client trusting the CA bundle (or `roots`), presenting `identity`'s certificate if given."""
        kwargs: dict[str, Any] = {"tls_root_certs": (roots or self.pki.bundle).read_bytes()}
        if identity is not None:
            kwargs["cert_chain"], kwargs["private_key"] = self.pki.identity(identity)
        return flight.connect(f"grpc+tls://{host}:{self.flight_port}", **kwargs)

    def ssl_context(self, identity: str | None = None, *, roots: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(roots or self.pki.bundle))
        if identity is not None:
            ctx.load_cert_chain(str(self.pki.crt(identity)), str(self.pki.key(identity)))
        return ctx

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.http_port}{path}"

    def http(self, method: str, path: str, *, identity: str | None = None, key: str | None = None,
             **kwargs: Any) -> HttpResponse:
        """An https request trusting the CA bundle, with `identity`'s client certificate and/or a bearer `key`."""
        return http(method, self.url(path), key=key, context=self.ssl_context(identity), **kwargs)


def _config(cert: Path, key: Path, bundle: Path, *, require_client_cert: bool, allow_bearer: bool,
            anchors: str = "", extra: str = "") -> str:
    return (f"# test_tls.py\n[tls]\ncert = {json.dumps(str(cert))}\nkey = {json.dumps(str(key))}\n"
            f"client_ca = {json.dumps(str(bundle))}\nrequire_client_cert = {str(require_client_cert).lower()}\n"
            f"allow_bearer = {str(allow_bearer).lower()}\n{extra}{anchors}")


def _tls_gateway(binary: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, name: str, *,
                 require_client_cert: bool, allow_bearer: bool, demo_rows: int):
    base = tmp_path_factory.mktemp(name)
    cert, key = base / "gw-fr.crt", base / "gw-fr.key"
    shutil.copyfile(pki.crt("gw-fr"), cert)
    shutil.copyfile(pki.key("gw-fr"), key)
    key.chmod(0o600)
    config = base / "passerelle.toml"
    config.write_text(_config(cert, key, pki.bundle, require_client_cert=require_client_cert,
                              allow_bearer=allow_bearer, anchors=pki.anchors_toml()))
    gw = start_gateway(binary, base / "data", demo_rows=demo_rows, config=config)
    try:
        yield TlsGateway(gw, pki, cert, key)
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the {name} gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the {name} gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


@pytest.fixture(scope="module")
def tls_gw(passerelle_bin: Path, tmp_path_factory, pki: Pki):
    yield from _tls_gateway(passerelle_bin, tmp_path_factory, pki, "tls-gateway", require_client_cert=False,
                            allow_bearer=True, demo_rows=DEMO_ROWS)


@pytest.fixture(scope="module")
def certonly_gw(passerelle_bin: Path, tmp_path_factory, pki: Pki):
    yield from _tls_gateway(passerelle_bin, tmp_path_factory, pki, "certonly-gateway", require_client_cert=False,
                            allow_bearer=False, demo_rows=SMALL_DEMO_ROWS)


@pytest.fixture(scope="module")
def required_gw(passerelle_bin: Path, tmp_path_factory, pki: Pki):
    yield from _tls_gateway(passerelle_bin, tmp_path_factory, pki, "required-gateway", require_client_cert=True,
                            allow_bearer=True, demo_rows=SMALL_DEMO_ROWS)


# ======================================================================================================================
# Helpers
# ======================================================================================================================

def quick_options(key: str | None = None, purpose: str | None = PURPOSE) -> flight.FlightCallOptions:
    """call_options with a short deadline, for calls expected to fail at the handshake."""
    headers = [(b"authorization", f"Bearer {key}".encode())] if key is not None else []
    if purpose is not None:
        headers.append((b"x-passerelle-purpose", purpose.encode()))
    return flight.FlightCallOptions(headers=headers, timeout=HANDSHAKE_RPC_TIMEOUT)


def expect_flight_handshake_refused(call: Callable[[], Any], what: str) -> str:
    """The call must fail at the transport: the TLS handshake was refused, so no gRPC status from the application.
    pyarrow reports that as UNAVAILABLE."""
    try:
        result = call()
    except flight.FlightUnavailableError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is a wrong answer, shown with its class
        pytest.fail(f"{what}: expected the TLS handshake to fail (FlightUnavailableError), got "
                    f"{type(exc).__name__}: {exc}")
    pytest.fail(f"{what}: expected the TLS handshake to fail, but the call succeeded: {result!r:.300}")


def expect_https_handshake_refused(tg: TlsGateway, path: str, what: str, *, identity: str | None = None,
                                   key: str | None = None) -> str:
    """The https request must fail before any HTTP response (an HTTP error status would mean the handshake passed)."""
    try:
        resp = tg.http("GET", path, identity=identity, key=key)
    except (OSError, HTTPException) as exc:  # URLError, SSLError, ConnectionResetError, RemoteDisconnected
        return f"{type(exc).__name__}: {exc}"
    pytest.fail(f"{what}: expected the TLS handshake to fail, got HTTP {resp.status}: {resp.text[:300]}")


def pull_and_check(tg: TlsGateway, client: flight.FlightClient, opts: flight.FlightCallOptions) -> int:
    """A full pull of demo_patients, checked against the reference model (row for row, pseudonyms aside)."""
    table = pull(client, opts).table
    ref = tg.gw.reference
    assert table.column_names == RELEASED_COLUMNS
    assert_same_multiset((output_row(r) for r in table.to_pylist()),
                         (released_row(r) for r in ref.consented_rows(PURPOSE)), "rows over TLS")
    assert all(PSEUDONYM_RE.match(p) for p in table.column("patient_id").to_pylist())
    return table.num_rows


def served_certificate(tg: TlsGateway, port: int | None = None) -> dict[str, Any]:
    """The certificate the gateway presents on a new connection (REST port by default), as the ssl module decodes
    it: its subject, serialNumber (hex), notAfter..."""
    ctx = tg.ssl_context()
    with socket.create_connection(("127.0.0.1", port or tg.http_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return s.getpeercert()


def subject_of(peercert: dict[str, Any]) -> dict[str, str]:
    return {k: v for rdn in peercert["subject"] for k, v in rdn}


# ======================================================================================================================
# gen.sh
# ======================================================================================================================

@dataclass
class CertInfo:
    subject: str
    issuer: str
    days: float  # notAfter - notBefore
    ext: str  # basicConstraints, keyUsage, extendedKeyUsage, subjectAltName as openssl prints them
    pubkey: str


def cert_info(path: Path) -> CertInfo:
    """One openssl call per certificate (the summary of gen.sh's output is checked on 9 of them)."""
    out = openssl("x509", "-in", path, "-noout", "-nameopt", "RFC2253", "-subject", "-issuer", "-startdate",
                  "-enddate", "-ext", "basicConstraints,keyUsage,extendedKeyUsage,subjectAltName", "-pubkey")
    fields = dict(line.split("=", 1) for line in out.splitlines()[:4])
    start, end = (datetime.strptime(fields[k].strip(), "%b %d %H:%M:%S %Y %Z") for k in ("notBefore", "notAfter"))
    pem = out.index("-----BEGIN PUBLIC KEY-----")
    return CertInfo(fields["subject"], fields["issuer"], (end - start).total_seconds() / 86400,
                    out[:pem].split("\n", 4)[4], out[pem:])


def test_gen_sh_makes_the_demo_pki(pki: Pki):
    names = {f"ca-{cc}": (f"Passerelle demo root CA {cc}", "passerelle demo", cc, cc) for cc in ("FR", "DE", "IT", "EU")}
    names |= {f"gw-{cc.lower()}": (f"gw-{cc.lower()}", "passerelle", cc, cc) for cc in ("FR", "DE", "IT")}
    names |= {n: (n, org, state, ca) for n, (org, state, ca) in DEMO_IDENTITIES.items()}
    bundle = pki.bundle.read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 4
    for name, (cn, org, state, ca_cc) in names.items():
        crt = pki.crt(name)
        info = cert_info(crt)
        assert crt.read_text().count("BEGIN CERTIFICATE") == 1, f"{name}.crt should hold one certificate"
        assert info.subject == f"CN={cn},O={org},C={state}", (name, info)
        assert info.issuer == f"CN=Passerelle demo root CA {ca_cc},O=passerelle demo,C={ca_cc}", (name, info)
        # the key is the certificate's, an EC P-256 key, and private to its owner
        key = openssl("pkey", "-in", pki.key(name), "-pubout", "-text_pub")
        assert info.pubkey.strip() in key and ("prime256v1" in key or "P-256" in key), (name, key)
        mode = pki.key(name).stat().st_mode & 0o777
        assert mode == 0o600, f"{name}.key has mode {oct(mode)}"
        if name.startswith("ca-"):
            assert crt.read_text().strip() in bundle, f"{name} missing from ca-bundle.pem"
            assert "CA:TRUE" in info.ext and "Certificate Sign, CRL Sign" in info.ext, (name, info.ext)
            assert 3649 < info.days < 3651, (name, info.days)
            continue
        assert "CA:FALSE" in info.ext and 824 < info.days < 826, (name, info)
        if name.startswith("gw-"):
            assert "TLS Web Server Authentication, TLS Web Client Authentication" in info.ext, (name, info.ext)
            assert f"DNS:localhost, DNS:{name}, IP Address:127.0.0.1" in info.ext, (name, info.ext)
        else:
            assert "TLS Web Client Authentication" in info.ext and "Server" not in info.ext, (name, info.ext)
    # every leaf chains to the bundle
    leaves = [pki.crt(n) for n in names if not n.startswith("ca-")]
    assert openssl("verify", "-CAfile", pki.bundle, *leaves).count(": OK") == len(leaves)
    assert not list(pki.dir.glob(".gen*")), "gen.sh left its scratch directory behind"


def test_gen_sh_is_idempotent(tmp_path: Path):
    first = run_gen_sh(tmp_path)
    assert "gen.sh" in first.stdout and "ca-bundle.pem" in first.stdout, first.stdout
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(files) == sorted(
        [f"{n}.{ext}" for n in ("ca-FR", "ca-DE", "ca-IT", "ca-EU", "gw-fr", "gw-de", "gw-it", "trainer-de", "auditor-eu",
                                "steward-fr") for ext in ("crt", "key")] + ["ca-bundle.pem", "anchors.toml"])
    run_gen_sh(tmp_path)
    again = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert again.keys() == files.keys(), "a second run should make the same files, no more"
    assert all(again[n] != files[n] for n in files), "a second run should make new keys and certificates"
    leaves = [tmp_path / f"{n}.crt" for n in ("gw-fr", "gw-de", "gw-it", "trainer-de", "auditor-eu", "steward-fr")]
    assert openssl("verify", "-CAfile", tmp_path / "ca-bundle.pem", *leaves).count(": OK") == len(leaves)


def test_deploy_certs_out_is_git_ignored():
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "deploy/certs/out/gw-fr.key"],
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, "deploy/certs/out/ must be git-ignored (deploy/certs/.gitignore)"


# ======================================================================================================================
# Server TLS with bearer keys
# ======================================================================================================================

def test_bearer_key_over_tls_pulls_the_governed_stream(tls_gw: TlsGateway):
    c = tls_gw.connect()
    try:
        n = pull_and_check(tls_gw, c, call_options(tls_gw.gw.keys["trainer-de"]))
    finally:
        c.close()
    assert n == len(tls_gw.gw.reference.consented_rows(PURPOSE)) > 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_gateway_certificate_is_verified_for_its_names(tls_gw: TlsGateway, host):
    """Clients verify the gateway against the bundle, by DNS name and by IP address (SAN)."""
    c = tls_gw.connect(host=host)
    try:
        assert listed_datasets(c, call_options(tls_gw.gw.keys["trainer-de"])) == [DATASET]
    finally:
        c.close()
    resp = http("GET", tls_gw.url("/healthz", host=host), context=tls_gw.ssl_context())
    assert resp.status == 200, resp.text[:300]
    for port in (tls_gw.flight_port, tls_gw.http_port):
        cert = served_certificate(tls_gw, port)
        assert subject_of(cert) == {"commonName": "gw-fr", "organizationName": "passerelle", "countryName": "FR"}


def test_clients_refuse_a_gateway_they_do_not_trust(tls_gw: TlsGateway, pki: Pki):
    """Only the rogue CA as trust anchor: the client refuses the gateway's certificate (server TLS is real)."""
    rogue = pki.crt("rogue-ca")
    c = tls_gw.connect(roots=rogue)
    try:
        expect_flight_handshake_refused(
            lambda: list(c.list_flights(b"", quick_options(tls_gw.gw.keys["trainer-de"]))), "untrusted gateway")
    finally:
        c.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", tls_gw.http_port), timeout=10) as raw:
            tls_gw.ssl_context(roots=rogue).wrap_socket(raw, server_hostname="localhost").close()


def test_plaintext_is_not_served_on_tls_ports(tls_gw: TlsGateway):
    plain = flight.connect(f"grpc://127.0.0.1:{tls_gw.flight_port}")
    try:
        with pytest.raises(flight.FlightError):
            list(plain.list_flights(b"", quick_options(tls_gw.gw.keys["trainer-de"])))
    finally:
        plain.close()
    try:
        resp = http("GET", f"http://127.0.0.1:{tls_gw.http_port}/healthz")
    except (OSError, HTTPException):
        return
    assert resp.status >= 400 and "metadata_version" not in resp.text, \
        f"the REST port answered plain HTTP: {resp.status} {resp.text[:300]}"


def test_rest_over_https_with_bearer_keys(tls_gw: TlsGateway):
    health = tls_gw.http("GET", "/healthz")
    assert health.status == 200 and health.body.get("status") == "ok", health.text[:300]
    listing = tls_gw.http("GET", "/api/v1/datasets", key=tls_gw.gw.keys["trainer-de"])
    assert listing.status == 200, listing.text[:300]
    assert DATASET in dataset_names(listing.body)
    audit = tls_gw.http("GET", "/api/v1/audit?limit=5", key=tls_gw.gw.keys["auditor-eu"])
    assert audit.status == 200 and isinstance(audit.body, list), audit.text[:300]
    assert_json_error(tls_gw.http("GET", "/api/v1/datasets"), 401)
    assert_json_error(tls_gw.http("GET", "/api/v1/audit", key=tls_gw.gw.keys["trainer-de"]), 403)


def test_missing_credentials_over_tls_are_unauthenticated(tls_gw: TlsGateway):
    c = tls_gw.connect()
    try:
        expect_status("UNAUTHENTICATED", lambda: c.get_flight_info(path_descriptor(), call_options(None)))
    finally:
        c.close()


# ======================================================================================================================
# Identities from client certificates
# ======================================================================================================================

def test_client_certificate_alone_pulls_and_is_audited(tls_gw: TlsGateway):
    """trainer-de's certificate and no authorization header: a full governed pull, audited as trainer-de (read back
    by the auditor, also with a certificate only)."""
    columns = ["admitted_at", "diagnosis", "hba1c"]  # an order no other test asks for: identifies the entries
    c = tls_gw.connect("trainer-de")
    try:
        opts = call_options(None)
        n = pull_and_check(tls_gw, c, opts)
        assert n == len(tls_gw.gw.reference.consented_rows(PURPOSE))
        info = c.get_flight_info(command_descriptor(columns=columns), opts)
        table = pull(c, opts, command_descriptor(columns=columns)).table
        assert table.column_names == columns and table.num_rows == n
        assert len(info.endpoints) >= 1
    finally:
        c.close()

    def entries():
        resp = tls_gw.http("GET", "/api/v1/audit?" + urllib.parse.urlencode({"principal": "trainer-de"}),
                           identity="auditor-eu")
        assert resp.status == 200, resp.text[:500]
        mine = [e for e in resp.body if e.get("columns") == columns]
        done = [e for e in mine if e["action"] == "do_get" and e["status"] == "completed"]
        # two GetFlightInfo (explicit and in pull) and the pull's do_gets
        return mine if len(done) >= len(info.endpoints) else None

    mine, _ = poll_until(entries, deadline=AUDIT_DEADLINE, what="the certificate pull's do_get entries completed")
    for e in mine:
        assert (e["principal"], e["organisation"], e["member_state"]) == ("trainer-de", "dkfz", "DE"), e
        assert e["decision"] == "allow" and e["purpose"] == PURPOSE and e["dataset"] == DATASET, e
    assert sum(1 for e in mine if e["action"] == "get_flight_info") == 2, mine
    assert sum(e["rows_sent"] for e in mine if e["action"] == "do_get") == n, mine


def test_client_certificate_identifies_on_rest(tls_gw: TlsGateway):
    listing = tls_gw.http("GET", "/api/v1/datasets", identity="trainer-de")
    assert listing.status == 200 and DATASET in dataset_names(listing.body), listing.text[:300]
    audit = tls_gw.http("GET", "/api/v1/audit?limit=1", identity="auditor-eu")
    assert audit.status == 200 and isinstance(audit.body, list), audit.text[:300]
    # the certificate decides the role: a trainer's certificate is not an auditor
    assert_json_error(tls_gw.http("GET", "/api/v1/audit", identity="trainer-de"), 403)
    assert_json_error(tls_gw.http("GET", "/api/v1/audit", identity="steward-fr"), 403)


def test_certificate_with_the_same_principals_key_is_accepted(tls_gw: TlsGateway):
    c = tls_gw.connect("trainer-de")
    try:
        assert listed_datasets(c, call_options(tls_gw.gw.keys["trainer-de"])) == [DATASET]
    finally:
        c.close()
    resp = tls_gw.http("GET", "/api/v1/datasets", identity="trainer-de", key=tls_gw.gw.keys["trainer-de"])
    assert resp.status == 200, resp.text[:300]


@pytest.mark.parametrize("identity", ["rogue-trainer-de", "expired-trainer-de"])
def test_untrusted_or_expired_certificate_fails_the_handshake(tls_gw: TlsGateway, identity):
    c = tls_gw.connect(identity)
    try:
        # with a valid bearer key too: the handshake fails before any header is read
        expect_flight_handshake_refused(
            lambda: c.get_flight_info(path_descriptor(), quick_options(tls_gw.gw.keys["trainer-de"])), identity)
    finally:
        c.close()
    expect_https_handshake_refused(tls_gw, "/api/v1/datasets", identity, identity=identity,
                                   key=tls_gw.gw.keys["trainer-de"])
    tls_gw.gw.assert_alive()


@pytest.mark.parametrize("identity,fragment", [
    ("ghost", "not a registered principal"),
    ("evil-org", "organisation"),
    ("wrong-state", "member state"),
    ("foreign-ca", "trust anchor of `FR`"),
    ("laundered-trainer-de", "trust anchor of `FR`"),
])
def test_certificate_not_matching_a_principal_is_unauthenticated(tls_gw: TlsGateway, identity, fragment):
    c = tls_gw.connect(identity)
    try:
        expect_status("UNAUTHENTICATED", lambda: c.get_flight_info(path_descriptor(), call_options(None)),
                      fragment=fragment)
        expect_status("UNAUTHENTICATED", lambda: list(c.list_flights(b"", call_options(None))), fragment=fragment)
        # a valid key of the named principal does not repair the certificate
        expect_status("UNAUTHENTICATED",
                      lambda: c.get_flight_info(path_descriptor(), call_options(tls_gw.gw.keys["trainer-de"])))
    finally:
        c.close()
    body = assert_json_error(tls_gw.http("GET", "/api/v1/datasets", identity=identity), 401)
    assert fragment in body["error"], body


def test_bearer_key_of_another_principal_with_a_certificate_is_unauthenticated(tls_gw: TlsGateway):
    steward = tls_gw.gw.keys["steward-fr"]
    c = tls_gw.connect("trainer-de")
    try:
        for call in (lambda: c.get_flight_info(path_descriptor(), call_options(steward)),
                     lambda: list(c.list_flights(b"", call_options(steward)))):
            expect_status("UNAUTHENTICATED", call, fragment="another principal")
    finally:
        c.close()
    body = assert_json_error(tls_gw.http("GET", "/api/v1/datasets", identity="trainer-de", key=steward), 401)
    assert "another principal" in body["error"], body
    # the auditor's key with a trainer's certificate does not open the audit
    body = assert_json_error(tls_gw.http("GET", "/api/v1/audit", identity="trainer-de",
                                         key=tls_gw.gw.keys["auditor-eu"]), 401)
    assert "another principal" in body["error"], body


# ======================================================================================================================
# allow_bearer = false; require_client_cert = true
# ======================================================================================================================

def test_certificate_only_node_refuses_bearer_keys(certonly_gw: TlsGateway):
    tg = certonly_gw
    key = tg.gw.keys["trainer-de"]
    c = tg.connect()
    try:
        for call in (lambda: c.get_flight_info(path_descriptor(), call_options(key)),
                     lambda: list(c.list_flights(b"", call_options(key))),
                     lambda: c.get_flight_info(path_descriptor(), call_options(None))):
            expect_status("UNAUTHENTICATED", call, fragment="client certificate")
        # nor does the basic-auth handshake open it
        expect_status("UNAUTHENTICATED", lambda: c.authenticate_basic_token("trainer-de", key),
                      fragment="client certificate")
    finally:
        c.close()
    body = assert_json_error(tg.http("GET", "/api/v1/datasets", key=key), 401)
    assert "client certificate" in body["error"], body
    # the node still answers health checks over TLS
    assert tg.http("GET", "/healthz").status == 200


def test_certificate_only_node_serves_certificates(certonly_gw: TlsGateway):
    c = certonly_gw.connect("trainer-de")
    try:
        pull_and_check(certonly_gw, c, call_options(None))
    finally:
        c.close()
    resp = certonly_gw.http("GET", "/api/v1/datasets", identity="trainer-de")
    assert resp.status == 200 and DATASET in dataset_names(resp.body), resp.text[:300]


def test_required_client_certificate_fails_the_handshake_without_one(required_gw: TlsGateway):
    tg = required_gw
    c = tg.connect()
    try:
        expect_flight_handshake_refused(
            lambda: c.get_flight_info(path_descriptor(), quick_options(tg.gw.keys["trainer-de"])), "no certificate")
    finally:
        c.close()
    expect_https_handshake_refused(tg, "/healthz", "healthz without a certificate")
    expect_https_handshake_refused(tg, "/api/v1/datasets", "bearer key without a certificate",
                                   key=tg.gw.keys["trainer-de"])
    tg.gw.assert_alive()


def test_required_client_certificate_serves_certificates(required_gw: TlsGateway):
    c = required_gw.connect("trainer-de")
    try:
        pull_and_check(required_gw, c, call_options(None))
    finally:
        c.close()
    assert required_gw.http("GET", "/healthz", identity="steward-fr").status == 200
    resp = required_gw.http("GET", "/api/v1/audit?limit=3", identity="auditor-eu")
    assert resp.status == 200 and isinstance(resp.body, list), resp.text[:300]


# ======================================================================================================================
# Garbage on the ports
# ======================================================================================================================

GARBAGE_IO_TIMEOUT = 1.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FLIGHT_SERVICE = "/arrow.flight.protocol.FlightService/"


def h2_frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + (stream & 0x7FFFFFFF).to_bytes(4, "big") + payload


def hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def grpc_request(method: str, message: bytes, *, prefix: bytes | None = None, stream: int = 1) -> bytes:
    """HTTP/2 preface, SETTINGS, a gRPC HEADERS frame for `method` and one DATA frame carrying `message` behind the
    5-byte gRPC prefix (or `prefix` as given)."""
    block = b"".join(hpack_literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "https"), (":path", FLIGHT_SERVICE + method), (":authority", "localhost"),
        ("content-type", "application/grpc"), ("te", "trailers"), ("x-passerelle-purpose", PURPOSE)])
    head = prefix if prefix is not None else b"\x00" + len(message).to_bytes(4, "big")
    return (H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x4, stream, block)
            + h2_frame(0, 0x1, stream, head + message))


def _raw_send(port: int, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=GARBAGE_IO_TIMEOUT * 5) as s:
        s.settimeout(GARBAGE_IO_TIMEOUT)
        try:
            if payload:
                s.sendall(payload)
            s.recv(4096)
        except OSError:
            pass
    return "sent"


def _tls_send(port: int, payload: bytes, alpn: str, bundle: Path) -> str:
    """Send `payload` inside a TLS connection (no client certificate). Returns "tls" once the handshake passed: the
    test requires it for every such job, so a server that stopped speaking TLS is noticed."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=GARBAGE_IO_TIMEOUT * 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.settimeout(GARBAGE_IO_TIMEOUT)
            try:
                s.sendall(payload)
                s.recv(4096)
            except OSError:
                pass
    return "tls"


def garbage_jobs(tg: TlsGateway, seed: int = 20261126) -> list[tuple[str, Callable[[], str]]]:
    """200 hostile connections: (kind, job)."""
    rnd = random.Random(seed)
    fp, hp, bundle = tg.flight_port, tg.http_port, tg.pki.bundle
    jobs: list[tuple[str, Callable[[], str]]] = []

    def raw(kind: str, port: int, payload: bytes):
        jobs.append((kind, lambda: _raw_send(port, payload)))

    def tls(kind: str, port: int, payload: bytes, alpn: str):
        jobs.append((kind, lambda: _tls_send(port, payload, alpn, bundle)))

    def junk(n: int) -> bytes:
        return rnd.randbytes(n)

    for _ in range(30):  # random bytes, not TLS
        raw("random bytes on the Flight port", fp, junk(rnd.randint(1, 3000)))
        raw("random bytes on the REST port", hp, junk(rnd.randint(1, 3000)))
    for i in range(20):  # broken TLS records: truncated or lying ClientHellos, bad versions
        length = rnd.randint(0, 0xFFFF)
        body = junk(rnd.randint(0, 200))
        hello = bytes([0x16, 0x03, rnd.choice([0x00, 0x01, 0x03, 0x7F])]) + length.to_bytes(2, "big") + b"\x01" + body
        raw("broken ClientHello", fp if i % 2 else hp, hello)
    for payload in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GARBAGE\r\n\r\n", b"\r\n\r\n\r\n",
                    H2_PREFACE, b"GET / HTTP/1.0\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n"):
        for _ in range(4):  # plaintext HTTP on the TLS ports
            raw("plaintext HTTP on a TLS port", hp, payload)
    for _ in range(10):
        raw("connect and close", rnd.choice([fp, hp]), b"")
    malformed_http = [
        b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n",
        b"GET /%%%zz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /api/v1/datasets HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999\r\n\r\n{",
        b"POST /api/v1/datasets HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n",
        b"POST /api/v1/datasets HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
        b"GET /api/v1/audit?limit=-1&limit=x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \x00\xff\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Junk: y\r\n" * 5000 + b"\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"A" * 70000 + b"\r\n\r\n",
        b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
        b"GET /api/v1/datasets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic !!!!\r\n\r\n",
    ]
    for i in range(30):  # malformed HTTP/1.1 inside TLS on the REST port
        tls("malformed HTTP over TLS", hp, malformed_http[i % len(malformed_http)], "http/1.1")
    grpc_junk = [
        grpc_request("DoGet", junk(64)),
        grpc_request("GetFlightInfo", junk(200)),
        grpc_request("DoGet", b"", prefix=b"\x00\xff\xff\xff\xff"),  # announces a 4 GiB message
        grpc_request("GetFlightInfo", junk(10), prefix=b"\x01\x00\x00\x00\x0a"),  # compressed, no grpc-encoding
        grpc_request("Handshake", junk(50)),
        grpc_request("NoSuchMethod", junk(10)),
        grpc_request("DoGet", junk(16), stream=2),  # even (server-initiated) stream id
        H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x4, 1, junk(60)),  # HEADERS with a garbage HPACK block
        H2_PREFACE + b"".join(h2_frame(rnd.randint(0, 12), rnd.randint(0, 255), rnd.randint(0, 9), junk(30))
                              for _ in range(20)),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",  # HTTP/1.1 after negotiating h2
    ]
    for i in range(40):  # junk HTTP/2 and gRPC inside TLS on the Flight port
        tls("junk gRPC over TLS", fp, grpc_junk[i % len(grpc_junk)], "h2")
    for i in range(20):  # random application data inside TLS on both ports
        tls("random bytes over TLS", fp if i % 2 else hp, junk(rnd.randint(1, 5000)), "h2" if i % 2 else "http/1.1")
    assert len(jobs) == 200, len(jobs)
    rnd.shuffle(jobs)
    return jobs


def test_garbage_leaves_the_node_healthy(tls_gw: TlsGateway):
    jobs = garbage_jobs(tls_gw)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [(kind, pool.submit(job)) for kind, job in jobs]
        outcomes = []
        for kind, fut in futures:
            try:
                outcomes.append((kind, fut.result(timeout=60)))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                outcomes.append((kind, f"{type(exc).__name__}: {exc}"))
    seconds = time.monotonic() - t0
    tls_gw.gw.assert_alive()
    tls_jobs = [(k, o) for k, o in outcomes if "over TLS" in k]
    failed = [(k, o) for k, o in tls_jobs if o != "tls"]
    assert not failed, f"TLS handshakes (without a client certificate) failed during the garbage: {failed[:5]}"
    assert all(o == "sent" for k, o in outcomes if "over TLS" not in k), \
        [(k, o) for k, o in outcomes if "over TLS" not in k and o != "sent"][:5]

    t1 = time.monotonic()
    health = tls_gw.http("GET", "/healthz")
    assert health.status == 200, health.text[:300]
    assert time.monotonic() - t1 < 5.0, "healthz was slow after the garbage"
    c = tls_gw.connect("trainer-de")
    try:
        pull_and_check(tls_gw, c, call_options(None))
    finally:
        c.close()
    c = tls_gw.connect()
    try:
        table = pull(c, call_options(tls_gw.gw.keys["trainer-de"]), command_descriptor(limit=10)).table
        assert table.num_rows == 10
    finally:
        c.close()
    assert seconds < 40, f"200 garbage connections took {seconds:.1f} s"


# ======================================================================================================================
# Certificate reload
# ======================================================================================================================

def test_replaced_certificate_is_served_without_restart(certonly_gw: TlsGateway, pki: Pki):
    """gw-fr's certificate re-issued for the same key replaces the file (atomically): new connections get it within
    the reload period; the process is the same and keeps serving."""
    tg = certonly_gw
    before = served_certificate(tg)
    assert int(before["serialNumber"], 16) == cert_serial(tg.cert)
    pid = tg.gw.proc.pid
    new = pki.issue("gw-fr-reissued", GATEWAY_SUBJECT, "ca-FR", ext="server_ext", days=30, key=tg.key)
    new_serial = cert_serial(new)
    assert new_serial != cert_serial(tg.cert)
    staged = tg.cert.with_name(tg.cert.name + ".new")
    shutil.copyfile(new, staged)
    os.replace(staged, tg.cert)

    def serving_new():
        return int(served_certificate(tg)["serialNumber"], 16) == new_serial

    _, seconds = poll_until(serving_new, deadline=RELOAD_DEADLINE, interval=0.5,
                            what="the replaced certificate is served on the REST port")
    assert int(served_certificate(tg, tg.flight_port)["serialNumber"], 16) == new_serial, \
        "the Flight port still serves the old certificate"
    assert tg.gw.proc.pid == pid
    tg.gw.assert_alive()
    c = tg.connect("trainer-de")
    try:
        assert listed_datasets(c, call_options(None)) == [DATASET]
    finally:
        c.close()
    print(f"certificate reload seen after {seconds:.1f} s")


# ======================================================================================================================
# Trust anchors bound to member states ([tls.anchors]); CRLs
# ======================================================================================================================

ROOTS = ("FR", "DE", "IT", "EU")


def test_gen_sh_binds_each_root_to_its_member_state(pki: Pki):
    """gen.sh's anchors.toml binds each root of the bundle to its member state by the fingerprint openssl prints."""
    doc = tomllib.loads(pki.dir.joinpath("anchors.toml").read_text())
    assert doc == {"tls": {"anchors": {cc: pki.fingerprint(f"ca-{cc}") for cc in ROOTS}}}, doc


def test_an_intermediate_under_the_principals_anchor_identifies_whatever_its_c(tls_gw: TlsGateway):
    """chained-trainer-de comes through an intermediate labelled C=FR under the DE anchor: the anchor decides, so it
    is trainer-de (DE); laundered-trainer-de (an intermediate labelled C=DE under the FR anchor) is refused above."""
    c = tls_gw.connect("chained-trainer-de")
    try:
        assert listed_datasets(c, call_options(None)) == [DATASET]
    finally:
        c.close()
    resp = tls_gw.http("GET", "/api/v1/datasets", identity="laundered-trainer-de")
    body = assert_json_error(resp, 401)
    assert "trust anchor of `FR`" in body["error"], body


def refused_start(binary: Path, base: Path, config_text: str) -> str:
    """`serve --config` with `config_text` must exit non-zero at once; returns what it printed."""
    config = base / "passerelle.toml"
    config.write_text(config_text)
    proc = run_cli(binary, base / "data", "serve", "--config", str(config), "--flight-addr", "127.0.0.1:0",
                   "--http-addr", "127.0.0.1:0", check=False)
    assert proc.returncode != 0, f"serve accepted the configuration:\n{config_text}\n{proc.stdout[-500:]}"
    return proc.stdout + proc.stderr


def test_client_ca_without_anchors_is_refused_with_the_lines_to_add(passerelle_bin: Path, pki: Pki, tmp_path: Path):
    """An existing configuration with client_ca but no [tls.anchors] is refused at start; the hint is the section
    to add, with each root's fingerprint, to be checked (the C shown is only the certificate's claim)."""
    out = refused_start(passerelle_bin, tmp_path, _config(pki.crt("gw-fr"), pki.key("gw-fr"), pki.bundle,
                                                          require_client_cert=False, allow_bearer=True))
    assert "[tls.anchors]" in out, out
    for cc in ROOTS:
        assert f'{cc} = "{pki.fingerprint(f"ca-{cc}")}"' in out, (cc, out)


@pytest.mark.parametrize("case,fragment", [
    ("EU root unbound", "no [tls.anchors] entry binds"),
    ("an anchor outside the bundle", "names no certificate"),
    ("one anchor for two states", "bound to both"),
    ("not a fingerprint", "not a SHA-256 fingerprint"),
    ("not a member state", "member state"),
])
def test_anchor_bindings_must_match_the_bundle(passerelle_bin: Path, pki: Pki, tmp_path: Path, case, fragment):
    three = {cc: [f"ca-{cc}"] for cc in ("FR", "DE", "IT")}
    anchors = {
        "EU root unbound": pki.anchors_toml(three),
        "an anchor outside the bundle": pki.anchors_toml({**three, "EU": ["ca-EU"], "DE": ["ca-DE", "rogue-ca"]}),
        "one anchor for two states": pki.anchors_toml({**three, "EU": ["ca-EU", "ca-FR"]}),
        "not a fingerprint": pki.anchors_toml() + 'XX = "AB:CD"\n',
        "not a member state": pki.anchors_toml().replace("EU =", "eu-bodies ="),
    }[case]
    out = refused_start(passerelle_bin, tmp_path, _config(pki.crt("gw-fr"), pki.key("gw-fr"), pki.bundle,
                                                          require_client_cert=False, allow_bearer=True,
                                                          anchors=anchors))
    assert fragment in out, (case, out)


CRL_CNF = """\
[ca]
default_ca = ca_default
[ca_default]
database = {workdir}/index.txt
default_md = sha256
default_crl_days = 2
"""


class Crl:
    """A CRL of one CA kept with `openssl ca` (its own index), written atomically to `path`."""

    def __init__(self, pki: Pki, ca: str, workdir: Path, path: Path):
        self.pki, self.ca, self.workdir, self.path = pki, ca, workdir, path
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "index.txt").write_text("")
        (workdir / "openssl.cnf").write_text(CRL_CNF.format(workdir=workdir))
        self.publish()

    def _ca(self, *args: Any) -> None:
        openssl("ca", "-batch", "-config", self.workdir / "openssl.cnf", "-cert", self.pki.crt(self.ca),
                "-keyfile", self.pki.key(self.ca), *args)

    def revoke(self, name: str) -> None:
        self._ca("-revoke", self.pki.crt(name))
        self.publish()

    def publish(self) -> None:
        staged = self.path.with_name(self.path.name + ".new")
        self._ca("-gencrl", "-out", staged)
        os.replace(staged, self.path)


def test_a_revoked_certificate_is_refused_once_the_crl_lists_it(passerelle_bin: Path, pki: Pki,
                                                                tmp_path_factory: pytest.TempPathFactory):
    """`crl = [DE's CRL]`: two certificates of trainer-de from the DE CA work; once one is revoked and the CRL file
    replaced, new connections with it fail the handshake (Flight and https) within the reload period, without a
    restart, while the other certificate of the same principal still works. A CA without a CRL in the list (FR) is
    refused: revocation cannot be checked, so the certificate is not accepted."""
    base = tmp_path_factory.mktemp("crl-gateway")
    pki.issue("crl-trainer-de", "/C=DE/O=dkfz/CN=trainer-de", "ca-DE")
    pki.issue("crl-trainer-de-2", "/C=DE/O=dkfz/CN=trainer-de", "ca-DE")
    crl = Crl(pki, "ca-DE", base / "crl-ca-DE", base / "crl-DE.pem")
    cert, key = base / "gw-fr.crt", base / "gw-fr.key"
    shutil.copyfile(pki.crt("gw-fr"), cert)
    shutil.copyfile(pki.key("gw-fr"), key)
    key.chmod(0o600)
    config = base / "passerelle.toml"
    config.write_text(_config(cert, key, pki.bundle, require_client_cert=False, allow_bearer=True,
                              extra=f"reload_secs = 1\ncrl = [{json.dumps(str(crl.path))}]\n",
                              anchors=pki.anchors_toml()))
    gw = start_gateway(passerelle_bin, base / "data", demo_rows=SMALL_DEMO_ROWS, config=config)
    tg = TlsGateway(gw, pki, cert, key)
    try:
        def lists(identity: str) -> bool:
            c = tg.connect(identity)
            try:
                return listed_datasets(c, quick_options(None)) == [DATASET]
            except flight.FlightUnavailableError:
                return False
            finally:
                c.close()

        assert lists("crl-trainer-de") and lists("crl-trainer-de-2")
        c = tg.connect("steward-fr")
        try:
            expect_flight_handshake_refused(lambda: c.get_flight_info(path_descriptor(), quick_options(None)),
                                            "FR certificate without an FR CRL")
        finally:
            c.close()

        crl.revoke("crl-trainer-de")
        pid = gw.proc.pid
        _, seconds = poll_until(lambda: not lists("crl-trainer-de"), deadline=RELOAD_DEADLINE, interval=0.5,
                                what="the revoked certificate is refused")
        c = tg.connect("crl-trainer-de")
        try:
            expect_flight_handshake_refused(lambda: c.get_flight_info(path_descriptor(), quick_options(None)),
                                            "revoked certificate")
        finally:
            c.close()
        expect_https_handshake_refused(tg, "/api/v1/datasets", "revoked certificate", identity="crl-trainer-de")
        assert lists("crl-trainer-de-2"), "the other certificate of the same principal is no longer accepted"
        assert gw.proc.pid == pid
        gw.assert_alive()
        print(f"revocation seen after {seconds:.1f} s")
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the CRL gateway died during the test (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the CRL gateway ignored SIGTERM; log:\n{gw.log_tail()}"
