"""Side channels of SQL over the gate: can a caller learn anything about rows it may not see?

The attacker is trainer-de (org dkfz) on the demo server, whose consent never changes, so the reference model says
exactly which rows are hidden. User SQL sees the released view: `patient_id` is a pseudonym, `birth_date` is the year,
`postcode` two characters, `full_name` absent. So the probes use values that exist only in hidden rows and that the
released view does not transform: `admitted_at` (unique per row, 2018-2024) and its integer form
`CAST(admitted_at AS BIGINT)` (microseconds since the epoch, a raw integer predicate), plus the raw forms of the
transformed columns.

Every probe is run with a value V of a hidden row (a subject who withdrew, and one who never consented for the
purpose) and with values that never existed (V-1 us, V+1 us, and a far one), and the responses are compared:
success or failure, rows, DB-API class, gRPC code and the server's message, with the literals typed by the attacker
and pseudonyms masked. They must be identical. The probes are:
  - plain filters (integer and timestamp forms), LIMIT, `>= V ORDER BY .. LIMIT 1`, `max(..) WHERE <= V`, EXISTS, a
    window function;
  - errors raised only on rows matching V: division by zero (in WHERE, GROUP BY, an aggregate and a join
    condition), a CAST failure, a regular expression that does not compile, a CAST error quoting a row's value.
A probe is worthless if it would not tell a visible row from a missing one, so each is also run on a VISIBLE row's
value, where it must respond differently (test_probe_discriminates_on_a_visible_value): that is a check of the probe,
not of the server.

Then: aggregates and statistics report the released rows (count(*), min/max, total_records, EXPLAIN VERBOSE), LIMIT
and OFFSET apply after the gate, filters see released values (raw birth dates and postcodes match nothing), and no
error message carries a value of a hidden row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import DATASET, PURPOSE, Gateway, Reference, call_options, purpose_and_ancestors
from test_flight_sql import (adbc_connect, expect_sql_error, flight_sql_pull, parse_adbc_error, run_sql, scalar)

T = DATASET
P = "CAST(admitted_at AS BIGINT)"


# ---------------------------------------------------------------------------------------------------- probe values

@dataclass(frozen=True)
class Value:
    """An admitted_at instant: integer microseconds and a timestamp literal for the same instant."""
    micros: int
    when: datetime

    def shift(self, us: int) -> "Value":
        return Value(self.micros + us, self.when + timedelta(microseconds=us))

    @property
    def iso(self) -> str:
        return self.when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @property
    def literals(self) -> tuple[str, ...]:
        """How the value may be echoed in a message: as typed, or as DataFusion renders the literal."""
        return (str(self.micros * 1000), str(self.micros), self.iso, self.iso[:-1], self.iso.replace("T", " ")[:-1])

    def sql(self, template: str) -> str:
        return template.format(v=self.micros, ts=f"'{self.iso}'")


@dataclass
class World:
    """The demo seen by the attacker, from the reference model."""
    ref: Reference
    consented: set[str]
    micros: list[int]  # per raw row, in reference.rows order
    visible_micros: set[int]
    hidden_micros: set[int]
    hidden_withdrawn: dict[str, Any]  # a row of a subject whose latest applicable event is a withdrawal
    hidden_never: dict[str, Any]  # a row of a subject without any applicable event
    visible: dict[str, Any]  # a consented row
    hidden_iso: set[str]  # hidden rows' admitted_at, to the second, as "YYYY-MM-DDTHH:MM:SS" and with a space
    full_names: set[str]
    raw_birth_dates: set[str]  # raw birth dates that are not Jan 1 (the released view has only Jan 1)
    storage: tuple[str, ...]  # how the node's storage paths would show in a message

    def value(self, row: dict[str, Any]) -> Value:
        return Value(self.micros[row["_i"]], row["admitted_at"])

    def absent(self, v: Value, us: int) -> Value:
        w = v.shift(us)
        assert w.micros not in self.visible_micros | self.hidden_micros, f"{w} exists"
        return w


@pytest.fixture(scope="module")
def world(reference: Reference) -> World:
    ref = reference
    consented = ref.consented(PURPOSE)
    applicable = purpose_and_ancestors(PURPOSE)
    with_events = {ev.subject_id for ev in ref.events if ev.purpose.strip("/") in applicable}
    withdrew = {ev.subject_id for ev in ref.events
                if ev.purpose.strip("/") in applicable and ev.status == "withdrawn"} - consented
    never = set(ref.by_subject) - with_events
    micros = pc.cast(ref.raw.column("admitted_at"), pa.int64()).to_pylist()
    rows = [dict(r, _i=i) for i, r in enumerate(ref.rows)]
    visible = {micros[i] for i, r in enumerate(rows) if str(r["patient_id"]) in consented}
    hidden = set(micros) - visible
    assert len(set(micros)) == len(micros), "admitted_at must be unique per row for these probes"

    def pick(subjects: set[str]) -> dict[str, Any]:
        # a row whose neighbours (+-1 us) do not exist and whose birth date is not Jan 1
        for r in sorted((r for r in rows if str(r["patient_id"]) in subjects), key=lambda r: micros[r["_i"]]):
            m = micros[r["_i"]]
            if m - 1 not in hidden | visible and m + 1 not in hidden | visible and \
                    (r["birth_date"].month, r["birth_date"].day) != (1, 1):
                return r
        raise AssertionError("no suitable row")

    assert withdrew and never, "the demo should have subjects who withdrew and who never consented"
    hidden_iso = set()
    for i, r in enumerate(rows):
        if micros[i] in hidden:
            hidden_iso.add(r["admitted_at"].strftime("%Y-%m-%dT%H:%M:%S"))
            hidden_iso.add(r["admitted_at"].strftime("%Y-%m-%d %H:%M:%S"))
    return World(
        ref=ref, consented=consented, micros=micros, visible_micros=visible, hidden_micros=hidden,
        hidden_withdrawn=pick(withdrew), hidden_never=pick(never), visible=pick(consented), hidden_iso=hidden_iso,
        full_names={r["full_name"] for r in rows},
        raw_birth_dates={r["birth_date"].isoformat() for r in rows if (r["birth_date"].month, r["birth_date"].day)
                         != (1, 1)},
        storage=_storage_markers(ref))


def _storage_markers(ref: Reference) -> tuple[str, ...]:
    data_dir = str(ref.parquet_path.resolve().parents[2])  # <data-dir>/demo/patients/patients.parquet
    return (data_dir, data_dir.lstrip("/"), ref.parquet_path.name, "demo/patients/", ref.consent_path.name)


@pytest.fixture(scope="module")
def conn(gateway: Gateway):
    c = adbc_connect(gateway, key=gateway.keys["trainer-de"])
    yield c
    c.close()


# ------------------------------------------------------------------------------------------------------- responses

@dataclass(frozen=True)
class Response:
    ok: bool
    rows: tuple  # result rows (sorted), () for errors
    cls: str | None
    code: str | None
    message: str | None  # normalised: literals and pseudonyms masked


_PSEUDONYM = re.compile(r"\b[0-9a-f]{32}\b")
_REQUEST_ID = re.compile(r"(request[ _-]id[:= ]*)\S+", re.I)


def normalise(text: str, literals: tuple[str, ...]) -> str:
    for lit in sorted(literals, key=len, reverse=True):
        text = text.replace(lit, "<literal>")
    text = _PSEUDONYM.sub("<pseudonym>", text)
    return _REQUEST_ID.sub(r"\1<id>", text)


def respond(conn, sql: str, literals: tuple[str, ...] = ()) -> tuple[Response, str | None]:
    """The response to `sql`, and the raw error message (None on success)."""
    try:
        t = run_sql(conn, sql)
    except dbapi.Error as exc:
        err = parse_adbc_error(exc)
        return Response(False, (), err.cls, err.code, normalise(err.message, literals)), err.message
    rows = tuple(sorted((tuple(r.values()) for r in t.to_pylist()), key=repr))
    return Response(True, rows, None, None, None), None


def assert_no_hidden_values(world: World, text: str | None, literals: tuple[str, ...] = (), what: str = "") -> None:
    """No value of a hidden row (admitted_at as integer or timestamp text), no full name, no raw birth date."""
    if not text:
        return
    for lit in literals:  # what the attacker typed may be echoed
        text = text.replace(lit, "")
    leaked = [int(d) for d in re.findall(r"\d{13,}", text) if int(d) in world.hidden_micros]
    assert not leaked, f"{what}: the message carries admitted_at of hidden rows {leaked[:3]}: {text!r}"
    iso = [s for s in world.hidden_iso if s in text]
    assert not iso, f"{what}: the message carries admitted_at of hidden rows {iso[:3]}: {text!r}"
    names = [n for n in world.full_names if n in text]
    assert not names, f"{what}: the message carries full names {names[:3]}: {text!r}"
    births = [d for d in re.findall(r"\d{4}-\d{2}-\d{2}", text) if d in world.raw_birth_dates]
    assert not births, f"{what}: the message carries raw birth dates {births[:3]}: {text!r}"
    paths = [m for m in world.storage if m in text]
    assert not paths, f"{what}: the message shows the node's storage paths {paths}: {text!r}"


# ------------------------------------------------------------------------------------------------------ the probes

@dataclass(frozen=True)
class Probe:
    sql: str
    control: int  # the neighbour (-1 or +1 us) a visible value must be told apart from
    local: bool = False  # the answer depends on the neighbourhood of V (compare only with V's neighbours)


def _div(cond: str) -> str:
    return f"1 / (CASE WHEN {cond} THEN 0 ELSE 1 END)"


PROBES = {
    "filter-int": Probe(f"SELECT count(*) AS n FROM {T} WHERE {P} = {{v}}", +1),
    "filter-timestamp": Probe(f"SELECT count(*) AS n FROM {T} WHERE admitted_at = {{ts}}", +1),
    "div-zero-where": Probe(f"SELECT count(*) AS n FROM {T} WHERE {_div(f'{P} = {{v}}')} = 1", +1),
    "div-zero-timestamp": Probe(f"SELECT count(*) AS n FROM {T} WHERE {_div('admitted_at = {ts}')} = 1", +1),
    "div-zero-group-by": Probe(f"SELECT count(*) AS n FROM {T} GROUP BY {_div(f'{P} = {{v}}')}", +1),
    "div-zero-aggregate": Probe(f"SELECT sum({_div(f'{P} = {{v}}')}) AS s FROM {T}", +1),
    "div-zero-join": Probe(f"SELECT count(*) AS n FROM {T} JOIN (SELECT 1 AS one) x ON {_div(f'{P} = {{v}}')} = x.one",
                           +1),
    "cast-failure": Probe(f"SELECT count(*) AS n FROM {T} "
                          f"WHERE CAST(CASE WHEN {P} = {{v}} THEN 'x' ELSE '1' END AS INT) = 1", +1),
    "regexp-error": Probe(f"SELECT count(*) AS n FROM {T} "
                          f"WHERE regexp_like(postcode, CASE WHEN {P} = {{v}} THEN '(' ELSE 'a' END)", +1),
    "value-in-error": Probe(f"SELECT count(*) AS n FROM {T} WHERE CASE WHEN {P} = {{v}} "
                            f"THEN CAST(CAST(hba1c AS VARCHAR) || 'x' AS DOUBLE) ELSE 1.0 END = 1.0", +1),
    "limit": Probe(f"SELECT diagnosis, hba1c FROM {T} WHERE {P} = {{v}} LIMIT 1", +1),
    "exists": Probe(f"SELECT count(*) AS n FROM {T} WHERE EXISTS (SELECT 1 FROM {T} d "
                    f"WHERE CAST(d.admitted_at AS BIGINT) = {{v}})", +1),
    "window": Probe(f"SELECT max(r) AS r FROM (SELECT row_number() OVER (ORDER BY admitted_at) AS r, {P} AS t "
                    f"FROM {T}) w WHERE t = {{v}}", +1),
    "div-zero-order-by": Probe(f"SELECT {P} AS t FROM {T} ORDER BY {_div(f'{P} = {{v}}')}, admitted_at LIMIT 3", +1),
    "div-zero-window": Probe(f"SELECT max(r) AS r FROM (SELECT row_number() OVER "
                             f"(ORDER BY {_div(f'{P} = {{v}}')}) AS r FROM {T}) w", +1),
    "div-zero-partition": Probe(f"SELECT max(r) AS r FROM (SELECT row_number() OVER "
                                f"(PARTITION BY {_div(f'{P} = {{v}}')} ORDER BY admitted_at) AS r FROM {T}) w", +1),
    "in-subquery": Probe(f"SELECT count(*) AS n FROM {T} WHERE {P} IN (SELECT column1 FROM (VALUES ({{v}})) v)", +1),
    # counted, so that the literal itself (which differs between V and its neighbours) is not in the answer
    "intersect": Probe(f"SELECT count(*) AS n FROM (SELECT {P} AS t FROM {T} INTERSECT "
                       f"SELECT CAST({{v}} AS BIGINT)) x", +1),
    "except": Probe(f"SELECT count(*) AS n FROM (SELECT CAST({{v}} AS BIGINT) AS t EXCEPT SELECT {P} FROM {T}) x", +1),
    "next-row": Probe(f"SELECT {P} AS t, diagnosis, hba1c FROM {T} WHERE {P} >= {{v}} ORDER BY admitted_at LIMIT 1",
                      +1, local=True),
    "max-below": Probe(f"SELECT max({P}) AS t, count(*) AS n FROM {T} WHERE {P} <= {{v}}", -1, local=True),
}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _far_absent(world: World) -> Value:
    """An instant far from every row (2001, before the demo's admissions start)."""
    when = datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    v = Value((when - EPOCH) // timedelta(microseconds=1), when)
    assert v.micros not in world.visible_micros | world.hidden_micros
    return v


@pytest.mark.parametrize("name", list(PROBES))
def test_hidden_values_respond_like_values_that_never_existed(conn, world: World, name):
    probe = PROBES[name]
    seen: dict[str, Response] = {}
    for kind, row in (("withdrawn", world.hidden_withdrawn), ("never-consented", world.hidden_never)):
        v = world.value(row)
        assert v.micros in world.hidden_micros
        hidden, raw = respond(conn, v.sql(probe.sql), v.literals)
        assert_no_hidden_values(world, raw, v.literals, f"{name} on a hidden value")
        for us in (-1, +1):
            w = world.absent(v, us)
            other, raw = respond(conn, w.sql(probe.sql), w.literals)
            assert_no_hidden_values(world, raw, w.literals, f"{name} on a missing value")
            assert hidden == other, (
                f"probe {name!r}: a value of a hidden row ({kind} subject) answers differently from a value that never "
                f"existed ({us:+d} us):\n  hidden: {hidden}\n  absent: {other}\n  SQL: {v.sql(probe.sql)}")
        seen[kind] = hidden
    if not probe.local:
        far = _far_absent(world)
        other, raw = respond(conn, far.sql(probe.sql), far.literals)
        assert_no_hidden_values(world, raw, far.literals, name)
        assert seen["withdrawn"] == seen["never-consented"] == other, (
            f"probe {name!r}: hidden values and a far missing value answer differently: {seen} vs {other}")


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_discriminates_on_a_visible_value(conn, world: World, name):
    """Validity of the probe (not a server property): on a VISIBLE row's value it answers differently from a
    missing neighbour, so the test above would catch a hidden row that the engine evaluated."""
    probe = PROBES[name]
    v = world.value(world.visible)
    w = world.absent(v, probe.control)
    visible, _ = respond(conn, v.sql(probe.sql), v.literals)
    absent, _ = respond(conn, w.sql(probe.sql), w.literals)
    assert visible != absent, f"probe {name!r} does not tell a visible row from a missing one: {visible}"


def test_bound_parameters_probe_like_literals(conn, world: World):
    """The division probe with V bound as a prepared-statement parameter (`$1`, no constant folding possible)."""
    sql = f"SELECT count(*) AS n FROM {T} WHERE {_div(f'{P} = $1')} = 1"

    def ask(v: int) -> Response:
        try:
            t = run_sql(conn, sql, parameters=(v,))
        except dbapi.Error as exc:
            err = parse_adbc_error(exc)
            assert_no_hidden_values(world, err.message, (str(v),), "parameter probe")
            return Response(False, (), err.cls, err.code, normalise(err.message, (str(v),)))
        return Response(True, tuple(tuple(r.values()) for r in t.to_pylist()), None, None, None)

    for row in (world.hidden_withdrawn, world.hidden_never):
        v = world.value(row).micros
        assert ask(v) == ask(v - 1) == ask(v + 1), f"a bound hidden value {v} answers unlike missing ones"
    visible = world.value(world.visible).micros
    assert ask(visible) != ask(visible + 1), "probe validity: a visible value must answer differently"


def test_division_by_zero_on_a_visible_row_is_a_clean_error(conn, world: World):
    """The visible case of the division probe fails as a client error, not INTERNAL (no stack, no request id
    needed to understand it)."""
    v = world.value(world.visible)
    err = expect_sql_error(conn, v.sql(PROBES["div-zero-where"].sql), {"INVALID_ARGUMENT"})
    assert_no_hidden_values(world, err.message, v.literals, "division by zero")


# ------------------------------------------------------------------------- raw forms of the transformed columns

def _other_date(world: World) -> date:
    d = date(1977, 7, 7)
    while d.isoformat() in world.raw_birth_dates:
        d += timedelta(days=1)
    return d


def test_raw_birth_dates_match_nothing_hidden_or_not(conn, world: World):
    """Filters run on the released view: birth_date is Jan 1 of the year, so a raw (non-Jan-1) birth date matches
    no row, whether it is a hidden subject's, a visible subject's or nobody's, and errors keyed on it never fire."""
    consented_rows = len(world.ref.consented_rows(PURPOSE))
    answers = {}
    for who, d in (("withdrawn", world.hidden_withdrawn["birth_date"]), ("never", world.hidden_never["birth_date"]),
                   ("visible", world.visible["birth_date"]), ("nobody", _other_date(world))):
        lit = d.isoformat()
        cond = f"birth_date = DATE '{lit}'"
        count, _ = respond(conn, f"SELECT count(*) AS n FROM {T} WHERE {cond}", (lit,))
        div, raw = respond(conn, f"SELECT count(*) AS n FROM {T} WHERE {_div(cond)} = 1", (lit,))
        assert_no_hidden_values(world, raw, (lit,), "birth date probe")
        answers[who] = (count, div)
    assert answers["withdrawn"] == answers["never"] == answers["visible"] == answers["nobody"], answers
    assert answers["nobody"][0].rows == ((0,),) and answers["nobody"][1].rows == ((consented_rows,),), answers


def test_raw_postcodes_match_nothing_hidden_or_not(conn, world: World):
    raw_postcodes = {r["postcode"] for r in world.ref.rows}
    nobody = next(f"{n:05d}" for n in range(99999, 0, -1) if f"{n:05d}" not in raw_postcodes)
    answers = {}
    for who, pcode in (("withdrawn", world.hidden_withdrawn["postcode"]), ("never", world.hidden_never["postcode"]),
                       ("visible", world.visible["postcode"]), ("nobody", nobody)):
        cond = f"postcode = '{pcode}'"
        answers[who] = (respond(conn, f"SELECT count(*) AS n FROM {T} WHERE {cond}", (pcode,))[0],
                        respond(conn, f"SELECT count(*) AS n FROM {T} WHERE {_div(cond)} = 1", (pcode,))[0])
    assert answers["withdrawn"] == answers["never"] == answers["visible"] == answers["nobody"], answers
    assert answers["nobody"][0].rows == ((0,),)


def test_raw_subject_ids_reveal_nothing(conn, world: World):
    """patient_id is the pseudonym in SQL: raw ids (as text or integers) of hidden, visible or missing subjects all
    answer alike."""
    ids = {"withdrawn": world.hidden_withdrawn["patient_id"], "never": world.hidden_never["patient_id"],
           "visible": world.visible["patient_id"], "nobody": 987_654_321}
    assert str(ids["nobody"]) not in world.ref.by_subject
    conditions = {
        "text": lambda i: f"patient_id = '{i}'",
        "integer": lambda i: f"CAST(patient_id AS BIGINT) = {i}",
        "division": lambda i: _div("patient_id = '%s'" % i) + " = 1",
    }
    for form, cond in conditions.items():
        answers = {}
        for who, i in ids.items():
            answers[who], raw = respond(conn, f"SELECT count(*) AS n FROM {T} WHERE {cond(i)}", (str(i),))
            assert_no_hidden_values(world, raw, (str(i),), form)
        assert len(set(answers.values())) == 1, f"raw ids as {form}: {answers}"


def test_full_name_probes_all_fail_alike(conn, world: World):
    """full_name is withheld: any reference to it is INVALID_ARGUMENT, whatever the name compared with."""
    answers = {}
    for who, name in (("withdrawn", world.hidden_withdrawn["full_name"]), ("never", world.hidden_never["full_name"]),
                      ("visible", world.visible["full_name"]), ("nobody", "Zoé Nobody-Ever")):
        cond = f"full_name = '{name}'"
        for form, sql in (("filter", f"SELECT count(*) AS n FROM {T} WHERE {cond}"),
                          ("division", f"SELECT count(*) AS n FROM {T} WHERE {_div(cond)} = 1")):
            resp, raw = respond(conn, sql, (name,))
            assert not resp.ok and resp.code == "INVALID_ARGUMENT", f"{sql}: {resp}"
            assert_no_hidden_values(world, raw, (name,), "full_name probe")
            answers[(who, form)] = resp
    for form in ("filter", "division"):
        assert len({r for (w, f), r in answers.items() if f == form}) == 1, answers


# --------------------------------------------------------------------------------- aggregates, statistics, LIMIT

def test_counts_are_the_released_rows(conn, world: World):
    n = len(world.ref.consented_rows(PURPOSE))
    assert n < world.ref.raw.num_rows
    for sql in (f"SELECT count(*) FROM {T}", f"SELECT count(1) FROM {T}", f"SELECT count(admitted_at) FROM {T}",
                f"SELECT count(*) FROM {T} WHERE true", f"SELECT count(*) FROM {T} WHERE hba1c = hba1c OR true",
                f"SELECT count(*) FROM (SELECT * FROM {T} LIMIT {world.ref.raw.num_rows})",
                f"SELECT sum(1) FROM {T}"):
        assert scalar(conn, sql) == n, f"{sql}: statistics of the raw source must not answer it"
    subjects = {str(r["patient_id"]) for r in world.ref.consented_rows(PURPOSE)}
    assert scalar(conn, f"SELECT count(DISTINCT patient_id) FROM {T}") == len(subjects)


def test_min_and_max_are_over_released_rows(conn, world: World):
    rows = world.ref.consented_rows(PURPOSE)
    vis = sorted(world.visible_micros)
    t = run_sql(conn, f"SELECT min({P}) AS lo, max({P}) AS hi, min(hba1c) AS hlo, max(hba1c) AS hhi, "
                      f"min(birth_date) AS blo, max(birth_date) AS bhi FROM {T}").to_pylist()[0]
    assert (t["lo"], t["hi"]) == (vis[0], vis[-1]), "min/max must not come from the raw source's statistics"
    assert (t["hlo"], t["hhi"]) == (min(r["hba1c"] for r in rows), max(r["hba1c"] for r in rows))
    assert (t["blo"], t["bhi"]) == (date(min(r["birth_date"] for r in rows).year, 1, 1),
                                    date(max(r["birth_date"] for r in rows).year, 1, 1))


def test_total_records_is_never_the_raw_count(gateway: Gateway, client, world: World):
    opts = call_options(gateway.keys["trainer-de"])
    n = len(world.ref.consented_rows(PURPOSE))
    info, table = flight_sql_pull(client, f"SELECT * FROM {T}", opts)
    assert table.num_rows == n
    assert info.total_records in (-1, n), info.total_records
    info, table = flight_sql_pull(client, f"SELECT count(*) FROM {T}", opts)
    assert info.total_records in (-1, 1), info.total_records
    assert table.column(0)[0].as_py() == n


def test_limit_and_offset_apply_after_the_gate(conn, world: World):
    ordered = sorted(world.visible_micros)
    got = run_sql(conn, f"SELECT {P} AS t FROM {T} ORDER BY admitted_at LIMIT 20 OFFSET 100").column("t").to_pylist()
    assert got == ordered[100:120]
    unordered = run_sql(conn, f"SELECT {P} AS t FROM {T} LIMIT 50").column("t").to_pylist()
    assert len(unordered) == 50 and set(unordered) <= world.visible_micros, "a LIMIT returned hidden rows"
    top = run_sql(conn, f"SELECT {P} AS t FROM {T} ORDER BY admitted_at DESC LIMIT 3").column("t").to_pylist()
    assert top == ordered[::-1][:3]


def test_explain_shows_no_raw_statistics(conn, world: World):
    """EXPLAIN (and EXPLAIN VERBOSE, if answered) must not show the raw row count or raw values: DataFusion prints
    `statistics=[Rows=Exact(N), ...]` and column min/max in the plan with statistics."""
    raw = world.ref.raw.num_rows
    for sql in (f"EXPLAIN SELECT count(*) FROM {T}", f"EXPLAIN VERBOSE SELECT count(*) FROM {T}",
                f"EXPLAIN VERBOSE SELECT * FROM {T} WHERE hba1c > 8"):
        try:
            t = run_sql(conn, sql)
        except dbapi.Error as exc:
            err = parse_adbc_error(exc)
            assert err.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), f"{sql}: {err}"
            continue
        text = "\n".join(str(x) for x in t.column("plan").to_pylist())
        counts = [int(c) for c in re.findall(r"Rows=(?:Exact|Inexact)\((\d+)\)", text)]
        assert raw not in counts, f"{sql}: the plan states the raw row count {raw}:\n{text}"
        assert not re.search(rf"(?<!\d){raw}(?!\d)", text), f"{sql}: the plan shows the raw row count:\n{text}"
        assert_no_hidden_values(world, text, (), sql)


def test_error_quoting_a_row_value_never_quotes_a_hidden_row(conn, world: World):
    """A CAST error quotes the row it failed on. Starting at a hidden row's instant, in time order, the first row the
    engine may evaluate is the next visible one: the hidden row must never be the one quoted."""
    v = world.value(world.hidden_withdrawn)
    sql = (f"SELECT CAST(CAST({P} AS VARCHAR) || 'x' AS BIGINT) AS bad FROM {T} "
           f"WHERE {P} >= {v.micros} ORDER BY admitted_at")
    err = expect_sql_error(conn, sql, {"INVALID_ARGUMENT", "INTERNAL"})
    quoted = [int(d) for d in re.findall(r"\d{13,}", err.message.replace(str(v.micros), ""))]
    assert not set(quoted) & world.hidden_micros, f"the error quotes a hidden row: {err}"
    assert set(quoted) <= world.visible_micros, f"the error quotes a value that is no visible row: {err}"
    assert_no_hidden_values(world, err.message, v.literals, "cast error")


def test_hidden_rows_never_surface_in_a_full_scan(conn, world: World):
    got = run_sql(conn, f"SELECT {P} AS t FROM {T}").column("t").to_pylist()
    assert len(got) == len(set(got)) == len(world.visible_micros)
    assert set(got) == world.visible_micros
