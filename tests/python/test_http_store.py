"""A dataset served over plain HTTP, end to end: the gateway reads a single Parquet file by URL through a
`[stores.web]` section (`kind = "http"`, `allow_http = true`) of its configuration.

object_store's HTTP client reads Parquet with HEAD (size, Last-Modified, ETag) and ranged GETs (`Range: bytes=a-b`,
expecting `206 Partial Content` with a `Content-Range`), which `http.server.SimpleHTTPRequestHandler` does not do.
So this module has a small threaded HTTP server of its own (`RangeServer`, port 0) that serves the files of a
temporary directory under `/data/` with HEAD and single-range GET (206 + Content-Range; 416 for a range it cannot
satisfy), answers any other method (e.g. WebDAV's PROPFIND, which object_store uses to list) with 405 as a plain web
server does, and logs every request so the tests can check that ranged reads were used.

The configuration declares the two web servers' `/data/` as storage locations of controller aphp read through
`web` (a dataset registers only inside a location naming its controller and store), so the store reaches nothing
else: another path, port or host is refused before any request.

Manifests are the demo's (`demo/demo_patients.toml` of the gateway's data dir: controller aphp, consent registry
`aphp-patients`, the demo's column classes) with another name, `store = "web"` and an `http://127.0.0.1:PORT/...`
location. The file served is the demo's own `demo/patients/patients.parquet`, byte for byte, so trainer-de (org
dkfz, permitted with `permit add`) must receive exactly the rows of the local `demo_patients`, pseudonyms included.
"""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import threading
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import (DATASET, PSEUDONYM_RE, PURPOSE, RELEASED_COLUMNS, Gateway, HttpResponse, assert_json_error,
                      assert_same_multiset, call_options, dataset_names, http, listed_datasets, norm_float,
                      output_row, path_descriptor, poll_until, pull, released_row, server_message, start_gateway,
                      stop_process)
from test_flight_sql import adbc_connect, scalar

# The first request after a permit opens the dataset over HTTP; the debug build may take a while on 2 cores.
VISIBLE_DEADLINE = 15.0
# Texts that must never reach a client in an error: traces and raw server documents.
TRACE_RE = re.compile(r"stack backtrace|panicked at|\bat src/|\.rs:\d+|<\?xml|<html|Traceback", re.I)
MAX_MESSAGE = 600


# ======================================================================================================================
# The HTTP server
# ======================================================================================================================

