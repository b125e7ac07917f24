"""Adversarial tests of federated aggregate push-down (gateway/src/federated_sql.rs `push_aggregates`).

trainer-de at its home node gw-de asks federated SQL (ADBC) or plain Flight `aggregate` commands over the federations
of test_federation.py: `eu_sql` (rows-release parts at gw-fr and gw-de) and `eu_agg` (gw-fr aggregates-only with a
floor of AGG_FLOOR rows, gw-de rows), plus `eu_null` defined here (gw-fr aggregates-only with `diagnosis` and `hba1c`
nullified, gw-de rows), which gives NULL groups and all-NULL measures at one node.

Every expected value is computed independently: from each node's own plain-Flight aggregate (`local_aggregate`, the
node's trainer-de, the node's own floor) combined in Python, so a federated answer must equal what the nodes release
on their own, no more (no group below gw-fr's floor, no row of an aggregates-only part) and no less.

Tests marked "BUG" fail against the reviewed binary; the docstring says why and what the fix is.
"""

from __future__ import annotations

from typing import Any, Iterable

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from test_federation import (AGG_FEDERATION, AGG_FLOOR, ORG, PURPOSE, SQL_FEDERATION, STEWARD, Federation,  # noqa: F401
                             adbc_home, agg_parts, fed, local_aggregate, manifest_json, poll_until,
                             register_aggregable_part, sql, sql_parts)
from test_flight_sql import parse_adbc_error

NULL_FEDERATION = "eu_null"
NULL_NODES = {"gw-fr": "null_fr", "gw-de": "null_de"}
AGG_NODES = {"gw-fr": "agg_fr", "gw-de": "agg_de"}
SQL_NODES = {"gw-fr": "sql_fr", "gw-de": "sql_de"}
HIDDEN = "full_name"  # the demo's direct identifier: never sent, never named in a suggestion

MEASURES = [{"func": "count"}, {"func": "count", "column": "hba1c"}, {"func": "sum", "column": "hba1c"}]


# ======================================================================================================================
# Helpers
# ======================================================================================================================

def sql_failure(conn, text: str, parameters: Iterable[Any] | None = None):
    """Run `text`; require a DB-API error and return it parsed (code, message)."""
    try:
        with conn.cursor() as cur:
            if parameters is None:
                cur.execute(text)
            else:
                cur.execute(text, parameters=parameters)
            got = cur.fetch_arrow_table()
    except dbapi.Error as exc:
        return parse_adbc_error(exc)
    pytest.fail(f"{text!r} should be refused, it returned {got.num_rows} rows: {got.slice(0, 5).to_pylist()}")


def sql_params(conn, text: str, parameters: Iterable[Any]) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(text, parameters=parameters)
        return cur.fetch_arrow_table()


def combine_local(fed: Federation, parts: dict[str, str], group_by: list[str], filter: str | None) -> dict[tuple, dict]:
    """What each node releases on its own for GROUP BY `group_by` (count(*), count(hba1c), sum(hba1c)) under `filter`,
    combined as SQL would over the union of the released groups."""
    out: dict[tuple, dict] = {}
    for node_id, dataset in parts.items():
        table = local_aggregate(fed.nodes[node_id], dataset, {"group_by": group_by, "measures": MEASURES}, filter)
        for r in table.to_pylist():
            key = tuple(r[g] for g in group_by)
            e = out.setdefault(key, {"n": 0, "c": 0, "s": None})
            e["n"] += r["count(*)"]
            e["c"] += r["count(hba1c)"]
            if r["sum(hba1c)"] is not None:
                e["s"] = (e["s"] or 0.0) + r["sum(hba1c)"]
    return out


def assert_matches(got: pa.Table, expected: dict[tuple, dict], group_by: list[str], what: str) -> None:
    rows = got.to_pylist()
    keys = [tuple(r[g] for g in group_by) for r in rows]
    assert len(keys) == len(set(keys)), f"{what}: a group appears twice: {sorted(keys, key=str)}"
    assert sorted(keys, key=str) == sorted(expected, key=str), \
        f"{what}: groups {sorted(keys, key=str)[:20]} vs the nodes' own {sorted(expected, key=str)[:20]}"
    for r, k in zip(rows, keys):
        e = expected[k]
        assert r["n"] == e["n"] and r["c"] == e["c"], (what, k, r, e)
        if e["s"] is None:
            assert r["s"] is None and r["a"] is None, (what, k, r, e)
        else:
            assert r["s"] == pytest.approx(e["s"], rel=1e-9), (what, k, r, e)
            assert r["a"] == pytest.approx(e["s"] / e["c"], rel=1e-9), (what, k, r, e)


