"""Flight SQL on the Flight port, with real clients: the ADBC Flight SQL driver (`adbc_driver_flightsql.dbapi`, a Go
driver inside; see /work/shared/CLIENTS.md) and pyarrow.flight with hand-encoded Flight SQL commands.

The contract under test:
- catalog `passerelle`, schema `public`, one table (type `TABLE`) per dataset the caller may use for the declared
  purpose, with the post-policy schema (what plain Flight GetSchema returns);
- DataFusion's SQL dialect, positional parameters `$1`;
- every query reads through the gate: consented rows only, released columns, pseudonyms of the caller's organisation
  (equal across datasets, so joins on `patient_id` work);
- a hidden or nonexistent table -> NOT_FOUND "dataset `x` not found" (the same text); a hidden column ->
  INVALID_ARGUMENT; non-query statements -> PERMISSION_DENIED "only SELECT queries ..."; EXPLAIN ANALYZE ->
  PERMISSION_DENIED; no table functions;
- `[sql]` limits (`max_rows`, `memory_limit_mb`, `timeout_secs`) -> RESOURCE_EXHAUSTED naming the setting;
- audit entries with action `sql_query` and `do_get`, the SQL text in `statement`, the datasets touched in `dataset`.

Tests on `gateway` only read (they may add principals and permits for orgs of their own); the join test registers a
second dataset on `scratch_gateway`; the limit tests start a third server with a `--config` file.

ADBC maps gRPC statuses to DB-API exceptions (PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED ->
ProgrammingError; RESOURCE_EXHAUSTED, INTERNAL -> InternalError; UNIMPLEMENTED -> NotSupportedError) and formats the
message as `<ADBC status>: [FlightSQL] <server message> (<gRPC code>; <call>)`; `sql_error()` cuts the gRPC code and
the server's message out of that text, so tests can assert the exact status.

The helpers in the first part of this file are also used by test_sql_side_channels.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import adbc_driver_flightsql.dbapi as dbapi
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import (DATASET, OTHER_PURPOSE, PSEUDONYM_RE, PURPOSE, PURPOSE_HEADER, REGISTRY, RELEASED_COLUMNS,
                      STARTUP_DEADLINE, Gateway, Reference, _read_json_file, assert_same_multiset, call_options,
                      expect_status, groups_by_pseudonym, is_string_type, output_row, path_descriptor,
                      poll_until, pull, released_row, stop_process)

# ======================================================================================================================
# Helpers (shared with test_sql_side_channels.py)
# ======================================================================================================================

CATALOG = "passerelle"
DB_SCHEMA = "public"
PURPOSE_KWARG = "adbc.flight.sql.rpc.call_header." + PURPOSE_HEADER
AUTH_KWARG = "adbc.flight.sql.authorization_header"
# Generous per-RPC deadlines, so a hung server fails a test instead of hanging the run.
ADBC_TIMEOUTS = {f"adbc.flight.sql.rpc.timeout_seconds.{k}": "120" for k in ("fetch", "query", "update")}
UNKNOWN_TABLE = "no_such_dataset"

# grpc-go's names of the status codes (as the ADBC driver prints them) -> the canonical names.
GO_CODES = {
    "Canceled": "CANCELLED", "Unknown": "UNKNOWN", "InvalidArgument": "INVALID_ARGUMENT",
    "DeadlineExceeded": "DEADLINE_EXCEEDED", "NotFound": "NOT_FOUND", "AlreadyExists": "ALREADY_EXISTS",
    "PermissionDenied": "PERMISSION_DENIED", "ResourceExhausted": "RESOURCE_EXHAUSTED",
    "FailedPrecondition": "FAILED_PRECONDITION", "Aborted": "ABORTED", "OutOfRange": "OUT_OF_RANGE",
    "Unimplemented": "UNIMPLEMENTED", "Internal": "INTERNAL", "Unavailable": "UNAVAILABLE", "DataLoss": "DATA_LOSS",
    "Unauthenticated": "UNAUTHENTICATED",
}
_ADBC_ERROR_RE = re.compile(
    r"\[FlightSQL\] (?P<msg>.*) \((?P<code>" + "|".join(GO_CODES) + r"); (?P<call>[^()]*)\)\s*$", re.S)
# The DB-API class the ADBC driver raises for each gRPC status (measured, see the module docstring).
EXPECTED_CLASS = {
    "PERMISSION_DENIED": dbapi.ProgrammingError, "NOT_FOUND": dbapi.ProgrammingError,
    "INVALID_ARGUMENT": dbapi.ProgrammingError, "UNAUTHENTICATED": dbapi.ProgrammingError,
    "RESOURCE_EXHAUSTED": dbapi.InternalError, "INTERNAL": dbapi.InternalError,
    "UNIMPLEMENTED": dbapi.NotSupportedError, "DEADLINE_EXCEEDED": dbapi.OperationalError,
}


def adbc_connect(gw: Gateway, *, key: str | None = None, username: str | None = None, password: str | None = None,
                 purpose: str | None = PURPOSE) -> dbapi.Connection:
    """An ADBC Flight SQL connection to the gateway's Flight port: bearer key (`authorization_header`) or
    username/password (basic-auth Handshake), and the purpose as a call header on every RPC."""
    kwargs = dict(ADBC_TIMEOUTS)
    if key is not None:
        kwargs[AUTH_KWARG] = f"Bearer {key}"
    if username is not None:
        kwargs["username"] = username
        kwargs["password"] = password or ""
    if purpose is not None:
        kwargs[PURPOSE_KWARG] = purpose
    # autocommit=True: the server has no transactions, and the driver would only warn about it.
    return dbapi.connect(gw.flight_uri, db_kwargs=kwargs, autocommit=True)


def run_sql(conn: dbapi.Connection, sql: str, parameters: Sequence[Any] | None = None) -> pa.Table:
    """Execute one statement on a fresh cursor and fetch the whole result as an Arrow table."""
    with conn.cursor() as cur:
        if parameters is None:
            cur.execute(sql)
        else:
            cur.execute(sql, parameters=parameters)
        return cur.fetch_arrow_table()


def scalar(conn: dbapi.Connection, sql: str, parameters: Sequence[Any] | None = None) -> Any:
    t = run_sql(conn, sql, parameters)
    assert t.num_rows == 1 and t.num_columns == 1, f"{sql!r} should return one value, got {t.num_rows} rows: {t}"
    return t.column(0)[0].as_py()


@dataclass
class SqlError:
    exc: BaseException
    code: str | None  # canonical gRPC code, None if the text did not name one (a client-side error)
    message: str  # the server's message (or the whole text for client-side errors)
    call: str  # which RPC the driver was making ("Prepare", "DoGet: endpoint 0: []", ...)

    @property
    def cls(self) -> str:
        return type(self.exc).__name__

    def __str__(self) -> str:
        return f"{self.cls} {self.code}: {self.message!r} (during {self.call})"


def parse_adbc_error(exc: BaseException) -> SqlError:
    text = str(exc)
    m = _ADBC_ERROR_RE.search(text)
    if not m:
        return SqlError(exc, None, text, "")
    msg = m.group("msg")
    # pyarrow-based servers append ". Detail: ..."; tonic sends none, but be tolerant.
    msg = re.sub(r"\. Detail: .*\Z", "", msg, flags=re.S).strip()
    return SqlError(exc, GO_CODES[m.group("code")], msg, m.group("call"))


def sql_error(conn: dbapi.Connection, sql: str, parameters: Sequence[Any] | None = None) -> SqlError:
    """Run `sql` and require that it fails with a DB-API error; return the parsed error."""
    try:
        result = run_sql(conn, sql, parameters)
    except dbapi.Error as exc:
        return parse_adbc_error(exc)
    pytest.fail(f"expected {sql!r} to fail, but it returned {result.num_rows} rows: {result.slice(0, 5).to_pylist()}")


def expect_sql_error(conn: dbapi.Connection, sql: str, codes: Iterable[str], *, parameters=None,
                     fragment: str | None = None) -> SqlError:
    """Run `sql`, require a failure with one of the gRPC `codes` and the DB-API class ADBC maps it to, and (if given)
    `fragment` in the server's message. Returns the parsed error."""
    codes = set(codes)
    err = sql_error(conn, sql, parameters)
    assert err.code in codes, f"{sql!r}: expected gRPC {sorted(codes)}, got {err}"
    wanted = EXPECTED_CLASS.get(err.code)
    if wanted is not None:
        assert type(err.exc) is wanted, f"{sql!r}: gRPC {err.code} should surface as {wanted.__name__}, got {err}"
    assert err.message, f"{sql!r}: the error should carry a message: {err}"
    if fragment is not None:
        assert fragment in err.message, f"{sql!r}: the message should contain {fragment!r}: {err}"
    return err


