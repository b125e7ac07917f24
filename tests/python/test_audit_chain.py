"""The tamper-evident audit: every entry and every completion is a link of a SHA-256 hash chain, checked by
`passerelle audit verify` and `GET /api/v1/audit/verify`; signed checkpoints (`audit checkpoint`,
`GET /api/v1/audit/checkpoint`, key at `GET /api/v1/keys`) checked by `audit verify --checkpoint FILE`; and the
filters of `GET /api/v1/audit` (since, until, principal, dataset, decision, limit, before_id).

Gateways of this module's own (the session gateways are shared: their counts move under other tests):

    chain_gw    left intact: a known sequence of calls in two phases separated by time marks; verify, checkpoints
                and filters are checked on it
    tamper_gw   rows of its SQLite database (<data-dir>/passerelle.db, table `audit`) are rewritten behind the
                running gateway's back (after `DROP TRIGGER audit_complete_once`, which otherwise refuses the
                update); verify must name the first edited entry
    rewind      (inside its test) stopped, then the newest entries and their links are removed, leaving a shorter
                chain that is consistent in itself: only a checkpoint taken before the removal can tell

Ed25519 signatures are checked with `cryptography` (in the venv through moto[server]; see requirements.txt).
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import (DATASET, OTHER_PURPOSE, Gateway, HttpResponse, assert_json_error, call_options,
                      command_descriptor, expect_status, http, parse_rfc3339, path_descriptor, poll_until, pull,
                      run_cli, start_gateway, stop_process)

DEMO_ROWS = 2000
SETTLE_DEADLINE = 10.0
HEX64 = re.compile(r"^[0-9a-f]{64}$")
UNKNOWN = "no_such_dataset_chain"
AUDITOR = "auditor-eu"
TRAINER = "trainer-de"
STEWARD = "steward-fr"


# ======================================================================================================================
# Helpers
# ======================================================================================================================

def audit_get(gw: Gateway, path: str = "/api/v1/audit", who: str | None = AUDITOR, **params: Any) -> HttpResponse:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    return http("GET", gw.url(path + query), key=gw.keys[who] if who else None)


def listing(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    params.setdefault("limit", 100000)
    resp = audit_get(gw, **params)
    assert resp.status == 200, f"GET /api/v1/audit {params}: {resp.status} {resp.text[:500]}"
    assert isinstance(resp.body, list), resp.text[:500]
    return resp.body


def ids(entries: list[dict[str, Any]]) -> set[int]:
    return {e["id"] for e in entries}


def settle(gw: Gateway) -> list[dict[str, Any]]:
    """Wait until no data stream's entry is still `requested` (completions are written when a stream ends, which
    may lag the client's last read); return the whole log."""
    def done():
        entries = listing(gw)
        return entries if not any(e["status"] == "requested" for e in entries) else None

    entries, _ = poll_until(done, deadline=SETTLE_DEADLINE, what="every audit entry completed")
    return entries


def mark() -> datetime:
    """A time strictly between the entries written before and after it."""
    time.sleep(0.02)
    t = datetime.now(timezone.utc)
    time.sleep(0.02)
    return t


