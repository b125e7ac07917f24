"""One-shot registration of deploy/compose.yaml (the `register` service; standard library only, Python >= 3.11).

Waits for the three nodes, uploads gw-it's demo Parquet to the S3 emulator, then registers each node's part of the
federated dataset `eu_diabetes` through the node's REST API as its steward (steward-fr of aphp, the controller of
the demo data): diabetes_fr (local files), diabetes_de (local files), diabetes_it (s3://eu-lake/diabetes_it/ through
the store `lake`, hba1c dropped). dkfz holds permits for research/ai-training at gw-fr and gw-de, not at gw-it.
Each part lies inside a storage location setup.sh declares for aphp (the node's demo data; gw-it's bucket eu-lake,
read through `lake`): without one, a steward's registration is refused. Re-running is harmless (409 on what exists).

Environment (defaults are the compose network's): FED (/fed), S3_ENDPOINT (http://s3:5000),
REST_URLS ("gw-fr=https://gw-fr:8080 gw-de=https://gw-de:8080 gw-it=https://gw-it:8080").
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

FED = Path(os.environ.get("FED", "/fed"))
S3 = os.environ.get("S3_ENDPOINT", "http://s3:5000").rstrip("/")
REST = dict(kv.split("=", 1) for kv in os.environ.get(
    "REST_URLS", "gw-fr=https://gw-fr:8080 gw-de=https://gw-de:8080 gw-it=https://gw-it:8080").split())
STATE = {"gw-fr": "FR", "gw-de": "DE", "gw-it": "IT"}
DATASET = {"gw-fr": "diabetes_fr", "gw-de": "diabetes_de", "gw-it": "diabetes_it"}
PERMIT = {"gw-fr": True, "gw-de": True, "gw-it": False}
BUCKET = "eu-lake"
TLS = ssl.create_default_context(cafile=str(FED / "certs" / "ca-bundle.pem"))


def call(method: str, url: str, key: str | None = None, body: object = None, data: bytes | None = None) -> tuple[int, str]:
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    if body is not None:
        data, headers["content-type"] = json.dumps(body).encode(), "application/json"
    elif data is not None:
        headers["content-type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=TLS if url.startswith("https") else None) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_for(what: str, check, deadline: float = 180.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() - t0 > deadline:
            raise SystemExit(f"register: {what} not ready after {deadline:.0f} s")
        time.sleep(0.5)


def demo_files(node: str) -> tuple[dict, list[Path]]:
    """The node's demo manifest, with its location made absolute, and the data files it names."""
    data = FED / node / "data"
    manifest = tomllib.loads((data / "demo" / "demo_patients.toml").read_text())
    location = manifest["location"].removeprefix("file://")
    path = Path(location) if location.startswith("/") else (data / "demo" / location).resolve()
    manifest["location"] = str(path) + ("/" if path.is_dir() else "")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return manifest, files


def main() -> int:
    for node, url in REST.items():
        wait_for(f"{node} ({url})", lambda url=url, node=node: call("GET", url + "/healthz")[0] == 200
                 and (FED / node / "data" / "demo-keys.json").exists())
    wait_for(f"the S3 emulator ({S3})", lambda: call("GET", S3 + "/")[0] < 500)
    for node, url in REST.items():
        steward = json.loads((FED / node / "data" / "demo-keys.json").read_text())["steward-fr"]["key"]
        manifest, files = demo_files(node)
        manifest.update(name=DATASET[node], member_state=STATE[node], federation="eu_diabetes")
        if node == "gw-it":
            status, text = call("PUT", f"{S3}/{BUCKET}", data=b"")
            if status not in (200, 409):
                raise SystemExit(f"register: creating bucket {BUCKET}: HTTP {status} {text[:300]}")
            for f in files:
                status, text = call("PUT", f"{S3}/{BUCKET}/diabetes_it/{f.name}", data=f.read_bytes())
                if status != 200:
                    raise SystemExit(f"register: uploading {f.name}: HTTP {status} {text[:300]}")
            manifest.update(location=f"s3://{BUCKET}/diabetes_it/", store="lake")
            manifest["columns"]["hba1c"] = {"class": manifest["columns"]["hba1c"]["class"], "mask": "drop"}
        status, text = call("POST", url + "/api/v1/datasets", steward, manifest)
        if status not in (200, 201, 409):
            raise SystemExit(f"register: {DATASET[node]} at {node}: HTTP {status} {text[:500]}")
        if PERMIT[node]:
            status, text = call("POST", f"{url}/api/v1/datasets/{DATASET[node]}/permits", steward,
                                {"org": "DE/dkfz", "purpose": "research/ai-training"})
            if status not in (200, 201, 409):
                raise SystemExit(f"register: permit on {DATASET[node]}: HTTP {status} {text[:500]}")
        print(f"register: {DATASET[node]} at {node} ({STATE[node]}){' via S3' if node == 'gw-it' else ''}", flush=True)
    print("register: eu_diabetes = diabetes_fr + diabetes_de + diabetes_it; "
          "pull it with deploy/compose/pull.py on the host", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
