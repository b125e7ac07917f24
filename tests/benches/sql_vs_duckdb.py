"""Flight SQL through the gateway against DuckDB with the consent semi-join: the same query over the same Parquet.

A benchmark, not a test: run it by hand on an idle machine.

    cargo build --release -p passerelle --bin passerelle
    $HOME/.cache/passerelle-venv/bin/python tests/benches/sql_vs_duckdb.py --data-dir /tmp/passerelle-bench-sql
    $HOME/.cache/passerelle-venv/bin/python tests/benches/sql_vs_duckdb.py --data-dir D --json

The first run has the release binary generate the synthetic demo (`serve --demo --demo-rows 10000000`: Parquet,
consent.csv, keys) in D; later runs on the same D reuse it (the demo is only created when D has no demo-keys.json).
The binary is `$CARGO_TARGET_DIR/release/passerelle` (default target dir `~/.cache/passerelle-target`), or --bin.

The query (purpose research/ai-training, principal trainer-de):

    SELECT diagnosis, count(*) AS n, avg(hba1c) AS mean FROM demo_patients WHERE hba1c > 8 GROUP BY diagnosis

- gateway: ADBC Flight SQL (`adbc_driver_flightsql.dbapi`, bearer key and purpose header), `execute` then
  `fetch_arrow_table`, wall clock on the client: planning, the consent gate on every row, the aggregate, the
  Flight round trips. The gateway has its consent index in memory already (built at start-up).
- duckdb_semijoin: DuckDB in-process, `PRAGMA threads=--threads`, the same SQL over
  `read_parquet(...) WHERE hba1c > 8 AND patient_id IN (SELECT subject_id FROM consented)`, with the consented
  subject table computed beforehand by duckdb_semijoin.py's consent SQL (its time is reported apart, as the
  gateway's consent loading is not timed either).
- duckdb_plain: the same query without the consent semi-join (no governance at all), for scale.

Each is run once untimed (warm page cache), then --repeats times; the best time is reported, as rows/s of INPUT
(the Parquet file's rows / time, as duckdb_semijoin.py and flight_e2e.rs count), and the ratio gateway/duckdb.
The server and DuckDB run one after the other, never at the same time, so each gets both cores.

Check (untimed): the gateway's groups must equal DuckDB semi-join's (counts exactly, means to 1e-9 relative);
with --full-check the consented subject set is also recomputed in pure Python from consent.csv
(duckdb_semijoin.reference_subjects) and compared with DuckDB's. A mismatch exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import duckdb_semijoin as semijoin  # noqa: E402  (the consent SQL and the pure-Python reference live there)

DATASET = "demo_patients"
PURPOSE_HEADER = "x-passerelle-purpose"
GATEWAY_SQL = f"SELECT diagnosis, count(*) AS n, avg(hba1c) AS mean FROM {DATASET} WHERE hba1c > 8 GROUP BY diagnosis"


def log(msg: str, to_json: bool) -> None:
    # With --json, stdout carries only the JSON object.
    print(msg, file=sys.stderr if to_json else sys.stdout, flush=True)


def default_binary() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path.home() / ".cache" / "passerelle-target")
    return Path(target) / "release" / "passerelle"


# ---------------------------------------------------------------------------------------------------------- server

class Server:
    """`passerelle serve --demo` on loopback, ports picked by the OS (read back from serve.json)."""

    def __init__(self, binary: Path, data_dir: Path, rows: int, config: Path | None, startup_timeout: float):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "serve.json").unlink(missing_ok=True)  # a stale one from a killed run would be read otherwise
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        cmd = [str(binary), "serve", "--data-dir", str(data_dir), "--flight-addr", "127.0.0.1:0",
               "--http-addr", "127.0.0.1:0", "--demo", "--demo-rows", str(rows)]
        if config is not None:
            cmd[2:2] = ["--config", str(config)]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        while True:
            serve, keys = read_json(data_dir / "serve.json"), read_json(data_dir / "demo-keys.json")
            if serve and keys and serve.get("flight_addr"):
                break
            if self.proc.poll() is not None:
                raise SystemExit(f"`{' '.join(cmd)}` exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() - t0 > startup_timeout:
                self.stop()
                raise SystemExit(f"the server did not start within {startup_timeout:.0f} s; see {self.log_path}")
            time.sleep(0.1)
        self.startup_secs = time.monotonic() - t0
        self.flight_uri = f"grpc://{serve['flight_addr']}"
        self.key = keys["trainer-de"]["key"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_json(path: Path):
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------------- timing

def best_of(run, repeats: int) -> tuple[float, float, pa.Table]:
    """(cold time, best warm time, result): one untimed-for-best warm-up run, then `repeats` timed runs."""
    t0 = time.perf_counter()
    result = run()
    cold = time.perf_counter() - t0
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t0)
    return cold, best, result


def groups(table: pa.Table) -> dict[str, tuple[int, float]]:
    return {r["diagnosis"]: (int(r["n"]), float(r["mean"])) for r in table.to_pylist()}


def compare(a: dict, b: dict, what: str) -> list[str]:
    failures = []
    if set(a) != set(b):
        failures.append(f"{what}: groups differ: {sorted(a)} vs {sorted(b)}")
    for d in sorted(set(a) & set(b)):
        (na, ma), (nb, mb) = a[d], b[d]
        if na != nb or not math.isclose(ma, mb, rel_tol=1e-9):
            failures.append(f"{what}: {d}: count/mean {na}/{ma!r} vs {nb}/{mb!r}")
    return failures


# ------------------------------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "passerelle-bench-sql",
                    help="Passerelle data directory; generated on the first run, reused afterwards")
    ap.add_argument("--rows", type=int, default=10_000_000, help="demo rows to generate (first run only)")
    ap.add_argument("--bin", type=Path, default=None, help="passerelle binary (default: the release build)")
    ap.add_argument("--config", type=Path, default=None, help="passed to `serve --config` (e.g. [sql] limits)")
    ap.add_argument("--purpose", default="research/ai-training")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (default 2: a 2-core machine)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the best is reported")
    ap.add_argument("--startup-timeout", type=float, default=1800.0,
                    help="seconds to wait for the server (generating 10M rows takes a while)")
    ap.add_argument("--full-check", action="store_true",
                    help="also recompute the consented subjects in pure Python (slow at 10M rows)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    js = args.json
    binary = args.bin or default_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        print(f"no passerelle binary at {binary}: `cargo build --release -p passerelle --bin passerelle` or --bin",
              file=sys.stderr)
        return 2
    data_dir = args.data_dir.resolve()
    parquet_path = data_dir / "demo" / "patients" / "patients.parquet"
    csv_path = data_dir / "demo" / "consent.csv"
    reused = (data_dir / "demo-keys.json").exists() and parquet_path.exists()

    # ---- gateway (first, so that it generates the data on a fresh directory)
    log(f"{'reusing' if reused else 'generating'} the demo in {data_dir} with {binary}", js)
    server = Server(binary, data_dir, args.rows, args.config, args.startup_timeout)
    try:
        input_rows = pq.ParquetFile(parquet_path).metadata.num_rows
        if reused and input_rows != args.rows:
            log(f"note: {data_dir} holds {input_rows} rows (not --rows {args.rows}); use another --data-dir", js)
        log(f"server up in {server.startup_secs:.1f} s ({server.flight_uri}); {input_rows} Parquet rows", js)
        conn = dbapi.connect(server.flight_uri, autocommit=True, db_kwargs={
            "adbc.flight.sql.authorization_header": f"Bearer {server.key}",
            f"adbc.flight.sql.rpc.call_header.{PURPOSE_HEADER}": args.purpose,
            "adbc.flight.sql.rpc.timeout_seconds.query": "3600",
            "adbc.flight.sql.rpc.timeout_seconds.fetch": "3600",
        })
        try:
            def gateway_query() -> pa.Table:
                with conn.cursor() as cur:
                    cur.execute(GATEWAY_SQL)
                    return cur.fetch_arrow_table()
            gw_cold, gw_best, gw_table = best_of(gateway_query, args.repeats)
        finally:
            conn.close()
    finally:
        server.stop()
    log(f"gateway         cold={gw_cold:.3f}s best={gw_best:.3f}s input_rows/s={input_rows / gw_best:,.0f}", js)

    # ---- DuckDB
    con = duckdb.connect()
    con.execute(f"PRAGMA threads={int(args.threads)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    load_sql, compute_sql = semijoin.consent_sql(str(csv_path), args.purpose)
    t0 = time.perf_counter()
    con.execute(load_sql)
    t1 = time.perf_counter()
    con.execute(compute_sql)
    t2 = time.perf_counter()
    consented = con.sql("SELECT count(*) FROM consented").fetchall()[0][0]
    log(f"duckdb consent prep (untimed below): load={t1 - t0:.3f}s compute={t2 - t1:.3f}s "
        f"consented_subjects={consented}", js)
    src = f"read_parquet({semijoin.sql_str(str(parquet_path))})"
    duck_sql = {
        "duckdb_semijoin": f"SELECT diagnosis, count(*) AS n, avg(hba1c) AS mean FROM {src} "
                           f"WHERE hba1c > 8 AND patient_id IN (SELECT subject_id FROM consented) GROUP BY diagnosis",
        "duckdb_plain": f"SELECT diagnosis, count(*) AS n, avg(hba1c) AS mean FROM {src} "
                        f"WHERE hba1c > 8 GROUP BY diagnosis",
    }
    duck = {}
    for name, sql in duck_sql.items():
        cold, best, table = best_of(lambda sql=sql: semijoin.to_arrow(con.sql(sql)), args.repeats)
        duck[name] = (cold, best, table)
        log(f"{name:<15} cold={cold:.3f}s best={best:.3f}s input_rows/s={input_rows / best:,.0f}", js)

    # ---- check and ratios
    failures = compare(groups(gw_table), groups(duck["duckdb_semijoin"][2]), "gateway vs duckdb_semijoin")
    if args.full_check:
        ref = semijoin.reference_subjects(str(csv_path), args.purpose)
        duck_subjects = set(con.sql("SELECT subject_id FROM consented").to_arrow_table()["subject_id"].to_pylist())
        if ref != duck_subjects:
            failures.append(f"consented subjects: python {len(ref)}, duckdb {len(duck_subjects)}")
    ratio_semi = duck["duckdb_semijoin"][1] / gw_best
    ratio_plain = duck["duckdb_plain"][1] / gw_best
    log(f"gateway/duckdb_semijoin input rows/s ratio = {ratio_semi:.3f}; gateway/duckdb_plain = {ratio_plain:.3f}; "
        f"check: {'OK' if not failures else 'MISMATCH'}", js)
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    if js:
        def entry(cold: float, best: float) -> dict:
            return {"cold_secs": cold, "best_secs": best, "input_rows_per_s": input_rows / best}
        print(json.dumps({
            "query": GATEWAY_SQL, "purpose": args.purpose, "data_dir": str(data_dir), "reused_data": reused,
            "input_rows": input_rows, "repeats": args.repeats, "duckdb_threads": args.threads,
            "duckdb_version": duckdb.__version__, "pyarrow_version": pa.__version__,
            "gateway": entry(gw_cold, gw_best),
            **{name: entry(c, b) for name, (c, b, _) in duck.items()},
            "duckdb_consent_prep_secs": t2 - t0, "consented_subjects": consented,
            "ratio_gateway_vs_duckdb_semijoin": ratio_semi, "ratio_gateway_vs_duckdb_plain": ratio_plain,
            "check": {"ok": not failures, "failures": failures},
        }, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