def assert_not_found_message(err: SqlError, table: str) -> None:
    """The contract's text: dataset `x` not found (x possibly qualified as passerelle.public.x)."""
    assert re.search(rf"dataset `(?:{CATALOG}\.)?(?:{DB_SCHEMA}\.)?{re.escape(table)}` not found", err.message), \
        f"NOT_FOUND should say \"dataset `{table}` not found\": {err}"


def mask(text: str, *names: str) -> str:
    for n in names:
        text = text.replace(n, "<name>")
    return text


# --- pyarrow.flight with hand-encoded Flight SQL commands (no Flight SQL client in pyarrow) --------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def flight_sql_command(message: str, body: bytes) -> flight.FlightDescriptor:
    """A CMD descriptor holding `google.protobuf.Any{type_url, value}` for a message of arrow.flight.protocol.sql."""
    any_msg = _bytes_field(1, f"type.googleapis.com/arrow.flight.protocol.sql.{message}".encode()) \
        + _bytes_field(2, body)
    return flight.FlightDescriptor.for_command(any_msg)


def statement_descriptor(sql: str) -> flight.FlightDescriptor:
    """CommandStatementQuery{query = sql}: the ad-hoc (not prepared) statement path."""
    return flight_sql_command("CommandStatementQuery", _bytes_field(1, sql.encode()))


def flight_sql_pull(client: flight.FlightClient, sql: str, options: flight.FlightCallOptions
                    ) -> tuple[flight.FlightInfo, pa.Table]:
    info = client.get_flight_info(statement_descriptor(sql), options)
    tables = [client.do_get(ep.ticket, options).read_all() for ep in info.endpoints]
    return info, (pa.concat_tables(tables) if tables else info.schema.empty_table())


# --- the reference model, for SQL results -----------------------------------------------------------------------------

def diagnosis_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(r["diagnosis"] for r in rows))


def sent_rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def wait_for_principal(conn_factory, what: str, check=lambda c: scalar(c, "SELECT 1") == 1) -> None:
    """New principals and permits reach the server within 1 s: poll with fresh connections until `check` passes."""
    def ok():
        try:
            with conn_factory() as c:
                return check(c)
        except dbapi.Error:
            return False
    poll_until(ok, deadline=5.0, interval=0.1, what=what)


# --- a server with a configuration file ------------------------------------------------------------------------------

def start_gateway_with_config(binary: Path, data_dir: Path, config: Path, demo_rows: int = 20000) -> Gateway:
    """conftest.start_gateway plus `--config FILE` (conftest's starter takes no extra arguments)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-serve.log"
    cmd = [str(binary), "serve", "--config", str(config), "--data-dir", str(data_dir), "--flight-addr",
           "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--demo", "--demo-rows", str(demo_rows)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "RUST_BACKTRACE": os.environ.get("RUST_BACKTRACE", "1")})
    t0 = time.monotonic()
    serve = keys = None
    while not (serve and keys and serve.get("flight_addr") and serve.get("http_addr")):
        serve = serve or _read_json_file(data_dir / "serve.json")
        keys = keys or _read_json_file(data_dir / "demo-keys.json")
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}; log:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        if time.monotonic() - t0 > STARTUP_DEADLINE:
            stop_process(proc)
            raise RuntimeError(f"no serve.json in {data_dir} after {STARTUP_DEADLINE} s")
        time.sleep(0.05)
    return Gateway(bin=binary, data_dir=data_dir, flight_addr=serve["flight_addr"], http_addr=serve["http_addr"],
                   keys={name: p["key"] for name, p in keys.items()}, demo_principals=keys, proc=proc,
                   log_path=log_path)


# ======================================================================================================================
# Fixtures
# ======================================================================================================================

@pytest.fixture(scope="module")
def conn(gateway: Gateway):
    """trainer-de (org dkfz, permitted for research/ai-training), bearer key."""
    c = adbc_connect(gateway, key=gateway.keys["trainer-de"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def consented_rows(reference: Reference) -> list[dict[str, Any]]:
    return reference.consented_rows(PURPOSE)


# ======================================================================================================================
# Authentication and purpose
# ======================================================================================================================

def test_username_password_handshake_then_query(gateway: Gateway, consented_rows):
    """db_kwargs username/password: the driver calls Handshake with Basic auth (base64 without padding) and reuses
    the bearer token the server answers with."""
    with adbc_connect(gateway, username="trainer-de", password=gateway.keys["trainer-de"]) as c:
        assert scalar(c, f"SELECT count(*) FROM {DATASET}") == len(consented_rows)


def test_bearer_authorization_header_then_query(gateway: Gateway, conn, consented_rows):
    assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == len(consented_rows)


@pytest.mark.parametrize("how", ["wrong-password", "unknown-user", "wrong-bearer"])
def test_bad_credentials_are_unauthenticated(gateway: Gateway, how):
    """Refused at connect (Handshake) or at the first query, as UNAUTHENTICATED, never with data."""
    try:
        if how == "wrong-bearer":
            c = adbc_connect(gateway, key="not-a-valid-key-" + "z" * 32)
        else:
            user = "trainer-de" if how == "wrong-password" else "nobody-sql"
            c = adbc_connect(gateway, username=user, password="wrong-key")
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
    else:
        with c:
            err = sql_error(c, f"SELECT count(*) FROM {DATASET}")
    assert isinstance(err.exc, dbapi.ProgrammingError), err
    assert err.code == "UNAUTHENTICATED" or (err.code is None and "UNAUTHENTICATED" in str(err.exc)), err


def test_missing_purpose_header_is_invalid_argument_naming_it(gateway: Gateway):
    with adbc_connect(gateway, key=gateway.keys["trainer-de"], purpose=None) as c:
        expect_sql_error(c, f"SELECT count(*) FROM {DATASET}", {"INVALID_ARGUMENT"}, fragment=PURPOSE_HEADER)


@pytest.fixture(scope="module")
def epi_trainer(gateway: Gateway) -> str:
    """A trainer of an org of its own holding permits for research/ai-training AND research/epidemiology."""
    key = gateway.add_principal("sql-epi-trainer", "sql-epi-org", "NL", "trainer")
    for purpose in (PURPOSE, OTHER_PURPOSE):
        gateway.cli("permit", "add", "--dataset", DATASET, "--org", "sql-epi-org", "--purpose", purpose)
    for purpose in (PURPOSE, OTHER_PURPOSE):
        wait_for_principal(lambda p=purpose: adbc_connect(gateway, key=key, purpose=p),
                           f"sql-epi-trainer can query {DATASET} for {purpose}",
                           check=lambda c: scalar(c, f"SELECT count(*) FROM {DATASET}") > 0)
    return key


@pytest.mark.parametrize("purpose", [PURPOSE, OTHER_PURPOSE])
def test_purpose_call_header_selects_the_consent(gateway: Gateway, reference: Reference, epi_trainer, purpose):
    """The purpose sent through db_kwargs `adbc.flight.sql.rpc.call_header.x-passerelle-purpose` decides which
    consent applies: the same principal gets each purpose's consented rows."""
    assert len(reference.consented_rows(PURPOSE)) != len(reference.consented_rows(OTHER_PURPOSE)), \
        "precondition: the demo's two purposes have different consent"
    with adbc_connect(gateway, key=epi_trainer, purpose=purpose) as c:
        t = run_sql(c, f"SELECT diagnosis, count(*) AS n FROM {DATASET} GROUP BY diagnosis")
    assert dict(zip(t.column("diagnosis").to_pylist(), t.column("n").to_pylist())) == \
        diagnosis_counts(reference.consented_rows(purpose))


