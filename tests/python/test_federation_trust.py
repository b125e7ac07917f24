"""Trust boundaries of federation assertions (issue #15, item 3), against the real nodes of test_federation.py.

- Roles: an assertion names the principal's role; the home node asserts only for the roles of `[federation] roles`
  (trainers by default), so a steward or auditor is refused at home and no peer hears of it; a peer decides with the
  asserted role through its own policy (only trainers pull data, a peer's admin or auditor sees nothing), and a role
  changed in transit breaks the signature.
- Binding: an assertion is good for the federated dataset and purpose it was issued for, and a listing assertion only
  for the `federations` listing.
- Time: `exp - iat` at most 300 s whatever the issuer says, `iat` at most 60 s in the peer's future; the home node
  refuses `assertion_ttl_secs` above 300.
- Domain separation: assertions are signed over `passerelle-assertion-v2\\n` + claims and tickets over
  `passerelle-ticket-v1\\n` + claims with the same node key, so neither verifies as the other, and claims signed
  bare (as before) verify as neither.
- `allow_bearer = false` at a peer: an assertion needs the principal's or the home node's certificate on the
  connection (a two-node mTLS federation of its own).

Forged assertions are signed with the home node's real key (test_federation.AssertionForger), so each case changes
exactly one thing and the signature is otherwise genuine.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from conftest import expect_status, rfc3339, run_cli, stop_process
from test_federation import (ASSERTION_CONTEXT, FEDERATION, HOME, PURPOSE, SPECS, SQL_FEDERATION, STEWARD,  # noqa: F401
                             TICKET_CONTEXT, TRAINER, AssertionForger, Federation, FedNode, audit_entries, b64d, b64e,
                             connect_url, expect_refused_without_data, fed, federated_command, flip, free_ports,
                             options, register_part, skip_pull, sql_parts, toml_str, wait_until_local_access)
from test_tls import Pki, run_gen_sh

AUDITOR = "auditor-eu"
MAX_TTL = 300
MAX_SKEW = 60


def now() -> int:
    return int(datetime.now(timezone.utc).timestamp())


def fr_part(fed: Federation, skip_pull) -> tuple[str, flight.Ticket, AssertionForger]:
    """gw-fr's assertion and first ticket from the shared eu_diabetes pull, and a forger for that assertion."""
    answer, _ = skip_pull
    assertion = answer.nodes["gw-fr"]["assertion"]
    return assertion, answer.endpoints["gw-fr"][0].ticket, AssertionForger(fed.home, assertion)


def home_client_of(fed: Federation, principal: str) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
    """`principal` at the home node: its certificate with mTLS, its bearer key otherwise."""
    if fed.tls:
        return fed.home.connect(principal), options()
    return fed.home.connect(), fed.home.local_options(principal)


# ======================================================================================================================
# Roles
# ======================================================================================================================

def test_assertions_carry_the_role_dataset_and_a_capped_lifetime(fed: Federation, skip_pull):
    _, _, forger = fr_part(fed, skip_pull)
    c = forger.claims
    assert c["v"] == 2 and c["role"] == "trainer" and c["dataset"] == FEDERATION and c["purpose"] == PURPOSE, c
    assert 0 < c["exp"] - c["iat"] <= MAX_TTL, c


@pytest.mark.parametrize("principal", [STEWARD, AUDITOR])
def test_a_steward_or_auditor_of_the_home_node_gets_no_assertion(fed: Federation, principal: str):
    """Refused at home with PERMISSION_DENIED naming the rule; no peer audits anything of that principal (it was
    never asked), and ListFlights at home lists no peer's federated dataset for it."""
    since = rfc3339(datetime.now(timezone.utc))
    c, opts = home_client_of(fed, principal)
    try:
        for command in ({"on_partial": "skip"}, {}):
            msg = expect_status("PERMISSION_DENIED", lambda: c.get_flight_info(federated_command(**command), opts),
                                fragment="does not reach federation peers")
            assert "[federation] roles" in msg and "trainer" in msg, msg
        listed = [json.loads(i.app_metadata or b"{}") for i in c.list_flights(b"", opts)]
    finally:
        c.close()
    for m in listed:
        if "federation" in m:
            assert m["nodes"] == [HOME], f"a peer showed {principal} a federated dataset: {m}"
    for node_id in ("gw-fr", "gw-it"):
        assert audit_entries(fed.nodes[node_id], f"{principal}@{HOME}", since=since) == [], node_id


@pytest.mark.parametrize("role,fragment", [("steward", "role `steward`"), ("auditor", "role `auditor`"),
                                           ("admin", "role `admin`")])
