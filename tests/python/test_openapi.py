"""The OpenAPI document of the REST API (gateway/src/openapi.json) against the real server.

- The server serves the file verbatim at GET /api/v1/openapi.json (compiled in: a stale binary fails here).
- The document is valid OpenAPI 3.0 and describes every route of `admin::router()`, with the same methods.
- schemathesis (pinned in requirements.txt) generates requests from the FILE and checks every response against it:
  no 5xx, the documented status codes and content types, and bodies that validate against the response schemas.
  It runs as a subprocess of the pinned CLI, deterministic (`--generation-deterministic`, one worker) and bounded
  (`--max-examples` per operation), once per pair of principals: GETs as the auditor and POSTs as the steward (the
  success paths), then GETs as the steward and POSTs as a trainer (visibility, `location`, 403/404 paths).

The server is this module's own demo node: schemathesis adds permits, deny rules and consent events to it, which the
session's `gateway` must never see. Before the run it gets audit entries of every kind (allowed and completed,
denied, unauthenticated, Flight SQL with its statement) and a CSV dataset that uses every optional manifest field,
so that the response schemas are checked on bodies that have them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow.flight as flight
import pytest

from conftest import DATASET, PURPOSE, Gateway, call_options, http, path_descriptor, pull, start_gateway, stop_process
# imported under another name: pytest would collect a module-level `tests_*` function as a test
from conftest import declared_locations_config as location_config

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "gateway" / "src" / "openapi.json"
ROUTER = REPO / "gateway" / "src" / "admin.rs"

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = 30
RUN_TIMEOUT = 150.0  # one schemathesis run; each takes about 10 s on 2 cores

# A CSV dataset outside the node's data directory whose manifest sets every optional field.
CSV_NAME = "openapi_people"
CSV_TEXT = "sid;postcode;age;note\n1;75001;34;a\n2;69002;51;b\n3;13008;47;c\n"


def csv_manifest(path: Path) -> dict:
    return {
        "name": CSV_NAME, "location": f"file://{path}", "format": "csv",
        "csv": {"delimiter": ";", "comment": "#", "infer_rows": 10,
                "schema": [{"name": "sid", "type": "Int64"}, {"name": "postcode", "type": "Utf8"},
                           {"name": "age", "type": "Int64"}, {"name": "note", "type": "Utf8"}]},
        "member_state": "FR", "controller": "aphp", "subject_column": "sid", "legal_basis": "public-interest",
        "consent_registry": "aphp-openapi-people", "purposes": ["research/epidemiology"],
        "columns": {"sid": {"class": "identifier"}, "postcode": {"class": "quasi-identifier", "generalise": "prefix:2"},
                    "age": {"class": "quasi-identifier", "generalise": "bucket:10"},
                    "note": {"class": "sensitive", "mask": "nullify"}},
        "special_category": True, "release": "aggregates", "min_group_size": 5, "k_anonymity": 2,
        "federation": "eu_openapi_people",
    }


@pytest.fixture(scope="module")
def api_gateway(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("openapi")
    # The steward registers its CSV under `people/`, declared a storage location of aphp's.
    (base / "people").mkdir()
    config = location_config(base, base / "people", ["aphp"])
    gw = start_gateway(passerelle_bin, base / "data", demo_rows=2000, config=config)
    try:
        _populate(gw, base)
        yield gw
    finally:
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        if died is not None:
            raise AssertionError(f"passerelle serve (openapi) died during the tests with exit code {died}; "
                                 f"log tail:\n{gw.log_tail()}")
        if rc is None:
            raise AssertionError(f"passerelle serve (openapi) ignored SIGTERM for 15 s and was killed; "
                                 f"log tail:\n{gw.log_tail()}")


def _populate(gw: Gateway, base: Path) -> None:
    """Audit entries of each kind and a dataset with every optional manifest field."""
    client = flight.connect(gw.flight_uri)
    try:
        got = pull(client, call_options(gw.keys["trainer-de"]))  # allowed, completed with rows sent
        assert got.table.num_rows > 0
        with pytest.raises(flight.FlightUnauthorizedError):  # denied: purpose not permitted
            client.get_flight_info(path_descriptor(), call_options(gw.keys["trainer-de"], "marketing"))
        with pytest.raises(flight.FlightUnauthenticatedError):  # unauthenticated
            client.get_flight_info(path_descriptor(), call_options("psk_" + "0" * 64))
    finally:
        client.close()
    db_kwargs = {"adbc.flight.sql.authorization_header": f"Bearer {gw.keys['trainer-de']}",
                 "adbc.flight.sql.rpc.call_header.x-passerelle-purpose": PURPOSE}
    with dbapi.connect(gw.flight_uri, db_kwargs=db_kwargs, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT diagnosis, count(*) FROM {DATASET} WHERE hba1c > $1 GROUP BY 1", parameters=(8.0,))
        cur.fetch_arrow_table()
    data = base / "people"
    (data / "people.csv").write_text(CSV_TEXT)
    resp = http("POST", gw.url("/api/v1/datasets"), key=gw.keys["steward-fr"], body=csv_manifest(data / "people.csv"))
    assert resp.status == 201, resp.text[:1000]
    # An audited entry has been written for each call above before it answered; check a listing sees them.
    resp = http("GET", gw.url("/api/v1/audit"), key=gw.keys["auditor-eu"])
    assert resp.status == 200, resp.text[:500]
    actions = {(e["action"], e["decision"]) for e in resp.body}
    assert {("do_get", "allow"), ("get_flight_info", "deny"), ("sql_query", "allow")} <= actions, actions


def test_served_document_is_the_file(api_gateway: Gateway):
    """GET /api/v1/openapi.json is gateway/src/openapi.json (compiled in with include_str!: rebuild after editing)."""
    resp = http("GET", api_gateway.url("/api/v1/openapi.json"))
    assert resp.status == 200, resp.text[:500]
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    expected = json.loads(SCHEMA.read_text())
    if resp.body != expected:
        served = resp.body if isinstance(resp.body, dict) else {}
        differ = sorted(k for k in set(served) | set(expected) if served.get(k) != expected.get(k))
        paths = sorted(set(served.get("paths", {})) ^ set(expected.get("paths", {})))
        pytest.fail(f"the server serves another document than gateway/src/openapi.json (rebuild the binary after "
                    f"editing the file): top-level keys that differ {differ}; paths in only one of them {paths}",
                    pytrace=False)


def _router_routes() -> dict[str, set[str]]:
    """{path: {methods}} of the `.route(...)` calls in admin.rs `router()`."""
    text = ROUTER.read_text()
    body = text[text.index("pub fn router("):]
    body = body[:body.index("\n}\n")]
    routes: dict[str, set[str]] = {}
    chunks = re.split(r"\.route\(\s*", body)[1:]
    for chunk in chunks:
        path = re.match(r'"([^"]+)"', chunk).group(1)
        handlers = chunk.split(".fallback(")[0]
        routes[path] = {m.upper() for m in re.findall(r"(?<![A-Za-z_])(get|post|put|patch|delete)\(", handlers)}
    assert routes, "no .route(...) found in admin.rs"
    return routes


def test_document_is_valid_and_describes_every_route():
    from openapi_spec_validator import validate

    doc = json.loads(SCHEMA.read_text())
    validate(doc)
    assert doc["openapi"] == "3.0.3"
    documented = {path: {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
                  for path, item in doc["paths"].items()}
    assert documented == _router_routes(), "openapi.json paths/methods differ from admin.rs router()"
    public = {"/healthz", "/api/v1/keys", "/api/v1/openapi.json"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert (op.get("security") == []) == (path in public), f"{method.upper()} {path}: security"
            if path not in public:
                assert "401" in op["responses"], f"{method.upper()} {path} does not document 401"


def _schemathesis(gw: Gateway, tmp_path: Path, name: str, get_as: str, post_as: str,
                  phases: str = "examples,coverage,fuzzing,stateful") -> tuple[int, str]:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        "[[operations]]\n"
        'include-method = "GET"\n'
        f'headers = {{ Authorization = "Bearer {gw.keys[get_as]}" }}\n\n'
        "[[operations]]\n"
        'include-method = "POST"\n'
        f'headers = {{ Authorization = "Bearer {gw.keys[post_as]}" }}\n'
    )
    cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
           "--config-file", str(config), "run", str(SCHEMA), "--url", gw.http_base,
           "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
           "--phases", phases, "--workers", "1", "--request-timeout", "30", "--no-color",
           "--output-truncate", "false"]
    env = dict(os.environ, NO_COLOR="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL)
    out = f"$ schemathesis run ({name}: GET as {get_as}, POST as {post_as}) in {time.monotonic() - t0:.1f} s\n" \
          f"{proc.stdout}\n{proc.stderr}"
    return proc.returncode, out


@pytest.mark.parametrize(("get_as", "post_as"), [("auditor-eu", "steward-fr"), ("steward-fr", "trainer-de")],
                         ids=["auditor-get+steward-post", "steward-get+trainer-post"])
def test_schemathesis_finds_no_failure(api_gateway: Gateway, tmp_path: Path, get_as: str, post_as: str):
    rc, report = _schemathesis(api_gateway, tmp_path, f"{get_as}+{post_as}", get_as, post_as)
    api_gateway.assert_alive()
    if rc != 0:
        pytest.fail(f"schemathesis exited with {rc}:\n{report}\nserver log tail:\n{api_gateway.log_tail(30)}",
                    pytrace=False)
    m = re.search(r"Test cases:\s*\n?\s*(\d+) generated, (\d+) passed", report)
    assert m and int(m.group(1)) > 0 and m.group(1) == m.group(2), f"no test case ran, or not all passed:\n{report}"
    print(f"schemathesis: {m.group(1)} test cases ({get_as} GET, {post_as} POST)")
