"""Access policy and the features that came with it: stored deny rules (CLI `policy deny|add|list|remove` and REST
`POST /api/v1/datasets/{name}/rules`), `policy explain` (CLI and REST), consent JSON Lines import, grants with an
expiry, future-dated events, consent-registry ownership, location safety of dataset registration, and the REST
fallbacks (unknown path, wrong method).

Tests that only read run on `gateway` (so `policy explain` can be compared with the reference consent model); tests
that change rules, consent or datasets run on `scratch_gateway` and undo their rules in `finally` blocks. Consent
changes are observed with the marker technique of test_consent_live.py (`check_change`): a stream before and after,
exactly the changed subject's rows differ."""

from __future__ import annotations

import csv
import json
import shutil
import time
import tomllib
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from conftest import (DATASET, OTHER_PURPOSE, POLL_DEADLINE, PROPAGATION_LIMIT, PURPOSE, RELEASED_COLUMNS, REGISTRY,
                      Gateway, assert_json_error, call_options, expect_status, http,
                      listed_datasets, path_descriptor, poll_until, pull, rfc3339, run_cli, utc_now_after)
from test_admin import manifest_json
from test_consent_live import _find, _groups, check_change

COMMERCIAL = "research/ai-training/commercial"
DE_DENY_LINE = f"p, *, DE/*, {DATASET}, {COMMERCIAL}, 9999-12-31T23:59:59Z, deny"
IT_ORG = "policy-it-org"
IT_TRAINER = "trainer-it-policy"
EVIL_STEWARD = "steward-evil"


# ---------------------------------------------------------------------------------------------------------- helpers

def _access(c: flight.FlightClient, key: str, purpose: str) -> str:
    """'allowed' if GetFlightInfo plans the request, 'denied' on PERMISSION_DENIED (anything else propagates)."""
    try:
        c.get_flight_info(path_descriptor(), call_options(key, purpose))
        return "allowed"
    except flight.FlightUnauthorizedError:
        return "denied"


def _rules(gw: Gateway) -> list[dict[str, Any]]:
    out = gw.cli_json("policy", "list")
    assert isinstance(out, list), out
    for r in out:
        assert set(r) == {"id", "line", "created_by"}, r
    return out


def _remove_rules_with_line(gw: Gateway, line: str) -> None:
    """Cleanup: remove every stored rule with this line (no-op if none)."""
    for r in _rules(gw):
        if r["line"] == line:
            gw.cli("policy", "remove", "--id", str(r["id"]))


def _wait_access(c: flight.FlightClient, key: str, purpose: str, want: str, what: str) -> float:
    _, seconds = poll_until(lambda: _access(c, key, purpose) == want, deadline=POLL_DEADLINE, what=what)
    assert seconds <= PROPAGATION_LIMIT, f"{what}: took {seconds:.2f} s"
    return seconds


@pytest.fixture
def sclient(scratch_gateway: Gateway):
    c = scratch_gateway.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def it_trainer(scratch_gateway: Gateway) -> str:
    """A trainer of an Italian organisation holding a research/ai-training permit on the scratch server: a DE/* rule
    must not touch it."""
    gw = scratch_gateway
    key = gw.add_principal(IT_TRAINER, IT_ORG, "IT", "trainer")
    gw.cli("permit", "add", "--dataset", DATASET, "--org", IT_ORG, "--purpose", PURPOSE)
    c = gw.connect()
    try:
        def sees():
            try:
                return listed_datasets(c, call_options(key)) == [DATASET]
            except flight.FlightUnauthenticatedError:
                return False
        poll_until(sees, what=f"{IT_TRAINER} is known and sees {DATASET}")
    finally:
        c.close()
    return key


@pytest.fixture(scope="module")
def evil(scratch_gateway: Gateway) -> str:
    """`principal add --role steward --org evil --member-state DE` on the scratch server; returns its key."""
    gw = scratch_gateway
    key = gw.add_principal(EVIL_STEWARD, "evil", "DE", "steward")
    poll_until(lambda: http("GET", gw.url("/api/v1/datasets"), key=key).status == 200,
               what=f"{EVIL_STEWARD} is known to the server")
    return key


