"""deploy/compose.yaml without containers (this machine has no Docker daemon): the file's shape, and its two
scripts run against local processes as the compose services would run them.

`deploy/compose/setup.sh` writes the PKI, node keys and configurations into a shared directory (the compose file's
`./compose/state`), with the URLs overridden to loopback ports; the three nodes then start with exactly the
arguments of their compose services (addresses aside); a real `moto_server` plays the `s3` service (unsigned
requests, as in the compose file); `deploy/compose/register.py` uploads gw-it's part to it and registers every part;
and `deploy/compose/pull.py`, the host-side client the compose file documents, pulls `eu_diabetes` over mTLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import stop_process
from test_federation import free_ports
from test_s3 import _start_moto

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NODES = ("gw-fr", "gw-de", "gw-it")
SCRIPT_TIMEOUT = 240


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def node_args(service: dict[str, Any], fed: Path, flight: int, http: int) -> list[str]:
    """The service's command with the shared volume at `fed` and its listen addresses moved to loopback ports."""
    args = [str(fed) + a[len("/fed"):] if a.startswith("/fed/") else a for a in service["command"]]
    for flag, port in (("--flight-addr", flight), ("--http-addr", http)):
        args[args.index(flag) + 1] = f"127.0.0.1:{port}"
    return args


def test_compose_file_names_three_nodes_an_s3_emulator_and_the_setup_scripts():
    doc = compose()
    services = doc["services"]
    assert {"setup", "s3", "register", *NODES} <= set(services), sorted(services)
    assert services["setup"]["entrypoint"][-1] == "/deploy/compose/setup.sh"
    assert services["register"]["command"][-1] == "/deploy/compose/register.py"
    host_ports = []
    for n in NODES:
        s = services[n]
        assert s["command"][0] == "serve" and "--demo" in s["command"], s
        assert s["command"][s["command"].index("--config") + 1] == f"/fed/{n}/passerelle.toml", s
        assert s["depends_on"]["setup"]["condition"] == "service_completed_successfully", s
        assert "./compose/state:/fed" in s["volumes"], s
        host_ports += [p.split(":")[1] for p in s["ports"]]
    assert len(host_ports) == len(set(host_ports)) == 6, host_ports
    assert "moto" in services["s3"]["image"]