def test_a_peer_decides_with_the_asserted_role(fed: Federation, skip_pull, role: str, fragment: str):
    """The home node's own key signs trainer-de's assertion with another role: gw-fr decides with that role through
    its own policy and refuses the stream (only trainers pull data; a peer's admin or auditor is not all-seeing),
    at DoGet and at GetFlightInfo."""
    _, ticket, forger = fr_part(fed, skip_pull)
    forged = forger.sign(role=role)
    with fed.part_client("gw-fr", certificate=False) as c:
        assert c.do_get(ticket, options(assertion=forger.sign())).read_all().num_rows > 0
        expect_refused_without_data("PERMISSION_DENIED", c, ticket, options(assertion=forged), role, fragment=fragment)
        expect_status("PERMISSION_DENIED", lambda: c.get_flight_info(federated_command(), options(assertion=forged)))
    # gw-it grants dkfz nothing: an asserted admin does not see its part either.
    it_forger = AssertionForger(fed.home, forger.sign(aud="gw-it"))
    with fed.part_client("gw-it", certificate=False) as c:
        msg = expect_status("PERMISSION_DENIED",
                            lambda: c.get_flight_info(federated_command(), options(assertion=it_forger.sign(role=role))))
        assert "does not release its part" in msg or fragment in msg, msg


def test_a_role_altered_in_transit_or_unknown_is_unauthenticated(fed: Federation, skip_pull):
    assertion, ticket, forger = fr_part(fed, skip_pull)
    _, sig = assertion.split(".")
    altered = b64e(json.dumps({**forger.claims, "role": "admin"}).encode()) + "." + sig
    with fed.part_client("gw-fr", certificate=False) as c:
        expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=altered), "role altered",
                                    fragment="signature")
        expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=forger.sign(role="superuser")),
                                    "unknown role", fragment="malformed")


# ======================================================================================================================
# Binding to dataset and purpose
# ======================================================================================================================

def test_an_assertion_is_bound_to_its_dataset_and_purpose(fed: Federation, skip_pull, sql_parts):
    assertion, ticket, forger = fr_part(fed, skip_pull)
    sql_ticket = fed.parse(fed.get_info(dataset=SQL_FEDERATION), SQL_FEDERATION).endpoints["gw-fr"][0].ticket
    with fed.part_client("gw-fr", certificate=False) as c:
        # eu_diabetes's assertion on eu_sql: its FlightInfo and a ticket of its part
        expect_status("UNAUTHENTICATED", lambda: c.get_flight_info(
            flight.FlightDescriptor.for_command(json.dumps({"dataset": SQL_FEDERATION}).encode()),
            options(assertion=assertion)), fragment=f"issued for federated dataset `{FEDERATION}`")
        expect_refused_without_data("UNAUTHENTICATED", c, sql_ticket, options(assertion=assertion),
                                    "eu_diabetes's assertion on an eu_sql ticket", fragment="issued for")
        # ... naming the local part instead of the federation changes nothing
        expect_status("UNAUTHENTICATED", lambda: c.get_flight_info(
            flight.FlightDescriptor.for_command(json.dumps({"dataset": "sql_fr"}).encode()),
            options(assertion=assertion)), fragment="issued for")
        # another purpose declared with it
        expect_refused_without_data("UNAUTHENTICATED", c, ticket,
                                    options(assertion=assertion, purpose="research/epidemiology"),
                                    "another purpose", fragment="purpose")
        # re-signed for another dataset, or as a listing assertion
        for forged, fragment in ((forger.sign(dataset=SQL_FEDERATION), f"`{SQL_FEDERATION}`"),
                                 (forger.sign(dataset=None), "listing")):
            expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=forged), fragment,
                                        fragment=fragment)
        # a data assertion does not list federations
        action = flight.Action("federations", b"")
        expect_status("UNAUTHENTICATED", lambda: list(c.do_action(action, options(assertion=assertion))),
                      fragment="not for listing")
        # the genuine assertion still reads its own part
        assert c.do_get(ticket, options(assertion=assertion)).read_all().num_rows > 0


# ======================================================================================================================
# Lifetime and clock skew
# ======================================================================================================================

def test_assertion_lifetime_is_capped_and_iat_bounded(fed: Federation, skip_pull):
    _, ticket, forger = fr_part(fed, skip_pull)
    t = now()
    with fed.part_client("gw-fr", certificate=False) as c:
        cases = {
            "a day long": (forger.sign(iat=t, exp=t + 86400), "lifetime"),
            "one second over the cap": (forger.sign(iat=t - 10, exp=t - 10 + MAX_TTL + 1), "lifetime"),
            "exp before iat": (forger.sign(iat=t + 10, exp=t + 5), "lifetime"),
            "issued in the future": (forger.sign(iat=t + MAX_SKEW + 60, exp=t + MAX_SKEW + 120), "future"),
        }
        for what, (forged, fragment) in cases.items():
            expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=forged), what,
                                        fragment=fragment)
        # within the skew and the cap: accepted
        ok = forger.sign(iat=t + 20, exp=t + 20 + MAX_TTL)
        assert c.do_get(ticket, options(assertion=ok)).read_all().num_rows > 0