def assert_refused_by_fr(err, what: str) -> None:
    assert err.code == "PERMISSION_DENIED", f"{what}: {err}"
    assert "gw-fr" in err.message and "aggregates only" in err.message, f"{what}: {err}"


def select(group_by: list[str], federation: str, where: str | None) -> str:
    groups = ", ".join(group_by)
    head = f"{groups}, " if groups else ""
    text = f"SELECT {head}count(*) AS n, count(hba1c) AS c, sum(hba1c) AS s, avg(hba1c) AS a FROM {federation}"
    if where:
        text += f" WHERE {where}"
    if groups:
        text += f" GROUP BY {groups}"
    return text


@pytest.fixture(scope="module")
def null_parts(fed: Federation) -> None:
    """`eu_null`: gw-fr's part is aggregates-only (floor AGG_FLOOR) with `diagnosis` and `hba1c` nullified (every
    gw-fr row falls in the NULL diagnosis group, with no hba1c); gw-de's is the demo manifest (rows)."""
    nullified = {"diagnosis": {"class": "sensitive", "mask": "nullify"}, "hba1c": {"class": "sensitive", "mask": "nullify"}}
    for node_id, name in NULL_NODES.items():
        fr = node_id == "gw-fr"
        register_aggregable_part(fed.nodes[node_id], name, NULL_FEDERATION, nullified if fr else None, aggregates_only=fr)


# ======================================================================================================================
# (b) + (c) + (d): a pushed aggregate equals what each node releases on its own, combined
# ======================================================================================================================

# Fine groups and rare filters: many of gw-fr's groups are under its floor and must stay out of every answer.
CASES = [
    ([], None),
    ([], "hba1c > 14.5"),                       # rare: gw-fr's single group is below the floor
    (["diagnosis"], "hba1c > 13"),
    (["birth_date", "diagnosis"], None),
    (["postcode", "birth_date"], "hba1c BETWEEN 6.5 AND 7.25 AND diagnosis <> 'I10'"),
    (["patient_id"], None),                     # one group per subject: nothing of gw-fr may come out
    (["diagnosis"], "admitted_at >= TIMESTAMP '2021-06-01 00:00:00' AND (hba1c < 5 OR hba1c > 12)"),
]


@pytest.mark.parametrize("group_by,where", CASES, ids=[f"{'+'.join(g) or 'all'}|{w}" for g, w in CASES])
def test_federated_group_by_equals_the_nodes_own_releases(fed: Federation, agg_parts, group_by, where):
    expected = combine_local(fed, AGG_NODES, group_by, where)
    with adbc_home(fed) as conn:
        got = sql(conn, select(group_by, AGG_FEDERATION, where))
    if not group_by:
        # gw-fr's suppressed total is absent, gw-de's is there: count 0 + gw-de's count, never gw-fr's.
        assert got.num_rows == 1
        (key,) = expected
        assert_matches(got, expected, [], "total")
    else:
        assert_matches(got, expected, group_by, f"GROUP BY {group_by} WHERE {where}")


def test_subject_groups_come_from_the_rows_node_only(fed: Federation, agg_parts):
    """GROUP BY patient_id: gw-fr's groups (a subject's few rows) are all below its floor; the answer is exactly
    gw-de's per-subject counts (its pseudonyms for dkfz)."""
    de = local_aggregate(fed.nodes["gw-de"], "agg_de", {"group_by": ["patient_id"], "measures": [{"func": "count"}]})
    fr = local_aggregate(fed.nodes["gw-fr"], "agg_fr", {"group_by": ["patient_id"], "measures": [{"func": "count"}]})
    assert fr.num_rows == 0, "gw-fr released subject-sized groups on its own"
    with adbc_home(fed) as conn:
        got = sql(conn, f"SELECT patient_id, count(*) AS n FROM {AGG_FEDERATION} GROUP BY patient_id HAVING count(*) < 25")
    expected = {r["patient_id"]: r["count(*)"] for r in de.to_pylist() if r["count(*)"] < 25}
    assert {r["patient_id"]: r["n"] for r in got.to_pylist()} == expected


