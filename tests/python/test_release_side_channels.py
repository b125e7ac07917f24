"""No error side channel under suppression (issue #15, item 4).

A k-anonymity floor (`k_anonymity = K`) and an aggregates-only release (`release = "aggregates"`, groups under
`min_group_size` suppressed) remove rows and groups *above* the consent gate, with ordinary plan nodes. A user
expression that can fail (`1/(CASE WHEN <rare combination> THEN 0 ELSE 1 END) = 1`) must never be evaluated on what
they remove, or its failure tells that a suppressed row exists. For each probe the answer (rows, or gRPC code and
message with the typed literals masked) is compared between a combination that exists but is suppressed and one
found nowhere: they must be identical. Each probe is also run on a combination the caller may see, where it must
fail: that checks the probe, not the server.

Probes, over plain Flight (JSON command `filter`, and `aggregate` with a `filter`) and over Flight SQL (WHERE, HAVING,
GROUP BY expressions):
  - `kanon_patients` (the demo with a floor of K on (birth year, postcode prefix)): filters run only on rows the
    floor releases, so every probe succeeds alike;
  - `agg_patients` (the demo released as aggregates of at least 10 rows): HAVING runs only on released groups;
    WHERE and GROUP BY expressions, which must run before groups exist, are refused with INVALID_ARGUMENT when they
    can fail on a row (whatever the data), and run when they cannot.

The server is a module-scoped demo of its own, whose consent no other test changes, so the reference model says
exactly which combinations are released, suppressed or absent.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from conftest import (DATASET, PURPOSE, Gateway, _gateway_fixture, call_options, expect_status, generalise_year,
                      poll_until, prefix2, server_message)
from test_flight_sql import adbc_connect, scalar
from test_sql_side_channels import Response, normalise, respond

KANON = "kanon_patients"
AGG = "agg_patients"
K = 5
MIN_GROUP = 10
ORG = "dkfz"  # trainer-de's organisation


@pytest.fixture(scope="module")
def gw(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _gateway_fixture(passerelle_bin, tmp_path_factory, "release")


def _register(gw: Gateway, name: str, extra: str, tmp: Path) -> None:
    manifest = gw.reference.manifest_path.read_text()
    lines = [ln for ln in manifest.splitlines() if not ln.startswith("name")]
    text = f'name = "{name}"\n' + "\n".join(lines)
    head, sep, columns = text.partition("[columns]")
    path = tmp / f"{name}.toml"
    path.write_text(f"{head}{extra}\n{sep}{columns}")
    gw.cli("dataset", "register", "--manifest", str(path))
    gw.cli("permit", "add", "--dataset", name, "--org", ORG, "--purpose", PURPOSE)


@dataclass(frozen=True)
class Combo:
    """A (birth year, postcode prefix) pair for K-floor probes, or (diagnosis, postcode prefix) for aggregates."""
    a: Any
    b: str

    @property
    def literals(self) -> tuple[str, ...]:
        return tuple(str(x) for x in (self.a, self.b))


@dataclass
class World:
    key: str
    kanon: dict[str, Combo]  # visible (>= K rows), suppressed (1..K-1 rows), absent (0 rows)
    agg: dict[str, Combo]  # visible (>= MIN_GROUP rows), suppressed (1..MIN_GROUP-1 rows), absent
    suppressed_group_size: int  # rows of agg["suppressed"]


def _pick(counts: Counter, counts_all: Counter, floor: int) -> dict[str, Combo]:
    """A combination of released rows above the floor, one below it, and one found in no raw row (consented or not;
    a postcode prefix the data never has if every pair of known values occurs)."""
    visible = max(counts, key=lambda c: (counts[c], repr(c)))
    suppressed = sorted((c for c, n in counts.items() if 0 < n < floor), key=repr)
    firsts = sorted({a for a, _ in counts_all if a is not None}, key=repr)
    seconds = sorted({b for _, b in counts_all if b is not None}) + ["00", "99", "ZZ"]
    absent = next((a, b) for a in firsts for b in seconds if counts_all[(a, b)] == 0)
    assert counts[visible] >= floor and suppressed, "the demo has combinations on both sides of the floor"
    return {"visible": Combo(*visible), "suppressed": Combo(*suppressed[0]), "absent": Combo(*absent)}


@pytest.fixture(scope="module")
def world(gw: Gateway, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("release-manifests")
    _register(gw, KANON, f"k_anonymity = {K}", tmp)
    _register(gw, AGG, f'release = "aggregates"\nmin_group_size = {MIN_GROUP}', tmp)
    key = gw.keys["trainer-de"]
    with adbc_connect(gw, key=key) as c:
        poll_until(lambda: _try_count(c, KANON) and _try_count(c, AGG), what="the probe datasets are usable")
    ref = gw.reference
    rows = ref.consented_rows(PURPOSE)
    everything = ref.rows
    qi = Counter((generalise_year(r["birth_date"]), prefix2(r["postcode"])) for r in rows)
    # Absent means absent among all raw rows, consented or not.
    qi_all = Counter((generalise_year(r["birth_date"]), prefix2(r["postcode"])) for r in everything)
    kanon = _pick(qi, qi_all, K)
    groups = Counter((r["diagnosis"], prefix2(r["postcode"])) for r in rows)
    groups_all = Counter((r["diagnosis"], prefix2(r["postcode"])) for r in everything)
    agg = _pick(groups, groups_all, MIN_GROUP)
    return World(key=key, kanon=kanon, agg=agg, suppressed_group_size=groups[(agg["suppressed"].a,
                                                                                agg["suppressed"].b)])


def _try_count(conn, table: str) -> bool:
    try:
        return scalar(conn, f"SELECT count(*) FROM {table}") > 0 if table == KANON else \
            scalar(conn, f"SELECT count(*) FROM {table} GROUP BY diagnosis LIMIT 1") > 0
    except Exception:
        return False


def _kanon_case(c: Combo) -> str:
    return f"CASE WHEN birth_date = DATE '{c.a.isoformat()}' AND postcode = '{c.b}' THEN 0 ELSE 1 END"


def _agg_case(c: Combo) -> str:
    return f"CASE WHEN diagnosis = '{c.a}' AND postcode = '{c.b}' THEN 0 ELSE 1 END"


# ------------------------------------------------------------------------------------------------- plain Flight

def flight_respond(gw: Gateway, key: str, command: dict[str, Any], literals: tuple[str, ...]) -> Response:
    """The answer to a JSON command: its rows (sorted), or the exception class and the server's message with the
    typed literals masked."""
    client = gw.connect()
    opts = call_options(key)
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)), opts)
        table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    except Exception as exc:  # noqa: BLE001 - the class is part of the answer
        return Response(False, (), type(exc).__name__, None, normalise(server_message(exc), literals))
    finally:
        client.close()
    rows = tuple(sorted((tuple(r.values()) for r in table.to_pylist()), key=repr))
    return Response(True, rows, None, None, None)


FLIGHT_PROBES = {
    "kanon-filter": lambda w, c: (w.kanon, {"dataset": KANON, "filter": f"1/({_kanon_case(c)}) = 1"}),
    "kanon-filter-other-columns": lambda w, c: (
        w.kanon, {"dataset": KANON, "columns": ["hba1c"], "filter": f"hba1c IS NULL OR 1/({_kanon_case(c)}) > 0"}),
    "kanon-aggregate-filter": lambda w, c: (w.kanon, {
        "dataset": KANON, "filter": f"1/({_kanon_case(c)}) = 1",
        "aggregate": {"group_by": ["diagnosis"], "measures": [{"func": "count"}]}}),
    "agg-aggregate-filter": lambda w, c: (w.agg, {
        "dataset": AGG, "filter": f"1/({_agg_case(c)}) = 1",
        "aggregate": {"group_by": ["diagnosis"], "measures": [{"func": "count"}]}}),
}


@pytest.mark.parametrize("name", list(FLIGHT_PROBES))
def test_plain_flight_answers_alike_for_suppressed_and_absent_combinations(gw: Gateway, world: World, name):
    combos, _ = FLIGHT_PROBES[name](world, world.kanon["visible"])
    answers = {}
    for which in ("suppressed", "absent"):
        combo = combos[which]
        _, cmd = FLIGHT_PROBES[name](world, combo)
        answers[which] = flight_respond(gw, world.key, cmd, combo.literals)
    assert answers["suppressed"] == answers["absent"], (
        f"{name}: the answer tells whether a suppressed row exists:\n  suppressed: {answers['suppressed']!s:.600}\n"
        f"  absent:     {answers['absent']!s:.600}")


@pytest.mark.parametrize("name", ["kanon-filter", "kanon-filter-other-columns", "kanon-aggregate-filter"])
def test_plain_flight_probe_fails_on_a_visible_combination(gw: Gateway, world: World, name):
    """The probe is sound: on a combination the caller sees, the division by zero does fail."""
    _, cmd = FLIGHT_PROBES[name](world, world.kanon["visible"])
    resp = flight_respond(gw, world.key, cmd, ())
    assert not resp.ok and resp.cls == "ArrowInvalid" and "zero" in (resp.message or "").lower(), resp


def test_plain_flight_aggregate_filter_that_can_fail_is_refused_with_a_reason(gw: Gateway, world: World):
    _, cmd = FLIGHT_PROBES["agg-aggregate-filter"](world, world.agg["visible"])
    msg = expect_status("INVALID_ARGUMENT", lambda: flight_respond_raising(gw, world.key, cmd))
    assert "aggregates only" in msg and "could fail on a single row" in msg, msg


def flight_respond_raising(gw: Gateway, key: str, command: dict[str, Any]) -> Any:
    client = gw.connect()
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)), call_options(key))
        return client.do_get(info.endpoints[0].ticket, call_options(key)).read_all()
    finally:
        client.close()


def test_plain_flight_aggregate_filter_that_cannot_fail_runs(gw: Gateway, world: World):
    c = world.agg["visible"]
    cmd = {"dataset": AGG, "filter": f"NOT (diagnosis = '{c.a}' AND postcode = '{c.b}') AND hba1c > 0",
           "aggregate": {"group_by": ["diagnosis"], "measures": [{"func": "count"}]}}
    resp = flight_respond(gw, world.key, cmd, ())
    assert resp.ok and resp.rows, resp
    assert all(n >= MIN_GROUP for _, n in resp.rows), resp.rows


# ------------------------------------------------------------------------------------------------------ Flight SQL

SQL_PROBES = {
    # k-anonymity floor: the statement's expressions run above the floor
    "kanon-where": ("kanon", "SELECT count(*) AS n FROM {T} WHERE 1/({case}) = 1"),
    "kanon-where-rows": ("kanon", "SELECT patient_id, hba1c FROM {T} WHERE 1/({case}) = 1"),
    "kanon-group-by-expression": ("kanon", "SELECT count(*) AS n FROM {T} GROUP BY 1/({case})"),
    "kanon-having": ("kanon", "SELECT birth_date, postcode, count(*) AS n FROM {T} GROUP BY birth_date, postcode "
                              "HAVING 1/({case}) = 1"),
    # aggregates only: HAVING runs on released groups; WHERE / GROUP BY that can fail are refused
    "agg-having": ("agg", "SELECT diagnosis, postcode, count(*) AS n FROM {T} GROUP BY diagnosis, postcode "
                          "HAVING 1/({case}) = 1"),
    "agg-where": ("agg", "SELECT diagnosis, count(*) AS n FROM {T} WHERE 1/({case}) = 1 GROUP BY diagnosis"),
    "agg-group-by-expression": ("agg", "SELECT count(*) AS n FROM {T} GROUP BY 1/({case})"),
    "agg-cast-in-where": ("agg", "SELECT count(*) AS n FROM {T} "
                                 "WHERE CAST(CASE WHEN {cond} THEN 'x' ELSE '1' END AS INT) = 1"),
}


def _sql(world: World, name: str, combo: Combo) -> str:
    kind, template = SQL_PROBES[name]
    case = _kanon_case(combo) if kind == "kanon" else _agg_case(combo)
    cond = case.removeprefix("CASE WHEN ").split(" THEN ")[0]
    return template.format(T=KANON if kind == "kanon" else AGG, case=case, cond=cond)


@pytest.fixture(scope="module")
def conn(gw: Gateway, world: World):
    c = adbc_connect(gw, key=world.key)
    yield c
    c.close()


@pytest.mark.parametrize("name", list(SQL_PROBES))
def test_sql_answers_alike_for_suppressed_and_absent_combinations(conn, world: World, name):
    combos = world.kanon if SQL_PROBES[name][0] == "kanon" else world.agg
    answers = {w: respond(conn, _sql(world, name, combos[w]), combos[w].literals)[0] for w in ("suppressed", "absent")}
    assert answers["suppressed"] == answers["absent"], (
        f"{name}: the answer tells whether a suppressed row exists:\n  suppressed: {answers['suppressed']!s:.600}\n"
        f"  absent:     {answers['absent']!s:.600}\n  SQL: {_sql(world, name, combos['suppressed'])}")


@pytest.mark.parametrize("name", ["kanon-where", "kanon-where-rows", "kanon-group-by-expression", "kanon-having",
                                  "agg-having"])
def test_sql_probe_fails_on_a_visible_combination(conn, world: World, name):
    combos = world.kanon if SQL_PROBES[name][0] == "kanon" else world.agg
    resp, raw = respond(conn, _sql(world, name, combos["visible"]))
    assert not resp.ok and resp.code == "INVALID_ARGUMENT" and "zero" in raw.lower(), resp


@pytest.mark.parametrize("name", ["agg-where", "agg-group-by-expression", "agg-cast-in-where"])
def test_fallible_expressions_before_group_suppression_are_refused_with_a_reason(conn, world: World, name):
    resp, raw = respond(conn, _sql(world, name, world.agg["visible"]))
    assert not resp.ok and resp.code == "INVALID_ARGUMENT", resp
    assert "aggregates only" in raw and "could fail on a single row" in raw, raw
    assert world.agg["visible"].a not in raw, f"the message quotes a typed value: {raw}"


def test_having_on_a_suppressed_group_size_answers_like_a_size_no_group_has(conn, world: World):
    """`HAVING 1/(count(*) - c)` fails only if a group of c rows is evaluated: suppressed groups are not."""
    sql = "SELECT diagnosis, postcode, count(*) AS n FROM {T} GROUP BY diagnosis, postcode HAVING 1/(count(*) - {c}) <> 0"
    present = respond(conn, sql.format(T=AGG, c=world.suppressed_group_size))[0]
    absent = respond(conn, sql.format(T=AGG, c=0))[0]
    assert present == absent, f"{present!s:.400}\n{absent!s:.400}"
    assert present.ok and all(r[-1] >= MIN_GROUP for r in present.rows)


def test_infallible_where_and_group_by_still_work_on_aggregates(conn, world: World):
    c = world.agg["visible"]
    t = respond(conn, f"SELECT CASE WHEN hba1c > 7 THEN 'high' ELSE 'low' END AS level, count(*) AS n, avg(hba1c) "
                      f"FROM {AGG} WHERE postcode <> '{c.b}' AND CAST(hba1c AS DOUBLE) / 2 > 0 "
                      f"AND coalesce(diagnosis, '') LIKE '%' GROUP BY 1")[0]
    assert t.ok and len(t.rows) == 2 and all(r[1] >= MIN_GROUP for r in t.rows), t


def test_prepared_statements_with_parameters_work_on_aggregates(gw: Gateway, world: World):
    """Parameters are values: a prepared GROUP BY with `$1` in WHERE is planned, bound and answered."""
    with adbc_connect(gw, key=world.key) as c:
        cur = c.cursor()
        cur.execute(f"SELECT diagnosis, count(*) AS n FROM {AGG} WHERE hba1c > $1 GROUP BY diagnosis", parameters=(7.0,))
        t = cur.fetch_arrow_table()
    assert t.num_rows > 0 and min(t.column("n").to_pylist()) >= MIN_GROUP


def test_floor_results_are_unchanged_by_the_barrier(gw: Gateway, conn, world: World):
    """The floor still counts the released view, in SQL and over plain Flight with a filter."""
    rows = gw.reference.consented_rows(PURPOSE)
    combos = Counter((generalise_year(r["birth_date"]), prefix2(r["postcode"])) for r in rows)
    assert scalar(conn, f"SELECT count(*) FROM {KANON}") == sum(n for n in combos.values() if n >= K)
    # Plain Flight counts the filtered stream: combinations of at least K rows among the rows passing the filter.
    high = Counter((generalise_year(r["birth_date"]), prefix2(r["postcode"])) for r in rows
                   if r["hba1c"] is not None and r["hba1c"] > 8)
    resp = flight_respond(gw, world.key, {"dataset": KANON, "filter": "hba1c > 8"}, ())
    assert resp.ok and len(resp.rows) == sum(n for n in high.values() if n >= K)


def test_datasets_without_a_floor_plan_as_before(conn):
    """No barrier and no refusal where nothing is suppressed: the probe fails only where it divides by zero."""
    assert scalar(conn, f"SELECT count(*) FROM {DATASET} WHERE 1/(CASE WHEN hba1c > 100 THEN 0 ELSE 1 END) = 1") > 0
