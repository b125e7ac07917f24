"""Attacks on governed SQL that the reviewer confirmed against the current binary. Each test states the invariant it
pins; all of them should pass once the hole is closed (none is marked xfail).

Aggregates-only release (`release = "aggregates"`, `min_group_size = k`) must release only summaries of groups of at
least k rows. The rule in `policies/src/enforce/release.rs` checks the size of the GROUP BY group, but
  1. not what the aggregate functions return: `array_agg`, `string_agg`, `first_value`, `nth_value`... hand out the
     group's rows verbatim (`array_agg(struct(...))` over the whole table, then `unnest`, is the dataset row by row);
  2. not which rows an aggregate reads: `max(x) FILTER (WHERE <one row>)` or `sum(CASE WHEN <one row> THEN x END)`
     over a group of all rows returns that one row's value;
  3. not the subqueries below (or inside) the protected aggregate: `restricted_below` walks the input chain with
     `apply` (no subqueries) and the final check `Jump`s over the protected aggregate, so a scalar subquery there reads
     the aggregates-only dataset unaggregated and its value comes out as a group key, an aggregate argument or a
     yes/no oracle in WHERE.
The probes target one row by its `admitted_at` (unique per row) and compare the answers for two visible rows whose
`hba1c` differ: an answer that depends on which single row was named releases that row.

Audit: failed authentication must be audited on every RPC (it is for GetFlightInfo, DoGet, GetTables...), but
Handshake, DoPut (parameter binding) and ClosePreparedStatement authenticate without writing an entry.

The aggregates-only dataset is registered on the scratch server over the demo's own Parquet file and consent registry,
for an org of its own; the two target subjects are reserved with `take_subject`, so no other test changes their
consent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import PURPOSE, REGISTRY, Gateway, call_options, poll_until
from test_flight_sql import (_bytes_field, adbc_connect, expect_sql_error, flight_sql_command, run_sql, scalar,
                             wait_for_principal)
from test_sql_side_channels import Response, Value, respond

AGG = "sqla_patients_agg"
AGG_ORG = "sqla-org"
AGG_TRAINER = "sqla-trainer"
MIN_GROUP = 10
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------------------- fixture

@dataclass
class Target:
    """One visible row of the aggregates-only dataset, named by its admitted_at."""
    subject: str
    value: Value
    hba1c: float
    diagnosis: str

    def sql(self, template: str) -> str:
        return self.value.sql(template.replace("{T}", AGG))


@dataclass
class Agg:
    key: str
    visible_rows: int
    a: Target
    b: Target


def _target(rows: list[dict[str, Any]], subject: str) -> Target | None:
    for r in sorted(rows, key=lambda r: r["admitted_at"]):
        h = r["hba1c"]
        if h is None or (isinstance(h, float) and math.isnan(h)):
            continue
        micros = (r["admitted_at"] - EPOCH) // timedelta(microseconds=1)
        return Target(subject, Value(micros, r["admitted_at"]), h, r["diagnosis"])
    return None


@pytest.fixture(scope="module")
def agg(scratch_gateway: Gateway, tmp_path_factory) -> Agg:
    """`sqla_patients_agg`: the demo's patients released as aggregates only (groups of at least 10 rows), permitted to
    an org of its own; and two reserved consented subjects whose first rows have different hba1c."""
    gw = scratch_gateway
    ref = gw.reference
    targets: list[Target] = []
    while len(targets) < 2:
        subject = gw.take_subject(consented=True)
        t = _target(ref.by_subject[subject], subject)
        if t is not None and all(t.hba1c != o.hba1c for o in targets):
            targets.append(t)
    manifest = tmp_path_factory.mktemp("sqla") / f"{AGG}.toml"
    manifest.write_text(f"""name = "{AGG}"
location = "file://{ref.parquet_path.parent.resolve()}/"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
consent_registry = "{REGISTRY}"
purposes = ["{PURPOSE}"]
release = "aggregates"
min_group_size = {MIN_GROUP}

