"""Datasets on S3, end to end, against a real S3-compatible server: `moto_server` (PyPI `moto[server]`) with boto3
to make buckets and upload files, and the gateway reading them through a `[stores.<name>]` section of its
configuration.

The S3 server checks signatures. moto accepts any credentials by default, which would make a wrong secret pass
unnoticed, so the `moto` fixture first makes an IAM user with an allow-all policy and an access key (through moto's
IAM API, with the usual `testing` credentials), then switches moto's IAM checks on (`POST /moto-api/reset-auth`
with `0`). From then on every S3 request must be signed with that user's key, as on AWS, and a wrong secret gets
`SignatureDoesNotMatch`. The gateway's configuration:

    [stores.lake]    kind = "s3", endpoint = moto, that key id, secret_access_key = "env:LAKE_SECRET"
                     (LAKE_SECRET holds the user's secret in the gateway's environment only)
    [stores.wrong]   the same, with the literal secret "not-the-secret-xyz"
    [locations.*]    one per bucket the tests use, for controller aphp: `lake-guarded` read through `wrong`, every
                     other bucket through `lake` (a dataset registers only inside a location naming its controller
                     and read through the store that location names; one bucket, one store)

moto's `/moto-api/reset` would also delete the IAM user (and so lock every client out), so it is never used: each
test works in a bucket of its own.

Manifests are the demo's (controller aphp, consent registry `aphp-patients`, the demo's column classes) with another
name, an `s3://` location and `store = "lake"`. So the demo's consent and the reference model of conftest apply, and
pseudonyms equal the local `demo_patients` ones for the same recipient organisation: the S3 datasets are compared
with the local dataset row for row, pseudonyms included. Synthetic datasets (CSV, hive partitions, many files, the
vanishing files) use demo subjects whose released demo rows identify them, so the pseudonym each of their rows must
carry is known from the local pull.

Registration goes through REST (`POST /api/v1/datasets` as the demo steward) or the CLI (`dataset register
--manifest F --config C`); trainer-de (org dkfz) pulls with pyarrow.flight after `permit add`.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import boto3
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from conftest import (CLI_TIMEOUT, DATASET, PSEUDONYM_RE, PURPOSE, RELEASED_COLUMNS, Gateway, HttpResponse,
                      assert_json_error, assert_same_multiset, call_options, dataset_names, groups_by_pseudonym,
                      http, listed_datasets, norm_float, output_row, path_descriptor, poll_until, pull,
                      released_row, start_gateway, stop_process)
from test_flight_sql import adbc_connect, run_sql, scalar

REGION = "us-east-1"
LAKE_BUCKET = "passerelle-lake"
LAKE_USER = "passerelle-lake"
WRONG_SECRET = "not-the-secret-xyz"
MOTO_DEADLINE = 30.0
# S3 datasets are opened on the first request after a permit; the debug build may take longer than the 1 s
# propagation rule measured elsewhere, so this file only waits (it does not time propagation).
VISIBLE_DEADLINE = 15.0
AUDIT_DEADLINE = 15.0
# HTTP statuses a refused registration may carry when the storage (not the manifest) is at fault: the contract asks
# for a refusal with a JSON error naming the cause, never a 500.
STORAGE_REFUSAL = {400, 403, 404, 422, 502, 503}
ACCESS_DENIED_RE = re.compile(r"access denied|denied|credential|signature|forbidden|unauthori[sz]ed|"
                              r"not authori[sz]ed|permission", re.I)
# The one refusal of a dataset outside the caller's storage locations (or read through a store its location does
# not name), whatever the reason.
LOCATION_REFUSED_RE = re.compile(r"location `[^`]*` is not available for registration")
# The buckets of the tests, each a storage location of aphp's, with the store that location names.
LAKE_BUCKETS = {LAKE_BUCKET: "lake", "lake-csv": "lake", "lake-csv-dialect": "lake", "lake-hive": "lake",
                "lake-many": "lake", "lake-mixed": "lake", "lake-retry": "lake", "lake-vanish": "lake",
                "no-such-bucket-passerelle": "lake", "lake-guarded": "wrong"}
BUCKET_MISSING_RE = re.compile(r"bucket.*(not found|does not exist|no such)|no ?such ?bucket|not found|"
                               r"does not exist|cannot be read|can't be read|could not be read|cannot read|"
                               r"unreadable", re.I)


# ======================================================================================================================
# moto_server
# ======================================================================================================================

@dataclass
class Moto:
    endpoint: str
    key_id: str  # the IAM user's access key id (not secret)
    secret: str = field(repr=False)  # the IAM user's secret access key (kept out of pytest's failure reports)
    proc: subprocess.Popen
    log_path: Path

    def client(self, service: str = "s3", key_id: str | None = None, secret: str | None = None):
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret,
            config=BotoConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                              response_checksum_validation="when_required", retries={"max_attempts": 2}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2) as resp:
            return resp.status == 200
    except OSError:  # refused while starting; URLError and http.client's errors are OSErrors
        return False


def _start_moto(binary: Path, base: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start moto_server on a free port and wait until it answers. A port found free can be taken before moto binds
    it: then moto exits and another port is tried. Fails the module (never skips) if moto cannot start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    problems = []
    for attempt in range(3):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log_path = base / f"moto-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < MOTO_DEADLINE:
            if _moto_answers(endpoint):
                return proc, endpoint, log_path
            time.sleep(0.05)
        rc = proc.poll()
        stop_process(proc)
        problems.append(f"attempt {attempt} on port {port}: " + (f"exited with {rc}" if rc is not None else
                        f"no answer within {MOTO_DEADLINE} s") + "; log tail:\n"
                        + log_path.read_text(errors="replace")[-1500:])
    pytest.fail("moto_server did not start:\n" + "\n".join(problems), pytrace=False)


def _enable_iam_checks(endpoint: str) -> tuple[str, str]:
    """Make an IAM user allowed everything, with an access key; then switch moto's IAM checks on. Returns the key."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    iam.create_user(UserName=LAKE_USER)
    iam.put_user_policy(UserName=LAKE_USER, PolicyName="lake-all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=LAKE_USER)["AccessKey"]
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.read()
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Moto:
    binary = Path(sys.executable).parent / "moto_server"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"moto_server not found at {binary}: install tests/python/requirements.txt into this venv "
                    f"(it pins moto[server])", pytrace=False)
    base = tmp_path_factory.mktemp("moto")
    proc, endpoint, log_path = _start_moto(binary, base)
    try:
        key_id, secret = _enable_iam_checks(endpoint)
        m = Moto(endpoint, key_id, secret, proc, log_path)
        # The checks are on: moto's default credentials are refused, a wrong secret too, the user's key works.
        with pytest.raises(ClientError) as denied:
            m.client(key_id="testing", secret="testing").list_buckets()
        assert denied.value.response["Error"]["Code"] == "InvalidAccessKeyId", denied.value
        with pytest.raises(ClientError) as bad_sig:
            m.client(secret=WRONG_SECRET).list_buckets()
        assert bad_sig.value.response["Error"]["Code"] == "SignatureDoesNotMatch", bad_sig.value
        m.client().create_bucket(Bucket=LAKE_BUCKET)
        yield m
    finally:
        stop_process(proc)


