"""Datasets on Azure Blob Storage, end to end, against Azurite (npm `azurite`, its `azurite-blob` server) with Shared
Key signatures checked, and the gateway reading them through `[stores.<name>]` sections of kind `azure`.

Azurite is started with an account of its own (`AZURITE_ACCOUNTS=passerelle:<random key>`), which also disables the
well-known `devstoreaccount1` account and key: every request must be signed with this run's key, and a wrong key gets
`403 AuthorizationFailure`. The files are uploaded with a small Shared Key client written here (stdlib only). The
gateway's configuration:

    [stores.lake]    kind = "azure", endpoint = http://127.0.0.1:PORT/passerelle (Azurite's path-style account URL),
                     access_key_id = "passerelle" (the account), secret_access_key = "env:BLOB_KEY"
    [stores.wrong]   the same with another well-formed (base64, 64 bytes) literal key
    [stores.garbled] the same with a literal key that is not base64
    [locations.*]    for controller aphp: az://lake/, az://visits/ and az://no-such-container/ through `lake`,
                     az://guarded/ through `wrong`, az://garbled/ through `garbled` (one container, one store)

Manifests are the demo's with another name, an `az://container/path` (or `abfs://`) location and `store = "lake"`,
so the helpers and the reference model of test_s3.py apply: `lake` here is a `BlobLake`, which has what those helpers
use (`gw`, `steward`, `trainer`, `secrets`, `config`, `env`), and test_s3's `local` fixture (the local demo pull) is
reused as it is.

Azurite is found at `$AZURITE_BIN`, else `$HOME/.cache/passerelle-azurite/node_modules/.bin/azurite-blob`
(`npm install --prefix $HOME/.cache/passerelle-azurite azurite@3.35.0`, the last release that runs on Node 20). If it
is missing the module fails; it never skips.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import pytest

from conftest import PURPOSE, Gateway, http, start_gateway, stop_process
from test_http_store import TRACE_RE
from test_s3 import (ACCESS_DENIED_RE, BUCKET_MISSING_RE, STORAGE_REFUSAL, Local, _free_port, assert_equals_local,
                     assert_location_refused, assert_not_registered, check_csv_visits, cli_register, locations_toml,
                     manifest, manifest_toml, parquet_bytes, permit_and_wait, pull_dataset, refusal, register,
                     register_ok, registered_names)
from test_s3 import local  # noqa: F401 - test_s3's fixture (the local demo pull), here over this module's `lake`

ACCOUNT = "passerelle"
CONTAINER = "lake"
# A well-formed account key (base64 of 64 bytes) that is not the account's.
WRONG_KEY = base64.b64encode(hashlib.sha512(b"passerelle: not the account key").digest()).decode()
GARBLED_KEY = "not base64 at all: %%% !"
AZURITE_DEADLINE = 30.0


def azurite_binary() -> Path:
    if os.environ.get("AZURITE_BIN"):
        return Path(os.environ["AZURITE_BIN"])
    return Path.home() / ".cache" / "passerelle-azurite" / "node_modules" / ".bin" / "azurite-blob"


# ======================================================================================================================
# Azurite and a Shared Key client
# ======================================================================================================================

@dataclass
class Azurite:
    endpoint: str  # http://127.0.0.1:PORT
    account: str
    key: str = field(repr=False)  # the account key (kept out of pytest's failure reports)
    proc: subprocess.Popen
    log_path: Path

    @property
    def account_url(self) -> str:
        """Azurite's path-style account URL: the `endpoint` of the gateway's store."""
        return f"{self.endpoint}/{self.account}"

    def request(self, method: str, path: str, query: dict[str, str] | None = None, body: bytes = b"",
                headers: dict[str, str] | None = None, key: str | None = None) -> tuple[int, bytes]:
        """One request to `<account_url>/<path>` signed with Shared Key (the account key, or `key`)."""
        query = query or {}
        url = f"{self.account_url}/{path}".rstrip("/") + ("?" + urllib.parse.urlencode(query) if query else "")
        h = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06", **(headers or {})}
        if method in ("PUT", "POST"):
            h["Content-Length"] = str(len(body))
            h.setdefault("Content-Type", "application/octet-stream")
        # https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key (version 2015-02-21+)
        std = [method, "", "", str(len(body)) if body else "", "", h.get("Content-Type", ""), "", "", "", "", "", ""]
        canon_headers = "".join(f"{k.lower()}:{v.strip()}\n" for k, v in sorted(h.items(), key=lambda kv: kv[0].lower())
                                if k.lower().startswith("x-ms-"))
        resource = f"/{self.account}{urllib.parse.urlsplit(url).path}"
        resource += "".join(f"\n{k.lower()}:{query[k]}" for k in sorted(query, key=str.lower))
        to_sign = "\n".join(std) + "\n" + canon_headers + resource
        sig = hmac.new(base64.b64decode(key or self.key), to_sign.encode(), hashlib.sha256).digest()
        h["Authorization"] = f"SharedKey {self.account}:{base64.b64encode(sig).decode()}"
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def create_container(self, name: str) -> None:
        status, body = self.request("PUT", name, {"restype": "container"})
        assert status == 201, f"create container {name}: {status} {body[:500]!r}"

    def put(self, container: str, blob: str, body: bytes) -> None:
        status, text = self.request("PUT", f"{container}/{blob}", body=body, headers={"x-ms-blob-type": "BlockBlob"})
        assert status == 201, f"put {container}/{blob}: {status} {text[:500]!r}"


def _azurite_answers(endpoint: str) -> bool:
    """Any HTTP answer (an unsigned request gets 403 or 400) means Azurite listens."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _start_azurite(binary: Path, base: Path, key: str) -> tuple[subprocess.Popen, str, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZURITE_"))}
    env["AZURITE_ACCOUNTS"] = f"{ACCOUNT}:{key}"
    problems = []
    for attempt in range(3):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log_path = base / f"azurite-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                 "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=base)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < AZURITE_DEADLINE:
            if _azurite_answers(endpoint):
                return proc, endpoint, log_path
            time.sleep(0.1)
        rc = proc.poll()
        stop_process(proc)
        problems.append(f"attempt {attempt} on port {port}: " + (f"exited with {rc}" if rc is not None else
                        f"no answer within {AZURITE_DEADLINE} s") + "; log tail:\n"
                        + log_path.read_text(errors="replace")[-1500:])
    pytest.fail("azurite-blob did not start:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory) -> Azurite:
    binary = azurite_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"azurite-blob not found at {binary}: `npm install --prefix $HOME/.cache/passerelle-azurite "
                    f"azurite@3.35.0` (as .ci/run does) or set AZURITE_BIN", pytrace=False)
    base = tmp_path_factory.mktemp("azurite")
    key = base64.b64encode(os.urandom(64)).decode()
    proc, endpoint, log_path = _start_azurite(binary, base, key)
    try:
        az = Azurite(endpoint, ACCOUNT, key, proc, log_path)
        az.create_container(CONTAINER)
        # Signatures are checked: a wrong key, and the emulator's well-known account, are refused.
        status, body = az.request("GET", CONTAINER, {"restype": "container", "comp": "list"}, key=WRONG_KEY)
        assert status == 403 and b"AuthorizationFailure" in body, (status, body[:300])
        status, _ = az.request("GET", CONTAINER, {"restype": "container", "comp": "list"})
        assert status == 200, status
        yield az
    finally:
        stop_process(proc)


