"""Administration that changes state, on the scratch server: registering a dataset and granting permits over REST
and the CLI, with their role checks."""

from __future__ import annotations

import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import (DATASET, PROPAGATION_LIMIT, PURPOSE, REGISTRY, Gateway, assert_json_error, run_cli,
                      assert_same_multiset, call_options,
                      dataset_names, groups_by_pseudonym, http, listed_datasets, poll_until, pull, path_descriptor,
                      rfc3339, run_cli)

COPY = "demo_patients_copy"


def _absolutise(node: Any, base: Path, rename: tuple[str, str]) -> Any:
    """The demo manifest as JSON: the dataset renamed, relative paths of existing files made absolute (a JSON body has
    no directory to be relative to), TOML datetimes as RFC 3339."""
    if isinstance(node, dict):
        return {k: _absolutise(v, base, rename) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolutise(v, base, rename) for v in node]
    if isinstance(node, datetime):
        return rfc3339(node)
    if isinstance(node, str):
        if node == rename[0]:
            return rename[1]
        if "/" in node and not node.startswith(("/", "file:", "s3:", "gs:", "az:")) and (base / node).exists():
            return str((base / node).resolve())
    return node


def manifest_json(gw: Gateway, new_name: str) -> dict[str, Any]:
    path = gw.reference.manifest_path
    return _absolutise(tomllib.loads(path.read_text()), path.parent, (DATASET, new_name))


@pytest.fixture(scope="module")
def admin(scratch_gateway: Gateway) -> dict[str, str]:
    """Extra principals on the scratch server: a steward of another org, and trainers of three new orgs."""
    gw = scratch_gateway
    keys = {
        "steward-dkfz": gw.add_principal("steward-dkfz", "dkfz", "DE", "steward"),
        "trainer-future": gw.add_principal("trainer-future", "future-org", "NL", "trainer"),
        "trainer-expired": gw.add_principal("trainer-expired", "expired-org", "NL", "trainer"),
        "trainer-rest": gw.add_principal("trainer-rest", "rest-org", "BE", "trainer"),
    }
    # Principals added by the CLI reach the running server within its refresh interval: wait for them.
    for key in keys.values():
        poll_until(lambda key=key: http("GET", gw.url("/api/v1/datasets"), key=key).status == 200,
                   what="the new principals are known to the server")
    return keys


def test_dataset_register_requires_the_controllers_steward(scratch_gateway: Gateway, admin):
    gw = scratch_gateway
    url = gw.url("/api/v1/datasets")
    body = manifest_json(gw, "demo_patients_denied")
    assert_json_error(http("POST", url, body=body), 401)
    assert_json_error(http("POST", url, key=gw.keys["trainer-de"], body=body), 403)
    assert_json_error(http("POST", url, key=gw.keys["auditor-eu"], body=body), 403)
    assert_json_error(http("POST", url, key=admin["steward-dkfz"], body=body), 403)  # steward, but not of aphp
    resp = http("GET", gw.url("/api/v1/datasets/demo_patients_denied"), key=gw.keys["steward-fr"])
    assert_json_error(resp, 404)


@pytest.mark.parametrize("raw", [b"{not json", b'{"name": 42}', b"[]"], ids=["not-json", "bad-type", "not-object"])
def test_dataset_register_rejects_a_malformed_manifest(scratch_gateway: Gateway, raw):
    gw = scratch_gateway
    resp = http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], raw=raw)
    assert resp.status in (400, 422), f"{resp.status}: {resp.text[:500]}"
    assert_json_error(resp, resp.status)


def test_register_and_permit_over_rest_then_pull(scratch_gateway: Gateway, admin):
    gw = scratch_gateway
    steward = gw.keys["steward-fr"]
    resp = http("POST", gw.url("/api/v1/datasets"), key=steward, body=manifest_json(gw, COPY))
    assert resp.status in (200, 201), resp.text[:1000]

    shown = http("GET", gw.url(f"/api/v1/datasets/{COPY}"), key=steward)
    assert shown.status == 200 and shown.body.get("name") == COPY, shown.text[:500]
    assert REGISTRY in shown.text
    assert COPY in dataset_names(http("GET", gw.url("/api/v1/datasets"), key=steward).body)
    assert COPY in dataset_names(gw.cli_json("dataset", "list"))
    assert gw.cli_json("dataset", "show", COPY).get("name") == COPY

    c = gw.connect()
    try:
        opts = call_options(admin["trainer-rest"])
        assert listed_datasets(c, opts) == [], "no permit yet"
        permits = gw.url(f"/api/v1/datasets/{COPY}/permits")
        permit = {"org": "rest-org", "purpose": PURPOSE}
        assert_json_error(http("POST", permits, body=permit), 401)
        # callers who cannot see the dataset get the 404 of an unknown one; those who can see it but do not steward
        # its controller get 403
        assert_json_error(http("POST", permits, key=admin["trainer-rest"], body=permit), 404)
        assert_json_error(http("POST", permits, key=admin["steward-dkfz"], body=permit), 404)
        assert_json_error(http("POST", permits, key=gw.keys["auditor-eu"], body=permit), 403)
        resp = http("POST", permits, key=steward, body=permit)
        assert resp.status in (200, 201), resp.text[:1000]

        _, seconds = poll_until(lambda: listed_datasets(c, opts) == [COPY], what=f"rest-org sees {COPY}")
        assert seconds <= PROPAGATION_LIMIT
        # The copy reads the same file under the same consent registry: the same released rows.
        copy = pull(c, opts, path_descriptor(COPY))
        original = pull(c, call_options(gw.keys["trainer-de"]))
        assert copy.table.schema.names == original.table.schema.names
        assert_same_multiset(groups_by_pseudonym(copy.table).values(), groups_by_pseudonym(original.table).values(),
                             f"{COPY} rows grouped by subject")
    finally:
        c.close()