[columns]
patient_id  = {{ class = "identifier" }}
full_name   = {{ class = "direct-identifier" }}
birth_date  = {{ class = "quasi-identifier", generalise = "year" }}
postcode    = {{ class = "quasi-identifier", generalise = "prefix:2" }}
diagnosis   = {{ class = "sensitive" }}
hba1c       = {{ class = "sensitive" }}
admitted_at = {{ class = "non-personal" }}
""")
    gw.cli("dataset", "register", "--manifest", str(manifest))
    key = gw.add_principal(AGG_TRAINER, AGG_ORG, "NL", "trainer")
    gw.cli("permit", "add", "--dataset", AGG, "--org", AGG_ORG, "--purpose", PURPOSE)
    wait_for_principal(lambda: adbc_connect(gw, key=key), f"{AGG_TRAINER} may query {AGG}",
                       check=lambda c: scalar(c, f"SELECT count(*) FROM {AGG}") >= MIN_GROUP)
    with adbc_connect(gw, key=key) as c:
        n = scalar(c, f"SELECT count(*) FROM {AGG}")
    return Agg(key=key, visible_rows=n, a=targets[0], b=targets[1])


@pytest.fixture(scope="module")
def conn(scratch_gateway: Gateway, agg: Agg):
    c = adbc_connect(scratch_gateway, key=agg.key)
    yield c
    c.close()


def _ask(conn, target: Target, template: str) -> tuple[Response, str | None]:
    return respond(conn, target.sql(template), target.value.literals)


def expect_refused(conn, sql: str) -> None:
    """`sql` must fail with PERMISSION_DENIED or INVALID_ARGUMENT; a success is reported briefly (the answer of a
    successful attack can be the whole dataset)."""
    resp, _ = respond(conn, sql)
    if resp.ok:
        values = _flatten(resp.rows)
        pytest.fail(f"released {len(resp.rows)} row(s) holding {len(values)} values, e.g. {values[:4]!r:.400}\n"
                    f"  SQL: {sql}")
    assert resp.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), f"{sql}: {resp}"


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [v for item in x.values() for v in _flatten(item)]
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _flatten(item)]
    return [x]


def assert_single_row_not_released(conn, agg: Agg, template: str) -> None:
    """The answer must not depend on which single row the statement names: rows A and B (different hba1c) answer
    alike, and neither answer carries the named row's admitted_at or hba1c."""
    answers = {}
    for name, t in (("A", agg.a), ("B", agg.b)):
        resp, _ = _ask(conn, t, template)
        if resp.ok:
            values = _flatten(resp.rows)
            assert t.value.when not in values, f"row {name}'s admitted_at was released: {t.sql(template)} -> {resp.rows}"
        answers[name] = resp
    assert answers["A"] == answers["B"], (
        f"the answer depends on the single row the statement names (hba1c {agg.a.hba1c} vs {agg.b.hba1c}):\n"
        f"  A: {answers['A']}\n  B: {answers['B']}\n  SQL: {agg.a.sql(template)}")
    if answers["A"].ok:
        released = _flatten(answers["A"].rows)
        assert agg.a.hba1c not in released or agg.b.hba1c not in released, (
            f"both rows' hba1c are in the answer: {answers['A'].rows}")


# ------------------------------------------------------------------------------------------- the dataset is usable

def test_fixture_group_by_works_and_rows_are_refused(conn, agg: Agg):
    """Sanity: GROUP BY summaries are released, a plain SELECT is refused."""
    t = run_sql(conn, f"SELECT diagnosis, count(*) AS n FROM {AGG} GROUP BY diagnosis")
    assert t.num_rows > 0 and min(t.column("n").to_pylist()) >= MIN_GROUP
    assert sum(t.column("n").to_pylist()) == agg.visible_rows
    expect_sql_error(conn, f"SELECT hba1c FROM {AGG}", {"PERMISSION_DENIED"})