def test_null_groups_and_all_null_measures_combine(fed: Federation, null_parts):
    """gw-fr sends one NULL diagnosis group with count(hba1c) = 0 and sum NULL; gw-de its real groups. The NULL group
    appears once, with gw-fr's count; avg is gw-de's sum over gw-de's count (gw-fr's NULLs count for nothing)."""
    expected = combine_local(fed, NULL_NODES, ["diagnosis"], None)
    assert (None,) in expected and expected[(None,)]["c"] == 0 and expected[(None,)]["s"] is None, expected
    with adbc_home(fed) as conn:
        got = sql(conn, select(["diagnosis"], NULL_FEDERATION, None))
        assert_matches(got, expected, ["diagnosis"], "GROUP BY diagnosis over eu_null")
        total = sql(conn, f"SELECT count(*) AS n, count(diagnosis) AS d, count(hba1c) AS c, avg(hba1c) AS a "
                          f"FROM {NULL_FEDERATION} WHERE diagnosis IS NULL").to_pylist()
    assert total == [{"n": expected[(None,)]["n"], "d": 0, "c": 0, "a": None}], total


def test_empty_input_totals(fed: Federation, agg_parts):
    """No row anywhere: count is 0 (not NULL), sum and avg are NULL; with GROUP BY, no group."""
    with adbc_home(fed) as conn:
        assert sql(conn, select([], AGG_FEDERATION, "false")).to_pylist() == [{"n": 0, "c": 0, "s": None, "a": None}]
        assert sql(conn, select(["diagnosis"], AGG_FEDERATION, "false")).num_rows == 0


@pytest.mark.parametrize("where", [
    "diagnosis = 'O''Brien' OR hba1c > 12",
    "(hba1c > 9 OR hba1c < 5) AND NOT (diagnosis IN ('E11.9', 'I10'))",
    "admitted_at > TIMESTAMP '2021-01-01 00:00:00' + INTERVAL '3 months 2 days'",
    "extract(year FROM admitted_at) = 2022 AND diagnosis ILIKE 'e1%'",
    "CASE WHEN hba1c > 8 THEN 'high' ELSE 'low' END = 'high' AND birth_date >= DATE '1970-01-01'",
])
def test_filters_unparse_to_the_same_predicate_at_every_node(fed: Federation, agg_parts, where):
    """The pushed filter is SQL text re-parsed by each node: the answer equals the nodes' own with the original text."""
    expected = combine_local(fed, AGG_NODES, ["diagnosis"], where)
    with adbc_home(fed) as conn:
        got = sql(conn, select(["diagnosis"], AGG_FEDERATION, where))
    assert_matches(got, expected, ["diagnosis"], where)


