"""Fixtures and helpers for the end-to-end tests of the `passerelle` binary.

The tests drive the real binary (env `PASSERELLE_BIN`, default
`$CARGO_TARGET_DIR/debug/passerelle`, `CARGO_TARGET_DIR` default `~/.cache/passerelle-target`) with real clients:
pyarrow.flight for Arrow Flight and urllib for the REST API.

Two servers are started per session, each on port 0 in its own temporary data directory:
- `gateway`: the demo left as created. Tests on it may add principals and permits for orgs of their own, but never
  change consent, so the reference model computed from `demo/consent.csv` stays exact.
- `scratch_gateway`: for tests that change consent or register datasets. They measure before/after deltas and take
  their subjects from `scratch_gateway.take_subject(...)`, so they never touch the same subject twice.

The expected output is computed by a reference model written here, independently of the Rust code:
`consented_subjects()` (the consent rule) and `released_row()` (the column policy of the demo manifest).

Helpers live in this file (the brief asks for them here); test modules import them with `from conftest import ...`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

# ---------------------------------------------------------------------------------------------------------------------
# Constants of the demo (the contract)
# ---------------------------------------------------------------------------------------------------------------------

DATASET = "demo_patients"
REGISTRY = "aphp-patients"
PURPOSE = "research/ai-training"
SUB_PURPOSE = "research/ai-training/llm"
OTHER_PURPOSE = "research/epidemiology"
PURPOSE_HEADER = "x-passerelle-purpose"
SUBJECT_COLUMN = "patient_id"
RAW_COLUMNS = ["patient_id", "full_name", "birth_date", "postcode", "diagnosis", "hba1c", "admitted_at"]
RELEASED_COLUMNS = [c for c in RAW_COLUMNS if c != "full_name"]
PSEUDONYM_RE = re.compile(r"^[0-9a-f]{32}$")

# Deadlines. CLI changes must reach the server within 1 s; we poll for up to POLL_DEADLINE and assert the change was
# seen within PROPAGATION_LIMIT (1 s plus the time of one stream on a loaded 2-core machine).
POLL_DEADLINE = 3.0
PROPAGATION_LIMIT = 1.5
STARTUP_DEADLINE = 90.0
RPC_TIMEOUT = 60.0
CLI_TIMEOUT = 120.0
HTTP_TIMEOUT = 30.0

# ---------------------------------------------------------------------------------------------------------------------
# gRPC status -> pyarrow exception class (measured with pyarrow 26.0.1 against a plain gRPC server that sends no Arrow
# status detail, as a tonic server does).
# ---------------------------------------------------------------------------------------------------------------------

STATUS_EXCEPTION: dict[str, type[BaseException]] = {
    "INVALID_ARGUMENT": pa.ArrowInvalid,
    "NOT_FOUND": pa.ArrowKeyError,
    "PERMISSION_DENIED": flight.FlightUnauthorizedError,
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "INTERNAL": flight.FlightInternalError,
    "UNAVAILABLE": flight.FlightUnavailableError,
    "UNIMPLEMENTED": pa.ArrowNotImplementedError,
}
# pyarrow 26 quirk: FlightClient.get_schema converts the Flight-specific statuses with the generic Arrow converter, so
# they arrive as a plain OSError. Its text still names the status twice: "Flight returned unauthorized error, with
# message: ... Detail: Unauthorized" (measured against a plain gRPC server); either marker identifies the status.
GET_SCHEMA_OSERROR_TEXT = {
    "PERMISSION_DENIED": ("Flight returned unauthorized error", "Detail: Unauthorized"),
    "UNAUTHENTICATED": ("Flight returned unauthenticated error", "Detail: Unauthenticated"),
    "INTERNAL": ("Flight returned internal error", "Detail: Internal"),
    "UNAVAILABLE": ("Flight returned unavailable error", "Detail: Unavailable"),
}


def server_message(exc: BaseException) -> str:
    """The message the server put in the gRPC status, cut out of pyarrow's decorated exception text."""
    text = str(exc)
    m = re.search(r"with message: (.*?)(?:\. gRPC client debug context:|\. Detail:|$)", text, re.S)
    if m:
        return m.group(1).strip()
    return re.sub(r"\. Detail: \w+$", "", text).strip()