def rfc3339_z(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cli_verify(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return run_cli(gw.bin, gw.data_dir, "audit", "verify", *args, check=False)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def named_entries(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"\bentry (\d+)\b", text)]


def calls(gw: Gateway, phase: int) -> None:
    """A mix of allowed and denied calls by two principals."""
    c = gw.connect()
    try:
        trainer = gw.keys[TRAINER]
        if phase == 1:
            pull(c, call_options(trainer))
        pull(c, call_options(trainer), command_descriptor(columns=["hba1c"], limit=5 + phase))
        expect_status("PERMISSION_DENIED", lambda: c.get_flight_info(path_descriptor(), call_options(trainer,
                                                                                                      OTHER_PURPOSE)))
        expect_status("NOT_FOUND", lambda: c.get_flight_info(path_descriptor(UNKNOWN), call_options(trainer)))
        expect_status("PERMISSION_DENIED", lambda: c.get_flight_info(path_descriptor(), call_options(gw.keys[STEWARD])))
    finally:
        c.close()


def db_path(gw: Gateway) -> Path:
    db = gw.data_dir / "passerelle.db"
    assert db.is_file(), f"no SQLite database at {db}: {sorted(p.name for p in gw.data_dir.iterdir())}"
    return db


def rewrite(gw: Gateway, *statements: tuple[str, tuple], drop_triggers: tuple[str, ...] = ("audit_complete_once",)
            ) -> None:
    """Edit the database in one write transaction, as someone with access to the file would, after dropping the
    triggers that refuse it. Each statement must change at least one row. The gateway may be running (WAL)."""
    con = sqlite3.connect(db_path(gw), timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        for trigger in drop_triggers:
            con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for sql, params in statements:
            cur = con.execute(sql, params)
            assert cur.rowcount >= 1, f"{sql} {params} changed no row"
        con.execute("COMMIT")
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and keys
# ---------------------------------------------------------------------------------------------------------------------

CHECKPOINT_FIELDS = {"node_id", "entries", "head", "time", "key_id", "signature"}


def signed_text(cp: dict[str, Any]) -> bytes:
    """The text a checkpoint's signature covers. The issue says only "a canonical text"; this is the Rust side's
    `Checkpoint::signed_text` (gateway/src/audit.rs): a version line, then node_id, entries, links, head and time,
    one per line, each line ending in \\n."""
    return (f"passerelle-audit-checkpoint-v1\n{cp['node_id']}\n{cp['entries']}\n{cp['links']}\n{cp['head']}\n"
            f"{cp['time']}\n").encode()


def b64url(text: str) -> bytes:
    assert re.fullmatch(r"[A-Za-z0-9_-]+=*", text), f"not base64url: {text!r}"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_checkpoint_shape(cp: Any) -> dict[str, Any]:
    assert isinstance(cp, dict) and CHECKPOINT_FIELDS <= set(cp), f"checkpoint fields: {cp!r:.500}"
    assert isinstance(cp["node_id"], str) and cp["node_id"], cp
    assert isinstance(cp["entries"], int) and cp["entries"] >= 0, cp
    assert HEX64.match(cp["head"]), cp
    taken = parse_rfc3339(cp["time"])
    assert abs(datetime.now(timezone.utc) - taken) < timedelta(minutes=5), cp
    assert isinstance(cp["key_id"], str) and cp["key_id"], cp
    assert len(b64url(cp["signature"])) == 64, f"an Ed25519 signature is 64 bytes: {cp}"
    return cp


def published_key(gw: Gateway, kid: str) -> Ed25519PublicKey:
    """The verification key `kid` from GET /api/v1/keys (public: no credentials)."""
    resp = http("GET", gw.url("/api/v1/keys"))
    assert resp.status == 200, resp.text[:500]
    body = resp.body
    assert isinstance(body, dict) and isinstance(body.get("node_id"), str) and isinstance(body.get("keys"), list), body
    matching = [k for k in body["keys"] if k.get("kid") == kid]
    assert len(matching) == 1, f"key {kid!r} not published (once) in {body}"
    k = matching[0]
    assert (k.get("alg"), k.get("crv")) == ("EdDSA", "Ed25519"), k
    raw = b64url(k["x"])
    assert len(raw) == 32, k
    return Ed25519PublicKey.from_public_bytes(raw)


def assert_signed(gw: Gateway, cp: dict[str, Any]) -> None:
    key = published_key(gw, cp["key_id"])
    sig = b64url(cp["signature"])
    try:
        key.verify(sig, signed_text(cp))
    except InvalidSignature:
        pytest.fail(f"checkpoint signature does not verify over {signed_text(cp)!r} with key {cp['key_id']}")
    # and the check is not vacuous: another count does not verify
    with pytest.raises(InvalidSignature):
        key.verify(sig, signed_text(cp | {"entries": cp["entries"] + 1}))


def rest_checkpoint(gw: Gateway) -> dict[str, Any]:
    resp = audit_get(gw, "/api/v1/audit/checkpoint")
    assert resp.status == 200, resp.text[:500]
    return check_checkpoint_shape(resp.body)


def cli_checkpoint(gw: Gateway) -> dict[str, Any]:
    return check_checkpoint_shape(gw.cli_json("audit", "checkpoint"))


def write_checkpoint(path: Path, cp: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cp))
    return path


# ======================================================================================================================
# An intact chain
# ======================================================================================================================

@dataclass
class Activity:
    t0: datetime  # before phase 1
    t1: datetime  # between the phases
    t2: datetime  # after phase 2
    entries: list[dict[str, Any]]  # the whole log after phase 2, settled
    max_id: int


def _gateway(binary: Path, tmp_path_factory: pytest.TempPathFactory, name: str):
    base = tmp_path_factory.mktemp(name)
    gw = start_gateway(binary, base / "data", demo_rows=DEMO_ROWS)
    try:
        yield gw
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        assert died is None, f"the {name} gateway died during the tests (exit {died}); log:\n{gw.log_tail()}"
        assert rc is not None, f"the {name} gateway ignored SIGTERM for 15 s; log:\n{gw.log_tail()}"


@pytest.fixture(scope="module")
def chain_gw(passerelle_bin: Path, tmp_path_factory):
    yield from _gateway(passerelle_bin, tmp_path_factory, "chain-gateway")


@pytest.fixture(scope="module")
def activity(chain_gw: Gateway) -> Activity:
    t0 = mark()
    calls(chain_gw, 1)
    settle(chain_gw)
    t1 = mark()
    calls(chain_gw, 2)
    entries = settle(chain_gw)
    t2 = mark()
    assert entries, "the calls left no audit entries"
    return Activity(t0, t1, t2, sorted(entries, key=lambda e: e["id"]), max(ids(entries)))


def count_entries(gw: Gateway) -> int:
    return len(listing(gw))


def test_cli_verify_passes_on_an_intact_chain(chain_gw: Gateway, activity: Activity):
    before = count_entries(chain_gw)
    proc = cli_verify(chain_gw)
    after = count_entries(chain_gw)
    assert proc.returncode == 0, f"audit verify failed on an intact log:\n{output(proc)}"
    lines = [line for line in output(proc).splitlines() if "verified" in line.lower()]
    assert lines, f"no line saying `verified`:\n{output(proc)}"
    numbers = {int(n) for line in lines for n in re.findall(r"\d+", line)}
    assert any(before <= n <= after for n in numbers), \
        f"the `verified` line should give the number of entries ({before}..{after}): {lines}"


def test_rest_verify_passes_on_an_intact_chain(chain_gw: Gateway, activity: Activity):
    before = count_entries(chain_gw)
    resp = audit_get(chain_gw, "/api/v1/audit/verify")
    after = count_entries(chain_gw)
    assert resp.status == 200, resp.text[:500]
    body = resp.body
    assert body.get("ok") is True, body
    assert isinstance(body.get("entries"), int) and before <= body["entries"] <= after, (before, body, after)
    assert HEX64.match(body.get("head", "")), body
    assert body.get("first_broken_entry") is None, body


@pytest.mark.parametrize("who,status", [(TRAINER, 403), (STEWARD, 403), (None, 401)])
def test_rest_verify_and_checkpoint_are_for_auditors(chain_gw: Gateway, who, status):
    for path in ("/api/v1/audit/verify", "/api/v1/audit/checkpoint"):
        assert_json_error(audit_get(chain_gw, path, who=who), status)


def test_rest_checkpoint_is_signed_by_the_published_key(chain_gw: Gateway, activity: Activity):
    cp = rest_checkpoint(chain_gw)
    assert cp["entries"] >= len(activity.entries)
    assert_signed(chain_gw, cp)
    keys = http("GET", chain_gw.url("/api/v1/keys")).body
    assert keys["node_id"] == cp["node_id"], (keys, cp)


def test_cli_checkpoint_is_signed_by_the_same_node_key(chain_gw: Gateway, activity: Activity):
    rest = rest_checkpoint(chain_gw)
    cp = cli_checkpoint(chain_gw)
    assert (cp["node_id"], cp["key_id"]) == (rest["node_id"], rest["key_id"])
    assert cp["entries"] >= rest["entries"]
    assert_signed(chain_gw, cp)


def test_checkpoint_and_verify_agree_on_the_head(chain_gw: Gateway, activity: Activity):
    """On a quiet node a checkpoint and a verification see the same chain: same count, same head."""
    cp = rest_checkpoint(chain_gw)
    v = audit_get(chain_gw, "/api/v1/audit/verify").body
    if v["entries"] == cp["entries"]:
        assert v["head"] == cp["head"], (cp, v)
    else:  # something wrote in between (nothing should on this node)
        pytest.fail(f"the log grew between a checkpoint and a verify on a quiet node: {cp} {v}")


def test_verify_against_a_checkpoint(chain_gw: Gateway, activity: Activity, tmp_path: Path):
    cp = cli_checkpoint(chain_gw)
    good = write_checkpoint(tmp_path / "cp.json", cp)
    proc = cli_verify(chain_gw, "--checkpoint", str(good))
    assert proc.returncode == 0, f"a fresh checkpoint should verify:\n{output(proc)}"
    # the chain grows past the checkpoint: still passes through it
    c = chain_gw.connect()
    try:
        expect_status("NOT_FOUND", lambda: c.get_flight_info(path_descriptor(UNKNOWN), call_options(
            chain_gw.keys[TRAINER])))
    finally:
        c.close()
    proc = cli_verify(chain_gw, "--checkpoint", str(good))
    assert proc.returncode == 0, f"a checkpoint should still hold after later entries:\n{output(proc)}"
    rest = write_checkpoint(tmp_path / "rest-cp.json", rest_checkpoint(chain_gw))
    assert cli_verify(chain_gw, "--checkpoint", str(rest)).returncode == 0
    # forged checkpoints: another head at that count, a count the chain never had, a signature of something else
    head = cp["head"]
    forged = {
        "head": cp | {"head": ("0" if head[0] != "0" else "1") + head[1:]},
        "entries": cp | {"entries": cp["entries"] + 1000} | ({"links": cp["links"] + 1000} if "links" in cp else {}),
        "signature": cp | {"signature": rest_checkpoint(chain_gw)["signature"]},
    }
    for what, bad in forged.items():
        proc = cli_verify(chain_gw, "--checkpoint", str(write_checkpoint(tmp_path / f"bad-{what}.json", bad)))
        assert proc.returncode != 0, f"a checkpoint with a forged {what} passed:\n{output(proc)}"
    proc = cli_verify(chain_gw, "--checkpoint", str(tmp_path / "missing.json"))
    assert proc.returncode != 0


# ---------------------------------------------------------------------------------------------------------------------
# Filters of GET /api/v1/audit
# ---------------------------------------------------------------------------------------------------------------------

def upto(entries: list[dict[str, Any]], act: Activity) -> set[int]:
    """Ids of `entries` that were in the settled snapshot (later entries may come from other tests' checks)."""
    return {e["id"] for e in entries if e["id"] <= act.max_id}


def snapshot_where(act: Activity, pred) -> set[int]:
    return {e["id"] for e in act.entries if pred(e)}


def entry_time(e: dict[str, Any]) -> datetime:
    return parse_rfc3339(e["time"])


def test_filter_by_time(chain_gw: Gateway, activity: Activity):
    a = activity
    phase1 = snapshot_where(a, lambda e: a.t0 <= entry_time(e) < a.t1)
    phase2 = snapshot_where(a, lambda e: a.t1 <= entry_time(e) < a.t2)
    assert phase1 and phase2, "both phases should have left entries"
    assert upto(listing(chain_gw, since=rfc3339_z(a.t1)), a) == snapshot_where(a, lambda e: entry_time(e) >= a.t1)
    assert upto(listing(chain_gw, until=rfc3339_z(a.t1)), a) == snapshot_where(a, lambda e: entry_time(e) < a.t1)
    assert upto(listing(chain_gw, since=rfc3339_z(a.t0), until=rfc3339_z(a.t1)), a) == phase1
    assert upto(listing(chain_gw, since=rfc3339_z(a.t1), until=rfc3339_z(a.t2)), a) == phase2
    # the same instant written with another offset
    plus2 = a.t1.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="microseconds")
    assert upto(listing(chain_gw, since=plus2), a) == snapshot_where(a, lambda e: entry_time(e) >= a.t1)
    assert listing(chain_gw, since=rfc3339_z(a.t1), until=rfc3339_z(a.t0)) == []


