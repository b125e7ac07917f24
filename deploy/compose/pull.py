"""trainer-de (dkfz, DE) pulls the federated dataset `eu_diabetes` from its home node gw-de, reading every member
state's part straight from the node that holds it, with its client certificate (needs pyarrow).

    python deploy/compose/pull.py [--fed deploy/compose/state] [--home grpc+tls://localhost:50062]

Exit code 0 when rows arrived. gw-it holds no permit for dkfz: it is reported and skipped (`on_partial = skip`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fed", default=str(Path(__file__).parent / "state"), help="the compose file's shared directory")
    ap.add_argument("--home", default="grpc+tls://localhost:50062", help="trainer-de's home node (gw-de)")
    ap.add_argument("--purpose", default="research/ai-training")
    args = ap.parse_args()
    certs = Path(args.fed) / "certs"
    tls = dict(tls_root_certs=(certs / "ca-bundle.pem").read_bytes(),
               cert_chain=(certs / "trainer-de.crt").read_bytes(),
               private_key=(certs / "trainer-de.key").read_bytes())
    opts = fl.FlightCallOptions(headers=[(b"x-passerelle-purpose", args.purpose.encode())])
    cmd = {"dataset": "eu_diabetes", "on_partial": "skip"}
    info = fl.connect(args.home, **tls).get_flight_info(fl.FlightDescriptor.for_command(json.dumps(cmd)), opts)
    for n in json.loads(info.app_metadata)["nodes"]:
        print(f'{n["node"]} ({n["member_state"]}): {n["status"]}, {n["endpoints"]} endpoint(s) {n.get("reason", "")}')
    parts = []
    for ep in info.endpoints:
        url = ep.locations[0].uri.decode()
        table = fl.connect(url, **tls).do_get(ep.ticket, opts).read_all()   # the certificate is the identity
        # A column a node withholds arrives as nulls (every node streams the FlightInfo's schema).
        nulls = [c for c in table.column_names if table.num_rows and table.column(c).null_count == table.num_rows]
        print(f"{url}: {table.num_rows} rows, columns {table.column_names}" + (f", all null: {nulls}" if nulls else ""))
        parts.append(table)
    total = pa.concat_tables(parts).num_rows if parts else 0   # one schema: no promotion needed
    print(f"eu_diabetes: {total} rows")
    return 0 if total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