def test_purpose_without_permit_shows_no_table_and_no_data(gateway: Gateway):
    """trainer-de's org holds no permit for research/epidemiology: no table in the catalog, and a query fails (as
    NOT_FOUND like any table outside the catalog, or PERMISSION_DENIED naming the purpose), with no rows."""
    with adbc_connect(gateway, key=gateway.keys["trainer-de"], purpose=OTHER_PURPOSE) as c:
        assert catalog_tables(c) == {}
        err = expect_sql_error(c, f"SELECT count(*) FROM {DATASET}", {"NOT_FOUND", "PERMISSION_DENIED"})
        if err.code == "NOT_FOUND":
            assert err.message == nonexistent_table_message(c, DATASET), err


# ======================================================================================================================
# Queries checked against the reference model
# ======================================================================================================================

def _hba_gt(x: float, limit: float) -> bool:
    return x is not None and x == x and x > limit


def test_select_with_where_equals_the_reference(conn, consented_rows):
    sql = f"SELECT * FROM {DATASET} WHERE hba1c > 9 AND diagnosis IN ('E11.9', 'I10')"
    t = run_sql(conn, sql)
    assert t.schema.names == RELEASED_COLUMNS, "SELECT * is the post-policy schema: no full_name, same order"
    assert is_string_type(t.schema.field("patient_id").type)
    ids = t.column("patient_id").to_pylist()
    bad = [p for p in ids if p is None or not PSEUDONYM_RE.match(p)]
    assert not bad, f"{len(bad)} patient_id values are not 32-hex pseudonyms, e.g. {bad[:3]}"
    expected = [r for r in consented_rows if _hba_gt(r["hba1c"], 9) and r["diagnosis"] in ("E11.9", "I10")]
    assert expected, "precondition: the filter matches consented rows"
    assert_same_multiset((output_row(r) for r in sent_rows(t)), (released_row(r) for r in expected),
                         "SQL rows (birth year, postcode[:2], diagnosis, hba1c, admitted_at)")


def test_select_star_equals_the_plain_flight_pull(gateway: Gateway, conn, client, reference: Reference):
    """SQL and plain Flight are two doors to the same gate: the same rows under the same pseudonyms."""
    sql_table = run_sql(conn, f"SELECT * FROM {DATASET}")
    flight_table = pull(client, call_options(gateway.keys["trainer-de"])).table
    assert sql_table.num_rows == len(reference.consented_rows(PURPOSE)) < reference.raw.num_rows
    assert groups_by_pseudonym(sql_table) == groups_by_pseudonym(flight_table)


def test_group_by_diagnosis_equals_the_reference(conn, consented_rows):
    t = run_sql(conn, f"SELECT diagnosis, count(*) AS n, avg(hba1c) AS mean FROM {DATASET} GROUP BY diagnosis")
    got = {r["diagnosis"]: (r["n"], r["mean"]) for r in sent_rows(t)}
    by_diag: dict[str, list[float]] = defaultdict(list)
    for r in consented_rows:
        by_diag[r["diagnosis"]].append(r["hba1c"])
    assert {d: n for d, (n, _) in got.items()} == {d: len(v) for d, v in by_diag.items()}
    for d, values in by_diag.items():
        assert math.isclose(got[d][1], sum(values) / len(values), rel_tol=1e-9), (d, got[d][1])


def test_window_functions_see_only_consented_rows(conn, consented_rows):
    """row_number and rank per diagnosis ordered by hba1c: positions computed over the consented rows only (a hidden
    row in a partition would shift every later position)."""
    t = run_sql(conn, f"""
        SELECT diagnosis, hba1c, admitted_at,
               row_number() OVER (PARTITION BY diagnosis ORDER BY hba1c, admitted_at) AS rn,
               rank() OVER (PARTITION BY diagnosis ORDER BY hba1c) AS rk,
               count(*) OVER (PARTITION BY diagnosis) AS size
        FROM {DATASET}""")
    expected = []
    parts: dict[str, list[dict]] = defaultdict(list)
    for r in consented_rows:
        parts[r["diagnosis"]].append(r)
    for d, rows in parts.items():
        rows.sort(key=lambda r: (r["hba1c"], r["admitted_at"]))
        rank = 0
        for i, r in enumerate(rows, start=1):
            if i == 1 or r["hba1c"] != rows[i - 2]["hba1c"]:
                rank = i
            expected.append((d, r["hba1c"], r["admitted_at"], i, rank, len(rows)))
    assert_same_multiset(((r["diagnosis"], r["hba1c"], r["admitted_at"], r["rn"], r["rk"], r["size"])
                          for r in sent_rows(t)), expected, "(diagnosis, hba1c, admitted_at, row_number, rank, size)")


def test_window_over_the_whole_table(conn, consented_rows):
    """A window without PARTITION BY: row_number and lag in time order over the released rows only."""
    t = run_sql(conn, f"""
        SELECT admitted_at, row_number() OVER (ORDER BY admitted_at) AS rn,
               lag(admitted_at) OVER (ORDER BY admitted_at) AS prev
        FROM {DATASET}""")
    times = sorted(r["admitted_at"] for r in consented_rows)
    expected = [(ts, i + 1, times[i - 1] if i else None) for i, ts in enumerate(times)]
    assert sorted((r["admitted_at"], r["rn"], r["prev"]) for r in sent_rows(t)) == expected