def expect_status(code: str, call: Callable[[], Any], *, rpc: str = "", fragment: str | None = None) -> str:
    """Run `call`, require that it fails with gRPC status `code` (by pyarrow's exact exception class) and, if given,
    that the server's message contains `fragment`. Returns the server's message."""
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - we check the exact class below
        caught = exc
    else:
        pytest.fail(f"expected gRPC {code}, but the call succeeded and returned {result!r:.300}")
    if rpc == "get_schema" and code in GET_SCHEMA_OSERROR_TEXT:
        ok = type(caught) is OSError and any(t in str(caught) for t in GET_SCHEMA_OSERROR_TEXT[code])
        wanted = f"OSError('{GET_SCHEMA_OSERROR_TEXT[code][0]} ...')"
    else:
        ok = type(caught) is STATUS_EXCEPTION[code]
        wanted = STATUS_EXCEPTION[code].__name__
    # FAILED_PRECONDITION and RESOURCE_EXHAUSTED also arrive as ArrowInvalid; their text tells them apart.
    if ok and code == "INVALID_ARGUMENT":
        ok = not any(t in str(caught) for t in ("precondition failed error", "resource exhausted error"))
    assert ok, f"expected gRPC {code} ({wanted}), got {type(caught).__module__}.{type(caught).__name__}: {caught}"
    msg = server_message(caught)
    if fragment is not None:
        assert fragment in msg, f"gRPC {code} message should name {fragment!r}: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# Flight helpers
# ---------------------------------------------------------------------------------------------------------------------


def call_options(key: str | None, purpose: str | None = PURPOSE, *, bearer: bool = True,
                 extra: Iterable[tuple[bytes, bytes]] = ()) -> flight.FlightCallOptions:
    """FlightCallOptions carrying `authorization: Bearer <key>` (omitted if key is None) and the purpose header
    (omitted if purpose is None). With bearer=False, `key` is used as the whole authorization value (for example the
    `Bearer ...` value returned by a handshake)."""
    headers: list[tuple[bytes, bytes]] = []
    if key is not None:
        headers.append((b"authorization", (f"Bearer {key}" if bearer else key).encode()))
    if purpose is not None:
        headers.append((PURPOSE_HEADER.encode(), purpose.encode()))
    headers.extend(extra)
    return flight.FlightCallOptions(headers=headers, timeout=RPC_TIMEOUT)


def path_descriptor(dataset: str = DATASET) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_path(dataset)


def command_descriptor(dataset: str = DATASET, *, columns: list[str] | None = None, filter: str | None = None,
                       limit: int | None = None) -> flight.FlightDescriptor:
    cmd: dict[str, Any] = {"dataset": dataset}
    if columns is not None:
        cmd["columns"] = columns
    if filter is not None:
        cmd["filter"] = filter
    if limit is not None:
        cmd["limit"] = limit
    return flight.FlightDescriptor.for_command(json.dumps(cmd).encode())


def descriptor_dataset(descriptor: flight.FlightDescriptor) -> str:
    """The dataset a listed FlightInfo's descriptor names (path descriptor, or our JSON command)."""
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        return "/".join(p.decode() if isinstance(p, bytes) else p for p in descriptor.path)
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        return json.loads(descriptor.command)["dataset"]
    raise AssertionError(f"unexpected descriptor type {descriptor.descriptor_type}")


def listed_datasets(client: flight.FlightClient, options: flight.FlightCallOptions) -> list[str]:
    return sorted(descriptor_dataset(info.descriptor) for info in client.list_flights(b"", options))


@dataclass
class Pull:
    info: flight.FlightInfo
    table: pa.Table
    seconds: float


def read_endpoints(client: flight.FlightClient, info: flight.FlightInfo,
                   options: flight.FlightCallOptions) -> pa.Table:
    tables = [client.do_get(ep.ticket, options).read_all() for ep in info.endpoints]
    if not tables:
        return info.schema.empty_table()
    return pa.concat_tables(tables)