# ------------------------------------------------------------------------------------- 1. CLI deny rules

def test_cli_policy_deny_list_remove(scratch_gateway: Gateway, sclient, it_trainer):
    gw = scratch_gateway
    de = gw.keys["trainer-de"]
    assert _access(sclient, de, COMMERCIAL) == "allowed", "precondition: the dkfz permit covers the sub-purpose"
    assert DE_DENY_LINE not in [r["line"] for r in _rules(gw)], "precondition: no such rule stored"
    # a ticket issued before the rule: DoGet decides again, so it must stop working too
    early = sclient.get_flight_info(path_descriptor(), call_options(de, COMMERCIAL)).endpoints[0].ticket
    try:
        out = gw.cli_json("policy", "deny", "--dataset", DATASET, "--purpose", COMMERCIAL, "--domain", "DE/*")
        assert out.get("line") == DE_DENY_LINE, out
        assert isinstance(out.get("id"), int), out
        rule_id = out["id"]

        _wait_access(sclient, de, COMMERCIAL, "denied", "the deny rule reaches the server")
        msg = expect_status("PERMISSION_DENIED",
                            lambda: sclient.get_flight_info(path_descriptor(), call_options(de, COMMERCIAL)))
        assert "deny" in msg and COMMERCIAL in msg and "DE/*" in msg, f"the message should name the deny line: {msg!r}"
        expect_status("PERMISSION_DENIED", lambda: sclient.do_get(early, call_options(de, COMMERCIAL)).read_all(),
                      fragment="deny")
        # sub-purposes of the denied purpose are denied too
        assert _access(sclient, de, COMMERCIAL + "/ads") == "denied"
        # the parent purpose still works for the same trainer, with data
        table = pull(sclient, call_options(de, PURPOSE)).table
        assert table.num_rows > 0 and table.schema.names == RELEASED_COLUMNS
        # the rule is scoped to DE/*: an Italian trainer with a permit is not affected
        assert _access(sclient, it_trainer, COMMERCIAL) == "allowed"

        listed = _rules(gw)
        assert {"id": rule_id, "line": DE_DENY_LINE, "created_by": "cli"} in listed, listed

        removed = gw.cli_json("policy", "remove", "--id", str(rule_id))
        assert removed == {"removed": rule_id}, removed
        _wait_access(sclient, de, COMMERCIAL, "allowed", "removing the rule lifts the deny")
        assert rule_id not in [r["id"] for r in _rules(gw)]

        again = run_cli(gw.bin, gw.data_dir, "policy", "remove", "--id", str(rule_id), check=False)
        assert again.returncode != 0, again.stdout
        assert f"no stored policy line with id {rule_id}" in again.stderr, again.stderr
    finally:
        _remove_rules_with_line(gw, DE_DENY_LINE)


def test_cli_policy_add_refuses_a_bad_line(scratch_gateway: Gateway):
    gw = scratch_gateway
    before = _rules(gw)
    proc = run_cli(gw.bin, gw.data_dir, "policy", "add", "--line", "bad line", check=False)
    assert proc.returncode != 0, f"a bad line was accepted: {proc.stdout!r}"
    # `--line, line 1: unknown line type `bad line`; use p or g`
    assert "--line" in proc.stderr and "line 1" in proc.stderr and "bad line" in proc.stderr, proc.stderr
    assert "unknown line type" in proc.stderr, proc.stderr
    assert _rules(gw) == before, "nothing may be stored"