def test_shapes_around_pushed_aggregates(fed: Federation, agg_parts):
    """Aliases, a HAVING, a window over the groups, an aggregate over the groups and a UNION ALL of two pushed
    aggregates: each built on exactly the nodes' own groups."""
    all_groups = combine_local(fed, AGG_NODES, ["diagnosis"], None)
    high = combine_local(fed, AGG_NODES, ["diagnosis"], "hba1c > 7")
    counts = {k[0]: v["n"] for k, v in all_groups.items()}
    with adbc_home(fed) as conn:
        aliased = sql(conn, f"SELECT t.diagnosis AS d, count(1) AS n FROM (SELECT * FROM {AGG_FEDERATION}) AS t "
                            f"GROUP BY t.diagnosis")
        assert {r["d"]: r["n"] for r in aliased.to_pylist()} == counts
        having = sql(conn, f"SELECT diagnosis, count(*) AS n FROM {AGG_FEDERATION} GROUP BY diagnosis "
                           f"HAVING count(*) < {AGG_FLOOR}")
        assert having.num_rows == 0, having.to_pylist()
        window = sql(conn, f"SELECT diagnosis, count(*) AS n, sum(count(*)) OVER () AS total FROM {AGG_FEDERATION} "
                           f"GROUP BY diagnosis")
        assert {r["diagnosis"]: (r["n"], r["total"]) for r in window.to_pylist()} == \
            {d: (n, sum(counts.values())) for d, n in counts.items()}
        nested = sql(conn, f"SELECT count(*) AS g, sum(n) AS n FROM (SELECT diagnosis, count(*) AS n "
                           f"FROM {AGG_FEDERATION} GROUP BY diagnosis) s")
        assert nested.to_pylist() == [{"g": len(counts), "n": sum(counts.values())}]
        union = sql(conn, f"SELECT 'all' AS k, diagnosis, count(*) AS n FROM {AGG_FEDERATION} GROUP BY diagnosis "
                          f"UNION ALL SELECT 'high' AS k, diagnosis, count(*) AS n FROM {AGG_FEDERATION} "
                          f"WHERE hba1c > 7 GROUP BY diagnosis")
        assert sorted((r["k"], r["diagnosis"], r["n"]) for r in union.to_pylist()) == sorted(
            [("all", k[0], v["n"]) for k, v in all_groups.items()] + [("high", k[0], v["n"]) for k, v in high.items()])


def test_bound_parameters_reach_every_node(fed: Federation, agg_parts):
    """A prepared statement's $1/$2 in the WHERE of a pushed aggregate are bound before it is pushed; a string
    parameter is a value, never SQL."""
    expected = combine_local(fed, AGG_NODES, ["diagnosis"], "hba1c > 7.5 AND diagnosis <> 'I10'")
    with adbc_home(fed) as conn:
        got = sql_params(conn, select(["diagnosis"], AGG_FEDERATION, "hba1c > $1 AND diagnosis <> $2"), (7.5, "I10"))
        assert_matches(got, expected, ["diagnosis"], "bound $1, $2")
        injected = sql_params(conn, f"SELECT count(*) AS n FROM {AGG_FEDERATION} WHERE diagnosis = $1",
                              ("E11.9' OR '1'='1",))
    assert injected.to_pylist() == [{"n": 0}]


# ======================================================================================================================
# (a): nothing of the aggregates-only part leaves gw-fr other than as floored groups
# ======================================================================================================================

@pytest.mark.parametrize("query", [
    f"SELECT hba1c FROM {AGG_FEDERATION} LIMIT 1",
    f"SELECT DISTINCT diagnosis FROM {AGG_FEDERATION}",
    f"SELECT count(*) FROM (SELECT * FROM {AGG_FEDERATION} LIMIT 10) s",
    f"SELECT count(*) OVER () FROM {AGG_FEDERATION}",
    f"SELECT count(DISTINCT hba1c) FROM {AGG_FEDERATION}",
    f"SELECT sum(hba1c) FILTER (WHERE hba1c > 14) FROM {AGG_FEDERATION}",
    f"SELECT sum(CASE WHEN hba1c > 14 THEN hba1c END) FROM {AGG_FEDERATION}",
    f"SELECT a.diagnosis, count(*) FROM {AGG_FEDERATION} a JOIN {AGG_FEDERATION} b ON a.patient_id = b.patient_id "
    f"GROUP BY a.diagnosis",
    f"SELECT count(*) FROM (SELECT * FROM {AGG_FEDERATION} UNION ALL SELECT * FROM {AGG_FEDERATION}) u",
    f"SELECT diagnosis, count(*) FROM {AGG_FEDERATION} WHERE diagnosis IN (SELECT diagnosis FROM {SQL_FEDERATION}) "
    f"GROUP BY diagnosis",
    f"SELECT diagnosis, min(hba1c) FROM {AGG_FEDERATION} GROUP BY diagnosis",
    f"SELECT diagnosis FROM {AGG_FEDERATION} GROUP BY diagnosis HAVING max(hba1c) > 14",
])
def test_anything_but_a_plain_summary_is_refused_by_the_aggregates_node(fed: Federation, agg_parts, sql_parts, query):
    """Raw rows, joins, unions, subqueries, order statistics and row-picking summaries of eu_agg are all refused by
    gw-fr, naming it (never answered from rows at the home node)."""
    with adbc_home(fed) as conn:
        err = sql_failure(conn, query)
    assert_refused_by_fr(err, query)