# ------------------------------------------------------------- 1. aggregates that return the group's rows verbatim

ROW_RETURNING = {
    # every row, every released column, in one value; 14 007 rows on the demo
    "array_agg-struct": f"SELECT array_agg(struct(patient_id, birth_date, postcode, diagnosis, hba1c, admitted_at)) "
                        f"AS v FROM {AGG}",
    # ... and back to rows
    "unnest-array_agg": f"SELECT unnest(array_agg(admitted_at)) AS v FROM {AGG}",
    "string_agg": f"SELECT diagnosis, string_agg(CAST(hba1c AS VARCHAR), ',') AS v FROM {AGG} GROUP BY diagnosis",
    "array_agg-distinct": f"SELECT array_agg(DISTINCT admitted_at) AS v FROM {AGG}",
    # one chosen row per query: enumerate the table with n = 1, 2, 3...
    "nth_value": f"SELECT nth_value(struct(patient_id, hba1c, admitted_at), 3 ORDER BY admitted_at) AS v FROM {AGG}",
    "first_value": f"SELECT first_value(struct(patient_id, hba1c, admitted_at) ORDER BY admitted_at) AS v FROM {AGG}",
    "last_value": f"SELECT last_value(struct(patient_id, hba1c, admitted_at) ORDER BY admitted_at) AS v FROM {AGG}",
}


@pytest.mark.parametrize("name", list(ROW_RETURNING))
def test_aggregates_that_return_rows_are_refused(conn, agg: Agg, name):
    """Observed: each returns rows of the aggregates-only dataset (array_agg: all of them, in one result row, which
    also escapes sql.max_rows). Fix: allow only summarising functions in `enforce_release` (release.rs)."""
    expect_refused(conn, ROW_RETURNING[name])


# --------------------------------------------------------- 2. an aggregate over one chosen row of a large group

ONE_ROW_AGGREGATES = {
    "max-filter": "SELECT max(hba1c) FILTER (WHERE admitted_at = TIMESTAMP {ts}) AS v, count(*) AS n FROM {T}",
    "min-filter": "SELECT min(hba1c) FILTER (WHERE admitted_at = TIMESTAMP {ts}) AS v FROM {T}",
    "sum-case": "SELECT sum(CASE WHEN admitted_at = TIMESTAMP {ts} THEN hba1c END) AS v, count(*) AS n FROM {T}",
    "avg-case-grouped": "SELECT diagnosis, avg(CASE WHEN admitted_at = TIMESTAMP {ts} THEN hba1c END) AS v "
                        "FROM {T} GROUP BY diagnosis",
}


@pytest.mark.parametrize("name", list(ONE_ROW_AGGREGATES))
def test_an_aggregate_over_one_chosen_row_is_not_released(conn, agg: Agg, name):
    """Observed: the whole table is one group of >= k rows, so it is released, but the aggregate read one row:
    `max(hba1c) FILTER (WHERE admitted_at = <row A>)` returns row A's hba1c. Fix (release.rs): count the rows each
    aggregate actually reads (FILTER and non-NULL argument) against min_group_size, or refuse FILTER and
    expressions other than bare columns as aggregate arguments on aggregates-only datasets."""
    assert_single_row_not_released(conn, agg, ONE_ROW_AGGREGATES[name])


# --------------------------------------------------- 3. subqueries below or inside the protected aggregate

SUBQUERY = "(SELECT b.hba1c FROM {T} b WHERE b.admitted_at = TIMESTAMP {ts})"
SUBQUERIES = {
    # the raw value becomes the group key of a group of all rows
    "group-key": f"SELECT g, count(*) AS n FROM (SELECT {SUBQUERY} AS g FROM {{T}}) s GROUP BY g",
    # ... or the argument of an aggregate
    "aggregate-argument": f"SELECT count(*) AS n, max({SUBQUERY}) AS v FROM {{T}}",
    # ... or a yes/no oracle (binary search on the value)
    "where-oracle": f"SELECT count(*) AS n FROM {{T}} WHERE {SUBQUERY} > {{mid}}",
    "exists-oracle": "SELECT count(*) AS n FROM {T} WHERE EXISTS "
                     "(SELECT 1 FROM {T} b WHERE b.admitted_at = TIMESTAMP {ts} AND b.hba1c > {mid})",
}