@pytest.mark.parametrize("line,reason", [
    ("p, *, *, demo_patients, research, 9999-12-31T23:59:59Z", "7 fields"),
    ("p, *, *, demo_patients, Research, 9999-12-31T23:59:59Z, deny", "purpose"),
    ("p, *, *, demo_patients, research, tomorrow, deny", "RFC 3339"),
    ("p, *, *, demo_patients, research, 9999-12-31T23:59:59Z, maybe", "allow or deny"),
    # `DE` alone would match an organisation named DE, never the member state: a deny that denies nothing.
    ("p, *, DE, demo_patients, research, 9999-12-31T23:59:59Z, deny", "DE/*"),
], ids=["six-fields", "bad-purpose", "bad-expiry", "bad-effect", "state-as-org"])
def test_cli_policy_add_names_what_is_wrong(scratch_gateway: Gateway, line, reason):
    gw = scratch_gateway
    before = _rules(gw)
    proc = run_cli(gw.bin, gw.data_dir, "policy", "add", "--line", line, check=False)
    assert proc.returncode != 0, f"{line!r} was accepted: {proc.stdout!r}"
    assert reason in proc.stderr and "line 1" in proc.stderr, proc.stderr
    assert _rules(gw) == before


def test_cli_policy_add_a_raw_deny_line(scratch_gateway: Gateway, sclient):
    """Positive control for `policy add`: a raw deny line for everyone on a sub-purpose, then removed."""
    gw = scratch_gateway
    de = gw.keys["trainer-de"]
    purpose = COMMERCIAL + "/raw-line"
    line = f"p, *, *, {DATASET}, {purpose}, 9999-12-31T23:59:59Z, deny"
    assert _access(sclient, de, purpose) == "allowed", "precondition"
    try:
        out = gw.cli_json("policy", "add", "--line", line)
        assert out.get("line") == line and isinstance(out.get("id"), int), out
        _wait_access(sclient, de, purpose, "denied", "the raw line reaches the server")
        assert _access(sclient, de, COMMERCIAL) == "allowed", "only the named sub-purpose is denied"
        gw.cli("policy", "remove", "--id", str(out["id"]))
        _wait_access(sclient, de, purpose, "allowed", "removing the raw line lifts it")
    finally:
        _remove_rules_with_line(gw, line)


def test_a_deny_line_for_every_purpose_denies_every_purpose(scratch_gateway: Gateway, sclient, it_trainer):
    """`*` as a deny line's purpose covers every purpose (it once matched none: a deny that denied nothing), and
    `DE/*` reaches DE's trainers only."""
    gw = scratch_gateway
    de = gw.keys["trainer-de"]
    line = f"p, *, DE/*, {DATASET}, *, 9999-12-31T23:59:59Z, deny"
    assert _access(sclient, de, COMMERCIAL) == "allowed" and _access(sclient, de, PURPOSE) == "allowed", "precondition"
    try:
        out = gw.cli_json("policy", "add", "--line", line)
        _wait_access(sclient, de, PURPOSE, "denied", "the line for every purpose reaches the server")
        assert _access(sclient, de, COMMERCIAL) == "denied"
        assert _access(sclient, it_trainer, PURPOSE) == "allowed", "another member state's trainer is not denied"
        gw.cli("policy", "remove", "--id", str(out["id"]))
        _wait_access(sclient, de, PURPOSE, "allowed", "removing the line lifts it")
    finally:
        _remove_rules_with_line(gw, line)


def test_cli_policy_reload_checks_the_files_first(scratch_gateway: Gateway, tmp_path: Path):
    """`policy reload` names the file, line and reason of a policy file servers would refuse, exits non-zero and
    requests nothing; once fixed it reports the version servers will load."""
    gw = scratch_gateway
    policy = tmp_path / "policy.csv"
    policy.write_text("# ok\np, *, *, demo_patients\n")
    config = tmp_path / "passerelle.toml"
    config.write_text(f"[policy]\npolicy_file = {json.dumps(str(policy))}\n")
    proc = run_cli(gw.bin, gw.data_dir, "policy", "reload", "--config", str(config), check=False)
    assert proc.returncode != 0, proc.stdout
    assert str(policy) in proc.stderr and "line 2" in proc.stderr and "7 fields" in proc.stderr, proc.stderr
    assert "nothing reloaded" in proc.stderr, proc.stderr
    policy.write_text(f"p, *, *, demo_patients, {COMMERCIAL}, 9999-12-31T23:59:59Z, deny\n")
    out = gw.cli_json("policy", "reload", "--config", str(config))
    assert out.get("reload") == "requested" and isinstance(out.get("policy_version"), str), out


