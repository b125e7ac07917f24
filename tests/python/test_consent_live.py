"""Consent changes while the server runs (CLI and REST) reach the NEXT stream within 1 s, on the scratch server.

Each test takes fresh subjects from `scratch_gateway.take_subject`, finds a subject's pseudonym in the stream by its
released rows (unique per subject), and checks the stream before and after the change: exactly that subject's rows
appear or disappear, everything else is unchanged."""

from __future__ import annotations

import csv
from typing import Callable

import pyarrow.flight as flight
import pytest

from conftest import (OTHER_PURPOSE, POLL_DEADLINE, PROPAGATION_LIMIT, PURPOSE, REGISTRY, SUB_PURPOSE, Gateway,
                      assert_json_error, call_options, groups_by_pseudonym, http, poll_until, pull, rfc3339,
                      utc_now_after)


@pytest.fixture
def sclient(scratch_gateway: Gateway):
    c = scratch_gateway.connect()
    yield c
    c.close()


def _groups(gw: Gateway, c: flight.FlightClient, purpose: str = PURPOSE) -> dict[str, tuple]:
    return groups_by_pseudonym(pull(c, call_options(gw.keys["trainer-de"], purpose)).table)


def _find(groups: dict[str, tuple], signature: tuple) -> str | None:
    found = [p for p, rows in groups.items() if rows == signature]
    assert len(found) <= 1
    return found[0] if found else None


def _rows(groups: dict[str, tuple]) -> int:
    return sum(len(v) for v in groups.values())


def check_change(gw: Gateway, c: flight.FlightClient, subject: str, change: Callable[[], None], *,
                 present_after: bool, purpose: str = PURPOSE) -> dict[str, tuple]:
    """Apply `change`; require that the next streams show `subject` (present_after) or not, within the limit, with
    everything else unchanged. Returns the groups after the change."""
    signature = gw.reference.signature(subject)
    before = _groups(gw, c, purpose)
    p_before = _find(before, signature)
    assert (p_before is None) == present_after, (
        f"precondition: subject {subject} should {'not ' if present_after else ''}be in the stream before the change")
    change()

    def changed():
        # A stream that was running when the change landed is itself cut over mid-stream (consent is re-read at every
        # batch boundary), so it may carry only part of the subject's rows: wait for a stream with all of them
        # (grant) or none of them under the subject's pseudonym (withdrawal).
        g = _groups(gw, c, purpose)
        if present_after:
            return g if _find(g, signature) is not None else None
        return g if p_before not in g else None

    after, seconds = poll_until(changed, deadline=POLL_DEADLINE,
                                what=f"subject {subject} {'appears' if present_after else 'disappears'}")
    assert seconds <= PROPAGATION_LIMIT, f"consent change took {seconds:.2f} s to reach the stream"
    n = len(gw.reference.by_subject[subject])
    expected = dict(before)
    if present_after:
        expected[_find(after, signature)] = signature
        assert _rows(after) == _rows(before) + n
    else:
        del expected[p_before]
        assert _rows(after) == _rows(before) - n
    assert after == expected, "only the changed subject's rows may differ"
    return after


def _event(gw: Gateway, subject: str, purpose: str, status: str) -> dict[str, str]:
    return {"subject_id": subject, "purpose": purpose, "status": status,
            "timestamp": rfc3339(utc_now_after(gw.reference))}


# ----------------------------------------------------------------------------------------------------------- CLI

def test_cli_withdrawal_is_honoured_by_the_next_stream(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    check_change(gw, sclient, s, lambda: gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", s,
                                                "--purpose", PURPOSE), present_after=False)


def test_cli_withdrawal_for_an_ancestor_purpose_applies(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    check_change(gw, sclient, s, lambda: gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", s,
                                                "--purpose", "research"), present_after=False)


def test_cli_withdrawal_for_another_or_a_narrower_purpose_does_not_apply(scratch_gateway: Gateway, sclient):
    """Withdraw S1 for research/epidemiology and for research/ai-training/llm, then S2 (the marker) for
    research/ai-training. Once S2 is gone the earlier changes have reached the server too: S1 must still be sent for
    research/ai-training, and no longer for research/ai-training/llm."""
    gw = scratch_gateway
    s1 = gw.take_subject(consented=True, purposes=(PURPOSE, SUB_PURPOSE))
    s2 = gw.take_subject(consented=True)
    sig1 = gw.reference.signature(s1)
    assert _find(_groups(gw, sclient, SUB_PURPOSE), sig1) is not None, "precondition: S1 sent for the sub-purpose"

    def change():
        for purpose in (OTHER_PURPOSE, SUB_PURPOSE):
            gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", s1, "--purpose", purpose)
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", s2, "--purpose", PURPOSE)

    after = check_change(gw, sclient, s2, change, present_after=False)
    assert _find(after, sig1) is not None, "a withdrawal for another or a narrower purpose removed the subject"
    assert _find(_groups(gw, sclient, SUB_PURPOSE), sig1) is None, "withdrawn for the sub-purpose, still sent"