# ======================================================================================================================
# The gateway with [stores] of kind azure
# ======================================================================================================================

@dataclass
class BlobLake:
    """What test_s3's helpers use of their `Lake`, for a gateway whose stores are on Azurite."""
    gw: Gateway
    azurite: Azurite
    config: Path
    env: dict[str, str] = field(repr=False)  # the gateway's (and the CLI's) environment, BLOB_KEY included

    @property
    def steward(self) -> str:
        return self.gw.keys["steward-fr"]

    @property
    def trainer(self) -> str:
        return self.gw.keys["trainer-de"]

    @property
    def secrets(self) -> list[str]:
        """Texts that must never leave the gateway: the account key and the configured wrong ones, also
        percent-encoded (base64 has `+`, `/` and `=`)."""
        out = []
        for s in (self.azurite.key, WRONG_KEY, GARBLED_KEY):
            out += [s, urllib.parse.quote(s, safe=""), urllib.parse.quote_plus(s)]
        return sorted(set(out))


# The containers of the tests, each a storage location of aphp's, with the store that location names.
CONTAINERS = {CONTAINER: "lake", "visits": "lake", "no-such-container": "lake", "guarded": "wrong",
              "garbled": "garbled"}


def store_config(az: Azurite) -> str:
    common = f'kind = "azure"\nendpoint = "{az.account_url}"\naccess_key_id = "{ACCOUNT}"\nallow_http = true\n' \
             f'timeout_secs = 10\n'
    return (locations_toml({f"az://{c}/": store for c, store in CONTAINERS.items()}) + "\n"
            f"# object stores of the Azure end-to-end tests (test_azure.py)\n"
            f"[stores.lake]\n{common}secret_access_key = \"env:BLOB_KEY\"\n\n"
            f"[stores.wrong]\n{common}secret_access_key = \"{WRONG_KEY}\"\n\n"
            f"[stores.garbled]\n{common}secret_access_key = \"{GARBLED_KEY}\"\n")


