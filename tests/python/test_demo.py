"""The demo data that `serve --demo` writes matches the contract the other tests rely on."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections import Counter

import pyarrow as pa

from conftest import (DATASET, OTHER_PURPOSE, PURPOSE, RAW_COLUMNS, REGISTRY, SUB_PURPOSE, Gateway, Reference,
                      consented_subjects, consented_subjects_from_csv, ConsentEvent, is_string_type, parse_rfc3339,
                      purpose_and_ancestors, subject_key)


def test_demo_keys_describe_three_principals(gateway: Gateway):
    p = gateway.demo_principals
    assert set(p) == {"steward-fr", "trainer-de", "auditor-eu"}
    assert {k: (v["org"], v["role"]) for k, v in p.items()} == {
        "steward-fr": ("aphp", "steward"), "trainer-de": ("dkfz", "trainer"), "auditor-eu": ("eu-audit", "auditor")}
    assert p["steward-fr"]["member_state"] == "FR"
    assert p["trainer-de"]["member_state"] == "DE"
    assert isinstance(p["auditor-eu"]["member_state"], str) and p["auditor-eu"]["member_state"]
    demo_keys = [v["key"] for v in p.values()]
    assert all(isinstance(k, str) and len(k) >= 16 for k in demo_keys), "API keys should be long random strings"
    assert len(set(demo_keys)) == 3


def test_raw_parquet_schema(reference: Reference):
    schema = reference.raw.schema
    assert schema.names == RAW_COLUMNS
    assert schema.field("patient_id").type == pa.int64()
    assert is_string_type(schema.field("full_name").type)
    assert is_string_type(schema.field("postcode").type) and is_string_type(schema.field("diagnosis").type)
    assert schema.field("birth_date").type == pa.date32()
    assert schema.field("hba1c").type == pa.float64()
    ts = schema.field("admitted_at").type
    assert pa.types.is_timestamp(ts) and ts.unit == "us" and ts.tz in ("UTC", "+00:00"), ts
    assert reference.raw.num_rows == 20000


def test_demo_data_exercises_the_policy(reference: Reference):
    """Several rows per subject; some subjects consented for the purpose and some not; so enforcement is visible."""
    per_subject = Counter(subject_key(r["patient_id"]) for r in reference.rows if r["patient_id"] is not None)
    assert max(per_subject.values()) > 1, "subjects should have several rows"
    consented = reference.consented(PURPOSE)
    assert consented & set(per_subject), "no subject with rows is consented for research/ai-training"
    assert set(per_subject) - consented, "every subject is consented: enforcement would be invisible"
    assert 0 < len(reference.consented_rows(PURPOSE)) < reference.raw.num_rows


def test_manifest_declares_the_demo_dataset(reference: Reference):
    """The manifest is valid TOML naming the dataset, its consent registry, legal basis and purposes (the key names
    are the Rust side's choice, so only the values are checked)."""
    text = reference.manifest_path.read_text()
    manifest = tomllib.loads(text)
    values = set(_leaf_strings(manifest))
    assert {DATASET, REGISTRY, "aphp", "FR", "consent", PURPOSE, OTHER_PURPOSE} <= values, sorted(values)


def _leaf_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _leaf_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaf_strings(v)


def test_consent_timestamps_are_rfc3339(reference: Reference):
    assert reference.events, "consent.csv is empty"
    assert all(ev.timestamp.tzinfo is not None for ev in reference.events)


# ------------------------------------------------------------------ the reference model itself (no server needed)

def _ev(subject, purpose, status, ts):
    return ConsentEvent(subject, purpose, status, parse_rfc3339(ts))


def test_reference_model_latest_applicable_event_wins():
    events = [
        _ev("1", "research/ai-training", "granted", "2024-01-01T00:00:00Z"),
        _ev("1", "research", "withdrawn", "2024-02-01T00:00:00Z"),  # ancestor, later: withdraws
        _ev("2", "research", "granted", "2024-01-01T00:00:00Z"),  # ancestor grant applies
        _ev("3", "research/ai-training/llm", "granted", "2024-01-01T00:00:00Z"),  # descendant: does not apply
        _ev("4", "research/ai-training", "withdrawn", "2024-01-01T00:00:00Z"),
        _ev("4", "research/ai-training", "granted", "2024-01-01T01:00:00+01:00"),  # same instant: withdrawn wins
        _ev("5", "research/ai-training", "withdrawn", "2024-03-01T00:00:00Z"),
        _ev("5", "research/ai-training", "granted", "2024-04-01T00:00:00Z"),  # later grant restores consent
        _ev("6", "research/epidemiology", "granted", "2024-01-01T00:00:00Z"),  # other purpose
        _ev("7", "research/ai-trainingX", "granted", "2024-01-01T00:00:00Z"),  # not a path prefix
    ]
    assert consented_subjects(events, "research/ai-training") == {"2", "5"}
    assert consented_subjects(events, "research/ai-training/llm") == {"2", "3", "5"}
    assert consented_subjects(events, "research/epidemiology") == {"2", "6"}
    assert purpose_and_ancestors(SUB_PURPOSE) == {"research", "research/ai-training", SUB_PURPOSE}


def test_reference_helper_reads_the_demo_csv(reference: Reference):
    assert consented_subjects_from_csv(reference.consent_path, PURPOSE) == reference.consented(PURPOSE)


def test_printed_snippet_runs_unchanged(gateway):
    """The pyarrow and ADBC snippet `serve --demo` prints works as printed (the README's promise)."""
    log = gateway.log_path.read_text(errors="replace")
    start = log.find("# Pull the governed demo stream")
    assert start >= 0, log[-2000:]
    end = log.find('print(cur.fetch_arrow_table())', start)
    assert end > start, "the snippet ends with the ADBC query"
    snippet = log[start:end + len('print(cur.fetch_arrow_table())')]
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diagnosis" in proc.stdout and "avg(" in proc.stdout, proc.stdout[-2000:]
