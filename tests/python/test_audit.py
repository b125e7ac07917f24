"""Every GetFlightInfo/DoGet decision is audited: `audit list --json` and `GET /api/v1/audit`.

A principal of its own (`audit-probe`, org dkfz) makes a known sequence of calls, so its entries can be asserted
exactly, whatever the other tests do."""

from __future__ import annotations

from typing import Any

import pyarrow.flight as flight
import pytest

from conftest import (DATASET, OTHER_PURPOSE, POLL_DEADLINE, PURPOSE, Gateway, Reference, assert_json_error,
                      call_options, command_descriptor, expect_status, http, path_descriptor, poll_until,
                      read_endpoints)

FIELDS = {"id", "time", "principal", "organisation", "member_state", "purpose", "dataset", "columns", "filter",
          "action", "decision", "reason", "consent_version", "rows_sent", "rows_withheld", "status"}
PROBE = "audit-probe"
UNKNOWN = "no_such_dataset_audit"


def _entries(gateway: Gateway, *filters: str) -> list[dict[str, Any]]:
    out = gateway.cli_json("audit", "list", *filters)
    assert isinstance(out, list), out
    return out


def _data_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["action"] in ("get_flight_info", "do_get")]


@pytest.fixture(scope="module")
def probe(gateway: Gateway, second_org, reference: Reference) -> dict[str, Any]:
    """Run the probe's calls once; return what was observed."""
    key = gateway.add_principal(PROBE, "dkfz", "DE", "trainer")
    c = gateway.connect()
    try:
        opts = call_options(key)

        def authenticated():
            try:
                list(c.list_flights(b"", opts))
                return True
            except flight.FlightUnauthenticatedError:
                return False

        poll_until(authenticated, what=f"{PROBE} is known to the server")
        # 1. allowed full pull
        info = c.get_flight_info(path_descriptor(), opts)
        full = read_endpoints(c, info, opts)
        # 2. allowed command pull with columns and filter
        cmd_columns, cmd_filter = ["patient_id", "hba1c"], "hba1c > 7"
        cmd_info = c.get_flight_info(command_descriptor(columns=cmd_columns, filter=cmd_filter), opts)
        cmd = read_endpoints(c, cmd_info, opts)
        # 3. denied: purpose not permitted
        expect_status("PERMISSION_DENIED",
                      lambda: c.get_flight_info(path_descriptor(), call_options(key, OTHER_PURPOSE)))
        # 4. denied: unknown dataset
        expect_status("NOT_FOUND", lambda: c.get_flight_info(path_descriptor(UNKNOWN), opts))
        # 5. denied: the probe uses another principal's ticket
        other_info = c.get_flight_info(command_descriptor(columns=["hba1c"], limit=3),
                                       call_options(second_org["embl"]))
        expect_status("PERMISSION_DENIED", lambda: c.do_get(other_info.endpoints[0].ticket, opts).read_all())
    finally:
        c.close()
    return {"endpoints": len(info.endpoints), "rows": full.num_rows, "cmd_endpoints": len(cmd_info.endpoints),
            "cmd_rows": cmd.num_rows, "cmd_columns": cmd_columns, "cmd_filter": cmd_filter,
            "raw_rows": reference.raw.num_rows}


@pytest.fixture(scope="module")
def probe_entries(gateway: Gateway, probe) -> list[dict[str, Any]]:
    """The probe's data-call entries, once every allowed do_get is completed (recording may lag the stream end)."""
    expected_do_gets = probe["endpoints"] + probe["cmd_endpoints"]

    def settled():
        entries = _data_entries(_entries(gateway, "--principal", PROBE))
        done = [e for e in entries if e["action"] == "do_get" and e["decision"] == "allow"
                and e["status"] == "completed"]
        return entries if len(done) >= expected_do_gets else None

    entries, _ = poll_until(settled, deadline=POLL_DEADLINE, what="the probe's do_get entries completed")
    return entries


def test_every_entry_has_the_contract_fields(probe_entries):
    for e in probe_entries:
        assert FIELDS <= set(e), f"missing {FIELDS - set(e)} in {e}"
        assert e["decision"] in ("allow", "deny")
        assert e["status"] in ("requested", "completed", "failed")
        assert e["columns"] is None or isinstance(e["columns"], list)


