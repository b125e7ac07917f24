"""Gateway memory while streaming a dataset several times larger than a memory budget, with a fast and a slow reader.

A benchmark, not a test: run it by hand on an idle machine with the release binary.

    cargo build --release -p passerelle --bin passerelle
    $HOME/.cache/passerelle-venv/bin/python tests/benches/large_stream_rss.py --budget-mib 512

It writes a synthetic Parquet dataset with the demo's schema (--files files of --row-groups row groups of
--row-group-rows rows, snappy) into a temporary directory outside the node's data directory, and refuses to go on
unless its decoded Arrow size (the sum over files of `pq.read_table(file).nbytes`) is at least 5x the budget. Subject
ids are drawn uniformly from the demo's subjects (1..demo_rows/2), so the demo's consent registry applies for real:
about 70 % of the rows pass the gate for research/ai-training, and the client checks the exact count computed from
`demo/consent.csv` by the reference model of tests/python/conftest.py.

It then starts `serve --demo --demo-rows 1000` on port 0, registers the dataset over REST as steward-fr (the demo
manifest renamed and pointed at the temporary directory; same controller, classes and consent registry), permits dkfz,
and pulls it whole as trainer-de with pyarrow.flight, batch by batch, keeping no batch: once as fast as possible and
once with a paced reader that takes about --slow-seconds. A thread samples the gateway's VmRSS from /proc/<pid>/status
every --sample-ms; VmHWM is reset (`echo 5 > /proc/<pid>/clear_refs`) before each pull. For each pull it prints the
throughput, the RSS before, the peak VmRSS and VmHWM, the ratio Arrow size / peak RSS delta, and the peak VmRSS in each
tenth of the stream (by rows received), which shows whether memory grows with the position in the stream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.flight as fl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from conftest import consented_subjects_from_csv, http, start_gateway, stop_process  # noqa: E402

PURPOSE = "research/ai-training"
NAME = "big_patients"
MIB = 1 << 20
EPOCH_2018_US = 1_514_764_800_000_000
SIX_YEARS_US = 6 * 365 * 86_400 * 1_000_000


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def uniform_ints(n: int, hi: int, seed: int, typ: pa.DataType = pa.int64()) -> pa.Array:
    """n integers uniform in [0, hi)."""
    return pc.cast(pc.floor(pc.multiply(pc.random(n, initializer=seed), hi)), typ)


def row_group(demo: pa.Table, subjects: int, n: int, seed: int) -> pa.Table:
    """n synthetic rows with the demo's schema; names and diagnoses from the demo's own values."""
    names = pc.unique(demo["full_name"])
    diagnoses = pc.unique(demo["diagnosis"])
    postcodes = pa.array([f"{x:05d}" for x in range(1_000, 95_000)])
    s = seed * 16
    arrays = [
        pc.add(uniform_ints(n, subjects, s + 1), 1),
        pc.take(names, uniform_ints(n, len(names), s + 2, pa.int32())),
        pc.cast(pc.cast(pc.subtract(uniform_ints(n, 29_220, s + 3), 14_610), pa.int32()), pa.date32()),
        pc.take(postcodes, uniform_ints(n, len(postcodes), s + 4, pa.int32())),
        pc.take(diagnoses, uniform_ints(n, len(diagnoses), s + 5, pa.int32())),
        pc.round(pc.add(pc.multiply(pc.random(n, initializer=s + 6), 8.0), 4.0), 1),
        pc.cast(pc.add(uniform_ints(n, SIX_YEARS_US, s + 7), EPOCH_2018_US), demo.schema.field("admitted_at").type),
    ]
    return pa.Table.from_arrays(arrays, schema=demo.schema)


@dataclass
class Dataset:
    files: list[Path]
    rows: int
    expected_rows: int  # rows whose subject is consented for PURPOSE
    parquet_bytes: int
    arrow_bytes: int
    gen_seconds: float


def generate(out: Path, demo_dir: Path, args: argparse.Namespace) -> Dataset:
    demo = pq.read_table(demo_dir / "patients" / "patients.parquet")
    subjects = pc.max(demo["patient_id"]).as_py()
    consented = pa.array(sorted(int(s) for s in consented_subjects_from_csv(demo_dir / "consent.csv", PURPOSE)),
                         pa.int64())
    t0 = time.perf_counter()
    files, rows, expected = [], 0, 0
    for f in range(args.files):
        path = out / f"part-{f:03d}.parquet"
        with pq.ParquetWriter(path, demo.schema, compression="snappy") as w:
            for g in range(args.row_groups):
                t = row_group(demo, subjects, args.row_group_rows, 1 + f * args.row_groups + g)
                rows += t.num_rows
                expected += pc.sum(pc.is_in(t["patient_id"], value_set=consented)).as_py()
                w.write_table(t, row_group_size=t.num_rows)
                del t
        files.append(path)
        print(f"  wrote {path.name}: {path.stat().st_size / MIB:,.0f} MiB Parquet "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    gen_seconds = time.perf_counter() - t0
    arrow_bytes = 0
    for path in files:
        t = pq.read_table(path)
        arrow_bytes += t.nbytes
        del t
    return Dataset(files, rows, expected, sum(p.stat().st_size for p in files), arrow_bytes, gen_seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Memory sampling
# ---------------------------------------------------------------------------------------------------------------------


def proc_status(pid: int | str) -> dict[str, int]:
    """VmRSS and VmHWM in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    def __init__(self, pid: int, period: float):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []  # (monotonic time, VmRSS bytes)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), proc_status(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return
            self.stop.wait(self.period)

    def between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss in list(self.samples) if t0 <= t <= t1]

    def now(self) -> int:
        """The median of the last five samples (about half a second): the resting RSS."""
        time.sleep(self.period * 6)
        recent = sorted(rss for _, rss in list(self.samples)[-5:])
        return recent[len(recent) // 2]


# ---------------------------------------------------------------------------------------------------------------------
# Pulls
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PullResult:
    label: str
    seconds: float
    rows: int
    batches: int
    received_bytes: int
    rss_before: int
    peak_rss: int
    hwm: int
    rss_after: int
    deciles: list[int | None]


def pull(client: fl.FlightClient, opts: fl.FlightCallOptions, gw_pid: int, sampler: Sampler, label: str,
         expected_rows: int, pace_seconds: float | None) -> PullResult:
    reset_hwm(gw_pid)
    rss_before = sampler.now()
    progress: list[tuple[float, int]] = []
    rows = batches = received = 0
    t0 = time.monotonic()
    info = client.get_flight_info(fl.FlightDescriptor.for_path(NAME), opts)
    for ep in info.endpoints:
        reader = client.do_get(ep.ticket, opts)
        for chunk in reader:
            rows += chunk.data.num_rows
            received += chunk.data.nbytes
            batches += 1
            del chunk
            now = time.monotonic()
            progress.append((now, rows))
            if pace_seconds:
                # Paced reader: be at row `rows` no earlier than its share of pace_seconds.
                due = t0 + pace_seconds * rows / expected_rows
                if due > now:
                    time.sleep(due - now)
    t1 = time.monotonic()
    time.sleep(sampler.period * 2)
    peak = max(sampler.between(t0, t1 + sampler.period * 2), default=0)
    hwm = proc_status(gw_pid)["VmHWM"]
    deciles: list[int | None] = []  # None: no sample in that tenth (a stream shorter than a few sample periods)
    start = t0
    for k in range(1, 11):
        end = next((t for t, r in progress if r >= rows * k / 10), t1)
        deciles.append(max(sampler.between(start, end), default=None))
        start = end
    rss_after = sampler.now()
    return PullResult(label, t1 - t0, rows, batches, received, rss_before, peak, hwm, rss_after, deciles)


def report(r: PullResult, ds: Dataset, warmed: int) -> None:
    """`warmed` is the RSS after the warm-up pull: the allocator keeps some of a pull's memory, so the RSS before the
    second pull is higher than before the first, and a delta over it alone would flatter the second pull."""
    mib = lambda b: f"{b / MIB:,.0f} MiB"  # noqa: E731
    peak = max(r.peak_rss, r.hwm)
    delta, delta_warm = peak - r.rss_before, peak - warmed
    print(f"\n[{r.label}] {r.seconds:.1f} s, {r.batches:,} batches, rows received {r.rows:,} "
          f"(expected {ds.expected_rows:,}: {'OK' if r.rows == ds.expected_rows else 'MISMATCH'})")
    print(f"  throughput: {ds.rows / r.seconds:,.0f} input rows/s, {r.rows / r.seconds:,.0f} sent rows/s, "
          f"{ds.arrow_bytes / r.seconds / 1e6:,.0f} MB/s of input Arrow, "
          f"{r.received_bytes / r.seconds / 1e6:,.0f} MB/s received ({r.received_bytes / 1e9:.2f} GB received)")
    print(f"  gateway RSS before {mib(r.rss_before)}, peak VmRSS {mib(r.peak_rss)}, VmHWM {mib(r.hwm)}, "
          f"after {mib(r.rss_after)}")
    print(f"  peak delta over the RSS before this pull {mib(delta)} (Arrow size / delta = "
          f"{ds.arrow_bytes / max(delta, 1):,.1f}x); over the post-warm-up RSS {mib(delta_warm)} "
          f"(Arrow size / delta = {ds.arrow_bytes / max(delta_warm, 1):,.1f}x)")
    tenths = " ".join("-" if d is None else f"{d / MIB:,.0f}" for d in r.deciles)
    print(f"  peak VmRSS per tenth of the stream (MiB): {tenths}")


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path,
                    default=Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/passerelle-target"))
                    / "release/passerelle")
    ap.add_argument("--budget-mib", type=int, default=512, help="the memory budget the dataset must exceed 5x")
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--row-groups", type=int, default=8, help="row groups per file")
    ap.add_argument("--row-group-rows", type=int, default=1 << 20)
    ap.add_argument("--slow-seconds", type=float, default=45.0, help="duration of the paced pull")
    ap.add_argument("--sample-ms", type=float, default=100.0)
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temporary directories (default: $TMPDIR)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="passerelle-rss-", dir=args.tmp))
    gw = sampler = None
    try:
        data_dir, big_dir = work / "node", work / "big"
        big_dir.mkdir()
        gw = start_gateway(args.bin, data_dir, demo_rows=1000)
        idle = proc_status(gw.proc.pid)["VmRSS"]
        print(f"gateway pid {gw.proc.pid} ({args.bin}), data dir {data_dir}, dataset dir {big_dir}")

        print(f"generating {args.files} x {args.row_groups} x {args.row_group_rows:,} rows ...", flush=True)
        ds = generate(big_dir, data_dir / "demo", args)
        budget = args.budget_mib * MIB
        print(f"dataset: {len(ds.files)} files, {ds.rows:,} rows ({ds.expected_rows:,} consented for {PURPOSE}, "
              f"{ds.expected_rows / ds.rows:.1%}), Parquet {ds.parquet_bytes / MIB:,.0f} MiB, "
              f"Arrow {ds.arrow_bytes / MIB:,.0f} MiB = {ds.arrow_bytes / budget:.2f}x the budget of "
              f"{args.budget_mib} MiB; generated in {ds.gen_seconds:.0f} s")
        if ds.arrow_bytes < 5 * budget:
            raise SystemExit("the dataset is smaller than 5x the budget: raise --files or --row-groups")

        with open(data_dir / "demo" / "demo_patients.toml", "rb") as f:
            manifest = tomllib.load(f)
        manifest.update(name=NAME, location=f"file://{big_dir}/", format="parquet")
        steward = gw.keys["steward-fr"]
        resp = http("POST", gw.url("/api/v1/datasets"), key=steward, body=manifest)
        assert resp.status in (200, 201), f"registering {NAME}: {resp.status} {resp.text[:800]}"
        resp = http("POST", gw.url(f"/api/v1/datasets/{NAME}/permits"), key=steward,
                    body={"org": "dkfz", "purpose": PURPOSE})
        assert resp.status in (200, 201), f"permit on {NAME}: {resp.status} {resp.text[:800]}"

        client = fl.connect(gw.flight_uri)
        opts = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {gw.keys['trainer-de']}".encode()),
                                             (b"x-passerelle-purpose", PURPOSE.encode())])
        deadline = time.monotonic() + 10
        while True:
            try:
                client.get_flight_info(fl.FlightDescriptor.for_path(NAME), opts)
                break
            except fl.FlightError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        sampler = Sampler(gw.proc.pid, args.sample_ms / 1000)
        sampler.start()
        registered = sampler.now()
        # Warm-up: a small governed pull of the big dataset, so one-time allocations (runtime threads, Parquet
        # metadata, the consent index) are not counted in the deltas below.
        warm = client.do_get(client.get_flight_info(fl.FlightDescriptor.for_command(
            json.dumps({"dataset": NAME, "limit": 100_000}).encode()), opts).endpoints[0].ticket, opts)
        warm_rows = sum(c.data.num_rows for c in warm)
        warmed = sampler.now()
        print(f"gateway VmRSS: {idle / MIB:,.0f} MiB idle after start, {registered / MIB:,.0f} MiB after "
              f"registration, {warmed / MIB:,.0f} MiB after a warm-up pull of {warm_rows:,} rows; "
              f"VmHWM reset between pulls: {reset_hwm(gw.proc.pid)}")

        fast = pull(client, opts, gw.proc.pid, sampler, "fast reader", ds.expected_rows, None)
        report(fast, ds, warmed)
        slow = pull(client, opts, gw.proc.pid, sampler, f"paced reader, ~{args.slow_seconds:.0f} s", ds.expected_rows,
                    args.slow_seconds)
        report(slow, ds, warmed)
        client_hwm = proc_status("self")["VmHWM"]
        print(f"\nclient (this process) VmHWM {client_hwm / MIB:,.0f} MiB (includes generation and the size check)")
        worst = max(max(r.peak_rss, r.hwm) for r in (fast, slow))
        print(f"summary: budget {args.budget_mib} MiB, Arrow {ds.arrow_bytes / MIB:,.0f} MiB "
              f"({ds.arrow_bytes / budget:.1f}x budget), gateway peak RSS {worst / MIB:,.0f} MiB "
              f"({worst / budget:.0%} of budget), peak delta over the post-warm-up RSS ({warmed / MIB:,.0f} MiB): "
              f"fast {(max(fast.peak_rss, fast.hwm) - warmed) / MIB:,.0f} MiB, "
              f"paced {(max(slow.peak_rss, slow.hwm) - warmed) / MIB:,.0f} MiB")
        ok = fast.rows == slow.rows == ds.expected_rows
        client.close()
        if not ok:
            raise SystemExit("rows received differ from the expected count")
    finally:
        if sampler is not None:
            sampler.stop.set()
        if gw is not None:
            stop_process(gw.proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
