"""Security features beyond TLS and the audit chain (see test_tls.py, test_audit_chain.py):

- the audit log as a read-only SQL table `audit` for auditors (Flight SQL through ADBC), invisible to everyone else,
  and the reserved dataset name;
- tickets: Ed25519-signed claims that name the issuing node, key, principal, organisation, member state, purpose,
  consent and policy version, verifiable by anyone with the key published at `/api/v1/keys`;
- per-principal request-rate and open-stream limits (RESOURCE_EXHAUSTED / 429 naming the limit), on a node of its own
  configured with small limits.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pyarrow.flight as flight
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import (DATASET, PURPOSE, Gateway, assert_json_error, call_options, expect_status, http, path_descriptor,
                      start_gateway, stop_process)
from test_admin import manifest_json
from test_flight_sql import adbc_connect, run_sql, scalar


def expect_exhausted(call, fragment: str) -> str:
    """RESOURCE_EXHAUSTED arrives in pyarrow as ArrowInvalid whose text names the status."""
    with pytest.raises(Exception) as info:
        call()
    text = str(info.value)
    assert "resource exhausted" in text.lower() and fragment in text, f"{type(info.value).__name__}: {text}"
    return text


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ======================================================================================================================
# The audit log as SQL
# ======================================================================================================================

def test_auditors_query_the_audit_log_with_sql(gateway: Gateway, client):
    # something to find: a pull by the trainer
    opts = call_options(gateway.keys["trainer-de"])
    info = client.get_flight_info(path_descriptor(), opts)
    client.do_get(info.endpoints[0].ticket, opts).read_all()
    rest = http("GET", gateway.url("/api/v1/audit?limit=100000"), key=gateway.keys["auditor-eu"]).body
    with adbc_connect(gateway, key=gateway.keys["auditor-eu"], purpose="audit") as conn:
        total = scalar(conn, "SELECT count(*) FROM audit")
        # the table holds every entry up to this query (its own sql_query entry is written before it runs)
        assert total >= len(rest), (total, len(rest))
        t = run_sql(conn, "SELECT principal, action, sum(rows_sent) AS rows FROM audit "
                          "WHERE principal = 'trainer-de' AND action = 'do_get' AND status = 'completed' GROUP BY 1, 2")
        assert t.num_rows == 1 and t.column("rows")[0].as_py() > 0, t
        ids = run_sql(conn, "SELECT id FROM audit ORDER BY id").column("id").to_pylist()
        # (each query adds its own entries, so later reads see more)
        assert ids == sorted(set(ids)) and len(ids) >= total
        # read-only: no statement other than a query is accepted
        for stmt in ("DELETE FROM audit", "UPDATE audit SET principal = 'x'", "INSERT INTO audit (id) VALUES (1)",
                     "DROP TABLE audit"):
            with pytest.raises(Exception) as info:
                run_sql(conn, stmt)
            assert "PermissionDenied" in str(info.value) or "InvalidArgument" in str(info.value), str(info.value)
    # the auditor's query is itself audited, naming the table
    entries = http("GET", gateway.url("/api/v1/audit?principal=auditor-eu&limit=20"),
                   key=gateway.keys["auditor-eu"]).body
    assert any(e["action"] == "sql_query" and e["dataset"] == "audit" and "FROM audit" in (e["statement"] or "")
               for e in entries), entries


def test_the_audit_table_does_not_exist_for_others(gateway: Gateway):
    for principal in ("trainer-de", "steward-fr"):
        with adbc_connect(gateway, key=gateway.keys[principal]) as conn:
            with pytest.raises(Exception) as info:
                run_sql(conn, "SELECT count(*) FROM audit")
            text = str(info.value)
            assert "NOT_FOUND" in text or "not found" in text, text
            tables = run_sql(conn, "SELECT 1 AS one").num_rows  # the connection still works
            assert tables == 1


def test_no_dataset_may_be_called_audit(scratch_gateway: Gateway):
    gw = scratch_gateway
    body = manifest_json(gw, "audit")
    err = assert_json_error(http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], body=body), 400)
    assert "reserved" in err["error"], err


# ======================================================================================================================
# Tickets and keys
# ======================================================================================================================

def test_tickets_carry_verifiable_claims(gateway: Gateway, client):
    keys = http("GET", gateway.url("/api/v1/keys")).body  # public: no credentials
    assert keys["keys"] and keys["keys"][0]["crv"] == "Ed25519" and keys["keys"][0]["alg"] == "EdDSA", keys
    jwk = keys["keys"][0]
    public = Ed25519PublicKey.from_public_bytes(b64url(jwk["x"]))
    info = client.get_flight_info(path_descriptor(), call_options(gateway.keys["trainer-de"]))
    ticket = info.endpoints[0].ticket.ticket
    body_b64, sig_b64 = ticket.decode().split(".")
    body = b64url(body_b64)
    # Domain-separated (README "Tickets and keys"): the signature covers the ticket context, then the claims.
    public.verify(b64url(sig_b64), b"passerelle-ticket-v1\n" + body)  # raises if the signature is not the node's
    with pytest.raises(InvalidSignature):
        public.verify(b64url(sig_b64), body)  # never over the bare claims, as earlier releases signed
    claims = json.loads(body)
    me = gateway.demo_principals["trainer-de"]
    assert claims["iss"] == keys["node_id"] and claims["kid"] == jwk["kid"], claims
    assert (claims["principal"], claims["org"], claims["member_state"]) == ("trainer-de", me["org"],
                                                                          me["member_state"]), claims
    assert claims["purpose"] == PURPOSE and claims["dataset"] == DATASET, claims
    assert claims["exp"] > claims["iat"] >= time.time() - 60, claims
    assert isinstance(claims["consent_version"], int) and claims["policy_version"], claims
    # a byte changed anywhere: refused, no data
    tampered = body_b64[:-2] + ("A" if body_b64[-2] != "A" else "B") + body_b64[-1] + "." + sig_b64
    expect_status("INVALID_ARGUMENT", lambda: client.do_get(flight.Ticket(tampered.encode()),
                                                            call_options(gateway.keys["trainer-de"])).read_all())


# ======================================================================================================================
# Limits
# ======================================================================================================================

@pytest.fixture(scope="module")
def limited(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("limited")
    cfg = d / "limits.toml"
    cfg.write_text("[limits]\nrequests_per_second = 2\nburst = 6\nmax_streams_per_principal = 1\n")
    gw = start_gateway(passerelle_bin, d / "data", demo_rows=200000, config=cfg)
    try:
        yield gw
    finally:
        stop_process(gw.proc)


def test_request_rate_is_limited_per_principal(limited: Gateway):
    gw = limited
    statuses = [http("GET", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"]).status for _ in range(12)]
    assert statuses[:6] == [200] * 6 and 429 in statuses, statuses
    err = assert_json_error(http("GET", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"]), 429)
    assert "requests_per_second" in err["error"] and "steward-fr" in err["error"], err
    # another principal is not affected
    assert http("GET", gw.url("/api/v1/datasets"), key=gw.keys["auditor-eu"]).status == 200
    client = flight.connect(f"grpc://{gw.flight_addr}")
    expect_exhausted(lambda: [client.get_flight_info(path_descriptor(), call_options(gw.keys["steward-fr"]))
                              for _ in range(3)], "requests_per_second")
    time.sleep(3.5)  # the bucket refills at 2 per second
    assert http("GET", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"]).status == 200


def test_open_streams_are_limited_per_principal(limited: Gateway):
    gw = limited
    time.sleep(3.5)
    client = flight.connect(f"grpc://{gw.flight_addr}")
    opts = call_options(gw.keys["trainer-de"])
    info = client.get_flight_info(path_descriptor(), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    reader.read_chunk()  # the first stream is open and unread beyond one batch
    try:
        expect_exhausted(lambda: client.do_get(info.endpoints[0].ticket, opts).read_all(), "max_streams_per_principal")
    finally:
        reader.cancel()
    # once the first stream is gone, the slot is free again
    deadline = time.monotonic() + 10
    while True:
        try:
            time.sleep(0.6)
            n = client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows
            assert n > 0
            break
        except flight.FlightError:
            if time.monotonic() > deadline:
                raise


# ======================================================================================================================
# Permits that would have poisoned the metadata or widened access
# ======================================================================================================================

@pytest.mark.parametrize("expires", ["9999-12-31T23:00:00-01:00", "0000-01-01T00:00:00+01:00"])
def test_permit_expiry_out_of_range_is_refused_and_the_node_keeps_working(scratch_gateway: Gateway, expires):
    gw = scratch_gateway
    resp = http("POST", gw.url(f"/api/v1/datasets/{DATASET}/permits"), key=gw.keys["steward-fr"],
                body={"org": "embl", "purpose": PURPOSE, "expires": expires})
    err = assert_json_error(resp, 400)
    assert "out of range" in err["error"], err
    # later metadata changes still take effect
    ok = http("POST", gw.url(f"/api/v1/datasets/{DATASET}/permits"), key=gw.keys["steward-fr"],
              body={"org": "embl", "purpose": PURPOSE, "expires": "2099-01-01T00:00:00Z"})
    assert ok.status in (200, 201), ok.text[:500]


@pytest.mark.parametrize("org", ["*", "DE/*", "de/dkfz", "DE/a/b", "DEU/dkfz", "DE/"])
def test_permits_name_one_organisation(scratch_gateway: Gateway, org):
    """A permit names one organisation, `org` or `CC/org` (federation: see test_federation); never a wildcard or a
    malformed member state."""
    gw = scratch_gateway
    resp = http("POST", gw.url(f"/api/v1/datasets/{DATASET}/permits"), key=gw.keys["steward-fr"],
                body={"org": org, "purpose": PURPOSE})
    err = assert_json_error(resp, 400)
    assert "organisation" in err["error"], err


# ======================================================================================================================
# Errors of the HTTP layer keep the contract's JSON body
# ======================================================================================================================

def test_a_path_that_is_not_utf8_is_a_json_400(gateway: Gateway):
    resp = http("GET", gateway.url("/api/v1/datasets/%FF"), key=gateway.keys["steward-fr"])
    err = assert_json_error(resp, 400)
    assert "path" in err["error"], err


def test_a_body_over_the_limit_is_a_json_413(gateway: Gateway):
    body = b"[" + b" " * (3 * 1024 * 1024) + b"]"
    resp = http("POST", gateway.url("/api/v1/datasets"), key=gateway.keys["steward-fr"], raw=body)
    err = assert_json_error(resp, 413)
    assert "larger" in err["error"], err