@pytest.fixture(scope="module")
def lake(passerelle_bin: Path, azurite: Azurite, tmp_path_factory) -> BlobLake:
    base = tmp_path_factory.mktemp("azure-gateway")
    config = base / "passerelle.toml"
    config.write_text(store_config(azurite))
    # Only the store configuration may give the gateway credentials.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZURITE_", "AWS_"))}
    env["BLOB_KEY"] = azurite.key
    gw = start_gateway(passerelle_bin, base / "data", config=config, env=env)
    try:
        yield BlobLake(gw, azurite, config, env)
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the Azure gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the Azure gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


def assert_no_secret(lake: BlobLake, text: str, where: str) -> None:
    for s in lake.secrets:
        assert s not in text, f"a storage secret appears in {where}"


def assert_clean(lake: BlobLake, text: str, where: str) -> None:
    """No secret, no trace, no raw XML document from the store."""
    assert_no_secret(lake, text, where)
    assert not TRACE_RE.search(text), f"{where} carries a trace or a raw store document: {text[:800]!r}"


# ======================================================================================================================
# Reads
# ======================================================================================================================

def test_prefix_of_four_parquet_parts_pulls_the_reference_rows(lake: BlobLake, local: Local):
    """The demo's rows in 4 Parquet blobs under az://lake/patients/ (plus an empty `_SUCCESS` marker, which must be
    ignored), registered over REST: trainer-de gets the local demo_patients' rows, pseudonyms included."""
    raw = lake.gw.reference.raw
    step = -(-raw.num_rows // 4)
    for i in range(4):
        lake.azurite.put(CONTAINER, f"patients/part-{i:05d}.parquet", parquet_bytes(raw.slice(i * step, step)))
    lake.azurite.put(CONTAINER, "patients/_SUCCESS", b"")
    location = f"az://{CONTAINER}/patients/"
    register_ok(lake, manifest(lake, "blob_patients", location))
    assert_equals_local(pull_dataset(lake, "blob_patients"), local, lake, location)
    shown = http("GET", lake.gw.url("/api/v1/datasets/blob_patients"), key=lake.steward)
    assert shown.status == 200 and location in shown.text and '"lake"' in shown.text, shown.text[:800]
    assert_no_secret(lake, shown.text, "GET /api/v1/datasets/blob_patients")


def test_single_blob_abfs_location_registered_with_the_cli(lake: BlobLake, local: Local, tmp_path: Path):
    """The demo's Parquet file, byte for byte, as one blob named by an `abfs://container/path` location; registered
    with the CLI and `--config`."""
    name, location = "blob_single", f"abfs://{CONTAINER}/single/patients.parquet"
    lake.azurite.put(CONTAINER, "single/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    path = tmp_path / f"{name}.toml"
    path.write_text(manifest_toml(lake, name, location, "lake"))
    proc = cli_register(lake, path)
    assert proc.returncode == 0, f"dataset register exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert_no_secret(lake, proc.stdout + proc.stderr, "the CLI's output")
    permit_and_wait(lake, name)
    assert_equals_local(pull_dataset(lake, name), local, lake, location)


def test_csv_on_azure(lake: BlobLake, local: Local):
    container = "visits"
    lake.azurite.create_container(container)
    check_csv_visits(lake, local, "blob_visits", f"az://{container}/2024/",
                     lambda path, data: lake.azurite.put(container, f"2024/{path}", data))


# ======================================================================================================================
# Refusals
# ======================================================================================================================

def test_wrong_account_key_is_refused_cleanly_then_the_right_store_reads(lake: BlobLake, tmp_path: Path):
    """A container of its own, declared as a location read through `wrong` (one container, one store). Azurite
    answers the wrong key's signature with 403: the registration is refused (REST and CLI) saying access was denied,
    with no secret, trace or XML anywhere; nothing is registered. The right store may not read that location (a
    location is read only through the store it names): the location refusal. And a refusal leaves no trace: the
    wrong store named for a location of `lake` is refused before any request, then the right store registers it."""
    container, name = "guarded", "blob_guarded"
    location = f"az://{container}/patients/"
    lake.azurite.create_container(container)
    lake.azurite.put(container, "patients/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    before = registered_names(lake)

    resp = register(lake, manifest(lake, name, location, store="wrong"))
    assert_clean(lake, resp.text, "the REST refusal")
    text = refusal(resp, STORAGE_REFUSAL)
    assert ACCESS_DENIED_RE.search(text), f"the refusal should say access was denied / check the credentials: {text!r}"
    assert_not_registered(lake, name, before)

    toml = tmp_path / f"{name}.toml"
    toml.write_text(manifest_toml(lake, name, location, "wrong"))
    proc = cli_register(lake, toml)
    assert proc.returncode != 0, f"the CLI registered a dataset with a wrong key: {proc.stdout[:500]}"
    assert_no_secret(lake, proc.stdout + proc.stderr, "the CLI's refusal")
    assert ACCESS_DENIED_RE.search(proc.stderr), f"the CLI should say access was denied: {proc.stderr[-1500:]!r}"
    assert_not_registered(lake, name, before)

    for who in ("steward-fr", "auditor-eu"):
        r = http("GET", lake.gw.url("/api/v1/audit" if who == "auditor-eu" else "/api/v1/datasets"),
                 key=lake.gw.keys[who])
        assert r.status == 200, r.text[:500]
        assert_no_secret(lake, r.text, f"a listing as {who}")
    assert_no_secret(lake, lake.gw.log_path.read_text(errors="replace"), "the server's log")

    assert_location_refused(register(lake, manifest(lake, name, location)), location)
    assert_not_registered(lake, name, before)

    retry = f"az://{CONTAINER}/guarded/"
    lake.azurite.put(CONTAINER, "guarded/patients.parquet", lake.gw.reference.parquet_path.read_bytes())
    resp = register(lake, manifest(lake, name, retry, store="wrong"))
    assert_clean(lake, resp.text, "the location refusal")
    assert_location_refused(resp, retry)
    assert_not_registered(lake, name, before)
    register_ok(lake, manifest(lake, name, retry))
    assert pull_dataset(lake, name).num_rows == len(lake.gw.reference.consented_rows(PURPOSE))
    lake.gw.assert_alive()


def test_key_that_is_not_base64_is_refused_naming_the_store(lake: BlobLake):
    """A container whose location names `garbled`; through that store on `lake`'s container, the location refusal."""
    name = "blob_garbled"
    before = registered_names(lake)
    elsewhere = f"az://{CONTAINER}/patients/"
    assert_location_refused(register(lake, manifest(lake, name, elsewhere, store="garbled")), elsewhere)
    assert_not_registered(lake, name, before)
    resp = register(lake, manifest(lake, name, "az://garbled/patients/", store="garbled"))
    assert_clean(lake, resp.text, "the refusal")
    text = refusal(resp, {400, *STORAGE_REFUSAL})
    assert "garbled" in text, f"the refusal should name the store: {text!r}"
    assert_not_registered(lake, name, before)


def test_missing_container_is_refused(lake: BlobLake):
    name = "blob_nocontainer"
    before = registered_names(lake)
    resp = register(lake, manifest(lake, name, "az://no-such-container/patients/"))
    assert_clean(lake, resp.text, "the refusal")
    text = refusal(resp, STORAGE_REFUSAL)
    assert BUCKET_MISSING_RE.search(text), f"the refusal should say the container was not found: {text!r}"
    assert_not_registered(lake, name, before)
    lake.gw.assert_alive()