# ======================================================================================================================
# The gateway with [stores]
# ======================================================================================================================

@dataclass
class Lake:
    gw: Gateway
    moto: Moto
    config: Path
    env: dict[str, str] = field(repr=False)  # the gateway's (and the CLI's) environment, LAKE_SECRET included

    @property
    def steward(self) -> str:
        return self.gw.keys["steward-fr"]

    @property
    def trainer(self) -> str:
        return self.gw.keys["trainer-de"]

    @property
    def secrets(self) -> list[str]:
        """Texts that must never leave the gateway: both secrets, also percent-encoded."""
        out = []
        for s in (WRONG_SECRET, self.moto.secret):
            out += [s, urllib.parse.quote(s, safe=""), urllib.parse.quote_plus(s)]
        return sorted(set(out))


def locations_toml(urls: dict[str, str | None], controllers: Iterable[str] = ("aphp",)) -> str:
    """`[locations.*]` sections, one per URL (a prefix) read through its store (None for a file location)."""
    names = ", ".join(json.dumps(c) for c in controllers)
    out = []
    for i, (url, store) in enumerate(urls.items()):
        out.append(f'[locations.loc{i}]\nurl = "{url}"\ncontrollers = [{names}]\n'
                   + (f'store = "{store}"\n' if store is not None else ""))
    return "\n".join(out)


def assert_location_refused(resp: HttpResponse, location: str) -> None:
    """The location refusal (HTTP 400): one message whatever the reason, which names no store."""
    body = assert_json_error(resp, 400)
    assert LOCATION_REFUSED_RE.search(body["error"]), f"expected the location refusal for {location}: {body}"


def store_config(m: Moto) -> str:
    """The gateway's configuration: a location per bucket of the tests, and the stores."""
    return locations_toml({f"s3://{b}/": store for b, store in LAKE_BUCKETS.items()}) + "\n" + stores_toml(m)


def stores_toml(m: Moto) -> str:
    return f"""# object stores of the S3 end-to-end tests (test_s3.py)
[stores.lake]
kind = "s3"
endpoint = "{m.endpoint}"
region = "{REGION}"
access_key_id = "{m.key_id}"
secret_access_key = "env:LAKE_SECRET"
allow_http = true

[stores.wrong]
kind = "s3"
endpoint = "{m.endpoint}"
region = "{REGION}"
access_key_id = "{m.key_id}"
secret_access_key = "{WRONG_SECRET}"
allow_http = true
"""


@pytest.fixture(scope="module")
def lake(passerelle_bin: Path, moto: Moto, tmp_path_factory) -> Lake:
    base = tmp_path_factory.mktemp("s3-gateway")
    config = base / "passerelle.toml"
    config.write_text(store_config(moto))
    # Only the store configuration may give the gateway credentials: no AWS_* variables from the test environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["LAKE_SECRET"] = moto.secret
    gw = start_gateway(passerelle_bin, base / "data", config=config, env=env)
    try:
        yield Lake(gw, moto, config, env)
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the S3 gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the S3 gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


@dataclass
class Local:
    """The local demo dataset as trainer-de (org dkfz) receives it from the S3 gateway, and the subjects whose
    released rows identify them in it."""
    table: pa.Table
    pseudonym_of: dict[str, str]  # consented subject (raw id text) -> its pseudonym for dkfz
    consented: list[str]  # identifiable consented subjects, deterministic order
    not_consented: list[str]  # identifiable subjects without consent for PURPOSE


@pytest.fixture(scope="module")
def local(lake: Lake) -> Local:
    ref = lake.gw.reference
    c = lake.gw.connect()
    try:
        table = pull(c, call_options(lake.trainer)).table
    finally:
        c.close()
    assert table.num_rows == len(ref.consented_rows(PURPOSE)), "the local demo pull is not the reference model's"
    pseudonym_by_signature = {sig: p for p, sig in groups_by_pseudonym(table).items()}
    consented = ref.consented(PURPOSE)
    unique = ref.unique_signature_subjects()
    ok = [s for s in unique if s in consented]
    pseudonym_of = {s: pseudonym_by_signature[ref.signature(s)] for s in ok}
    not_ok = [s for s in unique if s not in consented]
    assert len(ok) >= 300 and len(not_ok) >= 100, "the demo has too few identifiable subjects for these tests"
    return Local(table, pseudonym_of, ok, not_ok)