def test_entries_identify_the_principal(probe_entries):
    assert probe_entries
    for e in probe_entries:
        assert (e["principal"], e["organisation"], e["member_state"]) == (PROBE, "dkfz", "DE"), e


def test_get_flight_info_decisions_are_audited(probe_entries):
    gfi = sorted(((e["dataset"], e["purpose"], e["decision"]) for e in probe_entries
                  if e["action"] == "get_flight_info"))
    assert gfi == sorted([
        (DATASET, PURPOSE, "allow"),  # full pull
        (DATASET, PURPOSE, "allow"),  # command
        (DATASET, OTHER_PURPOSE, "deny"),
        (UNKNOWN, PURPOSE, "deny"),
    ])
    for e in probe_entries:
        if e["decision"] == "deny":
            assert isinstance(e["reason"], str) and e["reason"], f"a denial should say why: {e}"


def test_completed_do_get_counts_rows(probe_entries, probe):
    allowed = [e for e in probe_entries if e["action"] == "do_get" and e["decision"] == "allow"]
    assert len(allowed) == probe["endpoints"] + probe["cmd_endpoints"]
    assert all(e["status"] == "completed" and e["dataset"] == DATASET and e["purpose"] == PURPOSE for e in allowed)
    full = [e for e in allowed if e["filter"] in (None, "")]
    cmd = [e for e in allowed if e["filter"] == probe["cmd_filter"]]
    assert len(full) == probe["endpoints"] and len(cmd) == probe["cmd_endpoints"], allowed
    assert sum(e["rows_sent"] for e in full) == probe["rows"]
    # without a filter, every raw row is either sent or withheld
    assert sum(e["rows_withheld"] for e in full) == probe["raw_rows"] - probe["rows"]
    assert sum(e["rows_sent"] for e in cmd) == probe["cmd_rows"]
    assert all(e["columns"] == probe["cmd_columns"] for e in cmd), cmd
    assert all(isinstance(e["rows_withheld"], int) and e["rows_withheld"] >= 0 for e in allowed)


def test_denied_do_get_is_audited(probe_entries):
    denied = [e for e in probe_entries if e["action"] == "do_get" and e["decision"] == "deny"]
    assert len(denied) == 1, denied
    assert denied[0]["rows_sent"] in (0, None)


def test_audit_list_filters_by_dataset(gateway: Gateway, probe_entries):
    by_dataset = _entries(gateway, "--dataset", UNKNOWN)
    assert by_dataset and all(e["dataset"] == UNKNOWN for e in by_dataset)
    assert {e["id"] for e in probe_entries if e["dataset"] == UNKNOWN} <= {e["id"] for e in by_dataset}
    both = _entries(gateway, "--dataset", UNKNOWN, "--principal", PROBE)
    assert sorted(e["id"] for e in _data_entries(both)) == sorted(
        e["id"] for e in probe_entries if e["dataset"] == UNKNOWN)


def test_entry_ids_are_unique(gateway: Gateway, probe_entries):
    everything = _entries(gateway, "--limit", "1000000")
    ids = [e["id"] for e in everything]
    assert len(ids) == len(set(ids))
    assert {e["id"] for e in probe_entries} <= set(ids)


def test_rest_audit_for_the_auditor_matches_the_cli(gateway: Gateway, probe_entries):
    resp = http("GET", gateway.url(f"/api/v1/audit?principal={PROBE}"), key=gateway.keys["auditor-eu"])
    assert resp.status == 200, resp.text[:500]
    assert isinstance(resp.body, list), resp.text[:500]
    rest = {e["id"]: e for e in resp.body if e.get("principal") == PROBE}
    for e in probe_entries:
        assert e["id"] in rest, f"entry {e['id']} missing from GET /api/v1/audit"
        got = rest[e["id"]]
        assert {k: got.get(k) for k in FIELDS} == {k: e[k] for k in FIELDS}


@pytest.mark.parametrize("who,status", [("trainer-de", 403), ("steward-fr", 403), (None, 401), ("bad", 401)])
def test_rest_audit_is_for_auditors_only(gateway: Gateway, who, status):
    key = {"bad": "not-a-valid-key-" + "y" * 32}.get(who) or (gateway.keys[who] if who else None)
    assert_json_error(http("GET", gateway.url("/api/v1/audit"), key=key), status)
