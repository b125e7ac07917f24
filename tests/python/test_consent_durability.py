"""Durability: a consent withdrawal acknowledged over REST (201) survives `kill -9` of the server, and so do the audit
entries written before the kill.

The test runs its own server on its own data directory (function-scoped), so killing it disturbs no other test. The
server is restarted with the same command (`serve --demo` is idempotent on an existing demo); the withdrawal must be
in force on the very first stream after the restart: the restarted server loads consent before it listens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import (PURPOSE, REGISTRY, Gateway, call_options, groups_by_pseudonym, http, pull, rfc3339, run_cli,
                      start_gateway, stop_process, utc_now_after)

# The audit fields a completion may not change (audit.rs refuses updates to them with a trigger).
IMMUTABLE_AUDIT_FIELDS = ("id", "time", "principal", "organisation", "member_state", "purpose", "dataset", "columns",
                          "filter", "action", "decision", "reason", "consent_version")


@pytest.fixture
def own_server(passerelle_bin: Path, tmp_path: Path):
    """Starts a demo server in a fresh data directory; `start()` (re)starts one on the same directory. Every process
    started here is stopped at teardown."""
    data_dir = tmp_path / "data"
    procs: list[subprocess.Popen] = []

    class Handle:
        def start(self) -> Gateway:
            # a killed server leaves its serve.json behind; start_gateway must wait for the new one
            (data_dir / "serve.json").unlink(missing_ok=True)
            gw = start_gateway(passerelle_bin, data_dir)
            procs.append(gw.proc)
            return gw

    yield Handle()
    for p in procs:
        if p.poll() is None:
            stop_process(p)


def _audit(gw: Gateway) -> list[dict[str, Any]]:
    out = run_cli(gw.bin, gw.data_dir, "audit", "list", "--limit", "100000", "--json").stdout
    rows = json.loads(out)
    assert isinstance(rows, list), out[:500]
    return rows


def test_acknowledged_withdrawal_and_audit_survive_kill_9(own_server):
    gw = own_server.start()
    key = gw.keys["trainer-de"]
    subject = gw.take_subject(consented=True)
    signature = gw.reference.signature(subject)

    c = gw.connect()
    try:
        before = groups_by_pseudonym(pull(c, call_options(key)).table)
    finally:
        c.close()
    found = [p for p, rows in before.items() if rows == signature]
    assert len(found) == 1, f"precondition: subject {subject} is sent exactly once before the withdrawal"
    pseudonym = found[0]

    # audit entries written before the kill: at least this pull's GetFlightInfo and DoGet
    audited = [e for e in _audit(gw) if e["principal"] == "trainer-de"]
    actions = {e["action"] for e in audited}
    assert {"get_flight_info", "do_get"} <= actions, f"precondition: the pull is audited: {audited}"

    event = {"subject_id": subject, "purpose": PURPOSE, "status": "withdrawn",
             "timestamp": rfc3339(utc_now_after(gw.reference))}
    resp = http("POST", gw.url(f"/api/v1/consent/{REGISTRY}/events"), key=gw.keys["steward-fr"], body=[event])
    gw.proc.kill()  # SIGKILL as soon as the answer is in
    gw.proc.wait(timeout=30)
    assert resp.status == 201, f"{resp.status}: {resp.text[:500]}"

    gw2 = own_server.start()
    assert gw2.keys == gw.keys, "restarting with --demo must keep the demo (and its keys)"
    c = gw2.connect()
    try:
        after = groups_by_pseudonym(pull(c, call_options(key)).table)
    finally:
        c.close()
    # immediately (no polling): the restarted server applied every stored event before listening
    assert pseudonym not in after, f"withdrawal of subject {subject}, acknowledged with 201, was lost by kill -9"
    expected = dict(before)
    del expected[pseudonym]
    assert after == expected, "only the withdrawn subject's rows may differ after the restart"

    survived = {e["id"]: e for e in _audit(gw2)}
    for e in audited:
        assert e["id"] in survived, f"audit entry {e['id']} written before the kill is gone: {e}"
        assert {f: survived[e["id"]].get(f) for f in IMMUTABLE_AUDIT_FIELDS} == \
            {f: e.get(f) for f in IMMUTABLE_AUDIT_FIELDS}, f"audit entry {e['id']} changed across the kill"
    gw2.assert_alive()