@pytest.mark.parametrize("name", list(SUBQUERIES))
def test_subqueries_under_a_protected_aggregate_read_no_single_row(conn, agg: Agg, name):
    """Observed: `SELECT g, count(*) FROM (SELECT (SELECT b.hba1c FROM agg b WHERE b.admitted_at = <row A>) AS g
    FROM agg) s GROUP BY g` answers row A's hba1c with n = every row. Fix (release.rs): walk the chain below an
    aggregate and the aggregate's own expressions with subqueries (`apply_with_subqueries`), and let the final
    check `Jump` only over the protected aggregate's plain input chain, not over subqueries in it."""
    mid = (agg.a.hba1c + agg.b.hba1c) / 2
    assert_single_row_not_released(conn, agg, SUBQUERIES[name].replace("{mid}", repr(mid)))


def test_rows_can_be_enumerated_through_a_scalar_subquery(conn, agg: Agg):
    """The same hole without knowing any value: OFFSET n walks the dataset row by row, every column at once."""
    sql = (f"SELECT g, count(*) AS n FROM (SELECT (SELECT struct(b.patient_id, b.hba1c, b.diagnosis, b.admitted_at) "
           f"FROM {AGG} b ORDER BY b.admitted_at LIMIT 1 OFFSET {{k}}) AS g FROM {AGG}) s GROUP BY g")
    for k in (0, 1):
        expect_refused(conn, sql.format(k=k))


# ------------------------------------------------------------------------------- audit of failed authentication

def _unauthenticated_entries(gw: Gateway) -> int:
    return len(gw.cli_json("audit", "list", "--principal", "(unauthenticated)", "--limit", "100000"))


def _bad_options() -> flight.FlightCallOptions:
    return call_options("psk_" + "0" * 64)


def _do_put(client: flight.FlightClient) -> None:
    desc = flight_sql_command("CommandPreparedStatementQuery", _bytes_field(1, b"not-a-handle"))
    writer, reader = client.do_put(desc, pa.schema([("p", pa.int64())]), _bad_options())
    try:
        writer.write_table(pa.table({"p": [1]}))
        writer.done_writing()
        reader.read()
    finally:
        writer.close()


def _close(client: flight.FlightClient) -> None:
    body = flight_sql_command("ActionClosePreparedStatementRequest", _bytes_field(1, b"not-a-handle")).command
    list(client.do_action(flight.Action("ClosePreparedStatement", body), _bad_options()))


def _handshake(client: flight.FlightClient) -> None:
    client.authenticate_basic_token("trainer-de", "psk_" + "0" * 64)


UNAUDITED = {"DoPut-bind-parameters": _do_put, "ClosePreparedStatement": _close, "Handshake": _handshake}


@pytest.mark.parametrize("rpc", list(UNAUDITED))
def test_failed_authentication_is_audited(gateway: Gateway, client, rpc):
    """Observed: a wrong key is refused (UNAUTHENTICATED) but no audit entry is written, unlike GetFlightInfo. Fix:
    authenticate through `SqlService::authenticated` in do_put_prepared_statement_query and
    do_action_close_prepared_statement (flight_sql.rs), and audit failures in `FlightHandler::handshake`."""
    before = _unauthenticated_entries(gateway)
    with pytest.raises(flight.FlightUnauthenticatedError):
        UNAUDITED[rpc](client)
    poll_until(lambda: _unauthenticated_entries(gateway) > before, deadline=2.0,
               what=f"an audit entry for the failed {rpc}")