# ------------------------------------------------------------------------------------------- 2. policy explain

def _treatments(explanation: dict[str, Any]) -> dict[str, tuple[str, str]]:
    cols = explanation["columns"]
    assert isinstance(cols, list), explanation
    out = {c["name"]: (c["class"], c["treatment"]) for c in cols}
    assert len(out) == len(cols), f"duplicate columns: {cols}"
    return out


EXPECTED_TREATMENT = {
    "patient_id": "pseudonymised",
    "full_name": "dropped",
    "birth_date": "generalised:year",
    "postcode": "generalised:prefix:2",
    "diagnosis": "sent",
    "hba1c": "sent",
    "admitted_at": "sent",
}


@pytest.fixture(scope="module")
def cli_explain(gateway: Gateway) -> dict[str, Any]:
    return gateway.cli_json("policy", "explain", "--principal", "trainer-de", "--dataset", DATASET,
                            "--purpose", PURPOSE)


def test_cli_explain_allow(gateway: Gateway, cli_explain):
    e = cli_explain
    ref = gateway.reference
    assert e["decision"] == "allow", e
    assert (e["principal"], e["organisation"], e["member_state"]) == ("trainer-de", "dkfz", "DE"), e
    assert (e["dataset"], e["purpose"]) == (DATASET, PURPOSE), e
    assert e["legal_basis"] == "consent" and e["consent_registry"] == REGISTRY, e
    assert isinstance(e["reason"], str) and "dkfz" in e["reason"], e
    # the permit line decided
    assert isinstance(e["rule"], str) and "dkfz" in e["rule"] and PURPOSE in e["rule"] and \
        e["rule"].endswith("allow"), e["rule"]
    assert isinstance(e["policy_version"], str) and len(e["policy_version"]) == 12, e["policy_version"]
    assert e["subjects_counted"] == len(ref.consented(PURPOSE)), \
        f"explain counts {e['subjects_counted']} consented subjects, the reference model {len(ref.consented(PURPOSE))}"
    assert e["special_category"] is False and e["special_category_allowed"] is False, e
    # every column of the manifest, with the class it declares and the treatment the column policy implies
    declared = {name: c["class"] for name, c in tomllib.loads(ref.manifest_path.read_text())["columns"].items()}
    assert _treatments(e) == {n: (declared[n], t) for n, t in EXPECTED_TREATMENT.items()}


def test_cli_explain_deny_for_an_unpermitted_purpose(gateway: Gateway):
    e = gateway.cli_json("policy", "explain", "--principal", "trainer-de", "--dataset", DATASET,
                         "--purpose", OTHER_PURPOSE)
    assert e["decision"] == "deny", e
    assert isinstance(e["reason"], str) and "permit" in e["reason"] and "dkfz" in e["reason"], e["reason"]
    assert e["rule"] is None, f"no line matched, none should be named: {e['rule']!r}"
    assert e["subjects_counted"] == len(gateway.reference.consented(OTHER_PURPOSE)), e["subjects_counted"]


def test_cli_explain_unknown_principal_fails(gateway: Gateway):
    proc = run_cli(gateway.bin, gateway.data_dir, "policy", "explain", "--principal", "nobody-at-all",
                   "--dataset", DATASET, "--purpose", PURPOSE, check=False)
    assert proc.returncode != 0 and "nobody-at-all" in proc.stderr, (proc.returncode, proc.stderr)


def _explain_url(gw: Gateway, principal: str, purpose: str = PURPOSE, dataset: str = DATASET) -> str:
    q = urllib.parse.urlencode({"principal": principal, "dataset": dataset, "purpose": purpose})
    return gw.url(f"/api/v1/policy/explain?{q}")