def test_duckdb_over_the_fetched_arrow_table(conn, consented_rows):
    """The ecosystem works unchanged: DuckDB queries the Arrow table ADBC fetched."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {DATASET}")
        tbl = cur.fetch_arrow_table()
    assert isinstance(tbl, pa.Table)
    result = duckdb.sql("select diagnosis, count(*) from tbl group by 1").fetchall()
    assert dict(result) == diagnosis_counts(consented_rows)


def test_statement_path_without_prepare_via_pyarrow(gateway: Gateway, client, consented_rows):
    """CommandStatementQuery through pyarrow.flight (the path ADBC falls back to): the same port as plain Flight, a
    FlightInfo with the result schema, and a total_records that is unknown (-1) or the released count, never the raw
    count."""
    opts = call_options(gateway.keys["trainer-de"])
    info, table = flight_sql_pull(client, f"SELECT patient_id, hba1c FROM {DATASET} WHERE hba1c > 7", opts)
    expected = [r for r in consented_rows if _hba_gt(r["hba1c"], 7)]
    assert info.schema.names == ["patient_id", "hba1c"]
    assert table.num_rows == len(expected)
    assert info.total_records in (-1, len(expected)), info.total_records
    assert all(PSEUDONYM_RE.match(p) for p in table.column("patient_id").to_pylist())
    # plain Flight keeps working on the same connection
    assert pull(client, opts).table.num_rows == len(consented_rows)


def test_pseudonyms_in_sql_are_per_organisation(gateway: Gateway, conn, second_org):
    """Another org (embl, with a permit) gets the same rows under disjoint pseudonyms."""
    mine = set(run_sql(conn, f"SELECT DISTINCT patient_id FROM {DATASET}").column(0).to_pylist())
    with adbc_connect(gateway, key=second_org["embl"]) as c:
        theirs = set(run_sql(c, f"SELECT DISTINCT patient_id FROM {DATASET}").column(0).to_pylist())
    assert len(mine) == len(theirs) > 0
    assert not mine & theirs


# ======================================================================================================================
# Prepared statements with parameters
# ======================================================================================================================

def test_prepared_statement_with_a_parameter(conn, consented_rows):
    """The intended behaviour: `$1` is bound from the DB-API parameters and the count is the reference's. If the
    server or driver refused, the failure below says how (a clean ProgrammingError/NotSupportedError, or not)."""
    sql = f"SELECT count(*) FROM {DATASET} WHERE diagnosis = $1"
    try:
        got = {d: scalar(conn, sql, parameters=(d,)) for d in ("E11.9", "I10")}
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
        clean = isinstance(exc, (dbapi.ProgrammingError, dbapi.NotSupportedError)) and err.code not in (
            "INTERNAL", "UNKNOWN", None)
        pytest.fail(f"a parameterised query should work; it failed {'cleanly' if clean else 'NOT cleanly'}: {err}")
    assert got == {d: diagnosis_counts(consented_rows).get(d, 0) for d in ("E11.9", "I10")}


def test_prepared_statement_reused_with_other_parameters(conn, consented_rows):
    """One cursor, the same SQL executed with different parameters (the driver re-binds the prepared statement)."""
    sql = f"SELECT count(*) FROM {DATASET} WHERE hba1c > $1 AND diagnosis = $2"
    with conn.cursor() as cur:
        got = []
        for limit, diag in ((9.0, "E11.9"), (6.5, "I10"), (12.0, "E78.5")):
            cur.execute(sql, parameters=(limit, diag))
            got.append(cur.fetch_arrow_table().column(0)[0].as_py())
    expected = [sum(1 for r in consented_rows if _hba_gt(r["hba1c"], limit) and r["diagnosis"] == diag)
                for limit, diag in ((9.0, "E11.9"), (6.5, "I10"), (12.0, "E78.5"))]
    assert got == expected


def test_parameters_are_values_not_sql(conn):
    """A parameter is never spliced into the SQL text."""
    assert scalar(conn, f"SELECT count(*) FROM {DATASET} WHERE diagnosis = $1",
                  parameters=("E11.9' OR '1'='1",)) == 0


def test_unbound_parameter_is_a_clean_error(conn):
    expect_sql_error(conn, f"SELECT count(*) FROM {DATASET} WHERE diagnosis = $1", {"INVALID_ARGUMENT"})


# ======================================================================================================================
# Catalog: only visible datasets, post-policy schema
# ======================================================================================================================

def catalog_tables(c: dbapi.Connection) -> dict[tuple[str, str, str], tuple[str, list[str]]]:
    """(catalog, schema, table) -> (table type, column names in order), from adbc_get_objects(depth="all")."""
    out: dict[tuple[str, str, str], tuple[str, list[str]]] = {}
    for cat in c.adbc_get_objects(depth="all").read_all().to_pylist():
        for sch in cat["catalog_db_schemas"] or []:
            for tab in sch["db_schema_tables"] or []:
                cols = sorted(tab["table_columns"] or [], key=lambda col: col["ordinal_position"] or 0)
                out[(cat["catalog_name"], sch["db_schema_name"], tab["table_name"])] = (
                    tab["table_type"], [col["column_name"] for col in cols])
    return out


def nonexistent_table_message(c: dbapi.Connection, name: str) -> str:
    """The NOT_FOUND message for a table that exists nowhere, with its name replaced by `name`."""
    err = expect_sql_error(c, f"SELECT count(*) FROM {UNKNOWN_TABLE}", {"NOT_FOUND"})
    return err.message.replace(UNKNOWN_TABLE, name)


def test_get_objects_lists_the_visible_dataset_with_its_released_columns(conn):
    assert catalog_tables(conn) == {(CATALOG, DB_SCHEMA, DATASET): ("TABLE", RELEASED_COLUMNS)}


def test_get_objects_filters(conn):
    tables = conn.adbc_get_objects(depth="tables", catalog_filter=CATALOG, db_schema_filter=DB_SCHEMA,
                                   table_name_filter="demo%").read_all().to_pylist()
    names = [t["table_name"] for c in tables for sch in c["catalog_db_schemas"] or []
             for t in sch["db_schema_tables"] or []]
    assert names == [DATASET]
    schemas = conn.adbc_get_objects(depth="db_schemas").read_all().to_pylist()
    assert [(c["catalog_name"], [s["db_schema_name"] for s in c["catalog_db_schemas"]]) for c in schemas] == \
        [(CATALOG, [DB_SCHEMA])]


def test_get_table_schema_is_the_post_policy_schema(gateway: Gateway, conn, client):
    schema = conn.adbc_get_table_schema(DATASET)
    assert schema.names == RELEASED_COLUMNS
    assert "full_name" not in schema.names
    flight_schema = client.get_schema(path_descriptor(), call_options(gateway.keys["trainer-de"])).schema
    assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in flight_schema], \
        "column metadata must be what plain Flight GetSchema returns"
    qualified = conn.adbc_get_table_schema(DATASET, catalog_filter=CATALOG, db_schema_filter=DB_SCHEMA)
    assert qualified.names == RELEASED_COLUMNS


def test_table_types(conn):
    assert "TABLE" in conn.adbc_get_table_types()


def test_qualified_names_resolve(conn, consented_rows):
    assert scalar(conn, f"SELECT count(*) FROM {CATALOG}.{DB_SCHEMA}.{DATASET}") == len(consented_rows)
    assert scalar(conn, f"SELECT count(*) FROM {DB_SCHEMA}.{DATASET}") == len(consented_rows)


@pytest.mark.parametrize("who", ["noperm", "steward-fr", "auditor-eu"])
def test_principal_without_permit_sees_no_tables(gateway: Gateway, second_org, who):
    key = second_org.get(who) or gateway.keys[who]
    with adbc_connect(gateway, key=key) as c:
        assert catalog_tables(c) == {}, f"{who} may use no dataset for {PURPOSE}: no table may be listed"
        with pytest.raises(dbapi.Error):
            c.adbc_get_table_schema(DATASET)


@pytest.mark.parametrize("shape", [
    "SELECT count(*) FROM {t}",
    "SELECT * FROM {t} WHERE hba1c > 7 LIMIT 3",
    "SELECT count(*) FROM (SELECT 1 AS one) x JOIN {t} y ON true",
    "SELECT * FROM passerelle.public.{t}",
], ids=["count", "filter-limit", "join", "qualified"])
def test_hidden_and_nonexistent_tables_give_the_same_not_found(gateway: Gateway, second_org, shape):
    """trainer-noperm: demo_patients is invisible to it. The error for it and for a table that does not exist is
    NOT_FOUND "dataset `x` not found", identical but for the name."""
    with adbc_connect(gateway, key=second_org["noperm"]) as c:
        hidden = expect_sql_error(c, shape.format(t=DATASET), {"NOT_FOUND"})
        missing = expect_sql_error(c, shape.format(t=UNKNOWN_TABLE), {"NOT_FOUND"})
    assert_not_found_message(hidden, DATASET)
    assert_not_found_message(missing, UNKNOWN_TABLE)
    assert mask(hidden.message, DATASET) == mask(missing.message, UNKNOWN_TABLE)
    assert type(hidden.exc) is type(missing.exc)


def test_hidden_column_is_invalid_argument_without_data(conn, reference: Reference):
    names = {r["full_name"] for r in reference.rows}
    for sql in (f"SELECT full_name FROM {DATASET}", f"SELECT count(*) FROM {DATASET} WHERE full_name LIKE 'A%'",
                f"SELECT * FROM {DATASET} ORDER BY full_name LIMIT 1"):
        err = expect_sql_error(conn, sql, {"INVALID_ARGUMENT"})
        assert not [n for n in names if n in err.message], f"{sql!r}: the error names a full name: {err}"


def test_suggestions_never_name_a_hidden_column(conn):
    """DataFusion suggests similar column names ("Did you mean ..."): never a withheld one."""
    err = expect_sql_error(conn, f"SELECT full_nam FROM {DATASET}", {"INVALID_ARGUMENT"})
    assert "full_name" not in err.message, err


# ======================================================================================================================
# Join of two datasets on the pseudonym (scratch server)
# ======================================================================================================================

LABS = "sqlj_labs"
LABS_REGISTRY = "sqlj-labs-registry"
JOIN_ORG = "sqlj-org"
JOIN_TRAINER = "sqlj-trainer"


@dataclass
class Labs:
    key: str  # JOIN_TRAINER's key
    rows: list[dict[str, Any]]  # the raw labs rows (tag = raw subject id)
    demo_consented: set[str]  # demo subjects sent now, among the labs subjects
    labs_consented: set[str]  # labs subjects consented in the labs registry
    both: set[str]


@pytest.fixture(scope="module")
def labs(scratch_gateway: Gateway, tmp_path_factory) -> Labs:
    """A second dataset `sqlj_labs` of controller aphp on the scratch server, sharing subjects with demo_patients and
    with a consent registry of its own:
      A: consented in both registries       B: consented for demo, withdrawn in labs
      C: not consented for demo, granted    D: consented for demo, no labs event
      E: labs-only subjects (no demo rows), granted
    Columns: patient_id (identifier), tag (non-personal: the raw subject id, so the test can tell subjects apart in
    the output; a steward's classification, deliberately revealing here), lab_value (sensitive).
    Subjects another scratch test took (and may have changed the consent of) are left out, so the demo side's consent
    is the reference model's. A trainer of an org of its own holds permits for both datasets."""
    gw = scratch_gateway
    ref = gw.reference
    demo_ok = ref.consented(PURPOSE)
    pool = sorted((s for s in ref.by_subject if s not in gw._taken), key=int)
    a = [s for s in pool if s in demo_ok][:40]
    b = [s for s in pool if s in demo_ok][40:60]
    d = [s for s in pool if s in demo_ok][60:80]
    c = [s for s in pool if s not in demo_ok][:20]
    e = [str(10_000_000 + i) for i in range(10)]
    assert len(a) == 40 and len(b) == len(c) == len(d) == 20, "the demo has too few untouched subjects"

    base = tmp_path_factory.mktemp("sqlj-labs")
    data = base / "labs"
    data.mkdir()
    rows = []
    for i, s in enumerate(a + b + c + d + e):
        for j in range(i % 3 + 1):
            rows.append({"patient_id": int(s), "tag": int(s), "lab_value": round(1.0 + (i * 7 + j) % 50 / 10, 1)})
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("patient_id", pa.int64()), ("tag", pa.int64()),
                                                                 ("lab_value", pa.float64())])),
                   data / "labs.parquet")
    manifest = base / f"{LABS}.toml"
    manifest.write_text(f"""name = "{LABS}"
location = "file://{data.resolve()}/"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
consent_registry = "{LABS_REGISTRY}"
purposes = ["{PURPOSE}"]

[columns]
patient_id = {{ class = "identifier" }}
tag        = {{ class = "non-personal" }}
lab_value  = {{ class = "sensitive" }}
""")
    consent = base / "labs-consent.csv"
    lines = ["subject_id,purpose,status,timestamp"]
    for s in a + c + e:
        lines.append(f"{s},{PURPOSE},granted,2024-01-10T08:00:00Z")
    for s in b:
        lines.append(f"{s},{PURPOSE},granted,2024-01-10T08:00:00Z")
        lines.append(f"{s},{PURPOSE},withdrawn,2024-05-10T08:00:00Z")
    consent.write_text("\n".join(lines) + "\n")

    gw.cli("dataset", "register", "--manifest", str(manifest))
    gw.cli("consent", "import", "--registry", LABS_REGISTRY, "--file", str(consent))
    key = gw.add_principal(JOIN_TRAINER, JOIN_ORG, "NL", "trainer")
    for dataset in (DATASET, LABS):
        gw.cli("permit", "add", "--dataset", dataset, "--org", JOIN_ORG, "--purpose", PURPOSE)
    labs_ok = set(a + c + e)
    expected_labs_rows = sum(1 for r in rows if str(r["tag"]) in labs_ok)
    wait_for_principal(lambda: adbc_connect(gw, key=key), f"{JOIN_TRAINER} sees {LABS} with its consent",
                       check=lambda c_: scalar(c_, f"SELECT count(*) FROM {LABS}") == expected_labs_rows)
    subjects = set(a + b + c + d + e)
    return Labs(key=key, rows=rows, demo_consented=subjects & demo_ok, labs_consented=labs_ok,
                both=subjects & demo_ok & labs_ok)