def test_plain_flight_aggregate_by_subject_releases_nothing_of_gw_fr(fed: Federation, agg_parts):
    """The plain Flight `aggregate` command, grouped by subject: gw-fr's endpoint is empty (every group is below its
    floor); gw-de's is its own per-subject counts."""
    fine = {"group_by": ["patient_id"], "measures": [{"func": "count"}, {"func": "sum", "column": "hba1c"}]}
    answer = fed.parse(fed.get_info(dataset=AGG_FEDERATION, aggregate=fine), AGG_FEDERATION)
    assert answer.status() == {"gw-fr": "ok", "gw-de": "ok"}, answer.nodes
    assert fed.read_node(answer, "gw-fr").num_rows == 0
    de = fed.read_node(answer, "gw-de")
    local = local_aggregate(fed.nodes["gw-de"], "agg_de", fine)
    assert sorted(de.to_pylist(), key=lambda r: r["patient_id"]) == \
        sorted(local.to_pylist(), key=lambda r: r["patient_id"])


@pytest.mark.parametrize("command,fragment", [
    ({"aggregate": {"measures": [{"func": "min", "column": "hba1c"}]}}, "`min`"),
    ({"filter": "hba1c > (SELECT 1)", "aggregate": {"measures": [{"func": "count"}]}}, "subqueries"),
], ids=["min", "subquery-filter"])
def test_plain_flight_aggregate_refusals_name_gw_fr(fed: Federation, agg_parts, command, fragment):
    with pytest.raises(flight.FlightUnauthorizedError) as denied:
        fed.get_info(dataset=AGG_FEDERATION, **command)
    message = str(denied.value)
    assert "gw-fr" in message and "aggregates only" in message and fragment in message, message


# ======================================================================================================================
# (d)/(e): bugs found in review
# ======================================================================================================================

def test_group_by_without_aggregate_functions(fed: Federation, agg_parts, sql_parts):
    """BUG. `SELECT diagnosis FROM t GROUP BY diagnosis` is an Aggregate with no aggregate expressions; `pushed`
    turns it into an AggregateSpec with `measures: []`, which the home node's own part accepts but every peer refuses
    in `DataCommand::from_json` ("`aggregate.measures` needs 1 to 64 summaries"), so a valid query fails with
    PERMISSION_DENIED. Expected: the distinct groups each node releases (for gw-fr: groups of at least its floor)."""
    expected_sql = combine_local(fed, SQL_NODES, ["diagnosis"], None)
    expected_agg = combine_local(fed, AGG_NODES, ["diagnosis"], None)
    with adbc_home(fed) as conn:
        for federation, expected in ((SQL_FEDERATION, expected_sql), (AGG_FEDERATION, expected_agg)):
            try:
                got = sql(conn, f"SELECT diagnosis FROM {federation} GROUP BY diagnosis")
            except dbapi.Error as exc:
                pytest.fail(f"GROUP BY without aggregates over {federation} failed: {parse_adbc_error(exc)}")
            assert sorted(got.column("diagnosis").to_pylist(), key=str) == sorted((k[0] for k in expected), key=str)


def correlated_counts(fed: Federation, nodes: dict[str, str], federation: str) -> tuple[str, dict, Any]:
    """Per-diagnosis counts over `federation` through a correlated subquery at the home node: the query, the
    counts the nodes give locally, and the answer (or the ADBC error)."""
    expected = combine_local(fed, nodes, ["diagnosis"], None)
    query = (f"SELECT o.diagnosis, (SELECT count(*) FROM {federation} a WHERE a.diagnosis = o.diagnosis) AS n "
             f"FROM (SELECT DISTINCT diagnosis FROM {SQL_FEDERATION}) o")
    with adbc_home(fed) as conn:
        try:
            got: Any = sql(conn, query)
        except dbapi.Error as exc:
            got = exc
    return query, {k[0]: v["n"] for k, v in expected.items()}, got