@pytest.mark.parametrize("asker", ["auditor-eu", "trainer-de"])
def test_rest_explain_matches_the_cli(gateway: Gateway, cli_explain, asker):
    resp = http("GET", _explain_url(gateway, "trainer-de"), key=gateway.keys[asker])
    assert resp.status == 200, f"{resp.status}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json")
    body = resp.body
    assert body["decision"] == "allow", body
    assert body["subjects_counted"] == len(gateway.reference.consented(PURPOSE))
    assert _treatments(body) == _treatments(cli_explain)
    ignore = {"policy_version"}  # the CLI reads the store; the server's snapshot may lag by one refresh
    assert {k: v for k, v in body.items() if k not in ignore} == \
        {k: v for k, v in cli_explain.items() if k not in ignore}


def test_rest_explain_of_another_principal_by_a_trainer_is_403(gateway: Gateway, second_org):
    # trainer-de sees demo_patients, so the refusal is about whom it asks about (403), not visibility
    assert_json_error(http("GET", _explain_url(gateway, "steward-fr"), key=gateway.keys["trainer-de"]), 403)
    assert_json_error(http("GET", _explain_url(gateway, "trainer-de"), key=second_org["dkfz2"]), 403)
    # a trainer who cannot see the dataset gets the 404 of an unknown dataset
    assert_json_error(http("GET", _explain_url(gateway, "trainer-embl"), key=second_org["noperm"]), 404)
    assert_json_error(http("GET", _explain_url(gateway, "trainer-de")), 401)


def test_rest_explain_deny_and_bad_query(gateway: Gateway):
    auditor = gateway.keys["auditor-eu"]
    resp = http("GET", _explain_url(gateway, "trainer-de", OTHER_PURPOSE), key=auditor)
    assert resp.status == 200, resp.text[:500]
    assert resp.body["decision"] == "deny" and resp.body["reason"], resp.body
    assert_json_error(http("GET", gateway.url(f"/api/v1/policy/explain?principal=trainer-de&dataset={DATASET}"),
                           key=auditor), 400)


# -------------------------------------------------------------------------------------- 3. REST rules