JOIN_SQL = f"""SELECT p.patient_id AS pid, l.patient_id AS lpid, l.tag, p.diagnosis, p.hba1c, l.lab_value
FROM {DATASET} p JOIN {LABS} l ON p.patient_id = l.patient_id"""


def test_join_two_datasets_on_the_pseudonym(scratch_gateway: Gateway, labs: Labs):
    """Pseudonyms of one recipient org are equal across datasets, so the join matches; it holds exactly the subjects
    consenting in both registries, each demo row paired with each of the subject's lab rows."""
    ref = scratch_gateway.reference
    with adbc_connect(scratch_gateway, key=labs.key) as c:
        t = run_sql(c, JOIN_SQL)
    rows = sent_rows(t)
    assert rows, "the join matched nothing: pseudonyms differ across datasets?"
    tags = {str(r["tag"]) for r in rows}
    assert tags == labs.both, (f"subjects in the join: {len(tags)}; expected the {len(labs.both)} consenting in both; "
                               f"unexpected {sorted(tags - labs.both)[:5]}, missing {sorted(labs.both - tags)[:5]}")
    assert all(PSEUDONYM_RE.match(r["pid"]) and r["pid"] == r["lpid"] for r in rows)
    pseudonym_of = {}
    for r in rows:
        assert pseudonym_of.setdefault(r["tag"], r["pid"]) == r["pid"], "one subject, one pseudonym"
    assert len(set(pseudonym_of.values())) == len(pseudonym_of), "one pseudonym, one subject"
    expected = []
    for lr in labs.rows:
        s = str(lr["tag"])
        if s in labs.both:
            expected += [(lr["tag"], dr["diagnosis"], dr["hba1c"], lr["lab_value"]) for dr in ref.by_subject[s]]
    assert_same_multiset(((r["tag"], r["diagnosis"], r["hba1c"], r["lab_value"]) for r in rows), expected,
                         "(tag, diagnosis, hba1c, lab_value) of the join")


def test_join_aggregate(scratch_gateway: Gateway, labs: Labs):
    with adbc_connect(scratch_gateway, key=labs.key) as c:
        n = scalar(c, f"SELECT count(DISTINCT l.tag) FROM {DATASET} p JOIN {LABS} l ON p.patient_id = l.patient_id")
    assert n == len(labs.both)


def test_dataset_of_another_org_is_not_found_like_a_missing_one(scratch_gateway: Gateway, labs: Labs):
    """trainer-de (dkfz) holds no permit for sqlj_labs: it is not listed and looks exactly like a missing table,
    also inside a join with a dataset it may use."""
    with adbc_connect(scratch_gateway, key=scratch_gateway.keys["trainer-de"]) as c:
        assert (CATALOG, DB_SCHEMA, LABS) not in catalog_tables(c)
        hidden = expect_sql_error(c, JOIN_SQL, {"NOT_FOUND"})
        missing = expect_sql_error(c, JOIN_SQL.replace(LABS, UNKNOWN_TABLE), {"NOT_FOUND"})
    assert_not_found_message(hidden, LABS)
    assert_not_found_message(missing, UNKNOWN_TABLE)
    assert mask(hidden.message, LABS) == mask(missing.message, UNKNOWN_TABLE)


def test_join_is_audited_with_both_datasets(scratch_gateway: Gateway, labs: Labs):
    gw = scratch_gateway
    sql = JOIN_SQL + " WHERE l.lab_value > 0 AND 'audit-join-marker' <> ''"
    with adbc_connect(gw, key=labs.key) as c:
        n = run_sql(c, sql).num_rows
    entries = _wait_sql_entries(gw, JOIN_TRAINER, sql)
    queries = [e for e in entries if e["action"] == "sql_query"]
    assert queries, f"no sql_query entry with the statement: {entries}"
    for e in queries:
        assert set(e["dataset"].split(",")) == {DATASET, LABS}, e
        assert e["decision"] == "allow" and e["purpose"] == PURPOSE, e
    gets = [e for e in entries if e["action"] == "do_get"]
    assert sum(e["rows_sent"] for e in gets) == n, gets
    listed = gw.cli_json("audit", "list", "--dataset", LABS, "--principal", JOIN_TRAINER)
    assert {e["id"] for e in queries} <= {e["id"] for e in listed}, "`audit list --dataset` finds SQL entries"