def test_correlated_subquery_over_a_federated_table(fed: Federation, agg_parts, sql_parts):
    """BUG. A correlated subquery's WHERE holds an outer reference (`o.diagnosis`). `pushed` does not check for
    `Expr::OuterReferenceColumn`, and the unparser writes it as the column `o.diagnosis`, so every node gets the
    filter `diagnosis = o.diagnosis`: the statement fails at every node with "filter does not parse: No field named
    o.diagnosis ... Valid fields are patient_id, full_name, ..." (naming the withheld direct identifier). Expected:
    rows-release parts give the per-diagnosis counts (the aggregate stays in the plan for decorrelation)."""
    _, expected, got = correlated_counts(fed, SQL_NODES, SQL_FEDERATION)
    if isinstance(got, dbapi.Error):
        pytest.fail(f"correlated subquery failed: {parse_adbc_error(got)}")
    assert {r["diagnosis"]: r["n"] for r in got.to_pylist()} == expected


def test_correlated_subquery_over_an_aggregates_part_is_answered_or_clearly_refused(fed: Federation, agg_parts,
                                                                                       sql_parts):
    """BUG (same cause). Over eu_agg the correlated aggregate may be answered (per-diagnosis counts of the nodes' own
    groups) or refused by gw-fr as aggregates-only; it must not fail with a parse error that lists the raw columns."""
    query, expected, got = correlated_counts(fed, AGG_NODES, AGG_FEDERATION)
    if isinstance(got, dbapi.Error):
        err = parse_adbc_error(got)
        assert HIDDEN not in err.message, f"the error names the withheld column {HIDDEN}: {err}"
        assert_refused_by_fr(err, query)
        return
    assert {r["diagnosis"]: r["n"] for r in got.to_pylist()} == expected


@pytest.mark.parametrize("value,op,text", [(float("nan"), ">", "CAST('NaN' AS DOUBLE)"),
                                           (float("inf"), "<", "CAST('inf' AS DOUBLE)")], ids=["nan", "inf"])
def test_non_finite_float_parameters(fed: Federation, agg_parts, value, op, text):
    """BUG. A bound float parameter becomes a Float64 literal before the push; `filter_sql` unparses NaN and inf as
    the bare words `NaN` / `inf`, which each node parses as a column ("No field named nan. Valid fields are
    patient_id, full_name, ..."). Expected: the value the nodes give for the same predicate written with a cast."""
    expected = combine_local(fed, AGG_NODES, ["diagnosis"], f"hba1c {op} {text}")
    with adbc_home(fed) as conn:
        try:
            got = sql_params(conn, select(["diagnosis"], AGG_FEDERATION, f"hba1c {op} $1"), (value,))
        except dbapi.Error as exc:
            err = parse_adbc_error(exc)
            assert HIDDEN not in err.message, f"the error names the withheld column {HIDDEN}: {err}"
            pytest.fail(f"hba1c {op} $1 with $1 = {value} failed: {err}")
    assert_matches(got, expected, ["diagnosis"], f"hba1c {op} {value}")


def test_prepared_aggregate_reports_its_parameters(fed: Federation, agg_parts):
    """BUG. CreatePreparedStatement answers the parameter schema from the plan after `push_aggregates`, where the
    pushed WHERE (with its `$1`) has become text inside the FederatedAggregate: the schema is empty, while the same
    statement over a local dataset reports `$1: double`. Clients that bind by the parameter schema (JDBC) cannot bind.
    Expected: the parameter schema of the statement as written."""
    with adbc_home(fed) as conn:
        with conn.cursor() as cur:
            local = cur.adbc_prepare("SELECT diagnosis, count(*) FROM agg_de WHERE hba1c > $1 GROUP BY diagnosis")
        with conn.cursor() as cur:
            federated = cur.adbc_prepare(f"SELECT diagnosis, count(*) FROM {AGG_FEDERATION} WHERE hba1c > $1 "
                                         f"GROUP BY diagnosis")
    assert local is not None and [f.type for f in local] == [pa.float64()], local
    assert federated is not None and [f.type for f in federated] == [pa.float64()], \
        f"the federated statement reports parameters {federated}, the local one {local}"