def test_rest_rules(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    url = gw.url(f"/api/v1/datasets/{DATASET}/rules")
    body = {"effect": "deny", "purpose": COMMERCIAL, "domain": "DE/*"}
    de = gw.keys["trainer-de"]
    assert DE_DENY_LINE not in [r["line"] for r in _rules(gw)], "precondition: no such rule stored"
    assert _access(sclient, de, COMMERCIAL) == "allowed", "precondition"
    try:
        assert_json_error(http("POST", url, body=body), 401)
        assert_json_error(http("POST", url, key=de, body=body), 403)
        assert_json_error(http("POST", url, key=gw.keys["steward-fr"], body={**body, "effect": "allow"}), 400)
        assert DE_DENY_LINE not in [r["line"] for r in _rules(gw)], "refused requests stored a rule"

        resp = http("POST", url, key=gw.keys["steward-fr"], body=body)
        assert resp.status == 201, f"{resp.status}: {resp.text[:500]}"
        assert resp.body.get("line") == DE_DENY_LINE and isinstance(resp.body.get("id"), int), resp.body
        rule_id = resp.body["id"]
        assert {"id": rule_id, "line": DE_DENY_LINE, "created_by": "steward-fr"} in _rules(gw)
        _wait_access(sclient, de, COMMERCIAL, "denied", "the REST rule is in force")
        assert _access(sclient, de, PURPOSE) == "allowed"
        # the same line twice is a conflict
        assert_json_error(http("POST", url, key=gw.keys["steward-fr"], body=body), 409)

        gw.cli("policy", "remove", "--id", str(rule_id))
        _wait_access(sclient, de, COMMERCIAL, "allowed", "removing the REST rule lifts it")
    finally:
        _remove_rules_with_line(gw, DE_DENY_LINE)


@pytest.mark.parametrize("body", [
    {"effect": "deny", "purpose": "Not A Purpose"},
    {"effect": "deny", "purpose": COMMERCIAL, "domain": "a,b"},
    {"effect": "deny", "purpose": COMMERCIAL, "expires": "soon"},
    {"effect": "deny", "purpose": COMMERCIAL, "who": "everyone"},
], ids=["bad-purpose", "bad-domain", "bad-expiry", "unknown-field"])
def test_rest_rules_reject_malformed_bodies(scratch_gateway: Gateway, body):
    gw = scratch_gateway
    before = _rules(gw)
    resp = http("POST", gw.url(f"/api/v1/datasets/{DATASET}/rules"), key=gw.keys["steward-fr"], body=body)
    assert_json_error(resp, 400)
    assert _rules(gw) == before


# ------------------------------------------------------------------- 4. consent import: JSON Lines, expiry, future

def test_cli_consent_import_jsonl_withdrawal(scratch_gateway: Gateway, sclient, tmp_path):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    path = tmp_path / "withdrawal.jsonl"
    # an integer subject id: the same subject as the CSV's decimal text
    path.write_text(json.dumps({"subject_id": int(s), "purpose": PURPOSE, "status": "withdrawn",
                                "timestamp": rfc3339(utc_now_after(gw.reference))}) + "\n")
    check_change(gw, sclient, s, lambda: gw.cli("consent", "import", "--registry", REGISTRY, "--file", str(path)),
                 present_after=False)


def test_cli_consent_import_jsonl_refuses_a_bad_line_and_imports_nothing(scratch_gateway: Gateway, sclient,
                                                                         tmp_path):
    gw = scratch_gateway
    s, marker = gw.take_subject(consented=True), gw.take_subject(consented=True)
    now = rfc3339(utc_now_after(gw.reference))
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"subject_id": s, "purpose": PURPOSE, "status": "withdrawn", "timestamp": now}) + "\n"
                    + json.dumps({"subject_id": s, "purpose": PURPOSE, "status": "maybe", "timestamp": now}) + "\n")

    def change():
        proc = run_cli(gw.bin, gw.data_dir, "consent", "import", "--registry", REGISTRY, "--file", str(path),
                       check=False)
        assert proc.returncode != 0 and "line 2" in proc.stderr, (proc.returncode, proc.stderr)
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", marker, "--purpose", PURPOSE)

    after = check_change(gw, sclient, marker, change, present_after=False)
    assert _find(after, gw.reference.signature(s)) is not None, "line 1 of a refused file was imported"


def test_cli_consent_import_grant_with_expiry(scratch_gateway: Gateway, sclient, tmp_path):
    """A grant expiring a few seconds ahead: the subject appears, stays until the expiry, then disappears from the
    next streams (the server needs no new event for that)."""
    gw = scratch_gateway
    s = gw.take_subject(consented=False)
    path = tmp_path / "expiring.csv"
    when: dict[str, datetime] = {}

    def grant():
        ts = utc_now_after(gw.reference)
        expires = ts + timedelta(seconds=6)
        when["expires"] = expires
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subject_id", "purpose", "status", "timestamp", "expires_at"])
            w.writerow([s, PURPOSE, "granted", rfc3339(ts), rfc3339(expires)])
        gw.cli("consent", "import", "--registry", REGISTRY, "--file", str(path))

    before = _groups(gw, sclient)
    after = check_change(gw, sclient, s, grant, present_after=True)
    pseudonym = _find(after, gw.reference.signature(s))
    expires = when["expires"]
    assert datetime.now(timezone.utc) < expires - timedelta(seconds=1), "the grant was seen too late to test expiry"

    # present until the expiry: checked about every 0.5 s, stopping just short of it
    signature = gw.reference.signature(s)
    while (expires - datetime.now(timezone.utc)).total_seconds() > 0.7:
        g = _groups(gw, sclient)
        seen_at = datetime.now(timezone.utc)
        if seen_at < expires:  # a stream that ended before the expiry must carry all of the subject's rows
            assert g.get(pseudonym) == signature, \
                f"subject {s} missing at {seen_at}, before its grant expires at {expires}"
        time.sleep(max(0.0, min(0.5, (expires - datetime.now(timezone.utc)).total_seconds() - 0.7)))

    def gone():
        g = _groups(gw, sclient)
        return (g, datetime.now(timezone.utc)) if pseudonym not in g else None

    deadline = (expires - datetime.now(timezone.utc)).total_seconds() + POLL_DEADLINE
    (g, gone_at), _ = poll_until(gone, deadline=deadline, what=f"subject {s} disappears after its grant expires")
    assert gone_at >= expires - timedelta(milliseconds=100), f"gone at {gone_at}, before the expiry {expires}"
    assert gone_at <= expires + timedelta(seconds=PROPAGATION_LIMIT), f"still sent {gone_at - expires} after expiry"
    assert g == before, "after expiry the stream must be exactly what it was before the grant"