def test_cli_consent_import(scratch_gateway: Gateway, sclient, tmp_path):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    path = tmp_path / "withdrawals.csv"
    ev = _event(gw, s, PURPOSE, "withdrawn")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["subject_id", "purpose", "status", "timestamp"])
        w.writeheader()
        w.writerow(ev)
    check_change(gw, sclient, s, lambda: gw.cli("consent", "import", "--registry", REGISTRY, "--file", str(path)),
                 present_after=False)


def test_cli_withdrawal_of_an_unconsented_subject_changes_nothing(scratch_gateway: Gateway, sclient):
    """Marker technique again: withdraw a subject that is not sent, then a marker; the rest is unchanged (checked by
    check_change's exact comparison)."""
    gw = scratch_gateway
    absent, marker = gw.take_subject(consented=False), gw.take_subject(consented=True)

    def change():
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", absent, "--purpose", PURPOSE)
        gw.cli("consent", "withdraw", "--registry", REGISTRY, "--subject", marker, "--purpose", PURPOSE)

    after = check_change(gw, sclient, marker, change, present_after=False)
    assert _find(after, gw.reference.signature(absent)) is None


# ---------------------------------------------------------------------------------------------------------- REST

def _post_events(gw: Gateway, events: list[dict], key: str | None):
    return http("POST", gw.url(f"/api/v1/consent/{REGISTRY}/events"), key=key, body=events)


def _posted(gw: Gateway, events: list[dict]) -> Callable[[], None]:
    def post():
        resp = _post_events(gw, events, gw.keys["steward-fr"])
        assert 200 <= resp.status < 300, f"{resp.status}: {resp.text[:500]}"
    return post


def test_rest_withdrawal_is_honoured_by_the_next_stream(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    check_change(gw, sclient, s, _posted(gw, [_event(gw, s, PURPOSE, "withdrawn")]), present_after=False)


def test_rest_grant_is_honoured_by_the_next_stream(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    s = gw.take_subject(consented=False)
    check_change(gw, sclient, s, _posted(gw, [_event(gw, s, PURPOSE, "granted")]), present_after=True)


def test_rest_grant_for_a_sub_purpose_does_not_cover_its_parent(scratch_gateway: Gateway, sclient):
    gw = scratch_gateway
    s1 = gw.take_subject(consented=False, purposes=(PURPOSE, SUB_PURPOSE))
    marker = gw.take_subject(consented=False)
    events = [_event(gw, s1, SUB_PURPOSE, "granted"), _event(gw, marker, PURPOSE, "granted")]
    after = check_change(gw, sclient, marker, _posted(gw, events), present_after=True)
    sig1 = gw.reference.signature(s1)
    assert _find(after, sig1) is None, "a grant for research/ai-training/llm was applied to research/ai-training"
    assert _find(_groups(gw, sclient, SUB_PURPOSE), sig1) is not None, "the sub-purpose grant is not applied"


@pytest.mark.parametrize("who,status", [("trainer-de", 403), ("auditor-eu", 403), (None, 401)])
def test_rest_consent_events_are_for_stewards_only(scratch_gateway: Gateway, who, status):
    gw = scratch_gateway
    s = gw.take_subject(consented=True)
    resp = _post_events(gw, [_event(gw, s, PURPOSE, "withdrawn")], gw.keys[who] if who else None)
    assert_json_error(resp, status)


@pytest.mark.parametrize("broken", [{"status": "maybe"}, {"timestamp": "yesterday"}, {"timestamp": None},
                                    {"purpose": None}], ids=["bad-status", "bad-timestamp", "no-timestamp",
                                                             "no-purpose"])
def test_rest_consent_events_reject_malformed_events(scratch_gateway: Gateway, broken):
    gw = scratch_gateway
    event = _event(gw, gw.take_subject(consented=False), PURPOSE, "granted")
    for k, v in broken.items():
        if v is None:
            del event[k]
        else:
            event[k] = v
    resp = _post_events(gw, [event], gw.keys["steward-fr"])
    assert resp.status in (400, 422), f"{resp.status}: {resp.text[:500]}"
    assert_json_error(resp, resp.status)