@pytest.fixture(scope="module")
def composed(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("compose")
    fed = base / "state"
    moto_bin = Path(sys.executable).parent / "moto_server"
    moto, s3, _ = _start_moto(moto_bin, base)
    ports = free_ports(2 * len(NODES))
    flight = {n: ports[2 * i] for i, n in enumerate(NODES)}
    http = {n: ports[2 * i + 1] for i, n in enumerate(NODES)}
    env = dict(os.environ, FED=str(fed), DEPLOY=str(DEPLOY), PASSERELLE=str(passerelle_bin), S3_ENDPOINT=s3,
               PEER_URLS=" ".join(f"{n}=grpc+tls://localhost:{flight[n]}" for n in NODES),
               ADVERTISE=" ".join(f"{n}=grpc+tls://localhost:{flight[n]}" for n in NODES),
               REST_URLS=" ".join(f"{n}=https://localhost:{http[n]}" for n in NODES))
    setup = subprocess.run(["bash", str(DEPLOY / "compose" / "setup.sh")], env=env, capture_output=True, text=True,
                           timeout=SCRIPT_TIMEOUT, stdin=subprocess.DEVNULL)
    assert setup.returncode == 0, f"setup.sh: {setup.stdout}\n{setup.stderr}"
    procs = {}
    services = compose()["services"]
    try:
        for n in NODES:
            log = open(base / f"{n}.log", "wb")
            procs[n] = subprocess.Popen([str(passerelle_bin), *node_args(services[n], fed, flight[n], http[n])],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        register = subprocess.run([sys.executable, str(DEPLOY / "compose" / "register.py")], env=env,
                                  capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, stdin=subprocess.DEVNULL)
        logs = "\n".join(f"--- {n}\n" + (base / f"{n}.log").read_text(errors="replace")[-2000:] for n in NODES)
        assert register.returncode == 0, f"register.py: {register.stdout}\n{register.stderr}\n{logs}"
        yield {"fed": fed, "flight": flight, "http": http, "register": register.stdout, "setup": setup.stdout}
    finally:
        for p in procs.values():
            stop_process(p)
        stop_process(moto)


def test_setup_writes_peers_with_keys_and_gw_it_reads_s3(composed):
    fed = composed["fed"]
    for n in NODES:
        config = (fed / n / "passerelle.toml").read_text()
        assert f'node_id = "{n}"' in config and "[tls]" in config, config
        assert sum(f"[peers.{p}]" in config for p in NODES if p != n) == 2, config
        # each node's demo data is a storage location of aphp's, where its steward registers the node's part
        assert f'[locations.demo]\nurl = "file://{fed}/{n}/data/demo/"\ncontrollers = ["aphp"]' in config, config
    it = (fed / "gw-it" / "passerelle.toml").read_text()
    assert "[stores.lake]" in it
    assert '[locations.eu-lake]\nurl = "s3://eu-lake/"\ncontrollers = ["aphp"]\nstore = "lake"' in it, it
    assert "diabetes_it at gw-it (IT) via S3" in composed["register"], composed["register"]


def test_pull_script_reads_every_permitted_part_over_mtls(composed):
    out = subprocess.run([sys.executable, str(DEPLOY / "compose" / "pull.py"), "--fed", str(composed["fed"]),
                          "--home", f"grpc+tls://localhost:{composed['flight']['gw-de']}"],
                         capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    lines = out.stdout.splitlines()
    assert any(line.startswith("gw-fr (FR): ok") for line in lines), out.stdout
    assert any(line.startswith("gw-de (DE): ok") for line in lines), out.stdout
    assert any(line.startswith("gw-it (IT): denied") for line in lines), out.stdout
    assert sum(f"localhost:{composed['flight'][n]}:" in out.stdout for n in ("gw-fr", "gw-de")) == 2, out.stdout


def test_gw_it_serves_its_s3_part_once_permitted(composed):
    """gw-it's part really comes from S3: with a permit for DE/dkfz, trainer-de pulls rows of it through the home
    node."""
    import urllib.request
    import ssl
    fed = composed["fed"]
    steward = json.loads((fed / "gw-it" / "data" / "demo-keys.json").read_text())["steward-fr"]["key"]
    ctx = ssl.create_default_context(cafile=str(fed / "certs" / "ca-bundle.pem"))
    req = urllib.request.Request(f"https://localhost:{composed['http']['gw-it']}/api/v1/datasets/diabetes_it/permits",
                                 data=json.dumps({"org": "DE/dkfz", "purpose": "research/ai-training"}).encode(),
                                 method="POST", headers={"authorization": f"Bearer {steward}",
                                                         "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
        assert resp.status in (200, 201)
    from conftest import poll_until

    def it_ok():
        out = subprocess.run([sys.executable, str(DEPLOY / "compose" / "pull.py"), "--fed", str(fed),
                              "--home", f"grpc+tls://localhost:{composed['flight']['gw-de']}"],
                             capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, stdin=subprocess.DEVNULL)
        return out.returncode == 0 and f"localhost:{composed['flight']['gw-it']}:" in out.stdout and out.stdout

    out, _ = poll_until(it_ok, deadline=20, interval=0.5, what="gw-it's part pulled after its permit")
    it_line = next(line for line in out.splitlines() if f"localhost:{composed['flight']['gw-it']}:" in line)
    # gw-it drops hba1c: its rows carry the column as nulls, never values.
    assert " 0 rows" not in it_line and "all null: ['hba1c']" in it_line, it_line
