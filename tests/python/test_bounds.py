"""Bounded inputs on every decoder (issue #15, item 5), against the real binary.

- Deep expressions: a chain of operators as long as the statement limit allows (`1+1+…+1`, 64 KiB), nested
  parentheses, chains of OR, and the same in a JSON-command filter. Each is refused with INVALID_ARGUMENT naming the
  bound (or, within it, answered); the node never crashes and answers a normal query afterwards. Before the bound,
  `SELECT 1+1+…+1` with 100 terms overflowed a thread's stack and aborted the node.
- Prepared-statement parameters: exactly one row, in at most `sql.max_statement_bytes` of Arrow data (an honest
  LZ4-compressed row is accepted; a buffer claiming 2^45 bytes uncompressed is in the Rust e2e test
  `tests/e2e/decoders.rs`, which crafts the raw message).
- TLS handshakes: many TCP connections that never send a ClientHello do not keep a real client waiting.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import DATASET, PURPOSE, Gateway, call_options, command_descriptor, expect_status, listed_datasets
from test_flight_sql import (_bytes_field, _proto_fields, adbc_connect, create_prepared_statement, flight_sql_command,
                             prepared_pull, scalar)
from test_tls import Pki, TlsGateway, _tls_gateway, pki  # noqa: F401 - `pki` is a fixture used by tls_gw below

STATEMENT_LIMIT = 64 * 1024  # sql.max_statement_bytes (default)


def answers(gw: Gateway) -> None:
    """The node is alive and serves a normal query."""
    assert gw.proc.poll() is None, f"the node died:\n{gw.log_tail()}"
    with adbc_connect(gw, key=gw.keys["trainer-de"]) as c:
        assert scalar(c, f"SELECT count(*) FROM {DATASET}") > 0


def sql_error(gw: Gateway, sql: str) -> str:
    with adbc_connect(gw, key=gw.keys["trainer-de"]) as c:
        cur = c.cursor()
        try:
            cur.execute(sql)
            table = cur.fetch_arrow_table()
        except Exception as exc:  # noqa: BLE001 - the message is checked below
            return str(exc)
    pytest.fail(f"expected a refusal, got {table.num_rows} rows for {sql[:80]}...")


# ------------------------------------------------------------------------------------------------ deep expressions

def _longest_chain(prefix: str, term: str, op: str, limit: int) -> str:
    n = (limit - len(prefix)) // (len(term) + len(op))
    return prefix + op.join([term] * n)


DEEP_SQL = {
    "plus-chain-to-the-statement-limit": _longest_chain("SELECT ", "1", "+", STATEMENT_LIMIT),
    "or-chain": f"SELECT count(*) FROM {DATASET} WHERE " + " OR ".join(f"hba1c = {i}" for i in range(400)),
    "column-chain": f"SELECT count(*) FROM {DATASET} WHERE " + " + ".join(["hba1c"] * 2000) + " > 0",
    "nested-parentheses": "SELECT " + "(" * 5000 + "1" + ")" * 5000,
    "nested-subqueries": "SELECT * FROM " + "(SELECT * FROM " * 200 + DATASET + ") t" * 200,
    "cast-chain": "SELECT 1" + "::BIGINT" * 3000,
    "unary-chain": "SELECT " + "- " * 3000 + "1",
}


@pytest.mark.parametrize("name", list(DEEP_SQL))
def test_deep_sql_is_refused_and_the_node_keeps_answering(gateway: Gateway, name):
    sql = DEEP_SQL[name]
    assert len(sql) <= STATEMENT_LIMIT
    msg = sql_error(gateway, sql)
    assert "INVALID_ARGUMENT" in msg, msg[:400]
    assert "levels deep" in msg or "RecursionLimitExceeded" in msg or "does not parse" in msg, msg[:400]
    answers(gateway)


def test_expressions_within_the_bound_are_answered(gateway: Gateway):
    with adbc_connect(gateway, key=gateway.keys["trainer-de"]) as c:
        assert scalar(c, "SELECT " + "+".join(["1"] * 200) + " AS n") == 200
        n = scalar(c, f"SELECT count(*) FROM {DATASET} WHERE " + " OR ".join(f"hba1c = {i}" for i in range(100)))
        assert n >= 0
        # Long lists do not nest: thousands of values are fine.
        values = ", ".join(str(i) for i in range(5000))
        assert scalar(c, f"SELECT count(*) FROM {DATASET} WHERE hba1c NOT IN ({values})") >= 0
    answers(gateway)


@pytest.mark.parametrize("filter", [
    "+".join(["hba1c"] * 680) + " > 0",  # 4 KiB, the filter limit
    "(" * 2000 + "hba1c > 0" + ")" * 2000,
    " OR ".join(f"hba1c={i}" for i in range(300)),
])
def test_deep_json_command_filters_are_refused(gateway: Gateway, client, filter):
    assert len(filter) <= 4096
    msg = expect_status("INVALID_ARGUMENT",
                        lambda: client.get_flight_info(command_descriptor(filter=filter),
                                                       call_options(gateway.keys["trainer-de"])))
    assert "levels deep" in msg or "does not parse" in msg or "longer than" in msg, msg
    answers(gateway)


# ----------------------------------------------------------------------------------- prepared-statement parameters

def _options(key: str, *, timeout: float | None = None,
             write_options: pa.ipc.IpcWriteOptions | None = None) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode()),
                                             (b"x-passerelle-purpose", PURPOSE.encode())],
                                    timeout=timeout, write_options=write_options)


def _bind(client: flight.FlightClient, handle: bytes, table: pa.Table, opts: flight.FlightCallOptions) -> bytes:
    """DoPut the parameters; returns the new handle (DoPutPreparedStatementResult, field 1)."""
    desc = flight_sql_command("CommandPreparedStatementQuery", _bytes_field(1, handle))
    writer, reader = client.do_put(desc, table.schema, opts)
    try:
        writer.write_table(table)
        writer.done_writing()
        result = reader.read()
    finally:
        writer.close()
    return _proto_fields(result.to_pybytes())[1][0]


PARAM_SQL = f"SELECT count(*) AS n FROM {DATASET} WHERE hba1c > $1"


@pytest.mark.parametrize("rows", [0, 2, 1000])
def test_parameters_bind_exactly_one_row(gateway: Gateway, client, rows):
    opts = call_options(gateway.keys["trainer-de"])
    handle = create_prepared_statement(client, PARAM_SQL, opts)
    table = pa.table({"p": pa.array([8.0] * rows, pa.float64())})
    msg = expect_status("INVALID_ARGUMENT", lambda: _bind(client, handle, table, opts))
    assert "exactly one row" in msg, msg


def test_parameters_over_the_statement_limit_are_refused_naming_it(gateway: Gateway, client):
    opts = call_options(gateway.keys["trainer-de"])
    handle = create_prepared_statement(client, f"SELECT count(*) AS n FROM {DATASET} WHERE diagnosis = $1", opts)
    table = pa.table({"p": ["x" * (STATEMENT_LIMIT + 1)]})
    msg = expect_status("INVALID_ARGUMENT", lambda: _bind(client, handle, table, opts))
    assert "sql.max_statement_bytes = 65536" in msg, msg
    answers(gateway)


def test_one_row_binds_also_compressed(gateway: Gateway, client):
    """An honest row binds, plain or LZ4-compressed (the bound is on the decompressed size)."""
    key = gateway.keys["trainer-de"]
    with adbc_connect(gateway, key=key) as c:
        expected = scalar(c, f"SELECT count(*) FROM {DATASET} WHERE hba1c > 8")
    for compression in (None, "lz4"):
        handle = create_prepared_statement(client, PARAM_SQL, _options(key))
        table = pa.table({"p": pa.array([8.0], pa.float64())})
        write = pa.ipc.IpcWriteOptions(compression=compression)
        bound = _bind(client, handle, table, _options(key, write_options=write))
        _, got = prepared_pull(client, bound, _options(key))
        assert got.column("n")[0].as_py() == expected, compression


# --------------------------------------------------------------------------------------------------- TLS handshakes

@pytest.fixture(scope="module")
def tls_gw(passerelle_bin: Path, tmp_path_factory, pki: Pki):  # noqa: F811 - the imported fixture
    yield from _tls_gateway(passerelle_bin, tmp_path_factory, pki, "bounds-tls", require_client_cert=False,
                            allow_bearer=True, demo_rows=2000)


IDLE_CONNECTIONS = 400  # more than the 256 handshakes the node runs at once
SERVED_WITHIN = 5.0  # seconds; a handshake slot freed by the 10 s timeout would be too late


def test_connections_that_never_say_hello_do_not_starve_real_clients(tls_gw: TlsGateway):
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", tls_gw.flight_port), timeout=5))
        time.sleep(0.5)  # the node has accepted what it will and waits for their ClientHello
        c = tls_gw.connect()
        try:
            t0 = time.monotonic()
            assert listed_datasets(c, _options(tls_gw.gw.keys["trainer-de"], timeout=SERVED_WITHIN)) == [DATASET]
            elapsed = time.monotonic() - t0
        finally:
            c.close()
        assert elapsed < SERVED_WITHIN, f"a real client waited {elapsed:.1f} s behind idle connections"
    finally:
        for s in idle:
            s.close()
    assert tls_gw.gw.proc.poll() is None


def test_a_handshake_that_never_finishes_is_dropped(tls_gw: TlsGateway):
    """The time bound: a connection that sends nothing is closed by the node after 10 s, not held forever."""
    s = socket.create_connection(("127.0.0.1", tls_gw.flight_port), timeout=30)
    try:
        t0 = time.monotonic()
        data = s.recv(1)  # b"" when the node closes the connection
        waited = time.monotonic() - t0
    finally:
        s.close()
    assert data == b"" and 8 <= waited <= 25, (data, waited)