def test_future_dated_events_are_refused_and_nothing_is_stored(scratch_gateway: Gateway, sclient, tmp_path):
    """A batch with an event dated 10 minutes ahead (and a valid one) is refused by the CLI and by REST; then a marker
    withdrawal shows that neither subject's consent changed."""
    gw = scratch_gateway
    s_future, s_valid, marker = (gw.take_subject(consented=True) for _ in range(3))
    now = utc_now_after(gw.reference)
    events = [
        {"subject_id": s_valid, "purpose": PURPOSE, "status": "withdrawn", "timestamp": rfc3339(now)},
        {"subject_id": s_future, "purpose": PURPOSE, "status": "withdrawn",
         "timestamp": rfc3339(now + timedelta(minutes=10))},
    ]
    path = tmp_path / "future.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["subject_id", "purpose", "status", "timestamp"])
        w.writeheader()
        w.writerows(events)

    def change():
        proc = run_cli(gw.bin, gw.data_dir, "consent", "import", "--registry", REGISTRY, "--file", str(path),
                       check=False)
        assert proc.returncode != 0, f"future-dated import accepted: {proc.stdout!r}"
        assert "future" in proc.stderr and s_future in proc.stderr, proc.stderr
        resp = http("POST", gw.url(f"/api/v1/consent/{REGISTRY}/events"), key=gw.keys["steward-fr"], body=events)
        err = assert_json_error(resp, 400)
        assert "future" in err["error"], err
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", marker, "--purpose", PURPOSE)

    after = check_change(gw, sclient, marker, change, present_after=False)
    for s in (s_future, s_valid):
        assert _find(after, gw.reference.signature(s)) is not None, f"part of a refused batch was stored ({s})"


# --------------------------------------------------------------------------------- 5. registry ownership

def test_registry_of_another_org_is_404_and_does_not_leak(scratch_gateway: Gateway, sclient, evil):
    gw = scratch_gateway
    s, marker = gw.take_subject(consented=True), gw.take_subject(consented=True)
    now = rfc3339(utc_now_after(gw.reference))
    event = [{"subject_id": s, "purpose": PURPOSE, "status": "withdrawn", "timestamp": now}]
    seen: dict[str, Any] = {}

    def change():
        seen["resp"] = http("POST", gw.url(f"/api/v1/consent/{REGISTRY}/events"), key=evil, body=event)
        # positive control: the same steward may write to a registry of its own (claimed on first use)
        own = http("POST", gw.url("/api/v1/consent/evil-registry/events"), key=evil, body=event)
        assert own.status == 201, f"{own.status}: {own.text[:500]}"
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", marker, "--purpose", PURPOSE)

    after = check_change(gw, sclient, marker, change, present_after=False)
    assert _find(after, gw.reference.signature(s)) is not None, "the other org's steward changed aphp's consent"
    resp = seen["resp"]
    assert resp.status == 404, f"expected 404 (not 403): {resp.status} {resp.text[:500]}"
    assert isinstance(resp.body, dict) and isinstance(resp.body.get("error"), str) and resp.body["error"], resp.text
    # The caller's own registry name may be echoed; the owning organisation may not be named.
    assert "aphp" not in resp.text.lower().replace(REGISTRY, ""), f"the 404 names the owner: {resp.text}"
    assert "steward" not in resp.body["error"] and "controller" not in resp.body["error"], resp.text
    assert_json_error(resp, 404)  # the contract's shape, hint included


