"""Arrow Flight happy paths with pyarrow.flight: authentication, listing, full pulls checked against the reference
model, pseudonyms, and the JSON command (columns, filter, limit)."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from collections import Counter
from datetime import date

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import (DATASET, OTHER_PURPOSE, PSEUDONYM_RE, PURPOSE, RELEASED_COLUMNS, SUB_PURPOSE, Gateway,
                      Reference, assert_same_multiset, call_options, command_descriptor, expect_status,
                      groups_by_pseudonym, is_string_type, listed_datasets, norm_float, output_row,
                      path_descriptor, pull, read_endpoints, released_row)


# ------------------------------------------------------------------------------------------------ authentication

def test_handshake_returns_a_bearer_header_that_authenticates(gateway: Gateway, client: flight.FlightClient):
    name, value = client.authenticate_basic_token("trainer-de", gateway.keys["trainer-de"])
    assert name.lower() == b"authorization"
    assert value.startswith(b"Bearer ") and len(value) > len(b"Bearer ")
    opts = flight.FlightCallOptions(headers=[(name, value), (b"x-passerelle-purpose", PURPOSE.encode())])
    assert listed_datasets(client, opts) == [DATASET]


@pytest.mark.parametrize("user,password", [("trainer-de", "wrong-key"), ("nobody", "wrong-key")])
def test_handshake_with_bad_credentials_is_unauthenticated(gateway: Gateway, client, user, password):
    expect_status("UNAUTHENTICATED", lambda: client.authenticate_basic_token(user, password))


def test_handshake_with_another_principals_key_is_unauthenticated(gateway: Gateway, client):
    expect_status("UNAUTHENTICATED",
                  lambda: client.authenticate_basic_token("trainer-de", gateway.keys["steward-fr"]))


def test_bearer_api_key_authenticates(gateway: Gateway, client):
    assert listed_datasets(client, call_options(gateway.keys["trainer-de"])) == [DATASET]


# ------------------------------------------------------------------------------------------------------- listing

@pytest.mark.parametrize("principal,purpose,expected", [
    ("trainer-de", PURPOSE, [DATASET]),
    ("trainer-de", SUB_PURPOSE, [DATASET]),  # a sub-purpose of a permitted purpose is permitted
    ("trainer-de", OTHER_PURPOSE, []),
    ("trainer-de", "research", []),  # a parent purpose is not covered by a permit for its child
    ("steward-fr", PURPOSE, []),
    ("auditor-eu", PURPOSE, []),
])
def test_list_flights_shows_only_usable_datasets(gateway: Gateway, client, principal, purpose, expected):
    assert listed_datasets(client, call_options(gateway.keys[principal], purpose)) == expected


def test_listed_flight_info_has_the_post_policy_schema(gateway: Gateway, client):
    """A listing must not reveal hidden columns either (an empty schema is allowed in listings)."""
    infos = list(client.list_flights(b"", call_options(gateway.keys["trainer-de"])))
    assert len(infos) == 1
    schema = infos[0].schema
    assert "full_name" not in schema.names
    if schema.names:
        assert schema.names == RELEASED_COLUMNS
        assert is_string_type(schema.field("patient_id").type)


# ------------------------------------------------------------------------------------------------ the full pull

@pytest.fixture(scope="module")
def full_pull(gateway: Gateway):
    c = gateway.connect()
    try:
        yield pull(c, call_options(gateway.keys["trainer-de"]))
    finally:
        c.close()


def test_flight_info_schema_is_post_policy(full_pull, reference: Reference):
    schema = full_pull.info.schema
    assert schema.names == RELEASED_COLUMNS, "full_name must never be sent; the other columns keep their order"
    assert is_string_type(schema.field("patient_id").type), schema.field("patient_id").type
    assert schema.field("birth_date").type == pa.date32()
    assert is_string_type(schema.field("postcode").type)
    assert is_string_type(schema.field("diagnosis").type)
    assert schema.field("hba1c").type == pa.float64()
    ts = schema.field("admitted_at").type
    assert pa.types.is_timestamp(ts) and ts.unit == "us" and ts.tz in ("UTC", "+00:00"), ts
    assert full_pull.table.schema.names == schema.names
    assert [f.type for f in full_pull.table.schema] == [f.type for f in schema]


def test_get_schema_matches_flight_info(gateway: Gateway, client, full_pull):
    result = client.get_schema(path_descriptor(), call_options(gateway.keys["trainer-de"]))
    assert result.schema.names == full_pull.info.schema.names
    assert [f.type for f in result.schema] == [f.type for f in full_pull.info.schema]


def test_endpoints_have_no_locations(full_pull):
    assert full_pull.info.endpoints, "a dataset with consented rows must have at least one endpoint"
    assert all(list(ep.locations) == [] for ep in full_pull.info.endpoints)


def test_row_count_is_the_consented_raw_rows(full_pull, reference: Reference):
    expected = reference.consented_rows(PURPOSE)
    assert full_pull.table.num_rows == len(expected), (
        f"sent {full_pull.table.num_rows} rows; raw has {reference.raw.num_rows}, of which {len(expected)} belong to "
        f"the {len(reference.consented(PURPOSE))} subjects consented for {PURPOSE}")
    if full_pull.info.total_records >= 0:
        assert full_pull.info.total_records == len(expected)


def test_patient_id_is_a_32_hex_pseudonym(full_pull):
    ids = full_pull.table.column("patient_id").to_pylist()
    assert None not in ids
    bad = [p for p in ids if not PSEUDONYM_RE.match(p)]
    assert not bad, f"{len(bad)} patient_id values are not 32 lowercase hex chars, e.g. {bad[:3]}"


def test_no_raw_identifier_leaks(full_pull, reference: Reference):
    """No full name appears in any sent string column; no raw id appears as a pseudonym."""
    sent = set()
    for name in ("patient_id", "postcode", "diagnosis"):
        sent.update(v for v in full_pull.table.column(name).to_pylist() if v is not None)
    raw_names = {r["full_name"] for r in reference.rows if r["full_name"]}
    assert not sent & raw_names
    raw_ids = {str(r["patient_id"]) for r in reference.rows if r["patient_id"] is not None}
    assert not set(full_pull.table.column("patient_id").to_pylist()) & raw_ids


def test_released_rows_equal_the_consented_raw_rows(full_pull, reference: Reference):
    """Multiset of (admitted_at, hba1c, diagnosis), then of whole released rows with the generalisations applied."""
    expected = reference.consented_rows(PURPOSE)
    rows = full_pull.table.to_pylist()
    assert_same_multiset(((r["admitted_at"], norm_float(r["hba1c"]), r["diagnosis"]) for r in rows),
                         ((r["admitted_at"], norm_float(r["hba1c"]), r["diagnosis"]) for r in expected),
                         "(admitted_at, hba1c, diagnosis)")
    assert_same_multiset((output_row(r) for r in rows), (released_row(r) for r in expected),
                         "(birth_date as Jan 1 of its year, postcode[:2], diagnosis, hba1c, admitted_at)")


def test_generalisations(full_pull):
    births = [d for d in full_pull.table.column("birth_date").to_pylist() if d is not None]
    assert births, "no birth_date sent"
    assert all(isinstance(d, date) and (d.month, d.day) == (1, 1) for d in births)
    postcodes = [p for p in full_pull.table.column("postcode").to_pylist() if p is not None]
    assert postcodes, "no postcode sent"
    assert all(len(p) <= 2 for p in postcodes)
    assert any(len(p) == 2 for p in postcodes)


def test_each_pseudonym_carries_exactly_one_consented_subjects_rows(full_pull, reference: Reference):
    """Group the stream by pseudonym and the consented raw rows by patient_id: the groups must be the same multiset,
    so a pseudonym maps to exactly one subject and back."""
    consented = reference.consented(PURPOSE)
    expected_groups = [reference.signature(s) for s in reference.by_subject if s in consented]
    sent_groups = list(groups_by_pseudonym(full_pull.table).values())
    assert len(sent_groups) == len(expected_groups), "one pseudonym per consented subject with rows"
    assert_same_multiset(sent_groups, expected_groups, "rows grouped by subject")


# ------------------------------------------------------------------------------------------------ pseudonyms

def test_pseudonyms_are_stable_within_an_organisation(gateway: Gateway, client, full_pull, second_org):
    again = pull(client, call_options(gateway.keys["trainer-de"]))
    assert groups_by_pseudonym(again.table) == groups_by_pseudonym(full_pull.table)
    # another principal of the same organisation gets the same pseudonyms
    colleague = pull(client, call_options(second_org["dkfz2"]))
    assert groups_by_pseudonym(colleague.table) == groups_by_pseudonym(full_pull.table)


def test_pseudonyms_differ_across_organisations(gateway: Gateway, client, full_pull, second_org):
    other = pull(client, call_options(second_org["embl"]))
    mine, theirs = groups_by_pseudonym(full_pull.table), groups_by_pseudonym(other.table)
    assert all(PSEUDONYM_RE.match(p) for p in theirs)
    assert Counter(mine.values()) == Counter(theirs.values()), "both organisations get the same consented rows"
    assert not set(mine) & set(theirs), "pseudonym sets of two organisations must be disjoint"
    # the same subject (identified by its rows) has a different pseudonym in each organisation
    by_rows_mine = {rows: p for p, rows in mine.items()}
    by_rows_theirs = {rows: p for p, rows in theirs.items()}
    common = set(by_rows_mine) & set(by_rows_theirs)
    assert common
    assert all(by_rows_mine[r] != by_rows_theirs[r] for r in common)


# ---------------------------------------------------------------------------------------------- the JSON command

def _project(row: dict, columns: list[str]) -> tuple:
    out = []
    for c in columns:
        v = row[c]
        if c == "birth_date":
            v = None if v is None else date(v.year, 1, 1)
        elif c == "postcode":
            v = None if v is None else v[:2]
        out.append(norm_float(v) if c == "hba1c" else v)
    return tuple(out)


def _gt7(x) -> bool:
    return x is not None and x == x and x > 7


def test_command_columns_and_filter(gateway: Gateway, client, reference: Reference):
    columns = ["diagnosis", "patient_id", "hba1c"]
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=columns, filter="hba1c > 7"))
    assert result.info.schema.names == columns
    assert result.table.schema.names == columns
    assert is_string_type(result.table.schema.field("patient_id").type)
    assert all(PSEUDONYM_RE.match(p) for p in result.table.column("patient_id").to_pylist())
    hba = result.table.column("hba1c").to_pylist()
    nan_rows = [h for h in hba if h is not None and h != h]
    assert all(_gt7(h) for h in hba if h == h), "every sent row satisfies the filter"
    expected = [r for r in reference.consented_rows(PURPOSE) if _gt7(r["hba1c"])]
    assert expected, "the demo has consented rows with hba1c > 7"
    # NaN ordering in SQL engines is a convention; compare the non-NaN rows exactly and bound the NaN ones.
    raw_nan = [r for r in reference.consented_rows(PURPOSE) if r["hba1c"] is not None and r["hba1c"] != r["hba1c"]]
    assert len(nan_rows) in (0, len(raw_nan))
    assert_same_multiset(((d, h) for d, h in zip(result.table.column("diagnosis").to_pylist(), hba) if h == h),
                         ((r["diagnosis"], r["hba1c"]) for r in expected), "(diagnosis, hba1c) with hba1c > 7")


def test_filter_applies_only_to_consented_rows(gateway: Gateway, client, reference: Reference):
    """A filter that every raw row satisfies returns exactly the consented rows, never more."""
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=["admitted_at", "hba1c"], filter="admitted_at IS NOT NULL OR "
                                                                              "admitted_at IS NULL"))
    expected = reference.consented_rows(PURPOSE)
    assert result.table.num_rows == len(expected) < reference.raw.num_rows
    assert_same_multiset(((r["admitted_at"], norm_float(r["hba1c"])) for r in result.table.to_pylist()),
                         ((r["admitted_at"], norm_float(r["hba1c"])) for r in expected), "(admitted_at, hba1c)")


def test_filter_on_a_generalised_column_sees_the_released_value(gateway: Gateway, client, reference: Reference):
    """The filter runs after enforcement: on birth_date it sees Jan 1 of the year, not the raw date."""
    # Pick a year in the consented rows, then ask for rows born after June 1 of that year: on released values
    # (Jan 1) none of that year's rows match.
    years = sorted({r["birth_date"].year for r in reference.consented_rows(PURPOSE) if r["birth_date"]})
    year = years[len(years) // 2]
    flt = f"birth_date > DATE '{year}-06-01' AND birth_date < DATE '{year + 1}-01-01'"
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=["birth_date"], filter=flt))
    assert result.table.num_rows == 0, f"{flt} matched {result.table.num_rows} rows: filter saw raw dates"
    # ... while the year itself is there
    flt_year = f"birth_date = DATE '{year}-01-01'"
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=["birth_date"], filter=flt_year))
    expected = sum(1 for r in reference.consented_rows(PURPOSE) if r["birth_date"] and r["birth_date"].year == year)
    assert result.table.num_rows == expected > 0


def fill_nulls_descriptor(fill: dict[str, str], **command: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"dataset": DATASET, "fill_nulls": fill, **command}).encode())


def test_fill_nulls_never_reaches_a_hidden_columns_values(gateway: Gateway, client, reference: Reference):
    """`fill_nulls` (what federated SQL sends each node) adds columns the node does not send as nulls: naming the
    hidden direct identifier `full_name` there gives nulls, and a filter on it sees only nulls (never the raw names:
    no row matches a name that exists, every consented row is NULL); a column the node sends keeps its values."""
    opts = call_options(gateway.keys["trainer-de"])
    consented = reference.consented_rows(PURPOSE)
    some_name = next(r["full_name"] for r in consented if r["full_name"])
    fill = {"full_name": "Utf8", "diagnosis": "Int64"}
    result = pull(client, opts, fill_nulls_descriptor(fill, columns=["full_name", "diagnosis"]))
    assert result.table.num_rows == len(consented)
    assert result.table.column("full_name").null_count == len(consented)
    assert Counter(result.table.column("diagnosis").to_pylist()) == Counter(r["diagnosis"] for r in consented)
    for flt, rows in ((f"full_name = '{some_name}'", 0), ("full_name IS NOT NULL", 0),
                      (f"full_name LIKE '{some_name[:1]}%'", 0), ("full_name IS NULL", len(consented))):
        got = pull(client, opts, fill_nulls_descriptor(fill, columns=["diagnosis"], filter=flt)).table.num_rows
        assert got == rows, (flt, got)
    grouped = pull(client, opts, fill_nulls_descriptor(
        fill, aggregate={"group_by": ["full_name"], "measures": [{"func": "count"}, {"func": "count", "column": "full_name"}]}))
    assert grouped.table.to_pylist() == [{"full_name": None, "count(*)": len(consented), "count(full_name)": 0}]
    with pytest.raises(pa.ArrowInvalid, match="`fill_nulls` gives column `x` the unknown type `NotAType`"):
        pull(client, opts, fill_nulls_descriptor({"x": "NotAType"}))


@pytest.mark.parametrize("ty", ["List(" * 50_000 + "Int64" + ")" * 50_000,
                                "FixedSizeList(2147483647, FixedSizeBinary(2147483647))",
                                "FixedSizeBinary(2147483647)", "Dictionary(Utf8, Utf8)", "List(Int64)",
                                'Struct("a": Int64)'])
def test_fill_nulls_takes_only_flat_types(gateway: Gateway, client, ty: str):
    """Types whose parsing or null column could exhaust the stack or memory are refused before either, with and
    without credentials, and the gateway keeps serving."""
    for opts in (call_options(gateway.keys["trainer-de"]), flight.FlightCallOptions()):
        with pytest.raises((flight.FlightError, pa.ArrowInvalid)):
            pull(client, opts, fill_nulls_descriptor({"x": ty}, columns=["diagnosis"]))
    assert pull(client, call_options(gateway.keys["trainer-de"]),
                command_descriptor(columns=["diagnosis"], limit=1)).table.num_rows == 1


@pytest.mark.parametrize("limit", [1, 10, 137])
def test_command_limit(gateway: Gateway, client, reference: Reference, limit: int):
    columns = ["patient_id", "birth_date", "postcode", "diagnosis", "hba1c", "admitted_at"]
    result = pull(client, call_options(gateway.keys["trainer-de"]), command_descriptor(columns=columns, limit=limit))
    assert result.table.num_rows == limit
    pool = Counter(_project(r, columns[1:]) for r in reference.consented_rows(PURPOSE))
    sent = Counter(_project(r, columns[1:]) for r in result.table.to_pylist())
    assert not sent - pool, "limited rows must be consented rows"


def test_command_limit_with_filter(gateway: Gateway, client):
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=["hba1c"], filter="hba1c > 7", limit=5))
    assert result.table.num_rows == 5
    assert all(_gt7(h) for h in result.table.column("hba1c").to_pylist())


def test_command_limit_larger_than_the_data(gateway: Gateway, client, reference: Reference):
    result = pull(client, call_options(gateway.keys["trainer-de"]),
                  command_descriptor(columns=["hba1c"], limit=10 * reference.raw.num_rows))
    assert result.table.num_rows == len(reference.consented_rows(PURPOSE))


def test_command_without_columns_is_the_full_view(gateway: Gateway, client, full_pull):
    result = pull(client, call_options(gateway.keys["trainer-de"]), command_descriptor())
    assert result.table.schema.names == RELEASED_COLUMNS
    assert groups_by_pseudonym(result.table) == groups_by_pseudonym(full_pull.table)


def test_sub_purpose_pull_gets_the_sub_purpose_consent(gateway: Gateway, client, reference: Reference):
    result = pull(client, call_options(gateway.keys["trainer-de"], SUB_PURPOSE))
    expected = reference.consented_rows(SUB_PURPOSE)
    assert result.table.num_rows == len(expected)
    assert_same_multiset((output_row(r) for r in result.table.to_pylist()), (released_row(r) for r in expected),
                         f"released rows for {SUB_PURPOSE}")


def test_tickets_are_reusable_by_their_owner(gateway: Gateway, client):
    opts = call_options(gateway.keys["trainer-de"])
    info = client.get_flight_info(command_descriptor(columns=["hba1c"], limit=3), opts)
    first = read_endpoints(client, info, opts)
    second = read_endpoints(client, info, opts)
    assert first.num_rows == second.num_rows == 3


def test_raw_ids_of_consented_subjects_are_not_guessable_from_pseudonyms(full_pull, reference: Reference):
    """Sanity: a pseudonym is not a plain hash of the id (HMAC with a secret key)."""
    consented = reference.consented(PURPOSE)
    plain = set()
    for s in consented:
        plain.add(hashlib.md5(s.encode()).hexdigest())
        plain.add(hashlib.sha256(s.encode()).hexdigest()[:32])
    assert not plain & set(full_pull.table.column("patient_id").to_pylist())