def pull(client: flight.FlightClient, options: flight.FlightCallOptions,
         descriptor: flight.FlightDescriptor | None = None) -> Pull:
    """GetFlightInfo then DoGet on every endpoint (endpoints have no locations: same client)."""
    t0 = time.monotonic()
    info = client.get_flight_info(descriptor if descriptor is not None else path_descriptor(), options)
    table = read_endpoints(client, info, options)
    return Pull(info, table, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# Reference model (independent of the Rust code)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentEvent:
    subject_id: str
    purpose: str
    status: str
    timestamp: datetime


def parse_rfc3339(text: str) -> datetime:
    ts = datetime.fromisoformat(text.strip())
    if ts.tzinfo is None:
        raise ValueError(f"timestamp without offset (not RFC 3339): {text!r}")
    return ts


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def read_consent_csv(path: Path) -> list[ConsentEvent]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["subject_id", "purpose", "status", "timestamp"], reader.fieldnames
        events = []
        for row in reader:
            status = row["status"].strip()
            assert status in ("granted", "withdrawn"), f"unexpected consent status in {path}: {row}"
            events.append(ConsentEvent(row["subject_id"].strip(), row["purpose"].strip(), status,
                                       parse_rfc3339(row["timestamp"])))
    return events


def purpose_and_ancestors(purpose: str) -> set[str]:
    """`research/ai-training/llm` -> {research, research/ai-training, research/ai-training/llm}."""
    parts = purpose.strip("/").split("/")
    return {"/".join(parts[: i + 1]) for i in range(len(parts))}


def consented_subjects(events: Iterable[ConsentEvent], purpose: str) -> set[str]:
    """Subjects whose latest event (by timestamp) among the events for `purpose` or one of its ancestors is `granted`.
    No applicable event means no consent. On a timestamp tie, `withdrawn` wins (deny beats allow)."""
    applicable = purpose_and_ancestors(purpose)
    latest: dict[str, tuple[tuple[datetime, int], str]] = {}
    for ev in events:
        if ev.purpose.strip("/") not in applicable:
            continue
        rank = (ev.timestamp, 1 if ev.status == "withdrawn" else 0)
        if ev.subject_id not in latest or rank > latest[ev.subject_id][0]:
            latest[ev.subject_id] = (rank, ev.status)
    return {s for s, (_, status) in latest.items() if status == "granted"}


def consented_subjects_from_csv(consent_csv: Path, purpose: str) -> set[str]:
    """The helper the brief asks for: expected consented subject ids (as strings) for `purpose`."""
    return consented_subjects(read_consent_csv(consent_csv), purpose)


def subject_key(patient_id: int | None) -> str | None:
    """Raw int64 patient_id -> the subject id used in the consent registry (its decimal text)."""
    return None if patient_id is None else str(patient_id)


def norm_float(x: float | None) -> Any:
    return "NaN" if isinstance(x, float) and x != x else x


def generalise_year(d: date | None) -> date | None:
    return None if d is None else date(d.year, 1, 1)


def prefix2(s: str | None) -> str | None:
    return None if s is None else s[:2]


def released_row(raw: dict[str, Any]) -> tuple:
    """What the policy must send for one raw row, minus the pseudonym: (birth_date, postcode, diagnosis, hba1c,
    admitted_at)."""
    return (generalise_year(raw["birth_date"]), prefix2(raw["postcode"]), raw["diagnosis"],
            norm_float(raw["hba1c"]), raw["admitted_at"])


def output_row(row: dict[str, Any]) -> tuple:
    """The same tuple read from a row the gateway sent."""
    return (row["birth_date"], row["postcode"], row["diagnosis"], norm_float(row["hba1c"]), row["admitted_at"])


def group_signature(rows: Iterable[tuple]) -> tuple:
    return tuple(sorted(rows, key=repr))


class Reference:
    """The demo's raw data and consent, read from the data directory, with the expected results derived from them."""

    def __init__(self, data_dir: Path):
        self.parquet_path = data_dir / "demo" / "patients" / "patients.parquet"
        self.consent_path = data_dir / "demo" / "consent.csv"
        self.manifest_path = data_dir / "demo" / "demo_patients.toml"
        self.raw: pa.Table = pq.read_table(self.parquet_path)
        self.rows: list[dict[str, Any]] = self.raw.to_pylist()
        self.events = read_consent_csv(self.consent_path)
        self.by_subject: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            key = subject_key(r[SUBJECT_COLUMN])
            if key is not None:
                self.by_subject.setdefault(key, []).append(r)

    def consented(self, purpose: str = PURPOSE) -> set[str]:
        return consented_subjects(self.events, purpose)

    def consented_rows(self, purpose: str = PURPOSE) -> list[dict[str, Any]]:
        ok = self.consented(purpose)
        return [r for r in self.rows if subject_key(r[SUBJECT_COLUMN]) in ok]

    def signature(self, subject: str) -> tuple:
        return group_signature(released_row(r) for r in self.by_subject[subject])

    def unique_signature_subjects(self) -> list[str]:
        """Subjects whose released rows identify them among all subjects (so their pseudonym can be found in a
        stream), most rows first, then by id: a deterministic order."""
        counts = Counter(self.signature(s) for s in self.by_subject)
        subjects = [s for s in self.by_subject if counts[self.signature(s)] == 1]
        return sorted(subjects, key=lambda s: (-len(self.by_subject[s]), s))

    def latest_event_time(self) -> datetime:
        return max(ev.timestamp for ev in self.events)


def groups_by_pseudonym(table: pa.Table) -> dict[str, tuple]:
    """pseudonym -> sorted tuple of the released rows sent under it."""
    groups: dict[str, list[tuple]] = {}
    for row in table.to_pylist():
        groups.setdefault(row[SUBJECT_COLUMN], []).append(output_row(row))
    return {p: group_signature(rows) for p, rows in groups.items()}


def assert_same_multiset(actual: Iterable[Any], expected: Iterable[Any], what: str) -> None:
    """Multiset equality with a short, readable failure message (pytest's own diff of 10k-element Counters is not)."""
    a, e = Counter(actual), Counter(expected)
    if a == e:
        return
    extra, missing = a - e, e - a
    raise AssertionError(
        f"{what}: {sum(a.values())} sent vs {sum(e.values())} expected; "
        f"{sum(extra.values())} unexpected, e.g. {list(extra)[:3]}; {sum(missing.values())} missing, "
        f"e.g. {list(missing)[:3]}")


def is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def poll_until(predicate: Callable[[], Any], *, deadline: float = POLL_DEADLINE, interval: float = 0.05,
               what: str = "condition") -> tuple[Any, float]:
    """Call `predicate` until it returns a truthy value or `deadline` seconds pass. Returns (value, seconds)."""
    t0 = time.monotonic()
    while True:
        value = predicate()
        elapsed = time.monotonic() - t0
        if value:
            return value, elapsed
        if elapsed >= deadline:
            raise AssertionError(f"{what} not reached within {deadline} s")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------------------------
# REST helper (stdlib only)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON when the body is JSON, else the text
    text: str


def http(method: str, url: str, *, key: str | None = None, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> HttpResponse:
    """One request; `body` is sent as JSON, `raw` as given (with a JSON content type). `context` is the TLS context of
    an https:// URL (trust anchors, client certificate)."""
    data = None
    hdrs = {"accept": "application/json"}
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    if body is not None or raw is not None:
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs["content-type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT, context=context) as resp:
            status, raw, rh = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, rh = err.code, err.read(), err.headers
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text) if text else None
    except json.JSONDecodeError:
        parsed = text
    return HttpResponse(status, {k.lower(): v for k, v in rh.items()}, parsed, text)


def assert_json_error(resp: HttpResponse, status: int) -> dict[str, Any]:
    """The contract's error shape: HTTP `status` with a JSON body {"error": "...", "hint": "..."}."""
    assert resp.status == status, f"expected HTTP {status}, got {resp.status}: {resp.text[:500]}"
    assert isinstance(resp.body, dict), f"error body is not a JSON object: {resp.text[:500]}"
    assert isinstance(resp.body.get("error"), str) and resp.body["error"], resp.body
    assert isinstance(resp.body.get("hint"), str) and resp.body["hint"], resp.body
    return resp.body


def dataset_names(body: Any) -> list[str]:
    """Names from a dataset listing: a JSON array of objects with `name` (or of names), possibly wrapped in
    {"datasets": [...]}."""
    if isinstance(body, dict) and "datasets" in body:
        body = body["datasets"]
    assert isinstance(body, list), f"dataset listing is not a JSON array: {body!r:.500}"
    return sorted(item["name"] if isinstance(item, dict) else item for item in body)


# ---------------------------------------------------------------------------------------------------------------------
# The binary and the server
# ---------------------------------------------------------------------------------------------------------------------


def default_binary() -> Path:
    if os.environ.get("PASSERELLE_BIN"):
        return Path(os.environ["PASSERELLE_BIN"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path.home() / ".cache" / "passerelle-target")
    return Path(target) / "debug" / "passerelle"


class CliError(AssertionError):
    pass


@dataclass
class Gateway:
    bin: Path
    data_dir: Path
    flight_addr: str
    http_addr: str
    keys: dict[str, str]
    demo_principals: dict[str, dict[str, Any]]
    proc: subprocess.Popen
    log_path: Path
    _taken: set[str] = field(default_factory=set)
    _reference: Reference | None = None

    @property
    def flight_uri(self) -> str:
        return f"grpc://{self.flight_addr}"

    @property
    def http_base(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = Reference(self.data_dir)
        return self._reference

    def url(self, path: str) -> str:
        return self.http_base + path

    def connect(self) -> flight.FlightClient:
        return flight.connect(self.flight_uri)

    def cli(self, *args: str, check: bool = True) -> str:
        """Run `passerelle --data-dir D <args>` and return its stdout; raise with stderr on failure."""
        return run_cli(self.bin, self.data_dir, *args, check=check).stdout

    def cli_json(self, *args: str) -> Any:
        out = self.cli(*args, "--json")
        try:
            return json.loads(out)
        except json.JSONDecodeError as err:
            raise CliError(f"`{' '.join(args)} --json` printed no JSON ({err}): {out[:500]!r}") from None

    def add_principal(self, name: str, org: str, member_state: str, role: str) -> str:
        """Create a principal with the CLI and return its API key."""
        out = self.cli_json("principal", "add", "--name", name, "--org", org, "--member-state", member_state,
                            "--role", role)
        assert out.get("name") == name, out
        assert isinstance(out.get("key"), str) and out["key"], out
        self.keys[name] = out["key"]
        return out["key"]

    def take_subject(self, consented: bool, purposes: tuple[str, ...] = (PURPOSE,)) -> str:
        """A subject with rows, identifiable in a stream by its rows, (not) consented for each of `purposes` per the
        demo's consent.csv, and not handed out before by this gateway. Used by tests that change consent."""
        ref = self.reference
        sets = [ref.consented(p) for p in purposes]
        for s in ref.unique_signature_subjects():
            if s not in self._taken and all((s in c) == consented for c in sets):
                self._taken.add(s)
                return s
        raise AssertionError(f"demo data has no more subjects {'' if consented else 'not '}consented for {purposes}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def assert_alive(self) -> None:
        rc = self.proc.poll()
        assert rc is None, f"passerelle serve exited with {rc}; log tail:\n{self.log_tail()}"


def run_cli(binary: Path, data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(binary), "--data-dir", str(data_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise CliError(f"`{' '.join(cmd)}` exited with {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
                       f"stderr: {proc.stderr[-4000:]}")
    return proc


def _read_json_file(path: Path) -> Any:
    """The parsed file, or None while it is absent or still being written."""
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def start_gateway(binary: Path, data_dir: Path, demo_rows: int = 20000, *, config: Path | None = None,
                  env: dict[str, str] | None = None, flight_addr: str = "127.0.0.1:0",
                  http_addr: str = "127.0.0.1:0") -> Gateway:
    """`passerelle serve --demo` on port 0 (or on the given addresses), optionally with `--config FILE` and a whole
    environment of its own (default: this process's)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-serve.log"
    log = open(log_path, "wb")
    cmd = [str(binary), "serve", *(["--config", str(config)] if config is not None else []), "--data-dir",
           str(data_dir), "--flight-addr", flight_addr, "--http-addr", http_addr, "--demo", "--demo-rows",
           str(demo_rows)]
    env = dict(os.environ if env is None else env)
    env.setdefault("RUST_BACKTRACE", "1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])

    t0 = time.monotonic()
    serve = keys = None
    while True:
        serve = serve or _read_json_file(data_dir / "serve.json")
        keys = keys or _read_json_file(data_dir / "demo-keys.json")
        if serve and keys and serve.get("flight_addr") and serve.get("http_addr"):
            break
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc} before writing serve.json; log:\n{tail()}")
        if time.monotonic() - t0 > STARTUP_DEADLINE:
            stop_process(proc)
            raise RuntimeError(f"no serve.json/demo-keys.json in {data_dir} after {STARTUP_DEADLINE} s; log:\n{tail()}")
        time.sleep(0.05)
    return Gateway(bin=binary, data_dir=data_dir, flight_addr=serve["flight_addr"], http_addr=serve["http_addr"],
                   keys={name: p["key"] for name, p in keys.items()}, demo_principals=keys, proc=proc,
                   log_path=log_path)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait, then SIGKILL if it did not exit. Returns the exit code seen after SIGTERM (None if killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
        return None


# Organisations whose stewards the shared servers' tests let register files of their own temporary directories.
TEST_CONTROLLERS = ("aphp", "evil")


def declared_locations_config(base: Path, root: Path, controllers: Iterable[str] = TEST_CONTROLLERS) -> Path:
    """A configuration declaring one storage location, `root` (a directory the tests write datasets under), for
    `controllers`: REST registration by stewards needs a declared location naming the dataset's controller."""
    cfg = base / "locations.toml"
    names = ", ".join(json.dumps(c) for c in controllers)
    cfg.write_text(f'[locations.tests]\nurl = "file://{root.resolve()}/"\ncontrollers = [{names}]\n')
    return cfg


def _gateway_fixture(binary: Path, tmp_path_factory: pytest.TempPathFactory, name: str):
    base = tmp_path_factory.mktemp(name)
    gw = start_gateway(binary, base / "data", config=declared_locations_config(base, tmp_path_factory.getbasetemp()))
    try:
        yield gw
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        if died is not None:
            raise AssertionError(f"passerelle serve ({name}) died during the tests with exit code {died}; "
                                 f"log tail:\n{gw.log_tail()}")
        if rc is None:
            raise AssertionError(f"passerelle serve ({name}) ignored SIGTERM for 15 s and was killed; "
                                 f"log tail:\n{gw.log_tail()}")


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def passerelle_bin() -> Path:
    binary = default_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"passerelle binary not found at {binary}: build it with "
                    f"`cargo build -p passerelle --bin passerelle` or set PASSERELLE_BIN", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def gateway(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo server whose consent is never changed by tests."""
    yield from _gateway_fixture(passerelle_bin, tmp_path_factory, "gateway")


@pytest.fixture(scope="session")
def scratch_gateway(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second demo server for tests that change consent or register datasets."""
    yield from _gateway_fixture(passerelle_bin, tmp_path_factory, "scratch")


@pytest.fixture(scope="session")
def reference(gateway: Gateway) -> Reference:
    return gateway.reference


@pytest.fixture
def client(gateway: Gateway):
    c = gateway.connect()
    yield c
    c.close()


@pytest.fixture(scope="session")
def keys(gateway: Gateway) -> dict[str, str]:
    return gateway.keys


@pytest.fixture(scope="session")
def second_org(gateway: Gateway) -> dict[str, str]:
    """Extra trainers on the demo server, made with the CLI:
    - `embl`: trainer-embl of org embl, permitted for demo_patients / research/ai-training (`permit add`);
    - `dkfz2`: trainer-dkfz-2, a second trainer of dkfz;
    - `noperm`: trainer-noperm of org noperm-org, which has no permit: demo_patients is invisible to it.
    Waits until the server knows them (CLI changes take effect within 1 s)."""
    gateway.add_principal("trainer-embl", "embl", "DE", "trainer")
    gateway.cli("permit", "add", "--dataset", DATASET, "--org", "embl", "--purpose", PURPOSE)
    gateway.add_principal("trainer-dkfz-2", "dkfz", "DE", "trainer")
    gateway.add_principal("trainer-noperm", "noperm-org", "IT", "trainer")
    c = gateway.connect()
    try:
        for name, expected in (("trainer-embl", [DATASET]), ("trainer-dkfz-2", [DATASET]), ("trainer-noperm", [])):
            def seen(name=name, expected=expected):
                try:
                    return listed_datasets(c, call_options(gateway.keys[name])) == expected
                except flight.FlightUnauthenticatedError:
                    return False
            _, seconds = poll_until(seen, what=f"{name} is known and lists {expected}")
            assert seconds <= PROPAGATION_LIMIT, f"principal/permit took {seconds:.2f} s to reach the server"
    finally:
        c.close()
    return {"embl": gateway.keys["trainer-embl"], "dkfz2": gateway.keys["trainer-dkfz-2"],
            "noperm": gateway.keys["trainer-noperm"]}


def utc_now_after(ref: Reference) -> datetime:
    """A timestamp later than every event of the demo's consent.csv (normally just `now`)."""
    now = datetime.now(timezone.utc)
    latest = ref.latest_event_time()
    return now if now > latest else latest + timedelta(seconds=1)