def test_time_bounds_since_inclusive_until_exclusive(chain_gw: Gateway, activity: Activity):
    """An entry's own time: `since` includes it, `until` excludes it (as documented on AuditQuery)."""
    e = activity.entries[len(activity.entries) // 2]
    assert e["id"] in ids(listing(chain_gw, since=e["time"]))
    assert e["id"] not in ids(listing(chain_gw, until=e["time"]))


@pytest.mark.parametrize("decision", ["allow", "deny"])
def test_filter_by_decision(chain_gw: Gateway, activity: Activity, decision):
    got = listing(chain_gw, decision=decision)
    assert all(e["decision"] == decision for e in got), got
    expected = snapshot_where(activity, lambda e: e["decision"] == decision)
    assert expected and upto(got, activity) == expected


@pytest.mark.parametrize("principal", [TRAINER, STEWARD, "nobody-at-all"])
def test_filter_by_principal(chain_gw: Gateway, activity: Activity, principal):
    got = listing(chain_gw, principal=principal)
    assert all(e["principal"] == principal for e in got), got
    assert upto(got, activity) == snapshot_where(activity, lambda e: e["principal"] == principal)


def test_filters_combine(chain_gw: Gateway, activity: Activity):
    a = activity
    got = listing(chain_gw, principal=TRAINER, decision="deny", dataset=UNKNOWN, since=rfc3339_z(a.t1))
    expected = snapshot_where(a, lambda e: e["principal"] == TRAINER and e["decision"] == "deny"
                              and e["dataset"] == UNKNOWN and entry_time(e) >= a.t1)
    assert len(expected) == 1 and upto(got, a) == expected, (got, expected)
    got = listing(chain_gw, dataset=DATASET, decision="allow", until=rfc3339_z(a.t1))
    assert upto(got, a) == snapshot_where(a, lambda e: e["dataset"] == DATASET and e["decision"] == "allow"
                                          and entry_time(e) < a.t1)


@pytest.mark.parametrize("filters", [{}, {"principal": TRAINER}, {"decision": "deny"}])
def test_before_id_pages_cover_the_log_without_overlap(chain_gw: Gateway, activity: Activity, filters):
    a = activity
    expected = snapshot_where(a, lambda e: all(e[k] == v for k, v in filters.items()))
    assert len(expected) >= 3
    seen: list[int] = []
    pages = 0
    before = a.max_id + 1
    while True:
        page = listing(chain_gw, before_id=before, limit=2, **filters)
        assert len(page) <= 2, page
        page_ids = [e["id"] for e in page]
        assert page_ids == sorted(page_ids, reverse=True), f"a page is not newest first: {page_ids}"
        assert all(i < before for i in page_ids), (before, page_ids)
        if not page:
            break
        seen += page_ids
        before = page_ids[-1]
        pages += 1
        assert pages <= len(expected) + 1, "pagination does not end"
    assert len(seen) == len(set(seen)), f"pages overlap: {seen}"
    assert set(seen) == expected, f"pages miss {expected - set(seen)} or add {set(seen) - expected}"


def test_limit_gives_the_newest_entries(chain_gw: Gateway, activity: Activity):
    top = sorted(ids(activity.entries), reverse=True)[:3]
    page = listing(chain_gw, before_id=activity.max_id + 1, limit=3)
    assert [e["id"] for e in page] == top
    newest = listing(chain_gw, limit=1)
    assert len(newest) == 1 and newest[0]["id"] >= activity.max_id


@pytest.mark.parametrize("query", ["bogus=1", "since=yesterday", "until=2026-13-01T00:00:00Z", "decision=maybe",
                                   "before_id=abc", "limit=-1", "principal=x&frobnicate=y"])
def test_unknown_or_malformed_parameters_are_refused(chain_gw: Gateway, query):
    resp = http("GET", chain_gw.url("/api/v1/audit?" + query), key=chain_gw.keys[AUDITOR])
    assert_json_error(resp, 400)


# ======================================================================================================================
# Tampering
# ======================================================================================================================

@pytest.fixture(scope="module")
def tamper_gw(passerelle_bin: Path, tmp_path_factory):
    yield from _gateway(passerelle_bin, tmp_path_factory, "tamper-gateway")


@dataclass
class Tampered:
    clean_verify: subprocess.CompletedProcess
    clean_checkpoint: subprocess.CompletedProcess
    extended_checkpoint: subprocess.CompletedProcess
    rows_sent_id: int  # X: a completed do_get whose rows_sent was changed
    rows_sent_seen: tuple[int, int]  # (before, as the server lists it after)
    after_rows_sent: subprocess.CompletedProcess  # audit verify
    rest_after_rows_sent: HttpResponse
    checkpoint_after_rows_sent: subprocess.CompletedProcess  # audit verify --checkpoint (taken before)
    principal_id: int  # Y < X: an entry whose principal was changed
    after_principal: subprocess.CompletedProcess
    rest_after_principal: HttpResponse


@pytest.fixture(scope="module")
def tampered(tamper_gw: Gateway, tmp_path_factory) -> Tampered:
    gw = tamper_gw
    calls(gw, 1)
    entries = settle(gw)
    cp_file = write_checkpoint(tmp_path_factory.mktemp("tamper-cp") / "cp.json", cli_checkpoint(gw))
    clean_verify = cli_verify(gw)
    clean_checkpoint = cli_verify(gw, "--checkpoint", str(cp_file))
    calls(gw, 2)  # the chain grows past the checkpoint
    settle(gw)
    extended_checkpoint = cli_verify(gw, "--checkpoint", str(cp_file))

    # X: the newest completed allowed do_get before the checkpoint; Y: the first entry of the log
    streams = [e for e in entries if e["action"] == "do_get" and e["decision"] == "allow"
               and e["status"] == "completed" and e["rows_sent"] > 0]
    assert streams, entries
    x = max(e["id"] for e in streams)
    y = min(e["id"] for e in entries)
    assert y < x, (x, y)
    old = next(e["rows_sent"] for e in streams if e["id"] == x)
    rewrite(gw, ("UPDATE audit SET rows_sent = rows_sent + 1 WHERE id = ?", (x,)))
    seen = next(e["rows_sent"] for e in listing(gw) if e["id"] == x)
    after_rows_sent = cli_verify(gw)
    rest_after_rows_sent = audit_get(gw, "/api/v1/audit/verify")
    checkpoint_after_rows_sent = cli_verify(gw, "--checkpoint", str(cp_file))

    rewrite(gw, ("UPDATE audit SET principal = 'mallory' WHERE id = ?", (y,)))
    after_principal = cli_verify(gw)
    rest_after_principal = audit_get(gw, "/api/v1/audit/verify")
    return Tampered(clean_verify, clean_checkpoint, extended_checkpoint, x, (old, seen), after_rows_sent,
                    rest_after_rows_sent, checkpoint_after_rows_sent, y, after_principal, rest_after_principal)


def test_verify_and_checkpoint_pass_before_tampering(tampered: Tampered):
    assert tampered.clean_verify.returncode == 0, output(tampered.clean_verify)
    assert tampered.clean_checkpoint.returncode == 0, output(tampered.clean_checkpoint)
    assert tampered.extended_checkpoint.returncode == 0, output(tampered.extended_checkpoint)


def test_the_rewrite_reached_the_gateways_database(tampered: Tampered):
    old, seen = tampered.rows_sent_seen
    assert seen == old + 1, f"the server lists rows_sent {seen}, the database was set to {old + 1}"


def test_cli_verify_names_the_edited_entry(tampered: Tampered):
    proc = tampered.after_rows_sent
    assert proc.returncode != 0, f"audit verify passed after rows_sent was edited:\n{output(proc)}"
    named = named_entries(output(proc))
    assert named and named[0] == tampered.rows_sent_id, \
        f"audit verify should name entry {tampered.rows_sent_id} first:\n{output(proc)}"


def test_rest_verify_names_the_edited_entry(tampered: Tampered):
    resp = tampered.rest_after_rows_sent
    assert resp.status == 200, resp.text[:500]
    assert resp.body.get("ok") is False, resp.body
    assert resp.body.get("first_broken_entry") == tampered.rows_sent_id, resp.body
    assert isinstance(resp.body.get("reason"), str) and resp.body["reason"], resp.body


def test_checkpoint_fails_after_an_earlier_entry_was_edited(tampered: Tampered):
    proc = tampered.checkpoint_after_rows_sent
    assert proc.returncode != 0, f"verify --checkpoint passed after an entry before it was edited:\n{output(proc)}"


def test_the_first_broken_entry_is_named(tampered: Tampered):
    """After a second edit, of an older entry (its principal), that older entry is the first broken one."""
    proc = tampered.after_principal
    assert proc.returncode != 0, output(proc)
    named = named_entries(output(proc))
    assert named and named[0] == tampered.principal_id, \
        f"audit verify should name entry {tampered.principal_id} first:\n{output(proc)}"
    body = tampered.rest_after_principal.body
    assert tampered.rest_after_principal.status == 200 and body.get("ok") is False, body
    assert body.get("first_broken_entry") == tampered.principal_id, body


def test_removing_the_newest_entries_is_caught_by_a_checkpoint(passerelle_bin: Path, tmp_path: Path):
    """Someone with the database file removes the newest entries and their links: what is left is a consistent,
    shorter chain. A checkpoint taken before the removal no longer holds; one taken earlier still does.

    This test edits the chain table itself, so it relies on the Rust side's layout (gateway/src/audit.rs): table
    `audit_chain` (seq = link number from 1, entry_id), guarded by the triggers `audit_chain_no_delete` and
    `audit_no_delete`, and the checkpoint's `links` (number of links) next to `entries`. The gateway is stopped
    first: a running one keeps the head of the chain in memory."""
    gw = start_gateway(passerelle_bin, tmp_path / "data", demo_rows=DEMO_ROWS)
    try:
        calls(gw, 1)
        settle(gw)
        early = write_checkpoint(tmp_path / "early.json", cli_checkpoint(gw))
        calls(gw, 2)
        settle(gw)
        late = write_checkpoint(tmp_path / "late.json", cli_checkpoint(gw))
    finally:
        rc = stop_process(gw.proc)
    assert rc is not None, f"the gateway ignored SIGTERM; log:\n{gw.log_tail()}"
    cp0 = json.loads(early.read_text())
    assert "links" in cp0, f"the checkpoint has no `links` count (the test needs it): {cp0}"
    assert json.loads(late.read_text())["entries"] > cp0["entries"]
    rewrite(gw, ("DELETE FROM audit_chain WHERE seq > ?", (cp0["links"],)),
            ("DELETE FROM audit WHERE id NOT IN (SELECT entry_id FROM audit_chain WHERE kind = 'entry')", ()),
            drop_triggers=("audit_chain_no_delete", "audit_no_delete"))
    con = sqlite3.connect(db_path(gw))
    try:
        left = con.execute("SELECT count(*) FROM audit").fetchone()[0]
    finally:
        con.close()
    assert left == cp0["entries"], f"{left} entries left, the early checkpoint counted {cp0['entries']}"
    proc = cli_verify(gw, "--checkpoint", str(early))
    assert proc.returncode == 0, f"the chain up to the early checkpoint is intact:\n{output(proc)}"
    proc = cli_verify(gw, "--checkpoint", str(late))
    assert proc.returncode != 0, f"a checkpoint taken before the removal still passed:\n{output(proc)}"
