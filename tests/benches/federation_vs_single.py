"""Aggregate throughput of a 3-node federated pull versus one node serving the same total rows, in one run.

A benchmark, not a test: run it by hand on an idle machine with the release binary.

    cargo build --release -p passerelle --bin passerelle
    $HOME/.cache/passerelle-venv/bin/python tests/benches/federation_vs_single.py --rows 1000000

Three nodes (gw-fr, gw-de, gw-it; each `serve --demo --demo-rows N`, plain gRPC on loopback) hold a part of
`eu_diabetes` each, with a permit for dkfz on all three; trainer-de asks its home node gw-de and reads the three
endpoints concurrently (one thread per node, straight from each node). A fourth node with 3N demo rows serves the
same number of rows to a plain pull of demo_patients. Both are governed streams under research/ai-training, best of
--repeats. All four processes share this machine's cores, so the figure shows the cost of the federation protocol
(assertions, per-node planning, several streams), not the gain of several machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import pyarrow.flight as fl  # noqa: E402

from conftest import start_gateway, stop_process  # noqa: E402
from test_federation import (FedNode, NodeSpec, connect_url, free_ports, options, register_part,  # noqa: E402
                             wait_until_local_access)

PURPOSE = "research/ai-training"


def read_all(info: fl.FlightInfo, home: FedNode) -> int:
    nodes = json.loads(info.app_metadata)["nodes"]
    counts: list[int] = []
    errors: list[BaseException] = []

    def read(ep: fl.FlightEndpoint) -> None:
        try:
            loc = ep.locations[0].uri.decode()
            node = next(n for n in nodes if n.get("location") == loc)
            opts = options(assertion=node["assertion"]) if node.get("assertion") else home.local_options()
            client = fl.connect(loc)
            reader = client.do_get(ep.ticket, opts)
            n = 0
            for chunk in reader:
                n += chunk.data.num_rows
            counts.append(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(ep,)) for ep in info.endpoints]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="demo rows per federated node")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bin", type=Path, default=Path.home() / ".cache/passerelle-target/release/passerelle")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="passerelle-fed-bench-"))
    specs = [NodeSpec(n, ms, f"diabetes_{ms.lower()}", args.rows, True, {})
             for n, ms in (("gw-fr", "FR"), ("gw-de", "DE"), ("gw-it", "IT"))]
    ports = free_ports(8)
    nodes = [FedNode(spec, "plain", work / spec.node_id, ports[2 * i], ports[2 * i + 1], None)
             for i, spec in enumerate(specs)]
    started = []
    try:
        for n in nodes:
            n.learn_key(args.bin)
        for n in nodes:
            n.config_path.write_text(n.config_text([p for p in nodes if p is not n]))
        t0 = time.monotonic()
        for n in nodes:
            n.start(args.bin)
            started.append(n.gw.proc)
            register_part(n)
        for n in nodes:
            wait_until_local_access(n)
        single_dir = work / "single"
        single = start_gateway(args.bin, single_dir / "data", demo_rows=3 * args.rows)
        started.append(single.proc)
        print(f"nodes ready in {time.monotonic() - t0:.1f} s ({args.rows} rows per node, {3 * args.rows} single)")

        home = next(n for n in nodes if n.node_id == "gw-de")
        best_fed = best_single = 0.0
        rows_fed = rows_single = 0
        for _ in range(args.repeats):
            client = home.connect()
            t = time.perf_counter()
            info = client.get_flight_info(fl.FlightDescriptor.for_path("eu_diabetes"), home.local_options())
            rows_fed = read_all(info, home)
            best_fed = max(best_fed, rows_fed / (time.perf_counter() - t))

            sc = fl.connect(f"grpc://{single.flight_addr}")
            so = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {single.keys['trainer-de']}".encode()),
                                               (b"x-passerelle-purpose", PURPOSE.encode())])
            t = time.perf_counter()
            info = sc.get_flight_info(fl.FlightDescriptor.for_path("demo_patients"), so)
            rows_single = 0
            for chunk in sc.do_get(info.endpoints[0].ticket, so):
                rows_single += chunk.data.num_rows
            best_single = max(best_single, rows_single / (time.perf_counter() - t))
        print(f"federated (3 nodes, 3 concurrent streams): {rows_fed} rows, {best_fed / 1e6:.2f} M rows/s")
        print(f"single node, same total:                   {rows_single} rows, {best_single / 1e6:.2f} M rows/s")
        print(f"ratio federated / single: {best_fed / best_single:.2f}")
    finally:
        for p in started:
            stop_process(p)


if __name__ == "__main__":
    main()