def test_a_home_node_refuses_an_assertion_ttl_above_the_cap(passerelle_bin: Path, tmp_path: Path):
    config = tmp_path / "passerelle.toml"
    config.write_text("[federation]\nassertion_ttl_secs = 3600\n")
    proc = run_cli(passerelle_bin, tmp_path / "data", "config", "show", "--config", str(config), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "assertion_ttl_secs" in proc.stderr and "300" in proc.stderr, proc.stderr
    config.write_text("[federation]\nassertion_ttl_secs = 300\nroles = [\"trainer\", \"steward\"]\n")
    shown = run_cli(passerelle_bin, tmp_path / "data", "config", "show", "--config", str(config)).stdout
    assert "assertion_ttl_secs = 300" in shown and "steward" in shown, shown


# ======================================================================================================================
# Domain separation of tickets and assertions
# ======================================================================================================================

def test_tickets_and_assertions_never_verify_as_each_other(fed: Federation, skip_pull):
    assertion, ticket, forger = fr_part(fed, skip_pull)
    answer, _ = skip_pull
    home_ticket = answer.endpoints[HOME][0].ticket  # signed with the home node's key, as the assertion is
    with fed.part_client("gw-fr", certificate=False) as c:
        for what, forged in {
            "claims signed bare, as before domain separation": forger.sign(context=b""),
            "claims signed as a ticket": forger.sign(context=TICKET_CONTEXT),
            "the home node's ticket": home_ticket.ticket.decode(),
        }.items():
            expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=forged), what)
    # the assertion as a ticket at the node whose key signed it
    c, opts = home_client_of(fed, TRAINER)
    try:
        expect_refused_without_data("INVALID_ARGUMENT", c, flight.Ticket(assertion.encode()), opts,
                                    "assertion as a ticket", fragment="malformed")
        # a ticket re-signed under the assertion context neither
        body, _ = home_ticket.ticket.decode().split(".")
        resigned = f"{body}.{b64e(forger.key.sign(ASSERTION_CONTEXT + b64d(body)))}"
        expect_refused_without_data("INVALID_ARGUMENT", c, flight.Ticket(resigned.encode()), opts,
                                    "ticket signed as an assertion", fragment="malformed")
        assert c.do_get(home_ticket, opts).read_all().num_rows > 0
    finally:
        c.close()


# ======================================================================================================================
# allow_bearer = false at a peer: an assertion needs a certificate
# ======================================================================================================================

def test_a_certificate_only_peer_refuses_a_bare_assertion(passerelle_bin: Path,
                                                          tmp_path_factory: pytest.TempPathFactory):
    """gw-de (home) and gw-fr (peer, allow_bearer = false) over mTLS. The home node asks gw-fr with its own gateway
    certificate; at gw-fr the assertion is accepted over a connection made with trainer-de's certificate, and the
    certificate alone reads the part (the ticket keeps the asserted role); the same assertion without a client
    certificate, or with a third node's certificate, is refused."""
    base = tmp_path_factory.mktemp("federation-certonly")
    run_gen_sh(base / "pki")
    pki = Pki(base / "pki")
    specs = [s for s in SPECS if s.node_id in ("gw-fr", HOME)]
    ports = free_ports(2 * len(specs))
    nodes = {s.node_id: FedNode(s, "mtls", base / s.node_id, ports[2 * i], ports[2 * i + 1], pki)
             for i, s in enumerate(specs)}
    fr, de = nodes["gw-fr"], nodes[HOME]
    try:
        for n in nodes.values():
            n.learn_key(passerelle_bin)
        for n in nodes.values():
            n.config_path.write_text(n.config_text([p for p in nodes.values() if p is not n]))
            n.start(passerelle_bin)
        for n in nodes.values():
            register_part(n)
            wait_until_local_access(n)
        # gw-fr becomes certificate-only
        fr.config_path.write_text(fr.config_text([de], allow_bearer=False))
        stop_process(fr.gw.proc)
        fr.start(passerelle_bin)

        home = de.connect(TRAINER)
        try:
            info = home.get_flight_info(federated_command(on_partial="skip"), options())
        finally:
            home.close()
        meta = json.loads(info.app_metadata)
        entry = next(e for e in meta["nodes"] if e["node"] == "gw-fr")
        assert entry["status"] == "ok" and entry.get("assertion"), meta
        assertion = entry["assertion"]
        endpoint = next(e for e in info.endpoints if e.locations[0].uri.decode() == fr.advertise_url)

        def client(identity: str | None) -> flight.FlightClient:
            return connect_url(fr.advertise_url, pki, identity)

        c = client(None)
        try:
            expect_refused_without_data("UNAUTHENTICATED", c, endpoint.ticket, options(assertion=assertion),
                                        "assertion without a certificate", fragment="client certificate")
        finally:
            c.close()
        c = client("gw-it")
        try:
            expect_refused_without_data("UNAUTHENTICATED", c, endpoint.ticket, options(assertion=assertion),
                                        "assertion over a third node's certificate", fragment="neither")
        finally:
            c.close()
        c = client(TRAINER)
        try:
            with_assertion = c.do_get(endpoint.ticket, options(assertion=assertion)).read_all()
            certificate_only = c.do_get(endpoint.ticket, options()).read_all()
        finally:
            c.close()
        assert with_assertion.num_rows > 0 and certificate_only.num_rows == with_assertion.num_rows
    finally:
        for n in nodes.values():
            if n.gw is not None:
                stop_process(n.gw.proc)