# ======================================================================================================================
# Only queries
# ======================================================================================================================

NON_QUERIES = [
    ("ctas", "CREATE TABLE x AS SELECT 1"),
    ("insert", f"INSERT INTO {DATASET} (diagnosis, hba1c) VALUES ('X00', 1.0)"),
    ("insert-select", f"INSERT INTO {DATASET} SELECT * FROM {DATASET}"),
    ("copy", "COPY demo_patients TO '{tmp}/x.parquet'"),
    ("copy-tmp", "COPY demo_patients TO '/tmp/x.parquet'"),
    ("external-table", "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'"),
    ("set", "SET datafusion.execution.batch_size = 1"),
    ("create-view", f"CREATE VIEW v AS SELECT * FROM {DATASET}"),
    ("drop", f"DROP TABLE {DATASET}"),
    ("delete", f"DELETE FROM {DATASET}"),
]


@pytest.mark.parametrize("name,sql", NON_QUERIES, ids=[n for n, _ in NON_QUERIES])
def test_non_query_statements_are_refused_and_change_nothing(gateway: Gateway, conn, consented_rows, tmp_path,
                                                              name, sql):
    demo_dir = gateway.data_dir / "demo"
    before = sorted((p.relative_to(demo_dir), p.stat().st_size, p.stat().st_mtime_ns) for p in demo_dir.rglob("*"))
    tmp_existed = os.path.exists("/tmp/x.parquet")
    tmp_stat = os.stat("/tmp/x.parquet").st_mtime_ns if tmp_existed else None
    sql = sql.format(tmp=tmp_path)

    err = expect_sql_error(conn, sql, {"PERMISSION_DENIED", "INVALID_ARGUMENT"})
    if err.code == "PERMISSION_DENIED":
        assert err.message.startswith("only SELECT queries"), err
    assert "SELECT" in err.message, f"the message should say what is allowed: {err}"

    assert not (tmp_path / "x.parquet").exists(), "COPY wrote a file"
    assert os.path.exists("/tmp/x.parquet") == tmp_existed, "COPY wrote /tmp/x.parquet"
    if tmp_existed:
        assert os.stat("/tmp/x.parquet").st_mtime_ns == tmp_stat
    after = sorted((p.relative_to(demo_dir), p.stat().st_size, p.stat().st_mtime_ns) for p in demo_dir.rglob("*"))
    assert after == before, "a refused statement changed the data directory"
    assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == len(consented_rows)
    for table in ("x", "t", "v"):
        if table in sql.split():
            expect_sql_error(conn, f"SELECT * FROM {table}", {"NOT_FOUND"}, fragment=f"dataset `{table}` not found")


@pytest.mark.parametrize("sql", ["CREATE TABLE x AS SELECT 1", f"INSERT INTO {DATASET} SELECT * FROM {DATASET}"])
def test_execute_update_is_refused(conn, consented_rows, sql):
    """The update path (CommandStatementUpdate / prepared update) is refused too."""
    with conn.cursor() as cur:
        stmt = cur.adbc_statement
        stmt.set_sql_query(sql)
        with pytest.raises(dbapi.Error) as info:
            stmt.execute_update()
    err = parse_adbc_error(info.value)
    assert err.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED"), err
    assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == len(consented_rows)


def test_statuses_seen_by_pyarrow(gateway: Gateway, client, second_org):
    """The exact gRPC statuses, seen through pyarrow's status classes on the ad-hoc statement path."""
    de = call_options(gateway.keys["trainer-de"])
    msg = expect_status("PERMISSION_DENIED", lambda: flight_sql_pull(client, f"DELETE FROM {DATASET}", de))
    assert msg.startswith("only SELECT queries"), msg
    expect_status("PERMISSION_DENIED", lambda: flight_sql_pull(client, f"EXPLAIN ANALYZE SELECT * FROM {DATASET}", de))
    expect_status("INVALID_ARGUMENT", lambda: flight_sql_pull(client, f"SELECT full_name FROM {DATASET}", de))
    noperm = call_options(second_org["noperm"])
    hidden = expect_status("NOT_FOUND", lambda: flight_sql_pull(client, f"SELECT * FROM {DATASET}", noperm))
    missing = expect_status("NOT_FOUND", lambda: flight_sql_pull(client, f"SELECT * FROM {UNKNOWN_TABLE}", noperm))
    assert f"dataset `{DATASET}` not found" in hidden
    assert mask(hidden, DATASET) == mask(missing, UNKNOWN_TABLE)


def test_explain_analyze_is_permission_denied(conn):
    expect_sql_error(conn, f"EXPLAIN ANALYZE SELECT * FROM {DATASET}", {"PERMISSION_DENIED"})


def test_information_schema_is_not_available(conn):
    for sql in ("SELECT * FROM information_schema.tables", "SELECT * FROM information_schema.columns",
                "SELECT * FROM information_schema.df_settings"):
        expect_sql_error(conn, sql, {"NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"})


def test_multiple_statements_are_refused(conn, consented_rows):
    expect_sql_error(conn, f"SELECT 1; DROP TABLE {DATASET}", {"PERMISSION_DENIED", "INVALID_ARGUMENT"})
    assert scalar(conn, f"SELECT count(*) FROM {DATASET}") == len(consented_rows)


@pytest.mark.parametrize("sql", ["SELECT * FROM generate_series(1, 3)", "SELECT * FROM range(3)",
                                 "SELECT * FROM read_parquet('/etc/passwd')"])
def test_table_functions_are_not_available(conn, sql):
    expect_sql_error(conn, sql, {"NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"})


def test_raw_files_cannot_be_queried_by_path(gateway: Gateway, conn, reference: Reference):
    """DataFusion can read a file named in FROM (URL tables): the raw Parquet, full names included, must stay out of
    reach."""
    path = reference.parquet_path.resolve()
    names = {r["full_name"] for r in reference.rows}
    for sql in (f"SELECT * FROM '{path}'", f"SELECT full_name FROM '{path}'", f"SELECT * FROM 'file://{path}'",
                f"SELECT * FROM '{gateway.data_dir.resolve()}/demo/consent.csv'"):
        err = expect_sql_error(conn, sql, {"NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"})
        assert not [n for n in names if n in err.message], err


# ======================================================================================================================
# EXPLAIN: the gate above every scan, no storage paths
# ======================================================================================================================

def _plan_text(conn, sql: str) -> dict[str, str]:
    t = run_sql(conn, sql)
    assert t.schema.names[:2] == ["plan_type", "plan"], t.schema
    return dict(zip(t.column("plan_type").to_pylist(), t.column("plan").to_pylist()))


# Operators that only move batches; anything else (FilterExec, ProjectionExec, ...) between the gate and the scan
# would evaluate user expressions on raw rows.
PASSIVE_OPERATORS = {"RepartitionExec", "CoalesceBatchesExec", "CoalescePartitionsExec", "CooperativeExec"}
LEAF_WITHOUT_DATA = {"PlaceholderRowExec", "EmptyExec"}


def assert_gate_above_every_scan(physical: str) -> None:
    lines = [ln for ln in physical.splitlines() if ln.strip()]
    nodes = [(len(ln) - len(ln.lstrip(" ")), ln.strip().split(":")[0]) for ln in lines]
    assert any(op == "EnforceExec" for _, op in nodes), f"no EnforceExec in the plan:\n{physical}"
    for i, (depth, op) in enumerate(nodes):
        is_leaf = i + 1 == len(nodes) or nodes[i + 1][0] <= depth
        if not is_leaf or op in LEAF_WITHOUT_DATA:
            continue
        # walk up the ancestors until the gate
        chain, d = [], depth
        for j in range(i - 1, -1, -1):
            if nodes[j][0] < d:
                d = nodes[j][0]
                chain.append(nodes[j][1])
                if nodes[j][1] == "EnforceExec":
                    break
        assert "EnforceExec" in chain, f"{op} (line {i + 1}) has no EnforceExec above it:\n{physical}"
        between = chain[:-1]
        assert set(between) <= PASSIVE_OPERATORS, \
            f"{between} between EnforceExec and {op} would evaluate expressions on raw rows:\n{physical}"