# ======================================================================================================================
# Helpers
# ======================================================================================================================

def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def put(lake: Lake, bucket: str, key: str, body: bytes) -> None:
    lake.moto.client().put_object(Bucket=bucket, Key=key, Body=body)


def new_bucket(lake: Lake, bucket: str) -> None:
    lake.moto.client().create_bucket(Bucket=bucket)


def demo_manifest(lake: Lake) -> dict[str, Any]:
    return tomllib.loads(lake.gw.reference.manifest_path.read_text())


def manifest(lake: Lake, name: str, location: str, *, store: str | None = "lake", fmt: str = "parquet",
             columns: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The demo manifest (as JSON for REST) with another name, location, store, and optionally format and columns."""
    m = demo_manifest(lake)
    m.update(name=name, location=location, format=fmt)
    if store is not None:
        m["store"] = store
    if columns is not None:
        m["columns"] = columns
    return m


def manifest_toml(lake: Lake, name: str, location: str, store: str) -> str:
    """The demo manifest's TOML with another name, location and a store (for the CLI)."""
    text = lake.gw.reference.manifest_path.read_text()
    text, n1 = re.subn(r"(?m)^name\s*=.*$", f'name = "{name}"', text, count=1)
    text, n2 = re.subn(r"(?m)^location\s*=.*$", f'location = "{location}"\nstore = "{store}"', text, count=1)
    assert n1 == n2 == 1, text
    parsed = tomllib.loads(text)
    assert (parsed["name"], parsed["location"], parsed["store"]) == (name, location, store), parsed
    return text


def register(lake: Lake, body: dict[str, Any]) -> HttpResponse:
    return http("POST", lake.gw.url("/api/v1/datasets"), key=lake.steward, body=body)


def cli_register(lake: Lake, manifest_path: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    """`passerelle --data-dir D dataset register --manifest F --config C` (C the gateway's configuration unless
    given), with the gateway's environment."""
    cmd = [str(lake.gw.bin), "--data-dir", str(lake.gw.data_dir), "dataset", "register", "--manifest",
           str(manifest_path), "--config", str(config or lake.config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL,
                          env=lake.env)


def permit_and_wait(lake: Lake, name: str, *, org: str = "dkfz", key: str | None = None) -> None:
    """`permit add` for `org`, then wait until the org's trainer lists the dataset."""
    lake.gw.cli("permit", "add", "--dataset", name, "--org", org, "--purpose", PURPOSE)
    opts = call_options(key or lake.trainer)
    c = lake.gw.connect()

    def listed() -> bool:
        try:
            return name in listed_datasets(c, opts)
        except flight.FlightUnauthenticatedError:  # a principal just added is not known yet
            return False

    try:
        poll_until(listed, deadline=VISIBLE_DEADLINE, interval=0.1, what=f"{org} lists {name}")
    finally:
        c.close()


def register_ok(lake: Lake, body: dict[str, Any]) -> None:
    resp = register(lake, body)
    assert resp.status in (200, 201), f"registering {body['name']} at {body['location']}: {resp.status} " \
                                      f"{resp.text[:1500]}\nserver log:\n{lake.gw.log_tail(30)}"
    permit_and_wait(lake, body["name"])


def pull_dataset(lake: Lake, name: str, key: str | None = None) -> pa.Table:
    c = lake.gw.connect()
    try:
        return pull(c, call_options(key or lake.trainer), path_descriptor(name)).table
    finally:
        c.close()


def refusal(resp: HttpResponse, statuses: Iterable[int]) -> str:
    """A refused registration: one of `statuses` with the contract's JSON error. Returns error and hint."""
    statuses = set(statuses)
    assert resp.status in statuses, f"expected HTTP {sorted(statuses)}, got {resp.status}: {resp.text[:1500]}"
    body = assert_json_error(resp, resp.status)
    return f"{body['error']} {body['hint']}"


def registered_names(lake: Lake) -> list[str]:
    return dataset_names(lake.gw.cli_json("dataset", "list"))


def assert_not_registered(lake: Lake, name: str, before: list[str]) -> None:
    assert registered_names(lake) == before, f"a refused registration changed `dataset list` (adding {name}?)"
    assert_json_error(http("GET", lake.gw.url(f"/api/v1/datasets/{name}"), key=lake.steward), 404)


def assert_no_secret(lake: Lake, text: str, where: str) -> None:
    for s in lake.secrets:
        assert s not in text, f"a storage secret appears in {where}"


def full_rows(table: pa.Table) -> list[tuple]:
    return [tuple(norm_float(r[c]) for c in table.schema.names) for r in table.to_pylist()]


def subject_rows(subjects: list[str], per_subject: Iterable[int]) -> list[str]:
    """Subjects repeated 1..n times, cycling through `per_subject` counts: one entry per row."""
    counts = list(per_subject)
    out = []
    for i, s in enumerate(subjects):
        out += [s] * counts[i % len(counts)]
    return out


# ======================================================================================================================
# (a) the demo Parquet in four parts under a prefix; and as a single object registered with the CLI
# ======================================================================================================================

LAKE_PATIENTS = "lake_patients"
PATIENT_PARTS = 4


@pytest.fixture(scope="module")
def lake_patients(lake: Lake) -> str:
    """The demo's own rows in 4 Parquet files under s3://passerelle-lake/patients/ (plus a `_SUCCESS` marker, as
    Spark writes, which is not Parquet and must be ignored), registered over REST as `lake_patients`."""
    raw = lake.gw.reference.raw
    step = -(-raw.num_rows // PATIENT_PARTS)
    for i in range(PATIENT_PARTS):
        put(lake, LAKE_BUCKET, f"patients/part-{i:05d}.parquet", parquet_bytes(raw.slice(i * step, step)))
    put(lake, LAKE_BUCKET, "patients/_SUCCESS", b"")
    register_ok(lake, manifest(lake, LAKE_PATIENTS, f"s3://{LAKE_BUCKET}/patients/"))
    return LAKE_PATIENTS


def assert_equals_local(table: pa.Table, local: Local, lake: Lake, what: str) -> None:
    assert table.schema.names == RELEASED_COLUMNS, f"{what}: columns {table.schema.names}"
    assert [f.type for f in table.schema] == [f.type for f in local.table.schema], \
        f"{what}: types {table.schema} differ from the local dataset's {local.table.schema}"
    assert all(PSEUDONYM_RE.match(p) for p in table.column("patient_id").to_pylist())
    # the same rows as the local dataset, pseudonyms included (same recipient org, same consent registry)
    assert_same_multiset(full_rows(table), full_rows(local.table), f"{what} vs the local demo_patients, whole rows")
    # and the reference model's released rows
    expected = lake.gw.reference.consented_rows(PURPOSE)
    assert_same_multiset((output_row(r) for r in table.to_pylist()), (released_row(r) for r in expected),
                         f"{what} vs the reference model")


def test_prefix_of_four_parquet_parts_pulls_the_reference_rows(lake: Lake, lake_patients: str, local: Local):
    table = pull_dataset(lake, lake_patients)
    assert_equals_local(table, local, lake, f"s3://{LAKE_BUCKET}/patients/")


def test_rest_show_names_the_store_and_location(lake: Lake, lake_patients: str):
    resp = http("GET", lake.gw.url(f"/api/v1/datasets/{lake_patients}"), key=lake.steward)
    assert resp.status == 200, resp.text[:500]
    assert resp.body.get("name") == lake_patients, resp.text[:500]
    assert f"s3://{LAKE_BUCKET}/patients/" in resp.text
    assert '"lake"' in resp.text, f"the dataset should name its store: {resp.text[:800]}"
    assert_no_secret(lake, resp.text, f"GET /api/v1/datasets/{lake_patients}")


def test_single_object_location_registered_with_the_cli(lake: Lake, local: Local, tmp_path: Path):
    """The demo's Parquet file itself, byte for byte, as one object; registered with the CLI and `--config`."""
    name = "lake_single"
    location = f"s3://{LAKE_BUCKET}/single/patients.parquet"
    put(lake, LAKE_BUCKET, "single/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    path = tmp_path / f"{name}.toml"
    path.write_text(manifest_toml(lake, name, location, "lake"))
    proc = cli_register(lake, path)
    assert proc.returncode == 0, f"dataset register exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert_no_secret(lake, proc.stdout + proc.stderr, "the CLI's output")
    permit_and_wait(lake, name)
    assert_equals_local(pull_dataset(lake, name), local, lake, location)


# ======================================================================================================================
# (b) SQL over Flight SQL (ADBC) on the S3 dataset
# ======================================================================================================================

def test_sql_count_on_s3_equals_the_local_count(lake: Lake, lake_patients: str):
    expected = len(lake.gw.reference.consented_rows(PURPOSE))
    with adbc_connect(lake.gw, key=lake.trainer) as conn:
        assert scalar(conn, f"SELECT count(*) FROM {lake_patients}") == expected
        assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == expected
        by_diag = f"SELECT diagnosis, count(*) AS n FROM {{}} GROUP BY diagnosis ORDER BY diagnosis"
        s3 = run_sql(conn, by_diag.format(lake_patients)).to_pylist()
        loc = run_sql(conn, by_diag.format(DATASET)).to_pylist()
        assert s3 == loc and len(s3) == 8, (s3, loc)
        # same pseudonyms on both sides: every S3 row finds its local twin
        joined = scalar(conn, f"SELECT count(*) FROM {lake_patients} s JOIN {DATASET} d "
                              f"ON s.patient_id = d.patient_id AND s.admitted_at = d.admitted_at "
                              f"AND s.diagnosis = d.diagnosis")
    assert joined >= expected, f"the join of S3 and local rows on pseudonym matched {joined} of {expected} rows"


# ======================================================================================================================
# (c) CSV on S3
# ======================================================================================================================

def check_csv_visits(lake: Any, local: Local, name: str, location: str, put_file: Callable[[str, bytes], None]) -> None:
    """Visits of consenting and non-consenting demo subjects as two CSV files under `location` (written with
    `put_file(relative path, bytes)`), registered as `name` with a direct identifier, then pulled: only consenting
    subjects' rows, the name dropped, the pseudonym the local demo gives the same subject. Shared by every store."""
    subjects = local.consented[:15] + local.not_consented[:10]
    rows = [{"patient_id": int(s), "full_name": f"Name {s}", "visit": i, "lab": round(1.5 + i % 40 / 10, 1)}
            for i, s in enumerate(subject_rows(subjects, (1, 2, 3)))]
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
        text = io.StringIO()
        text.write("patient_id,full_name,visit,lab\n")
        for r in chunk:
            text.write(f"{r['patient_id']},{r['full_name']},{r['visit']},{r['lab']}\n")
        put_file(f"visits-{part}.csv", text.getvalue().encode())
    register_ok(lake, manifest(lake, name, location, fmt="csv", columns={
        "patient_id": {"class": "identifier"},
        "full_name": {"class": "direct-identifier"},
        "visit": {"class": "non-personal"},
        "lab": {"class": "sensitive"},
    }))
    table = pull_dataset(lake, name)
    assert table.schema.names == ["patient_id", "visit", "lab"], table.schema
    ok = set(local.consented)
    expected = [(local.pseudonym_of[str(r["patient_id"])], r["visit"], r["lab"]) for r in rows
                if str(r["patient_id"]) in ok]
    assert expected and len(expected) < len(rows)
    assert_same_multiset(((r["patient_id"], r["visit"], r["lab"]) for r in table.to_pylist()), expected,
                         "CSV rows (pseudonym as for the local demo, visit, lab)")


def test_csv_on_s3(lake: Lake, local: Local):
    bucket = "lake-csv"
    new_bucket(lake, bucket)
    check_csv_visits(lake, local, "lake_visits", f"s3://{bucket}/visits/",
                     lambda path, body: put(lake, bucket, f"visits/{path}", body))


def test_csv_dialect_explicit_schema_and_glob_on_s3(lake: Lake, local: Local):
    """A registry export as national archives write them: `;`-separated, `'`-quoted, no header, postal codes with
    leading zeros. The manifest's `[csv]` table states the dialect and the schema; a glob picks the export files out
    of a prefix that also holds other CSV files of another shape."""
    bucket, name = "lake-csv-dialect", "lake_csv_dialect"
    new_bucket(lake, bucket)
    subjects = local.consented[100:110] + local.not_consented[60:66]
    rows = [(int(s), f"0{7000 + i}", f"Rue {i}; bât. B") for i, s in enumerate(subjects)]
    for part in (0, 1):
        body = "".join(f"{pid};'{postcode}';'{street}'\n" for pid, postcode, street in rows[part::2])
        put(lake, bucket, f"exports/export-{part}.csv", body.encode())
    put(lake, bucket, "exports/summary.csv", b"a;b;c;d;e\n1;2;3;4;5\n")  # not an export: the glob skips it
    csv = {"header": False, "delimiter": ";", "quote": "'",
           "schema": [{"name": "patient_id", "type": "Int64"}, {"name": "postcode", "type": "Utf8"},
                      {"name": "street", "type": "Utf8"}]}
    columns = {"patient_id": {"class": "identifier"}, "postcode": {"class": "non-personal"},
               "street": {"class": "non-personal"}}

    # A wrong option is refused with what to fix, and nothing is stored.
    before = registered_names(lake)
    bad = manifest(lake, name, f"s3://{bucket}/exports/export-*.csv", fmt="csv", columns=columns)
    bad["csv"] = {**csv, "delimiter": "€"}
    text = refusal(register(lake, bad), {400})
    assert "delimiter" in text and "ASCII" in text, text
    bad["csv"] = {**csv, "schema": [{"name": "patient_id", "type": "integer"}]}
    assert "not an Arrow type" in refusal(register(lake, bad), {400})
    assert_not_registered(lake, name, before)

    # Without the glob, the other CSV file of five columns is named.
    whole = manifest(lake, name, f"s3://{bucket}/exports/", fmt="csv", columns=columns)
    whole["csv"] = csv
    text = refusal(register(lake, whole), {400})
    assert "summary.csv" in text and "5 columns" in text, text
    assert_not_registered(lake, name, before)

    good = manifest(lake, name, f"s3://{bucket}/exports/export-*.csv", fmt="csv", columns=columns)
    good["csv"] = csv
    register_ok(lake, good)
    shown = http("GET", lake.gw.url(f"/api/v1/datasets/{name}"), key=lake.steward)
    assert shown.status == 200 and shown.body["csv"]["delimiter"] == ";", shown.text[:500]
    table = pull_dataset(lake, name)
    assert table.schema.field("postcode").type == pa.string(), table.schema
    ok = set(local.consented)
    expected = [(local.pseudonym_of[str(pid)], pc, st) for pid, pc, st in rows if str(pid) in ok]
    assert expected and len(expected) < len(rows)
    assert_same_multiset(((r["patient_id"], r["postcode"], r["street"]) for r in table.to_pylist()), expected,
                         "CSV rows with leading zeros kept and quoted delimiters inside fields")


# ======================================================================================================================
# (d) hive-style partitions
# ======================================================================================================================

HIVE_PARTS = [("FR", "2024"), ("FR", "2023"), ("DE", "2024")]


def test_hive_partitions_appear_and_must_be_classified(lake: Lake, local: Local):
    bucket, name = "lake-hive", "lake_hive"
    new_bucket(lake, bucket)
    subjects = local.consented[20:32] + local.not_consented[10:18]
    expected = []
    for j, (ms, year) in enumerate(HIVE_PARTS):
        part = subjects[j::len(HIVE_PARTS)]
        ids = [int(s) for s in part]
        hba1c = [round(5.0 + (j * 13 + k) % 50 / 10, 1) for k in range(len(part))]
        t = pa.table({"patient_id": pa.array(ids, pa.int64()), "hba1c": pa.array(hba1c, pa.float64())})
        put(lake, bucket, f"part/member_state={ms}/year={year}/x.parquet", parquet_bytes(t))
        expected += [(local.pseudonym_of[s], h, ms, year) for s, h in zip(part, hba1c) if s in local.pseudonym_of]
    location = f"s3://{bucket}/part/"
    file_columns = {"patient_id": {"class": "identifier"}, "hba1c": {"class": "sensitive"}}

    # Without classes for the partition columns: refused, naming one of them; nothing stored.
    before = registered_names(lake)
    text = refusal(register(lake, manifest(lake, name, location, columns=file_columns)), {400})
    assert re.search(r"\b(member_state|year)\b", text), \
        f"the refusal should name the unclassified partition column: {text!r}"
    assert_not_registered(lake, name, before)

    register_ok(lake, manifest(lake, name, location, columns={
        **file_columns, "member_state": {"class": "non-personal"}, "year": {"class": "non-personal"}}))
    table = pull_dataset(lake, name)
    assert set(table.schema.names) == {"patient_id", "hba1c", "member_state", "year"}, table.schema
    got = [(r["patient_id"], r["hba1c"], str(r["member_state"]), str(r["year"])) for r in table.to_pylist()]
    assert_same_multiset(got, expected, "(pseudonym, hba1c, member_state, year) from the partitions")


# ======================================================================================================================
# (e) a prefix of 120 small files
# ======================================================================================================================

def test_prefix_of_120_files_pulls_completely(lake: Lake, local: Local):
    bucket, name, files, per_file = "lake-many", "lake_many", 120, 5
    new_bucket(lake, bucket)
    pool = local.consented[40:100] + local.not_consented[20:60]
    subject_of_seq = {}
    s3 = lake.moto.client()
    for f in range(files):
        seqs = list(range(f * per_file, (f + 1) * per_file))
        subjects = [pool[(seq * 7) % len(pool)] for seq in seqs]
        subject_of_seq.update(zip(seqs, subjects))
        t = pa.table({"patient_id": pa.array([int(s) for s in subjects], pa.int64()),
                      "seq": pa.array(seqs, pa.int64())})
        s3.put_object(Bucket=bucket, Key=f"many/part-{f:03d}.parquet", Body=parquet_bytes(t))
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="many/")
    assert listed["KeyCount"] == files and not listed.get("IsTruncated"), "the upload is incomplete"
    register_ok(lake, manifest(lake, name, f"s3://{bucket}/many/", columns={
        "patient_id": {"class": "identifier"}, "seq": {"class": "non-personal"}}))
    table = pull_dataset(lake, name)
    expected = [(local.pseudonym_of[s], seq) for seq, s in subject_of_seq.items() if s in local.pseudonym_of]
    assert 0 < len(expected) < files * per_file
    assert_same_multiset(((r["patient_id"], r["seq"]) for r in table.to_pylist()), expected,
                         f"(pseudonym, seq) over {files} files")


# ======================================================================================================================
# (f) files of different schemas under one prefix
# ======================================================================================================================

# case -> (the two files, the column that differs)
MIXED = {
    "type-conflict": ([pa.table({"patient_id": pa.array([1, 2], pa.int64()), "value": pa.array([1, 2], pa.int64())}),
                       pa.table({"patient_id": pa.array([3, 4], pa.int64()), "value": pa.array(["a", "b"])})],
                      "value"),
    "extra-column": ([pa.table({"patient_id": pa.array([1, 2], pa.int64()), "value": pa.array([1, 2], pa.int64())}),
                      pa.table({"patient_id": pa.array([3, 4], pa.int64()), "value": pa.array([3, 4], pa.int64()),
                                "extra": pa.array([0.5, 1.5], pa.float64())})],
                     "extra"),
}


@pytest.mark.parametrize("case", sorted(MIXED))
def test_files_of_different_schemas_are_refused(lake: Lake, case: str):
    bucket = "lake-mixed"
    try:
        new_bucket(lake, bucket)
    except ClientError as err:  # the other case made it
        assert err.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"), err
    files, column = MIXED[case]
    prefix = f"mixed-{case}/"
    for i, t in enumerate(files):
        put(lake, bucket, f"{prefix}{'ab'[i]}.parquet", parquet_bytes(t))
    name = f"lake_mixed_{case.replace('-', '_')}"
    before = registered_names(lake)
    # every column of the files is classified (and no other), so only the difference of schemas can be the reason
    columns = {c: {"class": "identifier" if c == "patient_id" else "non-personal"}
               for c in dict.fromkeys(n for t in files for n in t.schema.names)}
    text = refusal(register(lake, manifest(lake, name, f"s3://{bucket}/{prefix}", columns=columns)), {400})
    assert re.search(rf"schema|\b{column}\b", text, re.I), \
        f"the refusal should say the files' schemas differ (or name `{column}`): {text!r}"
    assert_no_secret(lake, text, "the refusal")
    assert_not_registered(lake, name, before)


# ======================================================================================================================
# (g) wrong credentials; no secret anywhere
# ======================================================================================================================

def test_wrong_credentials_are_refused_and_no_secret_leaks(lake: Lake, lake_patients: str, tmp_path: Path):
    """A bucket of its own, declared as a location read through `wrong` (one bucket, one store: a location is read
    only through the store it names, so the wrong secret can meet S3 only here)."""
    name, bucket = "lake_wrong", "lake-guarded"
    location = f"s3://{bucket}/patients/"
    new_bucket(lake, bucket)
    put(lake, bucket, "patients/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    before = registered_names(lake)

    # Through a store its location does not name (even the right credentials): the location refusal, before S3.
    assert_location_refused(register(lake, manifest(lake, name, location, store="lake")), location)
    assert_not_registered(lake, name, before)

    # REST
    resp = register(lake, manifest(lake, name, location, store="wrong"))
    assert_no_secret(lake, resp.text, "the REST refusal")
    text = refusal(resp, STORAGE_REFUSAL)
    assert ACCESS_DENIED_RE.search(text), f"the refusal should say access was denied / check the credentials: {text!r}"
    assert_not_registered(lake, name, before)

    # CLI
    path = tmp_path / f"{name}.toml"
    path.write_text(manifest_toml(lake, name, location, "wrong"))
    proc = cli_register(lake, path)
    assert proc.returncode != 0, f"the CLI registered a dataset with wrong credentials: {proc.stdout[:500]}"
    assert_no_secret(lake, proc.stdout + proc.stderr, "the CLI's refusal")
    assert ACCESS_DENIED_RE.search(proc.stderr), f"the CLI should say access was denied: {proc.stderr[-1500:]!r}"
    assert_not_registered(lake, name, before)


    # nowhere else either: listings and shows (REST and CLI), the audit (REST and CLI), the server's log
    g = lake.gw
    for who in ("steward-fr", "trainer-de", "auditor-eu"):
        r = http("GET", g.url("/api/v1/datasets"), key=g.keys[who])
        assert r.status == 200, r.text[:500]
        assert_no_secret(lake, r.text, f"GET /api/v1/datasets as {who}")
    r = http("GET", g.url(f"/api/v1/datasets/{lake_patients}"), key=lake.steward)
    assert_no_secret(lake, r.text, f"GET /api/v1/datasets/{lake_patients}")
    r = http("GET", g.url("/api/v1/audit"), key=g.keys["auditor-eu"])
    assert r.status == 200, r.text[:500]
    assert_no_secret(lake, r.text, "GET /api/v1/audit")
    for args in (("audit", "list", "--json", "--limit", "1000000"), ("dataset", "list", "--json"),
                 ("dataset", "show", lake_patients, "--json")):
        assert_no_secret(lake, g.cli(*args), f"`{' '.join(args)}`")
    assert_no_secret(lake, g.log_path.read_text(errors="replace"), "the server's log")
    g.assert_alive()


def test_a_refusal_leaves_no_trace_the_right_store_then_reads_the_bucket(lake: Lake):
    """A registration refused for naming the wrong store must not leave the bucket bound to that store: the same
    location then registers through the right store (a steward's typo must not lock a bucket until a restart). The
    bucket's location names `lake`, so the typo meets the location refusal before any request to S3."""
    bucket = "lake-retry"
    location = f"s3://{bucket}/patients/"
    new_bucket(lake, bucket)
    put(lake, bucket, "patients/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    before = registered_names(lake)
    resp = register(lake, manifest(lake, "lake_retry", location, store="wrong"))
    assert_location_refused(resp, location)
    assert_no_secret(lake, resp.text, "the refusal")
    assert_not_registered(lake, "lake_retry", before)
    register_ok(lake, manifest(lake, "lake_retry", location))
    assert pull_dataset(lake, "lake_retry").num_rows == len(lake.gw.reference.consented_rows(PURPOSE))


def test_config_show_redacts_store_secrets(lake: Lake):
    proc = subprocess.run([str(lake.gw.bin), "--data-dir", str(lake.gw.data_dir), "config", "show", "--config",
                           str(lake.config)], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL, env=lake.env)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert_no_secret(lake, proc.stdout + proc.stderr, "`config show`")
    assert "[stores.lake]" in proc.stdout or "stores" in proc.stdout, \
        f"`config show` should print the stores (secrets redacted): {proc.stdout[-1500:]}"


# ======================================================================================================================
# (h) a missing bucket, (i) an unknown store
# ======================================================================================================================

def test_missing_bucket_is_refused(lake: Lake):
    name = "lake_nobucket"
    before = registered_names(lake)
    resp = register(lake, manifest(lake, name, "s3://no-such-bucket-passerelle/patients/"))
    text = refusal(resp, STORAGE_REFUSAL)
    assert BUCKET_MISSING_RE.search(text), f"the refusal should say the bucket was not found / cannot be read: {text!r}"
    assert_no_secret(lake, resp.text, "the refusal")
    assert_not_registered(lake, name, before)


def test_unknown_store_is_refused_by_name(lake: Lake, tmp_path: Path):
    """A steward naming a store no location names gets the location refusal (one message, naming no store). The
    operator's CLI names the unknown store: with a configuration declaring no location (it may then register
    anywhere outside the data dir) when the manifest names it, and in a configuration whose location names it."""
    name = "lake_nostore"
    location = f"s3://{LAKE_BUCKET}/patients/"
    before = registered_names(lake)
    assert_location_refused(register(lake, manifest(lake, name, location, store="nowhere-store")), location)
    assert_not_registered(lake, name, before)

    # A bucket no dataset reads yet (else the CLI would first say the bucket is read through another store).
    path = tmp_path / f"{name}.toml"
    path.write_text(manifest_toml(lake, name, "s3://lake-nostore/patients/", "nowhere-store"))
    stores_only = tmp_path / "stores-only.toml"
    stores_only.write_text(stores_toml(lake.moto))
    bad_location = tmp_path / "bad-location.toml"
    bad_location.write_text(locations_toml({"s3://lake-nostore/": "nowhere-store"}) + "\n" + stores_toml(lake.moto))
    for config in (stores_only, bad_location):
        proc = cli_register(lake, path, config)
        assert proc.returncode != 0, f"the CLI registered through an unknown store: {proc.stdout[:500]}"
        assert "nowhere-store" in proc.stderr, f"the refusal should name the unknown store: {proc.stderr[-1500:]!r}"
        assert_no_secret(lake, proc.stdout + proc.stderr, "the CLI's refusal")
        assert_not_registered(lake, name, before)


# ======================================================================================================================
# (j) files deleted while a stream reads them (last: it leaves a registered dataset without data)
# ======================================================================================================================

VANISH = "lake_vanish"
VANISH_ORG = "vanish-org"
VANISH_PRINCIPAL = "s3-vanish"


def test_files_deleted_mid_stream_give_an_error_or_the_data_never_wrong_rows(lake: Lake, local: Local):
    """40 files of 5000 rows. A full pull first (the baseline, checked against the model); then a second pull reads
    one batch, every object is deleted, and the reading goes on. The client must get either the baseline's rows or
    an error (no storage secret in it) after a part of them; never a row the baseline lacks, never one twice. An
    error sent ends the DoGet's audit entry as `failed`. An org of its own holds the only permit, so other tests'
    listings never meet the emptied dataset."""
    bucket, files, per_file = "lake-vanish", 40, 5000
    g = lake.gw
    new_bucket(lake, bucket)
    s3 = lake.moto.client()
    pool = local.consented[100:300] + local.not_consented[60:100]
    subject_of_seq = {}
    for f in range(files):
        seqs = list(range(f * per_file, (f + 1) * per_file))
        subjects = [pool[(seq * 13) % len(pool)] for seq in seqs]
        subject_of_seq.update(zip(seqs, subjects))
        t = pa.table({"patient_id": pa.array([int(s) for s in subjects], pa.int64()),
                      "seq": pa.array(seqs, pa.int64()),
                      "pad": pa.array([f"row {seq:08d} of the vanishing dataset, padding" for seq in seqs])})
        s3.put_object(Bucket=bucket, Key=f"v/part-{f:03d}.parquet", Body=parquet_bytes(t))
    resp = register(lake, manifest(lake, VANISH, f"s3://{bucket}/v/", columns={
        "patient_id": {"class": "identifier"}, "seq": {"class": "non-personal"}, "pad": {"class": "non-personal"}}))
    assert resp.status in (200, 201), resp.text[:1500]
    key = g.add_principal(VANISH_PRINCIPAL, VANISH_ORG, "NL", "trainer")
    permit_and_wait(lake, VANISH, org=VANISH_ORG, key=key)
    opts = call_options(key)

    def do_gets() -> list[dict[str, Any]]:
        return [e for e in g.cli_json("audit", "list", "--principal", VANISH_PRINCIPAL, "--dataset", VANISH,
                                      "--limit", "1000000") if e["action"] == "do_get"]

    def settled(n: int, exclude: set) -> list[dict[str, Any]] | None:
        entries = [e for e in do_gets() if e["id"] not in exclude]
        done = len(entries) >= n and all(e["status"] in ("completed", "failed") for e in entries)
        return entries if done else None

    # baseline: the complete pull, checked against the model (the org's pseudonyms differ from dkfz's; check that
    # each subject has one pseudonym of its own)
    c = g.connect()
    try:
        base = pull(c, opts, path_descriptor(VANISH))
    finally:
        c.close()
    baseline = base.table
    rows = {r["seq"]: (r["patient_id"], r["pad"]) for r in baseline.to_pylist()}
    assert len(rows) == baseline.num_rows, "a seq was sent twice"
    expected_seqs = {seq for seq, s in subject_of_seq.items() if s in local.pseudonym_of}
    assert set(rows) == expected_seqs, (f"baseline: {len(rows)} rows, expected {len(expected_seqs)}; unexpected "
                                        f"{sorted(set(rows) - expected_seqs)[:5]}")
    pseudonym_of = {}
    for seq, (p, _) in rows.items():
        assert PSEUDONYM_RE.match(p) and pseudonym_of.setdefault(subject_of_seq[seq], p) == p
    assert len(set(pseudonym_of.values())) == len(pseudonym_of)
    base_entries, _ = poll_until(lambda: settled(len(base.info.endpoints), set()), deadline=AUDIT_DEADLINE,
                                 interval=0.2, what="the baseline's DoGet audit entries settle")
    assert [e["status"] for e in base_entries] == ["completed"] * len(base.info.endpoints), base_entries
    assert sum(e["rows_sent"] for e in base_entries) == baseline.num_rows, base_entries

    # the slow reader
    c = g.connect()
    got: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    try:
        info = c.get_flight_info(path_descriptor(VANISH), opts)
        assert info.endpoints
        first = c.do_get(info.endpoints[0].ticket, opts)
        got += first.read_chunk().data.to_pylist()

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="v/")["Contents"]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        assert s3.list_objects_v2(Bucket=bucket, Prefix="v/")["KeyCount"] == 0, "the objects were not deleted"

        def drain(reader) -> None:
            try:
                while True:
                    got.extend(reader.read_chunk().data.to_pylist())
            except StopIteration:
                pass
            except Exception as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        drain(first)
        for ep in info.endpoints[1:]:
            try:
                reader = c.do_get(ep.ticket, opts)
            except Exception as exc:  # noqa: BLE001 - checked below
                errors.append(exc)
                continue
            drain(reader)
    finally:
        c.close()

    # never a wrong row: each row sent is the baseline's, none twice
    seqs = [r["seq"] for r in got]
    assert len(seqs) == len(set(seqs)), "a row was sent twice"
    wrong = [r for r in got if rows.get(r["seq"]) != (r["patient_id"], r["pad"])]
    assert not wrong, f"{len(wrong)} rows differ from the baseline, e.g. {wrong[:2]}"
    if not errors:
        assert set(seqs) == set(rows), f"no error, but {len(rows) - len(seqs)} rows are missing"
    for exc in errors:
        assert not isinstance(exc, (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)), \
            f"a storage failure should not look like the caller's fault: {type(exc).__name__}: {exc}"
        assert isinstance(exc, (pa.ArrowException, flight.FlightError)), f"{type(exc).__name__}: {exc}"
        assert_no_secret(lake, str(exc), "the mid-stream error")

    # the audit: one do_get entry per DoGet of the slow reader, `failed` for each that sent an error
    mine, _ = poll_until(lambda: settled(len(info.endpoints), {e["id"] for e in base_entries}),
                         deadline=AUDIT_DEADLINE, interval=0.2, what="the slow reader's DoGet audit entries settle")
    failed = [e for e in mine if e["status"] == "failed"]
    assert len(mine) == len(info.endpoints), mine
    assert len(failed) == len(errors), (
        f"{len(errors)} DoGets ended in an error ({[f'{type(e).__name__}: {e}' for e in errors]}) but the audit "
        f"has {len(failed)} failed entries: {mine}")
    if not errors:
        assert sum(e["rows_sent"] for e in mine) == len(got), mine
    for e in mine:
        assert e["rows_sent"] is None or e["rows_sent"] <= len(got), e
        assert_no_secret(lake, json.dumps(e), "the audit entry")
    g.assert_alive()
    # the gateway still serves the other datasets
    assert pull_dataset(lake, DATASET).num_rows == local.table.num_rows