@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None  # the Range header as sent
    status: int


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=` range -> (first, last) inclusive, clamped to the file; None if malformed or unsatisfiable
    (including several ranges, which this server does not do)."""
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # bytes=-N: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as object_store's client expects of a real server
    server: "RangeServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # the server keeps its own structured log

    def _record(self, status: int) -> None:
        self.server.record(Request(self.command, self.path, self.headers.get("Range"), status))

    def _plain(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status)

    def _file(self) -> Path | None:
        path = self.path.split("?", 1)[0]
        if not path.startswith("/data/"):
            return None
        rel = Path(path[len("/data/"):])
        if rel.is_absolute() or ".." in rel.parts:
            return None
        p = self.server.root / rel
        return p if p.is_file() else None

    def _serve(self, head: bool) -> None:
        p = self._file()
        if p is None:
            self._plain(404, "Not Found\n")
            return
        st = p.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        meta = {"Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True), "ETag": etag,
                "Accept-Ranges": "bytes"}
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() != "*" and etag not in [t.strip() for t in if_match.split(",")]:
            self._plain(412, "Precondition Failed\n", meta)
            return
        if_none = self.headers.get("If-None-Match")
        if if_none is not None and (if_none.strip() == "*" or etag in [t.strip() for t in if_none.split(",")]):
            self.send_response(304)
            for k, v in meta.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(304)
            return
        rng = self.headers.get("Range")
        if head or rng is None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            for k, v in meta.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, self.wfile)
            self._record(200)
            return
        span = parse_range(rng, size)
        if span is None:
            self._plain(416, "Range Not Satisfiable\n", {**meta, "Content-Range": f"bytes */{size}"})
            return
        first, last = span
        with open(p, "rb") as f:
            f.seek(first)
            data = f.read(last - first + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        for k, v in meta.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self._record(206)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _not_allowed(self) -> None:
        # Drain a request body, if any, so the connection stays usable.
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self._plain(405, "Method Not Allowed\n", {"Allow": "GET, HEAD"})

    do_PROPFIND = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _not_allowed  # noqa: N815


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self._lock = threading.Lock()
        self._log: list[Request] = []

    def record(self, req: Request) -> None:
        with self._lock:
            self._log.append(req)

    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._log if path is None or r.path == path]

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base}/data/{name}"


def _http_get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def start_range_server(root: Path) -> tuple[RangeServer, threading.Thread]:
    server = RangeServer(root)
    thread = threading.Thread(target=server.serve_forever, name=f"range-server-{root.name}", daemon=True)
    thread.start()
    return server, thread


def stop_range_server(server: RangeServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> RangeServer:
    root = tmp_path_factory.mktemp("web-root")
    server, thread = start_range_server(root)
    try:
        # The server itself behaves as object_store expects (so a failure below is the gateway's).
        (root / "probe.bin").write_bytes(bytes(range(256)) * 4)
        status, h, body = _http_get(server.url("probe.bin"), method="HEAD")
        assert status == 200 and h["content-length"] == "1024" and "etag" in h and "last-modified" in h, (status, h)
        status, h, body = _http_get(server.url("probe.bin"), {"Range": "bytes=10-19"})
        assert (status, h["content-range"], body) == (206, "bytes 10-19/1024", bytes(range(10, 20))), (status, h)
        status, h, body = _http_get(server.url("probe.bin"), {"Range": "bytes=-4"})
        assert (status, h["content-range"], body) == (206, "bytes 1020-1023/1024", bytes(range(252, 256)))
        status, h, body = _http_get(server.url("probe.bin"), {"Range": "bytes=1000-"})
        assert (status, h["content-range"], len(body)) == (206, "bytes 1000-1023/1024", 24)
        status, h, _ = _http_get(server.url("probe.bin"), {"Range": "bytes=5000-6000"})
        assert (status, h.get("content-range")) == (416, "bytes */1024"), (status, h)
        assert _http_get(server.url("nope.bin"))[0] == 404
        (root / "probe.bin").unlink()
        yield server
    finally:
        stop_range_server(server, thread)


@pytest.fixture(scope="module")
def web2(tmp_path_factory) -> RangeServer:
    """A second web server on the same host, another port: declared as a location of its own when the gateway
    starts, and first read by test_a_second_web_server_on_another_port_reads_through_the_same_store."""
    server, thread = start_range_server(tmp_path_factory.mktemp("second-root"))
    try:
        yield server
    finally:
        stop_range_server(server, thread)


# ======================================================================================================================
# The gateway with [stores.web]
# ======================================================================================================================

STORE_CONFIG = """# the object store of the HTTP end-to-end tests (test_http_store.py)
[stores.web]
kind = "http"
allow_http = true
"""
LOCATION_REFUSED_RE = re.compile(r"location `[^`]*` is not available for registration")


def locations_config(*servers: RangeServer) -> str:
    """Each server's `/data/` a storage location of aphp's, read through `web`."""
    return "".join(f'[locations.web{i}]\nurl = "{srv.base}/data/"\ncontrollers = ["aphp"]\nstore = "web"\n\n'
                   for i, srv in enumerate(servers))


@dataclass
class Web:
    gw: Gateway
    server: RangeServer
    config: Path
    _local: pa.Table | None = field(default=None, repr=False)

    @property
    def steward(self) -> str:
        return self.gw.keys["steward-fr"]

    @property
    def trainer(self) -> str:
        return self.gw.keys["trainer-de"]

    def publish(self, name: str) -> str:
        """Copy the demo's Parquet file to the web root as `name`; returns its URL."""
        shutil.copyfile(self.gw.reference.parquet_path, self.server.root / name)
        return self.server.url(name)

    def local(self) -> pa.Table:
        """The local demo_patients as trainer-de receives it."""
        if self._local is None:
            self._local = pull_dataset(self, DATASET)
            assert self._local.num_rows == len(self.gw.reference.consented_rows(PURPOSE)), \
                "the local demo pull is not the reference model's"
        return self._local


@pytest.fixture(scope="module")
def webgw(passerelle_bin: Path, web: RangeServer, web2: RangeServer, tmp_path_factory) -> Web:
    base = tmp_path_factory.mktemp("http-gateway")
    config = base / "passerelle.toml"
    config.write_text(locations_config(web, web2) + STORE_CONFIG)
    gw = start_gateway(passerelle_bin, base / "data", config=config)
    try:
        yield Web(gw, web, config)
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the HTTP-store gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the HTTP-store gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


def manifest(w: Web, name: str, location: str) -> dict[str, Any]:
    """The demo manifest (as JSON for REST) with another name, this location and `store = "web"`."""
    m = tomllib.loads(w.gw.reference.manifest_path.read_text())
    m.update(name=name, location=location, store="web")
    return m


def register(w: Web, body: dict[str, Any]) -> HttpResponse:
    return http("POST", w.gw.url("/api/v1/datasets"), key=w.steward, body=body)


def permit_and_wait(w: Web, name: str) -> None:
    """`permit add` for dkfz, then wait until trainer-de lists the dataset."""
    w.gw.cli("permit", "add", "--dataset", name, "--org", "dkfz", "--purpose", PURPOSE)
    c = w.gw.connect()
    try:
        poll_until(lambda: name in listed_datasets(c, call_options(w.trainer)), deadline=VISIBLE_DEADLINE,
                   interval=0.1, what=f"dkfz lists {name}")
    except AssertionError as err:
        said = [line for line in w.gw.log_path.read_text(errors="replace").splitlines() if name in line]
        raise AssertionError(f"{err}; the server's log about {name}:\n" + "\n".join(said[-3:])) from None
    finally:
        c.close()


def register_ok(w: Web, name: str, location: str) -> None:
    resp = register(w, manifest(w, name, location))
    assert resp.status in (200, 201), (f"registering {name} at {location}: {resp.status} {resp.text[:1500]}\n"
                                       f"server log:\n{w.gw.log_tail(30)}")
    permit_and_wait(w, name)


def pull_dataset(w: Web, name: str) -> pa.Table:
    c = w.gw.connect()
    try:
        return pull(c, call_options(w.trainer), path_descriptor(name)).table
    finally:
        c.close()


def registered_names(w: Web) -> list[str]:
    return dataset_names(w.gw.cli_json("dataset", "list"))


def full_rows(table: pa.Table) -> list[tuple]:
    return [tuple(norm_float(r[c]) for c in table.schema.names) for r in table.to_pylist()]


def assert_short_clean(text: str, what: str) -> None:
    assert len(text) <= MAX_MESSAGE, f"{what} is {len(text)} characters long: {text[:1500]!r}"
    assert not TRACE_RE.search(text), f"{what} carries a trace or a raw document: {text[:1500]!r}"


WEB_PATIENTS = "web_patients"


@pytest.fixture(scope="module")
def web_patients(webgw: Web) -> str:
    """The demo's Parquet file at http://127.0.0.1:PORT/data/patients.parquet, registered over REST."""
    register_ok(webgw, WEB_PATIENTS, webgw.publish("patients.parquet"))
    return WEB_PATIENTS


# ======================================================================================================================
# Tests
# ======================================================================================================================

def test_pull_over_http_equals_the_local_dataset_and_uses_ranged_reads(webgw: Web, web_patients: str):
    path = "/data/patients.parquet"
    seen_before = len(webgw.server.requests(path))
    table = pull_dataset(webgw, web_patients)
    local = webgw.local()

    assert table.schema.names == RELEASED_COLUMNS, table.schema
    assert [f.type for f in table.schema] == [f.type for f in local.schema], (table.schema, local.schema)
    assert all(PSEUDONYM_RE.match(p) for p in table.column("patient_id").to_pylist())
    # the same rows as the local dataset, pseudonyms included (same recipient org, same consent registry)
    assert_same_multiset(full_rows(table), full_rows(local), "HTTP dataset vs the local demo_patients, whole rows")
    assert_same_multiset((output_row(r) for r in table.to_pylist()),
                         (released_row(r) for r in webgw.gw.reference.consented_rows(PURPOSE)),
                         "HTTP dataset vs the reference model")

    # object_store read the file with ranged GETs answered 206 (registration and the pull together)
    reqs = webgw.server.requests(path)
    ranged = [r for r in reqs if r.method == "GET" and r.range is not None]
    assert ranged, f"no ranged GET reached the HTTP server; requests: {reqs}"
    assert all(r.status == 206 for r in ranged), f"a ranged GET was not answered 206: {ranged}"
    assert len(reqs) > seen_before, f"the pull made no request to the HTTP server (cached?): {reqs}"
    assert not [r for r in reqs if r.status >= 400], f"the gateway made failing requests: {reqs}"


def test_sql_count_over_http_equals_the_local_count(webgw: Web, web_patients: str):
    expected = len(webgw.gw.reference.consented_rows(PURPOSE))
    with adbc_connect(webgw.gw, key=webgw.trainer) as conn:
        assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == expected
        assert scalar(conn, f"SELECT count(*) FROM {web_patients}") == expected


def test_url_that_404s_is_refused_at_registration(webgw: Web, web_patients: str):
    name = "web_missing"
    url = webgw.server.url("no-such-file.parquet")
    before = registered_names(webgw)
    resp = register(webgw, manifest(webgw, name, url))
    body = assert_json_error(resp, 400)
    text = f"{body['error']} {body['hint']}"
    assert_short_clean(text, "the refusal")
    assert not TRACE_RE.search(resp.text), f"the refusal carries a trace or a raw document: {resp.text[:1500]!r}"
    assert re.search(r"not found|does not exist|no such|cannot|can't|could not|unable|unreadable", text, re.I), \
        f"the refusal should say the location cannot be read: {text!r}"
    assert [r for r in webgw.server.requests("/data/no-such-file.parquet") if r.status == 404], \
        "the gateway never asked the HTTP server for the file"
    assert registered_names(webgw) == before, "a refused registration changed `dataset list`"
    assert_json_error(http("GET", webgw.gw.url(f"/api/v1/datasets/{name}"), key=webgw.steward), 404)
    webgw.gw.assert_alive()


def test_file_removed_after_registration_fails_cleanly(webgw: Web, web_patients: str):
    """A dataset of its own (the others keep their file): registered and pulled once, then its file is removed from
    the HTTP server. A pull must fail with a Flight error that is not INTERNAL (nor the caller's fault), short and
    without a trace; the gateway goes on serving demo_patients and web_patients."""
    name, file = "web_vanish", "vanish.parquet"
    register_ok(webgw, name, webgw.publish(file))
    local = webgw.local()
    assert pull_dataset(webgw, name).num_rows == local.num_rows

    os.unlink(webgw.server.root / file)
    c = webgw.gw.connect()
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the class is checked below
            pull(c, call_options(webgw.trainer), path_descriptor(name))
    finally:
        c.close()
    exc = caught.value
    what = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert isinstance(exc, (pa.ArrowException, flight.FlightError)), f"not a Flight error: {what}"
    assert not isinstance(exc, flight.FlightInternalError), f"a vanished file should not be INTERNAL: {what}"
    assert "Flight returned internal error" not in str(exc), f"a vanished file should not be INTERNAL: {what}"
    assert not isinstance(exc, (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)), \
        f"a storage failure should not look like the caller's fault: {what}"
    assert_short_clean(server_message(exc), "the pull's error message")
    assert [r for r in webgw.server.requests(f"/data/{file}") if r.status == 404], \
        "the failing pull never asked the HTTP server for the file"

    webgw.gw.assert_alive()
    assert pull_dataset(webgw, DATASET).num_rows == local.num_rows
    assert pull_dataset(webgw, web_patients).num_rows == local.num_rows


def test_a_second_web_server_on_another_port_reads_through_the_same_store(webgw: Web, web_patients: str,
                                                                         web2: RangeServer):
    """`[stores.web]` reads the http:// locations that name it; a second server on the same host but another port
    (two web servers on one machine, each declared) is another origin and must be read too, not only registered. The
    first server is in use already (web_patients), so the store's client for 127.0.0.1 exists when the second port
    is met."""
    assert pull_dataset(webgw, web_patients).num_rows == webgw.local().num_rows
    other = Web(webgw.gw, web2, webgw.config, webgw._local)
    assert web2.server_address[1] != webgw.server.server_address[1]
    name = "web_second_port"
    register_ok(other, name, other.publish("patients.parquet"))
    table = pull_dataset(other, name)
    assert_same_multiset(full_rows(table), full_rows(webgw.local()),
                         "the second server's dataset vs the local demo_patients, whole rows")
    assert [r for r in web2.requests("/data/patients.parquet") if r.status == 206], \
        f"the second server saw no ranged GET: {web2.requests()}"
    webgw.gw.assert_alive()


def test_the_store_reaches_only_its_declared_locations(webgw: Web, web_patients: str, tmp_path: Path):
    """No server-side request forgery through the `http` store: a URL outside the declared `/data/` bases (another
    path of the same server, a `..` out of `/data/`, an undeclared port of the same host, another spelling of the
    host) is refused with the location refusal, or as a malformed location, before any request; the servers see
    nothing of it and nothing is registered."""
    shutil.copyfile(webgw.gw.reference.parquet_path, webgw.server.root / "secret.parquet")
    root = tmp_path / "third-root"
    root.mkdir()
    third, thread = start_range_server(root)
    try:
        shutil.copyfile(webgw.gw.reference.parquet_path, root / "patients.parquet")
        port = webgw.server.server_address[1]
        seen = len(webgw.server.requests())
        before = registered_names(webgw)
        outside = [f"{webgw.server.base}/secret.parquet", f"{webgw.server.base}/other/data/patients.parquet",
                   third.url("patients.parquet"), f"http://localhost:{port}/data/patients.parquet",
                   f"https://127.0.0.1:{port}/data/patients.parquet"]
        for url in outside:
            resp = register(webgw, manifest(webgw, "web_outside", url))
            body = assert_json_error(resp, 400)
            assert LOCATION_REFUSED_RE.search(body["error"]), f"{url}: expected the location refusal: {body}"
        for url in (f"{webgw.server.base}/data/../secret.parquet", f"{webgw.server.base}/data/%2e%2e/secret.parquet"):
            resp = register(webgw, manifest(webgw, "web_outside", url))
            body = assert_json_error(resp, 400)
            assert_short_clean(f"{body['error']} {body['hint']}", f"the refusal of {url}")
        assert third.requests() == [], f"an undeclared origin was requested: {third.requests()}"
        assert webgw.server.requests()[seen:] == [], \
            f"a refused location was requested: {webgw.server.requests()[seen:]}"
        assert registered_names(webgw) == before, "a refused registration changed `dataset list`"
    finally:
        stop_range_server(third, thread)
    webgw.gw.assert_alive()