def assert_no_storage_paths(gw: Gateway, text: str) -> None:
    d = str(gw.data_dir.resolve())
    for needle in (d, d.lstrip("/"), "patients.parquet", "demo/patients", "consent.csv"):
        assert needle not in text, f"the plan shows a storage path ({needle!r}):\n{text}"


@pytest.mark.parametrize("sql", [
    f"SELECT * FROM {DATASET} WHERE hba1c > 8",
    f"SELECT diagnosis, count(*), avg(hba1c) FROM {DATASET} WHERE hba1c > 8 GROUP BY diagnosis",
    f"SELECT count(*) FROM {DATASET}",
    f"SELECT a.diagnosis, count(*) FROM {DATASET} a JOIN {DATASET} b ON a.patient_id = b.patient_id GROUP BY 1",
    f"SELECT * FROM {DATASET} WHERE 1 / (CASE WHEN hba1c = 7.1 THEN 0 ELSE 1 END) = 1 ORDER BY admitted_at LIMIT 5",
    f"SELECT row_number() OVER (ORDER BY admitted_at) FROM {DATASET}",
    f"SELECT row_number() OVER (ORDER BY 1 / (CASE WHEN hba1c = 7.1 THEN 0 ELSE 1 END)) FROM {DATASET}",
    f"SELECT * FROM {DATASET} ORDER BY 1 / (CASE WHEN hba1c = 7.1 THEN 0 ELSE 1 END) LIMIT 5",
], ids=["filter", "group-by", "count", "self-join", "division-probe", "window-order", "window-expression",
        "order-by-expression"])
def test_explain_shows_the_gate_above_every_scan_and_no_paths(gateway: Gateway, conn, sql):
    plans = _plan_text(conn, f"EXPLAIN {sql}")
    physical = plans.get("physical_plan")
    assert physical, f"EXPLAIN returned no physical_plan: {list(plans)}"
    assert_gate_above_every_scan(physical)
    for text in plans.values():
        assert_no_storage_paths(gateway, text)


@pytest.mark.parametrize("sql", [
    f"SELECT row_number() OVER (ORDER BY admitted_at) FROM {DATASET}",
    f"SELECT row_number() OVER (ORDER BY hba1c * 2) FROM {DATASET}",
    f"SELECT CAST(diagnosis AS INT) FROM {DATASET}",
    f"SELECT no_such_function(hba1c) FROM {DATASET}",
    f"SELECT * FROM {DATASET} a JOIN {DATASET} b USING (no_such_column)",
], ids=["window", "window-expression", "cast", "unknown-function", "bad-join"])
def test_errors_show_no_storage_paths(gateway: Gateway, conn, sql):
    """Whatever fails while planning or running a query (including DataFusion's own plan checks, which print the
    plan), the message never shows the node's storage paths."""
    try:
        run_sql(conn, sql)
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
        assert_no_storage_paths(gateway, err.message)
        assert err.code != "INTERNAL" or "request id" in err.message, err


def test_table_name_typos_suggest_no_hidden_dataset(gateway: Gateway, second_org):
    """DataFusion may suggest similar table names: never one the caller may not see."""
    with adbc_connect(gateway, key=second_org["noperm"]) as c:
        err = expect_sql_error(c, "SELECT * FROM demo_patient", {"NOT_FOUND"})
    assert DATASET not in err.message, err


@pytest.mark.parametrize("sql", ["SHOW TABLES", "SHOW ALL", f"DESCRIBE {DATASET}", f"SHOW COLUMNS FROM {DATASET}"])
def test_show_and_describe_reveal_nothing_hidden(gateway: Gateway, conn, second_org, sql):
    """Refused, or answered with visible things only: no hidden column for trainer-de, no hidden table for
    trainer-noperm."""
    try:
        text = json.dumps(run_sql(conn, sql).to_pylist(), default=str)
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
        assert err.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED"), err
    else:
        assert "full_name" not in text, f"{sql} shows a withheld column: {text[:500]}"
        assert_no_storage_paths(gateway, text)
    with adbc_connect(gateway, key=second_org["noperm"]) as c:
        try:
            text = json.dumps(run_sql(c, sql).to_pylist(), default=str)
        except dbapi.Error as exc:
            err = parse_adbc_error(exc)
            assert err.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED"), err
            if err.code == "NOT_FOUND" and DATASET in sql:
                assert err.message == nonexistent_table_message(c, DATASET), err
        else:
            assert DATASET not in text, f"{sql} shows a dataset trainer-noperm may not see: {text[:500]}"


def test_explain_verbose_shows_no_paths(gateway: Gateway, conn):
    """EXPLAIN VERBOSE (every optimizer pass) may be refused; if answered, it shows no storage paths either."""
    try:
        plans = _plan_text(conn, f"EXPLAIN VERBOSE SELECT * FROM {DATASET} WHERE hba1c > 8")
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
        assert err.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), err
        return
    for text in plans.values():
        assert_no_storage_paths(gateway, text)


# ======================================================================================================================
# Prepared statement handles (raw Flight SQL through pyarrow)
# ======================================================================================================================

def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _proto_fields(buf: bytes) -> dict[int, list[Any]]:
    """A minimal protobuf decoder: field number -> values (varints as int, length-delimited as bytes)."""
    out: dict[int, list[Any]] = defaultdict(list)
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out[number].append(value)
    return out


def create_prepared_statement(client: flight.FlightClient, sql: str, options: flight.FlightCallOptions) -> bytes:
    """DoAction CreatePreparedStatement; returns the handle."""
    body = _bytes_field(1, b"type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest") \
        + _bytes_field(2, _bytes_field(1, sql.encode()))
    results = list(client.do_action(flight.Action("CreatePreparedStatement", body), options))
    assert len(results) == 1, results
    any_msg = _proto_fields(results[0].body.to_pybytes())
    assert any_msg[1][0].endswith(b"ActionCreatePreparedStatementResult"), any_msg
    return _proto_fields(any_msg[2][0])[1][0]


def prepared_pull(client: flight.FlightClient, handle: bytes, options: flight.FlightCallOptions
                  ) -> tuple[flight.FlightInfo, pa.Table]:
    info = client.get_flight_info(flight_sql_command("CommandPreparedStatementQuery", _bytes_field(1, handle)),
                                  options)
    tables = [client.do_get(ep.ticket, options).read_all() for ep in info.endpoints]
    return info, (pa.concat_tables(tables) if tables else info.schema.empty_table())


def _refused(call) -> str:
    """The call must fail with a status that carries no data (pyarrow's class for it)."""
    with pytest.raises((pa.ArrowInvalid, pa.ArrowKeyError, flight.FlightUnauthorizedError,
                        flight.FlightUnauthenticatedError)) as info:
        call()
    return str(info.value)