# ------------------------------------------------------------------------------------- 6. location safety

def _not_registered(gw: Gateway, name: str, key: str) -> None:
    assert_json_error(http("GET", gw.url(f"/api/v1/datasets/{name}"), key=key), 404)
    listed = gw.cli_json("dataset", "list")
    assert name not in [d["name"] for d in listed], f"{name} was registered"


def _refused(resp) -> None:
    err = assert_json_error(resp, 400)
    assert "location" in err["error"] and "not available" in err["error"], \
        f"400 for another reason than the location check: {err}"


@pytest.mark.parametrize("where", ["data-dir", "data-dir-bare-path", "sqlite-db", "traversal-to-key"])
def test_steward_cannot_register_the_nodes_own_files(scratch_gateway: Gateway, where):
    gw = scratch_gateway
    d = gw.data_dir.resolve()
    location = {
        "data-dir": f"file://{d}/",
        "data-dir-bare-path": str(d),
        "sqlite-db": f"file://{d}/passerelle.db",
        "traversal-to-key": f"file://{d}/demo/../node.key",
    }[where]
    name = "loc_" + where.replace("-", "_")
    body = {**manifest_json(gw, name), "location": location}
    _refused(http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], body=body))
    _not_registered(gw, name, gw.keys["steward-fr"])


def _evil_manifest(gw: Gateway, name: str, location: str) -> dict[str, Any]:
    return {**manifest_json(gw, name), "location": location, "controller": "evil", "member_state": "DE",
            "consent_registry": name.replace("_", "-")}


@pytest.mark.parametrize("where", ["same-directory", "the-file"])
def test_other_controller_cannot_register_the_demo_data(scratch_gateway: Gateway, evil, where):
    gw = scratch_gateway
    demo_location = tomllib.loads(gw.reference.manifest_path.read_text())["location"]
    location = demo_location if where == "same-directory" else \
        demo_location.rstrip("/") + "/" + gw.reference.parquet_path.name
    name = "evil_" + where.replace("-", "_")
    _refused(http("POST", gw.url("/api/v1/datasets"), key=evil, body=_evil_manifest(gw, name, location)))
    _not_registered(gw, name, evil)


def test_other_controller_may_register_its_own_copy(scratch_gateway: Gateway, evil, tmp_path):
    """Positive control for the test above: the same manifest on a copy of the file in evil's own storage."""
    gw = scratch_gateway
    own = tmp_path / "evil-data"
    own.mkdir()
    shutil.copy(gw.reference.parquet_path, own / "patients.parquet")
    resp = http("POST", gw.url("/api/v1/datasets"), key=evil,
                body=_evil_manifest(gw, "evil_own_copy", f"file://{own.resolve()}/"))
    assert resp.status == 201, f"{resp.status}: {resp.text[:500]}"
    assert http("GET", gw.url("/api/v1/datasets/evil_own_copy"), key=evil).status == 200


# ---------------------------------------------------------------------------------------- 8. REST fallbacks

@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v2/datasets", "/healthz/extra",
                                  f"/api/v1/datasets/{DATASET}/x"])
@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "key"])
def test_unknown_rest_path_is_404_json(gateway: Gateway, path, with_key):
    resp = http("GET", gateway.url(path), key=gateway.keys["steward-fr"] if with_key else None)
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    assert_json_error(resp, 404)


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/api/v1/datasets"),
    ("PUT", "/healthz"),
    ("GET", f"/api/v1/datasets/{DATASET}/rules"),
    ("GET", f"/api/v1/consent/{REGISTRY}/events"),
    ("POST", "/api/v1/policy/explain"),
    ("DELETE", f"/api/v1/datasets/{DATASET}"),
])
def test_wrong_method_is_405_or_400_json(gateway: Gateway, method, path):
    resp = http(method, gateway.url(path), key=gateway.keys["steward-fr"])
    assert resp.status in (400, 405), f"{method} {path}: {resp.status} {resp.text[:300]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    assert_json_error(resp, resp.status)
