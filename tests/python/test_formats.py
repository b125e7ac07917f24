"""JSON Lines and Arrow IPC datasets on local disk, end to end: the demo's own rows written in each format outside
the node's data directory, registered over REST by the demo steward (the demo manifest with another name, location
and format; same controller and consent registry), pulled by trainer-de with pyarrow and compared row for row with
the demo Parquet dataset pulled the same way — pseudonyms, generalisations and consent included.

JSON has no date or timestamp type: the JSON Lines copy keeps the columns whose JSON form reads back as the same
Arrow type (integers, floats, strings), and its manifest classifies those only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.flight as flight
import pytest

from conftest import DATASET, PURPOSE, Gateway, assert_json_error, assert_same_multiset, call_options, http, norm_float, \
    path_descriptor
from test_admin import manifest_json

JSON_COLUMNS = ["patient_id", "full_name", "postcode", "diagnosis", "hba1c"]


def pull(client: flight.FlightClient, gw: Gateway, dataset: str) -> pa.Table:
    opts = call_options(gw.keys["trainer-de"])
    info = client.get_flight_info(path_descriptor(dataset), opts)
    return pa.concat_tables(client.do_get(ep.ticket, opts).read_all() for ep in info.endpoints)


def rows(table: pa.Table, columns: list[str]) -> list[tuple]:
    return [tuple(norm_float(r[c]) for c in columns) for r in table.select(columns).to_pylist()]


def register(gw: Gateway, name: str, location: str, fmt: str, columns: list[str] | None = None) -> None:
    m = manifest_json(gw, name)
    m.update(location=location, format=fmt)
    if columns is not None:
        m["columns"] = {c: cls for c, cls in m["columns"].items() if c in columns}
    resp = http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], body=m)
    assert resp.status in (200, 201), f"registering {name}: {resp.status} {resp.text[:800]}"
    resp = http("POST", gw.url(f"/api/v1/datasets/{name}/permits"), key=gw.keys["steward-fr"],
                body={"org": "dkfz", "purpose": PURPOSE})
    assert resp.status in (200, 201), f"permit on {name}: {resp.status} {resp.text[:800]}"


@pytest.fixture(scope="module")
def client(scratch_gateway: Gateway):
    c = flight.connect(f"grpc://{scratch_gateway.flight_addr}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def local(scratch_gateway: Gateway, client) -> pa.Table:
    return pull(client, scratch_gateway, DATASET)


def test_arrow_ipc_files_pull_like_the_parquet_dataset(scratch_gateway: Gateway, tmp_path_factory, local, client):
    gw = scratch_gateway
    d = tmp_path_factory.mktemp("ipc")
    raw = gw.reference.raw
    half = raw.num_rows // 2
    feather.write_feather(raw.slice(0, half), d / "part-0.arrow", compression="uncompressed")
    feather.write_feather(raw.slice(half), d / "part-1.arrow", compression="zstd")
    register(gw, "ipc_patients", f"file://{d}/", "arrow")
    table = pull(client, gw, "ipc_patients")
    assert table.schema.names == local.schema.names, table.schema
    assert_same_multiset(rows(table, local.schema.names), rows(local, local.schema.names), "IPC vs Parquet rows")


def test_json_lines_pull_like_the_parquet_dataset(scratch_gateway: Gateway, tmp_path_factory, local, client):
    gw = scratch_gateway
    d = tmp_path_factory.mktemp("jsonl")
    raw = gw.reference.raw.select(JSON_COLUMNS)
    for part, chunk in enumerate((raw.slice(0, 700), raw.slice(700))):
        with open(d / f"part-{part}.json", "w") as f:
            for r in chunk.to_pylist():
                f.write(json.dumps(r) + "\n")
    register(gw, "jsonl_patients", f"file://{d}/", "ndjson", JSON_COLUMNS)
    table = pull(client, gw, "jsonl_patients")
    released = [c for c in local.schema.names if c in JSON_COLUMNS]
    # (JSON inference orders the columns by name)
    assert sorted(table.schema.names) == sorted(released), table.schema
    assert_same_multiset(rows(table, released), rows(local, released), "JSON Lines vs Parquet rows")


def test_a_json_lines_file_that_is_not_json_is_refused(scratch_gateway: Gateway, tmp_path_factory):
    gw = scratch_gateway
    d = tmp_path_factory.mktemp("badjson")
    (d / "x.json").write_text("this is not json\n")
    m = manifest_json(gw, "bad_jsonl")
    m.update(location=f"file://{d}/", format="ndjson")
    err = assert_json_error(http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], body=m), 400)
    assert "bad_jsonl" in err["error"] or "json" in err["error"].lower() or "read" in err["error"], err