def test_prepared_handles_grant_nothing_by_themselves(gateway: Gateway, client, second_org, consented_rows):
    """A handle is not a capability: presented by a principal without access, under another purpose, or tampered
    with, it yields no data; a ticket of the statement is refused to another principal."""
    de = call_options(gateway.keys["trainer-de"])
    handle = create_prepared_statement(client, f"SELECT count(*) AS n FROM {DATASET}", de)
    info, table = prepared_pull(client, handle, de)
    assert table.column("n")[0].as_py() == len(consented_rows)

    noperm = call_options(second_org["noperm"])
    _refused(lambda: prepared_pull(client, handle, noperm))
    _refused(lambda: prepared_pull(client, handle, call_options(gateway.keys["trainer-de"], OTHER_PURPOSE)))
    _refused(lambda: client.do_get(info.endpoints[0].ticket, noperm).read_all())
    for tampered in (handle[:-1] + bytes([handle[-1] ^ 1]), handle[: len(handle) // 2], b"garbage"):
        _refused(lambda h=tampered: prepared_pull(client, h, de))


def test_prepared_handle_of_another_org_gets_its_own_pseudonyms(gateway: Gateway, client, second_org):
    """Presented by embl (with a permit of its own), trainer-de's handle either is refused or runs as embl would:
    embl's pseudonyms, never dkfz's."""
    sql = f"SELECT patient_id FROM {DATASET} ORDER BY admitted_at LIMIT 5"
    de, embl = call_options(gateway.keys["trainer-de"]), call_options(second_org["embl"])
    handle = create_prepared_statement(client, sql, de)
    dkfz_ids = prepared_pull(client, handle, de)[1].column(0).to_pylist()
    try:
        _, table = prepared_pull(client, handle, embl)
    except (pa.ArrowInvalid, pa.ArrowKeyError, flight.FlightUnauthorizedError):
        return
    embl_own = flight_sql_pull(client, sql, embl)[1].column(0).to_pylist()
    assert table.column(0).to_pylist() == embl_own and not set(embl_own) & set(dkfz_ids)


# ======================================================================================================================
# Consent changes reach SQL (scratch server)
# ======================================================================================================================

def test_withdrawal_reaches_sql_within_a_second(scratch_gateway: Gateway):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    ref = gw.reference
    micros = pc.cast(ref.raw.column("admitted_at"), pa.int64()).to_pylist()
    mine = [m for m, r in zip(micros, ref.rows) if str(r["patient_id"]) == s]
    probe = f"SELECT count(*) FROM {DATASET} WHERE CAST(admitted_at AS BIGINT) IN ({', '.join(map(str, mine))})"
    with adbc_connect(gw, key=gw.keys["trainer-de"]) as c:
        total = scalar(c, f"SELECT count(*) FROM {DATASET}")
        assert scalar(c, probe) == len(mine) > 0, "precondition: the subject's rows are sent"
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", s, "--purpose", PURPOSE)
        _, seconds = poll_until(lambda: scalar(c, probe) == 0, deadline=3.0, interval=0.05,
                                what=f"subject {s}'s rows leave SQL results")
        assert seconds <= 1.5, f"the withdrawal took {seconds:.2f} s to reach SQL"
        assert scalar(c, f"SELECT count(*) FROM {DATASET}") == total - len(mine)


# ======================================================================================================================
# Audit
# ======================================================================================================================

SQL_AUDIT_PROBE = "sql-audit-probe"


def _wait_sql_entries(gw: Gateway, principal: str, sql: str, deadline: float = 5.0) -> list[dict[str, Any]]:
    """The principal's audit entries whose `statement` is `sql`, once there is a `sql_query` entry and every
    `do_get` entry is completed (completion may lag the end of the stream)."""
    t0 = time.monotonic()
    while True:
        everything = gw.cli_json("audit", "list", "--principal", principal)
        entries = [e for e in everything if e.get("statement") == sql]
        gets = [e for e in entries if e["action"] == "do_get"]
        if any(e["action"] == "sql_query" for e in entries) and gets and all(e["status"] == "completed" for e in gets):
            return entries
        if time.monotonic() - t0 > deadline:
            raise AssertionError(
                f"after {deadline} s the audit has no sql_query entry and completed do_get entries with statement "
                f"{sql!r}; {principal}'s latest entries: "
                + json.dumps([{k: e.get(k) for k in ("action", "dataset", "statement", "status", "rows_sent")}
                              for e in everything[:8]], indent=1))
        time.sleep(0.1)


def test_sql_queries_are_audited_with_their_statement(gateway: Gateway, consented_rows):
    key = gateway.add_principal(SQL_AUDIT_PROBE, "dkfz", "DE", "trainer")
    wait_for_principal(lambda: adbc_connect(gateway, key=key), f"{SQL_AUDIT_PROBE} is known")
    sql = f"SELECT diagnosis, count(*) AS sql_audit_probe_n FROM {DATASET} WHERE hba1c > 9 GROUP BY diagnosis"
    with adbc_connect(gateway, key=key) as c:
        result = run_sql(c, sql)
    entries = _wait_sql_entries(gateway, SQL_AUDIT_PROBE, sql)
    queries = [e for e in entries if e["action"] == "sql_query"]
    gets = [e for e in entries if e["action"] == "do_get"]
    assert queries, f"no `sql_query` entry holds the statement; entries: {entries}"
    for e in queries + gets:
        assert (e["principal"], e["organisation"], e["purpose"], e["decision"]) == \
            (SQL_AUDIT_PROBE, "dkfz", PURPOSE, "allow"), e
        assert e["dataset"] == DATASET, e
    assert sum(e["rows_sent"] for e in gets) == result.num_rows == len(
        {r["diagnosis"] for r in consented_rows if _hba_gt(r["hba1c"], 9)})


# ======================================================================================================================
# [sql] limits (a server of their own, started with --config)
# ======================================================================================================================

SQL_LIMITS = {"max_rows": 10, "memory_limit_mb": 64, "timeout_secs": 3}


@pytest.fixture(scope="module")
def limited_gateway(passerelle_bin: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp("sql-limits")
    config = base / "passerelle.toml"
    config.write_text("[sql]\n" + "".join(f"{k} = {v}\n" for k, v in SQL_LIMITS.items()))
    gw = start_gateway_with_config(passerelle_bin, base / "data", config)
    try:
        yield gw
    finally:
        died = gw.proc.poll()
        stop_process(gw.proc)
        assert died is None, f"the server with [sql] limits died (exit {died}); log:\n{gw.log_tail()}"


@pytest.fixture
def limited_conn(limited_gateway: Gateway):
    c = adbc_connect(limited_gateway, key=limited_gateway.keys["trainer-de"])
    yield c
    c.close()


def test_config_show_has_the_sql_section(limited_gateway: Gateway, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sql]\n" + "".join(f"{k} = {v}\n" for k, v in SQL_LIMITS.items()))
    shown = limited_gateway.cli("config", "show", "--config", str(config))
    for k, v in SQL_LIMITS.items():
        assert re.search(rf"^{k}\s*=\s*{v}\s*$", shown, re.M), f"`config show` lacks {k} = {v}:\n{shown}"


def test_max_rows_limits_results_not_inputs(limited_gateway: Gateway, limited_conn):
    assert run_sql(limited_conn, f"SELECT * FROM {DATASET} LIMIT 10").num_rows == 10
    # aggregates over every row are fine: the limit is on rows sent
    assert run_sql(limited_conn, f"SELECT diagnosis, count(*) FROM {DATASET} GROUP BY diagnosis").num_rows == 8
    err = sql_error(limited_conn, f"SELECT * FROM {DATASET}")
    assert err.code == "RESOURCE_EXHAUSTED", err
    assert isinstance(err.exc, dbapi.InternalError), "ADBC maps RESOURCE_EXHAUSTED to InternalError"
    assert "sql.max_rows" in err.message, err
    limited_gateway.assert_alive()


def test_memory_limit(limited_gateway: Gateway, limited_conn):
    """count(DISTINCT x) over ~13k strings of ~10 kB keeps ~130 MB in one accumulator: over the 64 MB limit."""
    sql = (f"SELECT count(DISTINCT repeat(diagnosis, 2000) || CAST(admitted_at AS VARCHAR)) FROM {DATASET}")
    err = sql_error(limited_conn, sql)
    assert err.code == "RESOURCE_EXHAUSTED", err
    assert "sql.memory_limit_mb" in err.message, err
    # the server is fine afterwards
    assert scalar(limited_conn, f"SELECT count(*) FROM {DATASET} WHERE hba1c > 100") == 0


def test_timeout(limited_gateway: Gateway, limited_conn):
    """A 169M-pair cross join takes far longer than 3 s on a debug build: stopped at the limit."""
    sql = (f"SELECT count(*) FROM {DATASET} a CROSS JOIN {DATASET} b "
           f"WHERE a.hba1c * b.hba1c + a.hba1c > 1000000")
    t0 = time.monotonic()
    err = sql_error(limited_conn, sql)
    elapsed = time.monotonic() - t0
    assert err.code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"), err
    assert "sql.timeout_secs" in err.message, err
    assert elapsed < SQL_LIMITS["timeout_secs"] + 30, f"the query ran {elapsed:.1f} s"
    assert scalar(limited_conn, "SELECT 1") == 1
