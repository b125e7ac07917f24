"""DuckDB baseline for the governed-stream benchmark (tests/benches/flight_e2e.rs).

How fast does DuckDB, reading the same Parquet file, produce the rows our gateway streams for
purpose `research/ai-training`? The answer is the denominator of
"governed stream throughput / DuckDB semi-join throughput".

Run (with the test venv, where tests/python/requirements.txt pins duckdb):

    $HOME/.cache/passerelle-venv/bin/python tests/benches/duckdb_semijoin.py --data-dir D
    $HOME/.cache/passerelle-venv/bin/python tests/benches/duckdb_semijoin.py --data-dir D --json

D is a Passerelle data directory: `D/demo/patients/patients.parquet` (patient_id int64, full_name,
birth_date date32, postcode, diagnosis, hba1c, admitted_at) and `D/demo/consent.csv`
(`subject_id,purpose,status,timestamp`, RFC 3339 timestamps).

Consent rule (the gateway's, see policies/src/consent/index.rs): for purpose P a subject is kept
iff its latest event among events whose purpose is P or an ancestor of P is `granted`; latest
means the greatest timestamp, and at equal timestamps `withdrawn` wins. Subject ids are strings
in the CSV; the ones that are decimal integers match the int64 `patient_id`. Rows whose
patient_id is null are dropped.

What is timed (DuckDB in-process, `PRAGMA threads=2` by default since the bench machine has
2 cores; wall clock, best of --repeats runs, each query run once more untimed beforehand to
warm the page cache):
  consent prep       load consent.csv into a DuckDB table, then compute the consented subject
                     set (arg_max per subject) into a table; reported as load + compute.
  plain_scan         SELECT patient_id, birth_date, postcode, diagnosis, hba1c, admitted_at
                     FROM the Parquet file, fully materialised as one Arrow table.
  semijoin           the same columns, WHERE patient_id IN (SELECT subject_id FROM consented).
  semijoin_transform semijoin plus the gateway's column rules: birth_date truncated to the year,
                     postcode cut to 2 characters, patient_id replaced by a cheap keyed hash
                     (first 32 hex chars of sha256(decimal id || key): one SHA-256 per row).
  semijoin_hmac      as semijoin_transform but with the gateway's exact pseudonym,
                     hex(HMAC-SHA256(k_org, decimal id)[..16]) built from two sha256 calls in SQL
                     (2 SHA-256 per row, 4 compression blocks vs the gateway's 2 with a cached
                     keyed state), for a like-for-like hashing cost.

Reported per query: rows out, best time, rows/s (rows out / time), input_rows/s (rows in the
Parquet file / time; comparable with flight_e2e's input rows/s ratio), MB/s of the result's
Arrow `nbytes` (1 MB = 1e6 bytes; flight_e2e counts get_array_memory_size, which includes
buffer slack, so compare MB/s with care), and the input rows/s ratio to plain_scan.

Correctness (untimed, once): an independent pure-Python evaluation of the consent rule over
the CSV, probed against the Parquet patient_id column with pyarrow, must give the same subject
set, the same kept row count and the same sum of kept patient_ids as DuckDB, and the SQL HMAC
must equal Python's hmac module on sample ids. Otherwise the script exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = "patient_id, birth_date, postcode, diagnosis, hba1c, admitted_at"
# Rust's str::parse::<i64> accepts exactly this (then range-checks).
INT_RE = re.compile(r"[+-]?[0-9]+")
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def log(msg: str, to_json: bool) -> None:
    # With --json, stdout carries only the JSON object; the human lines go to stderr.
    print(msg, file=sys.stderr if to_json else sys.stdout, flush=True)


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def ancestors(purpose: str) -> list[str]:
    """`research/ai-training` -> [`research`, `research/ai-training`] (Purpose::self_and_ancestors)."""
    parts = purpose.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def to_arrow(rel) -> pa.Table:
    # duckdb 2.x: .arrow() returns a RecordBatchReader; to_arrow_table() materialises.
    if hasattr(rel, "to_arrow_table"):
        return rel.to_arrow_table()
    return rel.fetch_arrow_table()


def pseudonym_keys(master: bytes, org: str) -> tuple[bytes, bytes, bytes]:
    """k_org as policies/src/enforce/pseudonymise.rs derives it, and its HMAC inner/outer pads."""
    k_org = hmac.new(master, b"passerelle/pseudonym/v1/" + org.encode(), hashlib.sha256).digest()
    block = k_org.ljust(64, b"\0")
    return k_org, bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)


# ---------------------------------------------------------------- reference (pure Python)


def reference_subjects(csv_path: str, purpose: str) -> set[int]:
    """The consent rule evaluated line by line, without DuckDB."""
    wanted = set(ancestors(purpose))
    latest: dict[str, tuple[int, bool]] = {}  # subject -> (micros, withdrawn)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows)]
        if header != ["subject_id", "purpose", "status", "timestamp"]:
            raise SystemExit(f"{csv_path}: unexpected header {header}")
        for rec in rows:
            if not rec or all(not c.strip() for c in rec):
                continue
            subject, p, status, ts = (c.strip() for c in rec)
            if p not in wanted:
                continue
            if status not in ("granted", "withdrawn"):
                raise SystemExit(f"{csv_path}: bad status {status!r}")
            at = dt.datetime.fromisoformat(ts)
            if at.tzinfo is None:
                raise SystemExit(f"{csv_path}: timestamp {ts!r} has no offset")
            key = ((at - EPOCH) // dt.timedelta(microseconds=1), status == "withdrawn")
            cur = latest.get(subject)
            if cur is None or key > cur:
                latest[subject] = key
    out = set()
    for subject, (_, withdrawn) in latest.items():
        if not withdrawn and INT_RE.fullmatch(subject):
            v = int(subject)
            if I64_MIN <= v <= I64_MAX:
                out.add(v)
    return out


def reference_rows(parquet_path: str, subjects: set[int]) -> tuple[int, int]:
    ids = pq.read_table(parquet_path, columns=["patient_id"])["patient_id"]
    kept = pc.filter(ids, pc.is_in(ids, value_set=pa.array(sorted(subjects), pa.int64())))
    return len(kept), int(pc.sum(kept).as_py() or 0)


# ---------------------------------------------------------------- DuckDB


def consent_sql(csv_path: str, purpose: str) -> tuple[str, str]:
    load = f"""
        CREATE OR REPLACE TABLE consent_events AS
        SELECT trim(subject_id) AS subject, trim(purpose) AS purpose, trim(status) AS status,
               CAST(trim("timestamp") AS TIMESTAMPTZ) AS event_at
        FROM read_csv({sql_str(csv_path)}, header = true, auto_detect = false, delim = ',',
                      columns = {{'subject_id': 'VARCHAR', 'purpose': 'VARCHAR',
                                 'status': 'VARCHAR', 'timestamp': 'VARCHAR'}})
        WHERE subject_id IS NOT NULL AND trim(subject_id) <> ''
    """
    purposes = ", ".join(sql_str(p) for p in ancestors(purpose))
    # Latest event per subject: order by (time, withdrawn) packed into one BIGINT, so that at
    # equal times a withdrawal outranks a grant. Subjects are grouped as strings (as the gateway
    # keys them), then the decimal-integer ones are kept for the int64 column.
    compute = f"""
        CREATE OR REPLACE TABLE consented AS
        SELECT DISTINCT CAST(subject AS BIGINT) AS subject_id
        FROM (
            SELECT subject,
                   arg_max(status, epoch_us(event_at) * 2 + CAST(status = 'withdrawn' AS BIGINT)) AS last
            FROM consent_events
            WHERE purpose IN ({purposes})
            GROUP BY subject
        )
        WHERE last = 'granted'
          AND regexp_full_match(subject, '[+-]?[0-9]+')
          AND TRY_CAST(subject AS BIGINT) IS NOT NULL
    """
    return load, compute


def queries(parquet_path: str, hash_key: str, ipad: bytes, opad: bytes) -> dict[str, str]:
    src = f"read_parquet({sql_str(parquet_path)})"
    semi = "WHERE patient_id IN (SELECT subject_id FROM consented)"
    general = (
        "CAST(date_trunc('year', birth_date) AS DATE) AS birth_date, left(postcode, 2) AS postcode, "
        "diagnosis, hba1c, admitted_at"
    )
    cheap = f"left(sha256(CAST(patient_id AS VARCHAR) || {sql_str(hash_key)}), 32)"
    return {
        "plain_scan": f"SELECT {COLUMNS} FROM {src}",
        "semijoin": f"SELECT {COLUMNS} FROM {src} {semi}",
        "semijoin_transform": f"SELECT {cheap} AS patient_id, {general} FROM {src} {semi}",
        "semijoin_hmac": f"SELECT {hmac_sql('patient_id', ipad, opad)} AS patient_id, {general} FROM {src} {semi}",
    }


def hmac_sql(col: str, ipad: bytes, opad: bytes) -> str:
    inner = f"sha256(unhex('{ipad.hex()}') || encode(CAST({col} AS VARCHAR)))"
    return f"left(sha256(unhex('{opad.hex()}') || unhex({inner})), 32)"


def timed(con, sql: str, repeats: int) -> tuple[float, pa.Table]:
    """Runs once untimed (warm-up), then `repeats` times; returns the best time and a result."""
    table = to_arrow(con.sql(sql))
    best = float("inf")
    for _ in range(repeats):
        del table
        t0 = time.perf_counter()
        table = to_arrow(con.sql(sql))
        best = min(best, time.perf_counter() - t0)
    return best, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="Passerelle data directory (with demo/)")
    ap.add_argument("--purpose", default="research/ai-training")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (default 2: a 2-core machine)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per query; the best is reported")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    js = args.json

    parquet_path = os.path.join(args.data_dir, "demo", "patients", "patients.parquet")
    csv_path = os.path.join(args.data_dir, "demo", "consent.csv")
    for p in (parquet_path, csv_path):
        if not os.path.isfile(p):
            print(f"missing {p}", file=sys.stderr)
            return 2
    input_rows = pq.ParquetFile(parquet_path).metadata.num_rows

    con = duckdb.connect()
    con.execute(f"PRAGMA threads={int(args.threads)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    threads = con.sql("SELECT current_setting('threads')").fetchall()[0][0]
    log(
        f"duckdb {duckdb.__version__} (pyarrow {pa.__version__}), PRAGMA threads={threads}, "
        f"best of {args.repeats} after 1 warm-up; purpose {args.purpose} "
        f"(events on {', '.join(ancestors(args.purpose))}); {input_rows} Parquet rows",
        js,
    )

    # Consent prep: load + compute, best of `repeats` (the tables are replaced each time).
    load_sql, compute_sql = consent_sql(csv_path, args.purpose)
    best_load = best_compute = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        con.execute(load_sql)
        t1 = time.perf_counter()
        con.execute(compute_sql)
        t2 = time.perf_counter()
        best_load, best_compute = min(best_load, t1 - t0), min(best_compute, t2 - t1)
    events = con.sql("SELECT count(*) FROM consent_events").fetchall()[0][0]
    consented = con.sql("SELECT count(*) FROM consented").fetchall()[0][0]
    log(
        f"duckdb consent_prep events={events} consented_subjects={consented} "
        f"load={best_load:.3f}s compute={best_compute:.3f}s total={best_load + best_compute:.3f}s",
        js,
    )

    # Reference, untimed: the consent rule in pure Python, then the subject set compared exactly.
    t0 = time.perf_counter()
    ref_subjects = reference_subjects(csv_path, args.purpose)
    ref_rows, ref_sum = reference_rows(parquet_path, ref_subjects)
    ref_secs = time.perf_counter() - t0
    duck_subjects = set(con.sql("SELECT subject_id FROM consented").to_arrow_table()["subject_id"].to_pylist())
    failures = []
    if duck_subjects != ref_subjects:
        failures.append(
            f"consented subjects differ: duckdb {len(duck_subjects)}, python {len(ref_subjects)}, "
            f"only duckdb e.g. {sorted(duck_subjects - ref_subjects)[:5]}, "
            f"only python e.g. {sorted(ref_subjects - duck_subjects)[:5]}"
        )

    hash_key = "passerelle-bench-key"
    k_org, ipad, opad = pseudonym_keys(b"passerelle-bench-master-key", "bench-org")
    sample = con.sql(
        f"SELECT patient_id, {hmac_sql('patient_id', ipad, opad)} AS p "
        f"FROM read_parquet({sql_str(parquet_path)}) WHERE patient_id IS NOT NULL LIMIT 1000"
    ).fetchall()
    for pid, got in sample:
        want = hmac.new(k_org, str(pid).encode(), hashlib.sha256).hexdigest()[:32]
        if got != want:
            failures.append(f"SQL HMAC of {pid} is {got}, Python's is {want}")
            break

    results: dict[str, dict] = {}
    plain_ips = None
    for name, sql in queries(parquet_path, hash_key, ipad, opad).items():
        secs, table = timed(con, sql, args.repeats)
        rows, nbytes = table.num_rows, table.nbytes
        if name == "semijoin":
            got_sum = int(pc.sum(table["patient_id"]).as_py() or 0)
            if (rows, got_sum) != (ref_rows, ref_sum):
                failures.append(
                    f"semijoin kept rows={rows} sum(patient_id)={got_sum}; "
                    f"python reference rows={ref_rows} sum={ref_sum}"
                )
        elif name != "plain_scan" and rows != ref_rows:
            failures.append(f"{name} kept rows={rows}; python reference rows={ref_rows}")
        elif name == "plain_scan" and rows != input_rows:
            failures.append(f"plain_scan rows={rows}, Parquet metadata says {input_rows}")
        del table
        r = {
            "rows": rows,
            "secs": secs,
            "rows_per_s": rows / secs,
            "input_rows_per_s": input_rows / secs,
            "arrow_bytes": nbytes,
            "mb_per_s": nbytes / secs / 1e6,
        }
        if plain_ips is None:
            plain_ips = r["input_rows_per_s"]
        r["input_rows_per_s_vs_plain"] = r["input_rows_per_s"] / plain_ips
        results[name] = r
        extra = "" if name == "plain_scan" else f" input_rows/s={r['input_rows_per_s']:.0f}"
        ratio = "" if name == "plain_scan" else f" {name}/plain={r['input_rows_per_s_vs_plain']:.3f}"
        log(
            f"duckdb {name} rows={rows} time={secs:.3f}s rows/s={r['rows_per_s']:.0f}{extra} "
            f"MB/s={r['mb_per_s']:.1f}{ratio}",
            js,
        )

    ok = not failures
    log(
        f"check: python reference ({ref_secs:.1f}s untimed) consented_subjects={len(ref_subjects)} "
        f"kept_rows={ref_rows} ({100 * ref_rows / max(input_rows, 1):.1f} % of input): "
        + ("OK" if ok else "MISMATCH"),
        js,
    )
    for f in failures:
        print(f"error: {f}", file=sys.stderr)

    if js:
        print(
            json.dumps(
                {
                    "engine": "duckdb",
                    "duckdb_version": duckdb.__version__,
                    "pyarrow_version": pa.__version__,
                    "threads": int(threads),
                    "repeats": args.repeats,
                    "purpose": args.purpose,
                    "data_dir": os.path.abspath(args.data_dir),
                    "input_rows": input_rows,
                    "parquet_bytes": os.path.getsize(parquet_path),
                    "consent_prep": {
                        "events": events,
                        "consented_subjects": consented,
                        "load_secs": best_load,
                        "compute_secs": best_compute,
                        "total_secs": best_load + best_compute,
                    },
                    **results,
                    "check": {
                        "ok": ok,
                        "reference_consented_subjects": len(ref_subjects),
                        "reference_rows": ref_rows,
                        "reference_patient_id_sum": ref_sum,
                        "failures": failures,
                    },
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
