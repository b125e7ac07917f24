"""The governed Flight stream of the same 10M demo rows read from local disk and from S3 (moto_server on loopback).

A benchmark, not a test: run it by hand on an idle machine, after `sql_vs_duckdb.py` has generated the demo in D.

    cargo build --release -p passerelle --bin passerelle
    $HOME/.cache/passerelle-venv/bin/python tests/benches/s3_vs_local.py --data-dir /tmp/passerelle-bench-sql

It uploads D's demo Parquet to a moto bucket (in 8 parts), starts the release gateway on D with a `[stores.lake]`
section, registers `s3_patients` (the demo manifest pointed at the bucket), then pulls both datasets whole as
trainer-de (purpose research/ai-training) with pyarrow, best of --repeats. It prints rows/s for each, the ratio,
and the gateway's peak RSS (VmHWM) while streaming from S3. moto keeps objects in memory and serves them over
plain HTTP on loopback, so the S3 figure measures the object_store path, not a network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pyarrow.flight as fl
import pyarrow.parquet as pq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True, help="a directory where sql_vs_duckdb.py made the demo")
    ap.add_argument("--bin", type=Path,
                    default=Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/passerelle-target"))
                    / "release/passerelle")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    d: Path = args.data_dir
    parquet = d / "demo/patients/patients.parquet"
    if not parquet.exists():
        raise SystemExit(f"no demo in {d}; run sql_vs_duckdb.py --data-dir {d} first")

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = None
    try:
        wait_http(f"http://127.0.0.1:{port}/", 30)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        table = pq.read_table(parquet)
        parts = 8
        step = (table.num_rows + parts - 1) // parts
        for i in range(parts):
            buf = io.BytesIO()
            pq.write_table(table.slice(i * step, step), buf, row_group_size=1 << 20)
            s3.put_object(Bucket="bench", Key=f"patients/part-{i}.parquet", Body=buf.getvalue())
        rows = table.num_rows
        del table

        cfg = d.parent / f"{d.name}-s3.toml"
        cfg.write_text(f'[stores.lake]\nkind = "s3"\nendpoint = "http://127.0.0.1:{port}"\nregion = "us-east-1"\n'
                       f'access_key_id = "testing"\nsecret_access_key = "testing"\nallow_http = true\n')
        (d / "serve.json").unlink(missing_ok=True)
        log = open(d.parent / f"{d.name}-s3-serve.log", "wb")
        gw = subprocess.Popen([str(args.bin), "serve", "--data-dir", str(d), "--config", str(cfg),
                               "--flight-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
                              stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (d / "serve.json").exists():
            if time.monotonic() > deadline or gw.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.2)
        time.sleep(0.5)
        serve = json.loads((d / "serve.json").read_text())
        keys = json.loads((d / "demo-keys.json").read_text())
        manifest = (d / "demo/demo_patients.toml").read_text()
        manifest = manifest.replace('name = "demo_patients"', 'name = "s3_patients"')
        lines = [ln for ln in manifest.splitlines() if not ln.startswith("location =")]
        lines.insert(1, 'location = "s3://bench/patients/"\nstore = "lake"')
        mpath = d.parent / f"{d.name}-s3-manifest.toml"
        mpath.write_text("\n".join(lines) + "\n")
        run = lambda *a: subprocess.run([str(args.bin), "--data-dir", str(d), *a], check=True,
                                        capture_output=True, text=True)
        existing = json.loads(run("--json", "dataset", "list").stdout)
        if not any(x.get("name") == "s3_patients" for x in existing):
            run("dataset", "register", "--manifest", str(mpath), "--config", str(cfg))
            run("permit", "add", "--dataset", "s3_patients", "--org", "dkfz", "--purpose", "research/ai-training")
        time.sleep(1.0)

        client = fl.connect(f"grpc://{serve['flight_addr']}")
        opts = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {keys['trainer-de']['key']}".encode()),
                                             (b"x-passerelle-purpose", b"research/ai-training")])

        def pull(name: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            info = client.get_flight_info(fl.FlightDescriptor.for_path(name), opts)
            n = 0
            for ep in info.endpoints:
                reader = client.do_get(ep.ticket, opts)
                for chunk in reader:
                    n += chunk.data.num_rows
            return time.perf_counter() - t0, n

        hwm_before = vm_hwm_kib(gw.pid)
        results = {}
        for name in ("demo_patients", "s3_patients"):
            pull(name)  # warm
            best = min(pull(name)[0] for _ in range(args.repeats))
            sent = pull(name)[1]
            results[name] = (best, sent)
            print(f"{name:14s} best={best:.3f}s input_rows/s={rows / best:,.0f} rows_sent={sent:,}")
        assert results["demo_patients"][1] == results["s3_patients"][1], "S3 and local sent different row counts"
        print(f"s3/local throughput ratio = {results['demo_patients'][0] / results['s3_patients'][0]:.3f}")
        print(f"gateway peak RSS (VmHWM) = {vm_hwm_kib(gw.pid) / 1024:.0f} MiB, of which "
              f"{hwm_before / 1024:.0f} MiB before streaming (consent index of the demo); "
              f"Parquet on disk {parquet.stat().st_size / 2**20:.0f} MiB")
    finally:
        for p in (gw, moto):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