def test_permit_by_a_permitted_trainer_is_403_json(scratch_gateway: Gateway):
    """trainer-de sees demo_patients (dkfz holds a permit) but is no steward: 403."""
    gw = scratch_gateway
    resp = http("POST", gw.url(f"/api/v1/datasets/{DATASET}/permits"), key=gw.keys["trainer-de"],
                body={"org": "dkfz", "purpose": "research/epidemiology"})
    assert_json_error(resp, 403)


def test_permit_to_an_unknown_dataset_is_404_json(scratch_gateway: Gateway):
    gw = scratch_gateway
    resp = http("POST", gw.url("/api/v1/datasets/no_such_dataset/permits"), key=gw.keys["steward-fr"],
                body={"org": "rest-org", "purpose": PURPOSE})
    assert_json_error(resp, 404)


def test_cli_permit_expiry(scratch_gateway: Gateway, admin):
    """A permit expiring in 3-4 s grants access until then and not after; a far-future one keeps granting."""
    gw = scratch_gateway
    # a whole second, so no sub-second rounding in the policy layer can move the expiry
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=4)
    gw.cli("permit", "add", "--dataset", DATASET, "--org", "expired-org", "--purpose", PURPOSE,
           "--expires", rfc3339(expires))
    gw.cli("permit", "add", "--dataset", DATASET, "--org", "future-org", "--purpose", PURPOSE,
           "--expires", rfc3339(datetime.now(timezone.utc) + timedelta(days=30)))
    short, future = call_options(admin["trainer-expired"]), call_options(admin["trainer-future"])
    c = gw.connect()
    try:
        poll_until(lambda: listed_datasets(c, short) == [DATASET], deadline=2.5, what="the short permit is seen")
        poll_until(lambda: listed_datasets(c, future) == [DATASET], deadline=2.5, what="the long permit is seen")
        poll_until(lambda: listed_datasets(c, short) == [], deadline=8.0, what="the short permit expires")
        gone = datetime.now(timezone.utc)
        assert gone >= expires - timedelta(milliseconds=200), f"permit dropped {expires - gone} before it expired"
        assert gone <= expires + timedelta(seconds=PROPAGATION_LIMIT), f"permit honoured {gone - expires} too long"
        # expired: not usable (whether reported as invisible or as denied), and never INTERNAL
        with pytest.raises((flight.FlightUnauthorizedError, pa.ArrowKeyError)):
            c.get_flight_info(path_descriptor(), short)
        assert listed_datasets(c, future) == [DATASET]
    finally:
        c.close()


def test_cli_principal_add_key_works_within_a_second(scratch_gateway: Gateway):
    gw = scratch_gateway
    key = gw.add_principal("json-output", "dkfz", "DE", "trainer")
    other = gw.add_principal("json-output-2", "dkfz", "DE", "trainer")
    assert key != other
    c = gw.connect()
    try:
        _, seconds = poll_until(lambda: _authenticates(c, key), what="new key accepted")
        assert seconds <= PROPAGATION_LIMIT
        assert listed_datasets(c, call_options(key)) == [DATASET]
    finally:
        c.close()


def _authenticates(c: flight.FlightClient, key: str) -> bool:
    try:
        list(c.list_flights(b"", call_options(key)))
        return True
    except flight.FlightUnauthenticatedError:
        return False


def test_cli_principal_add_rejects_an_unknown_role(scratch_gateway: Gateway):
    gw = scratch_gateway
    proc = run_cli(gw.bin, gw.data_dir, "principal", "add", "--name", "x-bad-role", "--org", "dkfz",
                   "--member-state", "DE", "--role", "superuser", check=False)
    assert proc.returncode != 0
    assert "superuser" in proc.stderr or "role" in proc.stderr


def test_dataset_refresh_reopens_sources_and_names_unknown_datasets(gateway: Gateway):
    """`dataset refresh NAME` bumps the metadata version (running servers re-open the source); an unknown name fails
    with a message that says what to do, and the dataset keeps streaming."""
    out = gateway.cli("dataset", "refresh", DATASET)
    assert DATASET in out and "re-open" in out, out
    assert gateway.cli_json("dataset", "refresh", DATASET) == {"refreshed": DATASET}
    proc = run_cli(gateway.bin, gateway.data_dir, "dataset", "refresh", "no_such_dataset", check=False)
    assert proc.returncode != 0
    assert "not registered" in proc.stderr and "dataset list" in proc.stderr, proc.stderr[:2000]
