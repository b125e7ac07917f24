"""Federation end to end: three real nodes on loopback, one federated dataset, one request at the home node.

The nodes are `passerelle serve --demo` processes, each with its own data directory, `node_id`, advertised Flight
URL and the two others as `[peers.<node id>]` (keys learned beforehand with `passerelle keys --config F`):

    node   member state  local dataset  demo rows  column classes                     permit dkfz/research/ai-training
    gw-fr  FR            diabetes_fr    40000      the demo manifest's                yes
    gw-de  DE            diabetes_de    24000      postcode dropped (mask = "drop")   yes   <- home node of trainer-de
    gw-it  IT            diabetes_it    12000      hba1c dropped                      no

Each local dataset is registered over REST from the node's own demo manifest, renamed, with
`federation = "eu_diabetes"`. The demo data is deterministic in its row count, so different `--demo-rows` give each
node different subjects, rows and consent (each node's `demo/consent.csv` covers its own subjects): every node's part
is different, and each is checked against the conftest reference model of that node's data directory and against a
pull of the local dataset at that node by its local `trainer-de` (same organisation, dkfz).

trainer-de authenticates at gw-de and asks for `eu_diabetes`; the FlightInfo has one endpoint per answering node (per
rank with a shard) located at that node, and `app_metadata` says how every node answered. The client reads each
endpoint from its location: at a peer with the node's `assertion` (plain gRPC) or its own certificate (mTLS); at the
home node with its own credentials (the home node's entry carries no assertion).

Transports (the module fixture's parameter): `plain` (grpc://127.0.0.1) always; `mtls` when listed in
PASSERELLE_FEDERATION_TRANSPORTS (e.g. `plain,mtls`): grpc+tls://localhost and https with deploy/certs/gen.sh
certificates, each node presenting its own gateway certificate to its peers (`ca` = the CA bundle), trainer-de its
client certificate at the home node and at the peers (no assertion sent: the certificate is the identity); the
assertion checks then run over TLS without a client certificate.

The module fixture starts the nodes once (about 3 s; the module about 30 s); the test that kills a peer restarts it
on the same ports and data directory before it returns, so the tests do not depend on their order.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from conftest import (PSEUDONYM_RE, PURPOSE, RELEASED_COLUMNS, RPC_TIMEOUT, SUBJECT_COLUMN, Gateway, HttpResponse,
                      Reference, assert_json_error, descriptor_dataset, assert_same_multiset, expect_status, generalise_year,
                      group_signature, http, is_string_type, listed_datasets, norm_float, poll_until, prefix2,
                      rfc3339, run_cli, start_gateway, stop_process)
from test_admin import manifest_json
from test_tls import Pki, run_gen_sh

FEDERATION = "eu_diabetes"
HOME = "gw-de"
TRAINER = "trainer-de"                      # a demo principal of every node (dkfz, DE)
ORG = "dkfz"
# Permits for peers' principals name the member state that vouches for them: a bare `dkfz` names only a node's own
# principals of dkfz (a peer could claim any organisation name).
PERMIT_ORG = "DE/dkfz"
FEDERATED_PRINCIPAL = f"{TRAINER}@{HOME}"   # how peers name it in their audit
STEWARD = "steward-fr"                      # steward of aphp, the controller of every node's demo data
ASSERTION_HEADER = "x-passerelle-assertion"
STATUSES = ("ok", "denied", "refused", "unavailable")
# A peer that is down must be reported at once (connection refused on loopback), not after the RPC deadline.
DOWN_PEER_DEADLINE = 20.0
# Peer health may be probed periodically: allow some time for /api/v1/peers to notice a change.
PEER_HEALTH_DEADLINE = 20.0
AUDIT_DEADLINE = 5.0
NODE_START_DEADLINE = 30.0


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    member_state: str
    dataset: str                        # the local name of this node's part
    demo_rows: int
    permit: bool                        # dkfz holds a permit for research/ai-training on the local dataset
    columns: dict[str, dict[str, Any]]  # column classes that differ from the demo manifest


SPECS = (
    NodeSpec("gw-fr", "FR", "diabetes_fr", 40000, True, {}),
    NodeSpec("gw-de", "DE", "diabetes_de", 24000, True, {"postcode": {"class": "quasi-identifier", "mask": "drop"}}),
    NodeSpec("gw-it", "IT", "diabetes_it", 12000, False, {"hba1c": {"class": "sensitive", "mask": "drop"}}),
)
NODE_IDS = tuple(s.node_id for s in SPECS)
PERMITTED = tuple(s.node_id for s in SPECS if s.permit)    # the nodes that answer "ok"
HOME_DATASET = next(s.dataset for s in SPECS if s.node_id == HOME)

TRANSPORTS = [t.strip() for t in os.environ.get("PASSERELLE_FEDERATION_TRANSPORTS", "plain,mtls").split(",") if t.strip()]
assert set(TRANSPORTS) <= {"plain", "mtls"}, f"PASSERELLE_FEDERATION_TRANSPORTS: unknown transport in {TRANSPORTS}"


def released_columns(spec: NodeSpec) -> list[str]:
    """The columns this node sends for its part (the demo's released columns minus the ones it drops)."""
    return [c for c in RELEASED_COLUMNS if spec.columns.get(c, {}).get("mask") != "drop"]


# ======================================================================================================================
# The nodes
# ======================================================================================================================

def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass
class FedNode:
    spec: NodeSpec
    transport: str
    base: Path
    flight_port: int
    http_port: int
    pki: Pki | None
    key_x: str = ""                 # base64url Ed25519 public key, as `passerelle keys` prints it
    gw: Gateway | None = None
    killed: bool = False            # stopped on purpose by a test (and not restarted yet)

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def config_path(self) -> Path:
        return self.base / "passerelle.toml"

    @property
    def tls(self) -> bool:
        return self.transport == "mtls"

    @property
    def host(self) -> str:
        return "localhost" if self.tls else "127.0.0.1"  # gen.sh certificates name localhost

    @property
    def advertise_url(self) -> str:
        return f"{'grpc+tls' if self.tls else 'grpc'}://{self.host}:{self.flight_port}"

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}{path}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.pki.bundle)) if self.tls else None

    def rest(self, method: str, path: str, *, key: str | None = None, body: Any = None) -> HttpResponse:
        return http(method, self.url(path), key=key, body=body, context=self.ssl_context())

    def key(self, principal: str) -> str:
        """The API key of a principal of this node (the demo principals: from its demo-keys.json)."""
        assert self.gw is not None
        return self.gw.keys[principal]

    @property
    def reference(self) -> Reference:
        assert self.gw is not None
        return self.gw.reference

    def cli_json(self, *args: str) -> Any:
        assert self.gw is not None
        return self.gw.cli_json(*args)

    def config_text(self, peers: list[FedNode], *, keys: dict[str, str] | None = None,
                    allow_bearer: bool = True) -> str:
        """This node's configuration: node id, advertised URL, the peers (their keys, or `keys[node]` instead)."""
        lines = [f"# test_federation.py ({self.transport})", f"node_id = {toml_str(self.node_id)}", ""]
        if self.tls:
            lines += ["[tls]", f"cert = {toml_str(self.pki.crt(self.node_id))}",
                      f"key = {toml_str(self.pki.key(self.node_id))}", f"client_ca = {toml_str(self.pki.bundle)}",
                      "require_client_cert = false", f"allow_bearer = {str(allow_bearer).lower()}",
                      self.pki.anchors_toml()]
        lines += ["[federation]", f"advertise_flight_url = {toml_str(self.advertise_url)}", ""]
        for p in peers:
            lines += [f"[peers.{p.node_id}]", f"member_state = {toml_str(p.spec.member_state)}",
                      f"flight_url = {toml_str(p.advertise_url)}",
                      f"key = {toml_str((keys or {}).get(p.node_id, p.key_x))}"]
            if self.tls:
                lines.append(f"ca = {toml_str(self.pki.bundle)}")
            lines.append("")
        return "\n".join(lines)

    def learn_key(self, binary: Path) -> str:
        """`passerelle --data-dir D keys --config F` (F naming the node id only): creates the node key and prints the
        JSON of GET /api/v1/keys."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(f"node_id = {toml_str(self.node_id)}\n")
        out = run_cli(binary, self.data_dir, "keys", "--config", str(self.config_path), "--json").stdout
        doc = json.loads(out)
        assert doc.get("node_id") == self.node_id, f"`keys` printed another node id: {out[:500]}"
        keys = doc.get("keys")
        assert isinstance(keys, list) and len(keys) == 1 and keys[0].get("x"), f"`keys` printed {out[:500]}"
        self.key_x = keys[0]["x"]
        assert len(b64d(self.key_x)) == 32, f"not a raw Ed25519 public key: {self.key_x!r}"
        return self.key_x

    def start(self, binary: Path) -> None:
        """Start (or restart) `serve --demo` on this node's fixed ports."""
        (self.data_dir / "serve.json").unlink(missing_ok=True)  # a restart must not read the previous run's
        log = self.base / "data-serve.log"
        if log.exists():
            log.rename(self.base / f"data-serve.{int(time.time() * 1000)}.log")
        self.gw = start_gateway(binary, self.data_dir, demo_rows=self.spec.demo_rows, config=self.config_path,
                                flight_addr=f"127.0.0.1:{self.flight_port}", http_addr=f"127.0.0.1:{self.http_port}")
        self.killed = False
        poll_until(lambda: self._healthy(), deadline=NODE_START_DEADLINE, interval=0.1,
                   what=f"{self.node_id} answers /healthz")

    def _healthy(self) -> bool:
        try:
            return self.rest("GET", "/healthz").status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the node vanishes as in a crash."""
        assert self.gw is not None
        self.killed = True
        self.gw.proc.kill()
        self.gw.proc.wait(timeout=15)

    def connect(self, identity: str | None = None) -> flight.FlightClient:
        """A Flight client to this node (with TLS: trusting the CA bundle, presenting `identity`'s certificate)."""
        return connect_url(self.advertise_url, self.pki, identity)

    def local_options(self, principal: str = TRAINER) -> flight.FlightCallOptions:
        """Bearer key of one of this node's own principals (also over TLS: allow_bearer = true)."""
        return options(key=self.key(principal))


def connect_url(url: str, pki: Pki | None, identity: str | None = None) -> flight.FlightClient:
    if url.startswith("grpc+tls://"):
        assert pki is not None
        kwargs: dict[str, Any] = {"tls_root_certs": pki.bundle.read_bytes()}
        if identity is not None:
            kwargs["cert_chain"], kwargs["private_key"] = pki.identity(identity)
        return flight.connect(url, **kwargs)
    return flight.connect(url)


def options(*, key: str | None = None, assertion: str | None = None, purpose: str | None = PURPOSE,
            timeout: float = RPC_TIMEOUT) -> flight.FlightCallOptions:
    headers: list[tuple[bytes, bytes]] = []
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if assertion is not None:
        headers.append((ASSERTION_HEADER.encode(), assertion.encode()))
    if purpose is not None:
        headers.append((b"x-passerelle-purpose", purpose.encode()))
    return flight.FlightCallOptions(headers=headers, timeout=timeout)


@dataclass
class Federated:
    """A federated answer: the FlightInfo, its parsed app_metadata and its endpoints grouped by node."""
    info: flight.FlightInfo
    meta: dict[str, Any]
    nodes: dict[str, dict[str, Any]]                    # node id -> its entry in app_metadata
    endpoints: dict[str, list[flight.FlightEndpoint]]   # node id -> its endpoints (every node present, maybe [])

    def status(self) -> dict[str, str]:
        """Node id -> status, for the nodes app_metadata lists."""
        return {n: e["status"] for n, e in self.nodes.items()}


@dataclass
class Federation:
    transport: str
    binary: Path
    pki: Pki | None
    nodes: dict[str, FedNode]
    _local: dict[str, pa.Table] = field(default_factory=dict)

    @property
    def home(self) -> FedNode:
        return self.nodes[HOME]

    @property
    def tls(self) -> bool:
        return self.transport == "mtls"

    # -- the home request -----------------------------------------------------------------------------------------

    @contextmanager
    def home_client(self) -> Iterator[tuple[flight.FlightClient, flight.FlightCallOptions]]:
        """trainer-de at its home node: bearer key (plain) or its client certificate (mTLS)."""
        if self.tls:
            c, opts = self.home.connect(TRAINER), options()
        else:
            c, opts = self.home.connect(), self.home.local_options(TRAINER)
        try:
            yield c, opts
        finally:
            c.close()

    def get_info(self, descriptor: flight.FlightDescriptor | None = None, **command: Any) -> flight.FlightInfo:
        """GetFlightInfo at the home node: `descriptor`, or the JSON command {"dataset": "eu_diabetes", **command}."""
        if descriptor is None:
            descriptor = federated_command(**command)
        with self.home_client() as (c, opts):
            return c.get_flight_info(descriptor, opts)

    def request(self, descriptor: flight.FlightDescriptor | None = None, **command: Any) -> Federated:
        """GetFlightInfo at the home node, with the answer's shape checked (see `parse`)."""
        return self.parse(self.get_info(descriptor, **command))

    def parse(self, info: flight.FlightInfo, federation: str = FEDERATION) -> Federated:
        """app_metadata has an entry per node (at most one, for known nodes only; that every node is listed is
        asserted by the tests on statuses, so that a missing entry fails those, not every test) with its member state
        and status; every endpoint is located at exactly one node's advertised URL; each node's `endpoints` count is
        the number of endpoints at its location."""
        try:
            meta = json.loads(info.app_metadata)
        except (TypeError, ValueError) as err:
            raise AssertionError(f"app_metadata is not JSON ({err}): {info.app_metadata[:500]!r}") from None
        assert isinstance(meta, dict) and meta.get("federation") == federation, meta
        entries = meta.get("nodes")
        assert isinstance(entries, list), meta
        nodes = {e.get("node"): e for e in entries}
        assert len(nodes) == len(entries), f"a node is listed twice: {entries}"
        assert set(nodes) <= set(NODE_IDS), f"app_metadata lists {sorted(nodes)}, the nodes are {sorted(NODE_IDS)}"
        for node_id, e in nodes.items():
            assert e.get("member_state") == self.nodes[node_id].spec.member_state, e
            assert e.get("status") in STATUSES, e
            assert isinstance(e.get("endpoints"), int) and e["endpoints"] >= 0, e
            assert "reason" not in e or isinstance(e["reason"], str), e
            assert "assertion" not in e or isinstance(e["assertion"], str), e
        by_url = {n.advertise_url: n.node_id for n in self.nodes.values()}
        endpoints: dict[str, list[flight.FlightEndpoint]] = {n: [] for n in NODE_IDS}
        for ep in info.endpoints:
            urls = [loc.uri.decode() if isinstance(loc.uri, bytes) else loc.uri for loc in ep.locations]
            assert len(urls) == 1 and urls[0] in by_url, \
                f"an endpoint's locations should be [one node's advertise_flight_url] {sorted(by_url)}, got {urls}"
            endpoints[by_url[urls[0]]].append(ep)
        for node_id in NODE_IDS:
            if node_id not in nodes:
                assert not endpoints[node_id], f"{node_id} contributes endpoints but is not in app_metadata"
        for node_id, e in nodes.items():
            assert e["endpoints"] == len(endpoints[node_id]), \
                f"{node_id}: app_metadata says {e['endpoints']} endpoints, the FlightInfo has {len(endpoints[node_id])}"
            if e["status"] == "ok":
                assert e["endpoints"] >= 1, f"{node_id} answered ok but contributes no endpoint: {e}"
                if not self.tls and node_id != HOME:
                    assert e.get("assertion"), f"peer {node_id} answered ok but carries no assertion: {e}"
            else:
                assert e["endpoints"] == 0, f"{node_id} is {e['status']} but contributes endpoints: {e}"
        return Federated(info, meta, nodes, endpoints)

    # -- reading the parts ----------------------------------------------------------------------------------------

    def part_options(self, fed: Federated, node_id: str, *, assertion: str | None = None) -> flight.FlightCallOptions:
        """Headers for reading `node_id`'s endpoints: with mTLS, none but the purpose (the certificate is the
        identity); plain, the node's assertion from app_metadata, or at the home node (no assertion) the bearer key."""
        if self.tls:
            return options()
        assertion = assertion if assertion is not None else fed.nodes[node_id].get("assertion")
        if assertion is None and node_id == HOME:
            return self.home.local_options(TRAINER)
        return options(assertion=assertion)

    @contextmanager
    def part_client(self, node_id: str, *, certificate: bool = True) -> Iterator[flight.FlightClient]:
        """A client to `node_id`'s advertised URL; with TLS, presenting trainer-de's certificate unless told not to."""
        c = connect_url(self.nodes[node_id].advertise_url, self.pki, TRAINER if self.tls and certificate else None)
        try:
            yield c
        finally:
            c.close()

    def read_node(self, fed: Federated, node_id: str) -> pa.Table:
        """Every endpoint of `node_id`, read from its location (the home node moves no rows)."""
        tables = []
        with self.part_client(node_id) as c:
            for ep in fed.endpoints[node_id]:
                tables.append(c.do_get(ep.ticket, self.part_options(fed, node_id)).read_all())
        assert tables, f"{node_id} has no endpoint"
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_parts(self, fed: Federated) -> dict[str, pa.Table]:
        return {n: self.read_node(fed, n) for n in NODE_IDS if fed.endpoints[n]}

    # -- the baselines --------------------------------------------------------------------------------------------

    def local_pull(self, node_id: str) -> pa.Table:
        """What `node_id` alone releases to dkfz: its local dataset pulled there by its own trainer-de."""
        if node_id not in self._local:
            node = self.nodes[node_id]
            c = node.connect()
            try:
                opts = node.local_options(TRAINER)
                info = c.get_flight_info(flight.FlightDescriptor.for_path(node.spec.dataset), opts)
                tables = [c.do_get(ep.ticket, opts).read_all() for ep in info.endpoints]
            finally:
                c.close()
            self._local[node_id] = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return self._local[node_id]


def federated_command(**command: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"dataset": FEDERATION, **command}).encode())


def register_part(node: FedNode) -> None:
    """The node's demo manifest, renamed to its local dataset name, with its member state, its column classes and
    `federation = "eu_diabetes"`, registered over REST by the steward of aphp; dkfz's permit where the spec says."""
    assert node.gw is not None
    manifest = manifest_json(node.gw, node.spec.dataset)
    manifest["member_state"] = node.spec.member_state
    manifest["federation"] = FEDERATION
    for column, cls in node.spec.columns.items():
        assert column in manifest["columns"], column
        manifest["columns"][column] = cls
    steward = node.key(STEWARD)
    resp = node.rest("POST", "/api/v1/datasets", key=steward, body=manifest)
    assert resp.status in (200, 201), f"{node.node_id}: registering {node.spec.dataset}: {resp.status} {resp.text[:800]}"
    if node.spec.permit:
        resp = node.rest("POST", f"/api/v1/datasets/{node.spec.dataset}/permits", key=steward,
                         body={"org": PERMIT_ORG, "purpose": PURPOSE})
        assert resp.status in (200, 201), f"{node.node_id}: permit: {resp.status} {resp.text[:800]}"


def wait_until_local_access(node: FedNode) -> None:
    """Permits reach the server within a second: wait until the local trainer-de sees (or not) the local dataset."""
    c = node.connect()
    try:
        if node.spec.permit:
            poll_until(lambda: node.spec.dataset in listed_datasets(c, node.local_options(TRAINER)),
                       what=f"trainer-de lists {node.spec.dataset} at {node.node_id}")
        else:
            shown = node.rest("GET", f"/api/v1/datasets/{node.spec.dataset}", key=node.key(STEWARD))
            assert shown.status == 200, f"{node.spec.dataset} not registered at {node.node_id}: {shown.text[:500]}"
            assert node.spec.dataset not in listed_datasets(c, node.local_options(TRAINER)), \
                f"dkfz should hold no permit for {node.spec.dataset}"
    finally:
        c.close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def fed(request, passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    transport: str = request.param
    base = tmp_path_factory.mktemp(f"federation-{transport}")
    pki = None
    if transport == "mtls":
        run_gen_sh(base / "pki")
        pki = Pki(base / "pki")
    ports = free_ports(2 * len(SPECS))
    nodes = {s.node_id: FedNode(s, transport, base / s.node_id, ports[2 * i], ports[2 * i + 1], pki)
             for i, s in enumerate(SPECS)}
    for n in nodes.values():
        n.learn_key(passerelle_bin)
    for n in nodes.values():
        n.config_path.write_text(n.config_text([p for p in nodes.values() if p is not n]))
    federation = Federation(transport, passerelle_bin, pki, nodes)
    try:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for f in [pool.submit(n.start, passerelle_bin) for n in nodes.values()]:
                f.result()
        for n in nodes.values():
            assert n.rest("GET", "/api/v1/keys").body.get("keys", [{}])[0].get("x") == n.key_x, \
                f"{n.node_id} serves another key than `passerelle keys` printed"
            register_part(n)
        for n in nodes.values():
            wait_until_local_access(n)
        yield federation
    finally:
        problems = []
        for n in nodes.values():
            if n.gw is None:
                continue
            died = None if n.killed else n.gw.proc.poll()
            rc = stop_process(n.gw.proc)
            if died is not None:
                problems.append(f"{n.node_id} died during the tests (exit {died}); log:\n{n.gw.log_tail()}")
            elif rc is None and not n.killed:
                problems.append(f"{n.node_id} ignored SIGTERM for 15 s; log:\n{n.gw.log_tail()}")
        if problems:
            raise AssertionError("\n\n".join(problems))


# ======================================================================================================================
# Comparisons
# ======================================================================================================================

RELEASE: dict[str, Callable[[dict[str, Any]], Any]] = {  # the demo manifest's column policy, per released column
    "birth_date": lambda r: generalise_year(r["birth_date"]),
    "postcode": lambda r: prefix2(r["postcode"]),
    "diagnosis": lambda r: r["diagnosis"],
    "hba1c": lambda r: norm_float(r["hba1c"]),
    "admitted_at": lambda r: r["admitted_at"],
}


def part_view(table: pa.Table, spec: NodeSpec) -> pa.Table:
    """A node's part restricted to the columns that node releases. The part must carry all of them; a column of the
    union schema that this node does not release may only be present if it is entirely null."""
    mine = released_columns(spec)
    missing = [c for c in mine if c not in table.column_names]
    assert not missing, f"{spec.node_id}'s part lacks {missing}: {table.column_names}"
    for c in table.column_names:
        if c not in mine:
            assert c in RELEASED_COLUMNS and table.column(c).null_count == table.num_rows, \
                f"{spec.node_id}'s part carries {c!r}, which {spec.node_id} does not release"
    return table.select(mine)


def subject_groups(table: pa.Table) -> list[tuple]:
    """The rows of each pseudonym, as a sorted tuple of ((column, value), ...) rows: comparable across nodes'
    pseudonym keys and column sets."""
    cols = sorted(c for c in table.column_names if c != SUBJECT_COLUMN)
    groups: dict[Any, list[tuple]] = {}
    for row in table.to_pylist():
        groups.setdefault(row[SUBJECT_COLUMN], []).append(tuple((c, norm_float(row[c])) for c in cols))
    return [group_signature(rows) for rows in groups.values()]


def expected_subject_groups(ref: Reference, columns: list[str]) -> list[tuple]:
    """The reference model: each consented subject's raw rows with the column policy applied."""
    cols = sorted(c for c in columns if c != SUBJECT_COLUMN)
    consented = ref.consented(PURPOSE)
    return [group_signature(tuple((c, RELEASE[c](r)) for c in cols) for r in rows)
            for s, rows in ref.by_subject.items() if s in consented]


def row_counter(table: pa.Table) -> Counter:
    """Rows (pseudonym included) as a multiset."""
    cols = sorted(table.column_names)
    return Counter(tuple((c, norm_float(row[c])) for c in cols) for row in table.to_pylist())


def assert_pseudonymised(table: pa.Table, what: str) -> None:
    assert is_string_type(table.schema.field(SUBJECT_COLUMN).type), f"{what}: {table.schema}"
    bad = [p for p in table.column(SUBJECT_COLUMN).to_pylist() if not (isinstance(p, str) and PSEUDONYM_RE.match(p))]
    assert not bad, f"{what}: patient_id values that are not pseudonyms, e.g. {bad[:3]}"


def expect_refused_without_data(code: str, client: flight.FlightClient, ticket: flight.Ticket,
                                opts: flight.FlightCallOptions, what: str, fragment: str | None = None) -> str:
    """DoGet must fail with `code` before any batch arrives."""
    batches = []

    def read():
        reader = client.do_get(ticket, opts)
        while True:
            try:
                batches.append(reader.read_chunk())
            except StopIteration:
                return batches

    msg = expect_status(code, read, fragment=fragment)
    assert not batches, f"{what}: {len(batches)} batch(es) were sent before the refusal"
    return msg


def audit_entries(node: FedNode, principal: str, *, since: str) -> list[dict[str, Any]]:
    """The node's GetFlightInfo/DoGet audit entries of `principal` since `since` (RFC 3339)."""
    entries = node.cli_json("audit", "list", "--principal", principal, "--since", since)
    assert isinstance(entries, list), entries
    return [e for e in entries if e["action"] in ("get_flight_info", "do_get")]


# ======================================================================================================================
# (a) on_partial = skip: IT denied and skipped, FR and DE each exactly what that node alone releases
# ======================================================================================================================

@pytest.fixture(scope="module")
def skip_pull(fed: Federation) -> tuple[Federated, dict[str, pa.Table]]:
    answer = fed.request(on_partial="skip")
    return answer, fed.read_parts(answer)


def test_skip_reports_each_node_and_skips_the_denying_one(fed: Federation, skip_pull):
    """Every node is listed; gw-it, which holds a part of eu_diabetes but grants dkfz no permit, as denied (not left
    out as if it had no part)."""
    answer, parts = skip_pull
    assert answer.status() == {"gw-fr": "ok", "gw-de": "ok", "gw-it": "denied"}
    assert set(parts) == set(PERMITTED), f"rows came from {sorted(parts)}"
    assert not answer.endpoints["gw-it"]
    assert not answer.nodes["gw-it"].get("assertion"), "a node that denied gets no assertion"


@pytest.mark.parametrize("node_id", PERMITTED)
def test_each_part_is_what_that_node_alone_releases(fed: Federation, skip_pull, node_id: str):
    answer, parts = skip_pull
    spec = fed.nodes[node_id].spec
    part = part_view(parts[node_id], spec)
    assert_pseudonymised(part, f"{node_id}'s part")
    local = fed.local_pull(node_id)
    assert sorted(local.column_names) == sorted(released_columns(spec)), \
        f"local pull at {node_id} has columns {local.column_names}"
    assert part.num_rows == local.num_rows, f"{node_id}: {part.num_rows} rows federated vs {local.num_rows} locally"
    assert part.schema == local.select(part.column_names).schema
    assert_same_multiset(subject_groups(part), subject_groups(local),
                         f"{node_id}'s part vs its local dataset pulled there, rows grouped by subject")
    assert_same_multiset(subject_groups(part), expected_subject_groups(fed.nodes[node_id].reference, part.column_names),
                         f"{node_id}'s part vs the reference model of {node_id}'s data, rows grouped by subject")


def test_parts_differ_between_nodes(fed: Federation, skip_pull):
    """A guard on the setup: the nodes' data differ, so a part served by the wrong node would be noticed."""
    _, parts = skip_pull
    counts = {n: parts[n].num_rows for n in PERMITTED}
    assert len(set(counts.values())) == len(counts), f"parts of equal size: {counts}"
    assert len({fed.nodes[n].reference.raw.num_rows for n in NODE_IDS}) == len(NODE_IDS)


def test_schema_is_the_union_of_the_parts(fed: Federation, skip_pull):
    answer, parts = skip_pull
    union: dict[str, pa.DataType] = {}
    for node_id, table in parts.items():
        for f in part_view(table, fed.nodes[node_id].spec).schema:
            assert union.setdefault(f.name, f.type) == f.type, f"{f.name}: {union[f.name]} vs {f.type} at {node_id}"
    schema = answer.info.schema
    assert sorted(schema.names) == sorted(union), f"FlightInfo schema {schema.names}, parts' union {sorted(union)}"
    for name, typ in union.items():
        assert schema.field(name).type == typ, f"{name}: {schema.field(name).type} in FlightInfo, {typ} in the parts"
    assert "postcode" in union and "full_name" not in union


def test_home_lists_the_federated_datasets_each_node_shows(fed: Federation):
    """ListFlights at the home node includes eu_diabetes, learnt from the nodes that show it to trainer-de for the
    purpose (gw-it holds no permit for dkfz: it does not show its part), with the union of their schemas."""
    with fed.home_client() as (c, opts):
        infos = {descriptor_dataset(i.descriptor): i for i in c.list_flights(b"", opts)}
    assert HOME_DATASET in infos, sorted(infos)
    assert FEDERATION in infos, f"eu_diabetes is not listed at the home node: {sorted(infos)}"
    info = infos[FEDERATION]
    meta = json.loads(info.app_metadata)
    assert meta["federation"] == FEDERATION and sorted(meta["nodes"]) == sorted(PERMITTED), meta
    union = {c for s in SPECS if s.permit for c in released_columns(s)}
    assert set(info.schema.names) == union, (info.schema.names, union)
    # Under a purpose nobody permits, the federated dataset is not listed (nor its parts).
    with fed.home_client() as (c, _):
        other = options(key=None if fed.tls else fed.home.key(TRAINER), purpose="research/marketing")
        names = [descriptor_dataset(i.descriptor) for i in c.list_flights(b"", other)]
    assert FEDERATION not in names, names


def test_a_request_every_node_finds_invalid_is_invalid_argument(fed: Federation, agg_parts):
    """A federated aggregate over a column no part has: every node refuses the request itself (not the caller), so
    the answer is INVALID_ARGUMENT naming each node, not PERMISSION_DENIED."""
    bad = {"measures": [{"func": "sum", "column": "no_such_column"}]}
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"dataset": AGG_FEDERATION, "aggregate": bad}).encode())
    with fed.home_client() as (c, opts):
        message = expect_status("INVALID_ARGUMENT", lambda: c.get_flight_info(descriptor, opts))
    assert "no_such_column" in message and "gw-fr" in message and "gw-de" in message, message
    assert "full_name" not in message, message


def test_path_descriptor_names_the_federated_dataset(fed: Federation):
    """A path descriptor ["eu_diabetes"] is the same request with on_partial = fail: gw-it's denial fails it."""
    expect_status("PERMISSION_DENIED", lambda: fed.get_info(flight.FlightDescriptor.for_path(FEDERATION)),
                  fragment="gw-it")


# ======================================================================================================================
# (b) on_partial = fail (the default)
# ======================================================================================================================

@pytest.mark.parametrize("command", [{}, {"on_partial": "fail"}, {"columns": ["patient_id", "diagnosis"]}],
                         ids=["default", "explicit", "with-columns"])
def test_fail_is_permission_denied_naming_the_denying_node(fed: Federation, command):
    expect_status("PERMISSION_DENIED", lambda: fed.get_info(**command), fragment="gw-it")


# ======================================================================================================================
# (c) the home node moves no rows; audits
# ======================================================================================================================

def test_home_moves_no_rows_and_peers_audit_the_federated_principal(fed: Federation):
    """Entries are selected by time: nothing else runs while this test does."""
    started = rfc3339(datetime.now(timezone.utc))
    answer = fed.request(on_partial="skip")
    parts = fed.read_parts(answer)
    rows = {n: t.num_rows for n, t in parts.items()}
    assert rows == {n: fed.local_pull(n).num_rows for n in PERMITTED}
    home, fr, it = fed.home, fed.nodes["gw-fr"], fed.nodes["gw-it"]

    def settled(node: FedNode, principal: str):
        def check():
            entries = audit_entries(node, principal, since=started)
            gets = [e for e in entries if e["action"] == "do_get"]
            return entries if gets and all(e["status"] == "completed" for e in gets) else None
        return check

    # The home node: the federated request, audited with rows_sent 0; the only rows it sent are its own part's.
    entries, _ = poll_until(settled(home, TRAINER), deadline=AUDIT_DEADLINE,
                            what="the home node's do_get of its own part is audited and completed")
    federated = [e for e in entries if e["action"] == "get_flight_info" and e["dataset"] == FEDERATION]
    assert federated, f"the home node should audit the federated request (get_flight_info on {FEDERATION}): {entries}"
    for e in federated:
        assert (e["decision"], e["rows_sent"], e["purpose"], e["organisation"]) == ("allow", 0, PURPOSE, ORG), e
    gets = [e for e in entries if e["action"] == "do_get"]
    assert all(e["dataset"] in (HOME_DATASET, FEDERATION) for e in gets), gets
    assert sum(e["rows_sent"] for e in gets) == rows[HOME], \
        f"the home node sent {sum(e['rows_sent'] for e in gets)} rows; its own part has {rows[HOME]}: {gets}"
    others = [e for e in home.cli_json("audit", "list", "--since", started)
              if e["action"] == "do_get" and e["principal"] != TRAINER]
    assert not others, f"the home node streamed rows under another name: {others}"

    # gw-fr: the request and the stream, both in the name of trainer-de@gw-de (not of its own trainer-de).
    entries, _ = poll_until(settled(fr, FEDERATED_PRINCIPAL), deadline=AUDIT_DEADLINE,
                            what=f"gw-fr audits {FEDERATED_PRINCIPAL}'s do_get, completed")
    for e in entries:
        assert (e["organisation"], e["member_state"], e["purpose"], e["decision"]) == (ORG, "DE", PURPOSE, "allow"), e
    assert any(e["action"] == "get_flight_info" for e in entries), f"gw-fr should audit the request: {entries}"
    gets = [e for e in entries if e["action"] == "do_get"]
    assert sum(e["rows_sent"] for e in gets) == rows["gw-fr"], gets
    assert not audit_entries(fr, TRAINER, since=started), "gw-fr took the federated caller for its own trainer-de"

    # gw-it: a denial in the name of trainer-de@gw-de, no stream.
    it_entries, _ = poll_until(lambda: audit_entries(it, FEDERATED_PRINCIPAL, since=started),
                               deadline=AUDIT_DEADLINE, what=f"gw-it audits {FEDERATED_PRINCIPAL}'s denied request")
    assert all(e["decision"] == "deny" and e["rows_sent"] == 0 for e in it_entries), it_entries
    assert any(e["action"] == "get_flight_info" and e["reason"] for e in it_entries), it_entries


# ======================================================================================================================
# (d) shards
# ======================================================================================================================

def test_shards_are_disjoint_and_cover_the_full_pull(fed: Federation, skip_pull):
    world = 4
    full_answer, full_parts = skip_pull
    got: dict[str, Counter] = {n: Counter() for n in PERMITTED}
    per_rank: list[int] = []
    for rank in range(world):
        answer = fed.request(on_partial="skip", shard={"rank": rank, "world_size": world})
        assert answer.status() == full_answer.status(), f"rank {rank}: {answer.status()}"
        rank_rows = 0
        for node_id in PERMITTED:
            assert answer.endpoints[node_id], f"rank {rank} gets no part of {node_id}"
            part = fed.read_node(answer, node_id)
            got[node_id] += row_counter(part)
            rank_rows += part.num_rows
        per_rank.append(rank_rows)
    for node_id in PERMITTED:
        full = row_counter(full_parts[node_id])
        assert sum(got[node_id].values()) == sum(full.values()), \
            f"{node_id}: ranks 0..{world - 1} sent {sum(got[node_id].values())} rows, the full pull {sum(full.values())}"
        assert_same_multiset(got[node_id].elements(), full.elements(), f"{node_id}: union of the {world} ranks")
    assert all(per_rank), f"rows per rank: {per_rank} (a rank with no rows of ~{sum(per_rank)} is no shard)"


def test_a_seed_reshuffles_the_shards_and_keeps_them_disjoint_and_complete(fed: Federation, skip_pull):
    """`seed` (one per epoch) changes which share of each node's rows a rank reads, and the endpoint order; for
    every seed the ranks stay disjoint and together complete, and the same seed gives the same shares."""
    world = 4
    _, full_parts = skip_pull

    def shares(seed: int) -> list[dict[str, Counter]]:
        out = []
        for rank in range(world):
            answer = fed.request(on_partial="skip", shard={"rank": rank, "world_size": world}, seed=seed)
            out.append({n: row_counter(fed.read_node(answer, n)) for n in PERMITTED})
        return out

    epochs = {seed: shares(seed) for seed in (1, 2, 3)}
    for seed, ranks in epochs.items():
        for node_id in PERMITTED:
            union = sum((r[node_id] for r in ranks), Counter())
            assert union == row_counter(full_parts[node_id]), f"seed {seed}, {node_id}: ranks are not a partition"
    assert shares(2) == epochs[2], "the same seed must give the same shares"
    assert any(epochs[a][0] != epochs[b][0] for a, b in ((1, 2), (1, 3), (2, 3))), \
        "rank 0 reads the same rows under every seed: the seed reshuffles nothing"


# ======================================================================================================================
# (e) resume
# ======================================================================================================================

def read_batches(client: flight.FlightClient, ticket: flight.Ticket, opts: flight.FlightCallOptions,
                 limit: int | None = None) -> list[pa.RecordBatch]:
    reader = client.do_get(ticket, opts)
    batches = []
    while limit is None or len(batches) < limit:
        try:
            batches.append(reader.read_chunk().data)
        except StopIteration:
            break
    if limit is not None:
        reader.cancel()
    return batches


def resume(client: flight.FlightClient, ticket: flight.Ticket, batches: int,
           opts: flight.FlightCallOptions) -> flight.Ticket:
    body = json.dumps({"ticket": ticket.ticket.decode(), "batches": batches}).encode()
    results = list(client.do_action(flight.Action("resume", body), opts))
    assert len(results) == 1, f"resume should answer one result, got {len(results)}"
    return flight.Ticket(results[0].body.to_pybytes())


def as_table(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


@pytest.mark.parametrize("node_id", ["gw-fr", HOME], ids=["peer-part", "home-part"])
def test_resume_skips_the_batches_already_read(fed: Federation, node_id: str):
    answer = fed.request(on_partial="skip")
    ep = answer.endpoints[node_id][0]
    opts = fed.part_options(answer, node_id)
    with fed.part_client(node_id) as c:
        full = read_batches(c, ep.ticket, opts)
        assert len(full) >= 2, f"{node_id}'s part came in {len(full)} batch(es); the test needs several"
        schema = full[0].schema
        m = len(full) // 2
        first = read_batches(c, ep.ticket, opts, limit=m)  # an interrupted reader
        assert as_table(first, schema).equals(as_table(full[:m], schema)), "the same ticket streamed other batches"

        rest = as_table(read_batches(c, resume(c, ep.ticket, m, opts), opts), schema)
        expected = as_table(full[m:], schema)
        assert rest.num_rows == expected.num_rows, \
            f"resumed after {m} of {len(full)} batches: {rest.num_rows} rows, expected {expected.num_rows}"
        assert_same_multiset(row_counter(rest).elements(), row_counter(expected).elements(), "resumed rows")
        assert rest.equals(expected), "resumed rows are the remaining batches' rows, but not in their order"

        everything = as_table(read_batches(c, resume(c, ep.ticket, 0, opts), opts), schema)
        assert everything.equals(as_table(full, schema)), "resume with 0 batches should stream the whole part"
        assert as_table(read_batches(c, resume(c, ep.ticket, len(full), opts), opts), schema).num_rows == 0

        if not fed.tls:  # the resume is bound to the caller: without its credentials, nothing
            expect_status("UNAUTHENTICATED", lambda: resume(c, ep.ticket, m, options()))


# ======================================================================================================================
# (f) assertions: forged, expired, for another audience
# ======================================================================================================================

def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def flip(text: str, index: int) -> str:
    """`text` with the base64url character at `index` replaced by another one (still valid base64url)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    c = text[index]
    return text[:index] + alphabet[(alphabet.index(c) + 1) % 64] + text[index + 1:]


# What an assertion's signature covers before its claims (domain separation from tickets, which are signed after
# TICKET_CONTEXT with the same node key).
ASSERTION_CONTEXT = b"passerelle-assertion-v2\n"
TICKET_CONTEXT = b"passerelle-ticket-v1\n"


class AssertionForger:
    """Re-signs an assertion's claims with the home node's own key (its `<data-dir>/node.key`), so that exactly one
    claim is wrong and the signature is genuine. Relies on assertions being
    `base64url(JSON claims) "." base64url(Ed25519 signature of ASSERTION_CONTEXT + those bytes)`, with `exp`
    (seconds since the epoch) and `aud` (the peer's node id) among the claims; the constructor checks that against the
    real assertion and the home node's published key, and the test checks that an unmodified re-signed copy is
    accepted."""

    def __init__(self, home: FedNode, assertion: str):
        parts = assertion.split(".")
        assert len(parts) == 2, f"assertion is not `claims.signature`: {assertion[:200]!r}"
        self.body, sig = b64d(parts[0]), b64d(parts[1])
        try:
            Ed25519PublicKey.from_public_bytes(b64d(home.key_x)).verify(sig, ASSERTION_CONTEXT + self.body)
        except InvalidSignature:
            pytest.fail("the assertion is not an Ed25519 signature of the context and its claims by the home node's key")
        self.claims = json.loads(self.body)
        assert isinstance(self.claims.get("exp"), int) and isinstance(self.claims.get("aud"), str), self.claims
        key = serialization.load_pem_private_key((home.data_dir / "node.key").read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        assert b64e(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)) \
            == home.key_x
        self.key = key

    def sign(self, *, context: bytes = ASSERTION_CONTEXT, **changes: Any) -> str:
        """The claims with `changes`, signed by the home node's key over `context` + claims."""
        claims = dict(self.claims)
        for k in changes:
            assert k in claims, f"the assertion has no claim {k!r}: {sorted(claims)}"
        claims.update(changes)
        body = json.dumps(claims, separators=(",", ":")).encode()
        return f"{b64e(body)}.{b64e(self.key.sign(context + body))}"


def test_forged_expired_and_misaddressed_assertions_are_unauthenticated(fed: Federation):
    """With TLS, the reads below present no client certificate: the assertion is the only credential."""
    answer = fed.request(on_partial="skip")
    assertion = answer.nodes["gw-fr"].get("assertion")
    if fed.tls and not assertion:
        pytest.skip("no assertions with mTLS: the client certificate is the identity")
    ticket = answer.endpoints["gw-fr"][0].ticket
    claims_part, sig_part = assertion.split(".")
    forger = AssertionForger(fed.home, assertion)
    assert forger.claims["aud"] == "gw-fr", forger.claims
    now = int(datetime.now(timezone.utc).timestamp())
    assert now < forger.claims["exp"] <= now + 3600, f"an assertion should be short-lived: {forger.claims}"
    expired = {"exp": now - 60, **({"iat": now - 120} if "iat" in forger.claims else {})}

    with fed.part_client("gw-fr", certificate=False) as c:
        # the genuine assertion, and the same claims re-signed by us: accepted (so the refusals below are about the
        # one claim changed)
        genuine = c.do_get(ticket, options(assertion=assertion)).read_all()
        assert genuine.num_rows == fed.local_pull("gw-fr").num_rows
        assert c.do_get(ticket, options(assertion=forger.sign())).read_all().num_rows == genuine.num_rows

        cases = {
            "a byte of the claims flipped": flip(claims_part, len(claims_part) // 2) + "." + sig_part,
            "a byte of the signature flipped": claims_part + "." + flip(sig_part, len(sig_part) // 2),
            "claims of another assertion": b64e(json.dumps({**forger.claims, "sub": "steward-fr"}).encode())
                                           + "." + sig_part,
            "expired": forger.sign(**expired),
            "addressed to gw-it": forger.sign(aud="gw-it"),
            "addressed to the home node": forger.sign(aud=HOME),
            "not an assertion": "garbage",
        }
        for what, forged in cases.items():
            expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=forged), what)
        expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(), "no assertion at all")
    # gw-fr's genuine assertion presented to gw-it (its audience is gw-fr)
    with fed.part_client("gw-it", certificate=False) as c:
        expect_refused_without_data("UNAUTHENTICATED", c, ticket, options(assertion=assertion),
                                    "gw-fr's assertion at gw-it")
    for node in fed.nodes.values():
        node.gw.assert_alive()


# ======================================================================================================================
# (h) /api/v1/peers and `passerelle peer list`
# ======================================================================================================================

def peers_view(body: Any) -> dict[str, dict[str, Any]]:
    assert isinstance(body, list), f"peers: not a JSON list: {body!r:.500}"
    view = {p["node"]: p for p in body}
    assert len(view) == len(body), body
    return view


def assert_peers(node: FedNode, body: Any, *, status: dict[str, str], key_matches: dict[str, bool] | None = None):
    view = peers_view(body)
    others = [n for n in NODE_IDS if n != node.node_id]
    assert sorted(view) == sorted(others), f"{node.node_id} lists peers {sorted(view)}"
    for peer_id, p in view.items():
        spec = next(s for s in SPECS if s.node_id == peer_id)
        assert p.get("member_state") == spec.member_state, p
        assert p.get("status") == status[peer_id], f"{node.node_id} sees {peer_id}: {p}"
        assert isinstance(p.get("key_matches"), bool), p
        if p["status"] == "ok":  # an unreachable peer's key cannot be checked
            assert p["key_matches"] is (key_matches or {}).get(peer_id, True), f"{node.node_id} sees {peer_id}: {p}"


def test_peers_endpoint_lists_the_peers_and_their_health(fed: Federation):
    for node in fed.nodes.values():
        all_ok = {n: "ok" for n in NODE_IDS}

        def healthy(node=node):
            resp = node.rest("GET", "/api/v1/peers", key=node.key(TRAINER))
            assert resp.status == 200, f"{node.node_id}: {resp.status} {resp.text[:500]}"
            view = peers_view(resp.body)
            return resp.body if all(p.get("status") == "ok" for p in view.values()) else None

        body, _ = poll_until(healthy, deadline=PEER_HEALTH_DEADLINE, interval=0.25,
                             what=f"{node.node_id} sees its peers healthy")
        assert_peers(node, body, status=all_ok)
        urls = {p["node"]: p.get("flight_url") for p in body}
        assert urls == {n.node_id: n.advertise_url for n in fed.nodes.values() if n is not node}, urls
        # any authenticated principal, and only those
        for principal in ("auditor-eu", STEWARD):
            assert node.rest("GET", "/api/v1/peers", key=node.key(principal)).status == 200
        assert_json_error(node.rest("GET", "/api/v1/peers"), 401)
        assert_json_error(node.rest("GET", "/api/v1/peers", key="not-a-key"), 401)


def peer_list_cli(fed: Federation, node: FedNode, config: Path) -> Any:
    out = run_cli(fed.binary, node.data_dir, "peer", "list", "--config", str(config), "--json").stdout
    return json.loads(out)


def test_peer_list_cli_checks_keys(fed: Federation, tmp_path: Path):
    node = fed.nodes["gw-it"]
    assert_peers(node, peer_list_cli(fed, node, node.config_path), status={n: "ok" for n in NODE_IDS})
    # gw-fr configured with gw-de's key: reachable, but not the key it serves
    wrong = tmp_path / "wrong-key.toml"
    peers = [p for p in fed.nodes.values() if p is not node]
    wrong.write_text(node.config_text(peers, keys={"gw-fr": fed.nodes["gw-de"].key_x}))
    assert_peers(node, peer_list_cli(fed, node, wrong), status={n: "ok" for n in NODE_IDS},
                 key_matches={"gw-fr": False})


# ======================================================================================================================
# (g) a peer killed before the request (restarted afterwards)
# ======================================================================================================================

@pytest.mark.parametrize("victim", ["gw-it", "gw-fr"])
def test_a_killed_peer_is_unavailable(fed: Federation, victim: str):
    node = fed.nodes[victim]
    node.kill()
    try:
        t0 = time.monotonic()
        answer = fed.request(on_partial="skip")
        seconds = time.monotonic() - t0
        assert seconds < DOWN_PEER_DEADLINE, f"the home node took {seconds:.1f} s to give up on {victim}"
        status = answer.status()
        assert status.get(victim) == "unavailable", f"{victim} was killed: {answer.nodes}"
        assert all(status.get(n) == "ok" for n in PERMITTED if n != victim), answer.nodes
        if victim != "gw-it":  # (that it is listed as denied is test_skip_reports_each_node_...'s business)
            assert status.get("gw-it", "denied") == "denied", answer.nodes
        parts = fed.read_parts(answer)
        assert {n: t.num_rows for n, t in parts.items()} == \
            {n: fed.local_pull(n).num_rows for n in PERMITTED if n != victim}

        if victim == "gw-it":  # the only node that is not ok: UNAVAILABLE, not PERMISSION_DENIED
            t0 = time.monotonic()
            expect_status("UNAVAILABLE", lambda: fed.get_info(), fragment=victim)
            expect_status("UNAVAILABLE", lambda: fed.get_info(on_partial="fail"), fragment=victim)
            assert time.monotonic() - t0 < 2 * DOWN_PEER_DEADLINE
        else:  # gw-fr down and gw-it denying: the request fails, naming one of them, and never INTERNAL
            with pytest.raises((flight.FlightUnauthorizedError, flight.FlightUnavailableError)) as err:
                fed.get_info()
            assert "gw-fr" in str(err.value) or "gw-it" in str(err.value), str(err.value)

        home = fed.home

        def noticed():
            body = home.rest("GET", "/api/v1/peers", key=home.key(TRAINER)).body
            return body if peers_view(body)[victim].get("status") == "unavailable" else None

        body, _ = poll_until(noticed, deadline=PEER_HEALTH_DEADLINE, interval=0.25,
                             what=f"{HOME}'s /api/v1/peers reports {victim} unavailable")
        assert_peers(home, body, status={n: "unavailable" if n == victim else "ok" for n in NODE_IDS})
        home.gw.assert_alive()
    finally:
        node.start(fed.binary)
    # back: the federation answers as before
    def recovered():
        status = fed.request(on_partial="skip").status()
        return status.get(victim) != "unavailable" and all(status.get(n) == "ok" for n in PERMITTED)

    poll_until(recovered, deadline=PEER_HEALTH_DEADLINE, interval=0.25, what=f"{victim} answers again after its restart")


# ======================================================================================================================
# Federated SQL at the home node
# ======================================================================================================================

SQL_FEDERATION = "eu_sql"


def adbc_home(fed: Federation, purpose: str = PURPOSE):
    """ADBC (Flight SQL) to the home node as trainer-de: its bearer key (plain gRPC) or its client certificate (mTLS,
    trusting the CA bundle)."""
    import adbc_driver_flightsql.dbapi as flight_sql
    kwargs = {"adbc.flight.sql.rpc.call_header.x-passerelle-purpose": purpose}
    if fed.tls:
        assert fed.pki is not None
        cert, key = fed.pki.identity(TRAINER)
        kwargs.update({"adbc.flight.sql.client_option.tls_root_certs": fed.pki.bundle.read_text(),
                       "adbc.flight.sql.client_option.mtls_cert_chain": cert.decode(),
                       "adbc.flight.sql.client_option.mtls_private_key": key.decode()})
    else:
        kwargs["adbc.flight.sql.authorization_header"] = f"Bearer {fed.home.key(TRAINER)}"
    return flight_sql.connect(fed.home.advertise_url, db_kwargs=kwargs, autocommit=True)


def sql(conn, text: str) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(text)
        return cur.fetch_arrow_table()


@pytest.fixture(scope="module")
def sql_parts(fed: Federation) -> dict[str, int]:
    """A second federated dataset held by FR and DE only (IT holds no part of it, so it is not asked about): each
    node's demo manifest under another local name with `federation = "eu_sql"` and dkfz's permit. Returns the rows
    each part releases to trainer-de, counted by a pull at that node alone."""
    counts = {}
    for node_id in ("gw-fr", "gw-de"):
        node = fed.nodes[node_id]
        name = f"sql_{node.spec.member_state.lower()}"
        manifest = manifest_json(node.gw, name)
        manifest["member_state"] = node.spec.member_state
        manifest["federation"] = SQL_FEDERATION
        steward = node.key(STEWARD)
        resp = node.rest("POST", "/api/v1/datasets", key=steward, body=manifest)
        assert resp.status in (200, 201), resp.text[:500]
        resp = node.rest("POST", f"/api/v1/datasets/{name}/permits", key=steward, body={"org": PERMIT_ORG, "purpose": PURPOSE})
        assert resp.status in (200, 201), resp.text[:500]
        c = node.connect()
        try:
            opts = node.local_options(TRAINER)
            info = c.get_flight_info(flight.FlightDescriptor.for_path(name), opts)
            counts[node_id] = sum(c.do_get(ep.ticket, opts).read_all().num_rows for ep in info.endpoints)
        finally:
            c.close()
    return counts


def test_federated_sql_counts_every_part(fed: Federation, sql_parts):
    with adbc_home(fed) as conn:
        assert sql(conn, f"SELECT count(*) AS n FROM {SQL_FEDERATION}").column("n")[0].as_py() == sum(sql_parts.values())
        groups = sql(conn, f"SELECT diagnosis, count(*) AS n FROM {SQL_FEDERATION} WHERE hba1c > 8 GROUP BY diagnosis")
        filtered = sql(conn, f"SELECT count(*) AS n FROM {SQL_FEDERATION} WHERE hba1c > 8").column("n")[0].as_py()
        assert 0 < filtered < sum(sql_parts.values())
        assert sum(groups.column("n").to_pylist()) == filtered


def catalog_columns(conn) -> dict[str, list[str]]:
    """Table name -> column names in order, from ADBC's get_objects (Flight SQL GetTables with schemas)."""
    out = {}
    for cat in conn.adbc_get_objects(depth="all").read_all().to_pylist():
        for sch in cat["catalog_db_schemas"] or []:
            for tab in sch["db_schema_tables"] or []:
                cols = sorted(tab["table_columns"] or [], key=lambda col: col["ordinal_position"] or 0)
                out[tab["table_name"]] = [col["column_name"] for col in cols]
    return out


def test_sql_catalogue_at_home_lists_the_federated_tables(fed: Federation, sql_parts):
    """GetTables at the home node lists the federated datasets the nodes show trainer-de for the purpose, next to
    its own datasets, with the union of the columns the nodes release (what a query over it returns); under a purpose nobody permits, neither the
    federated datasets nor the parts are listed."""
    with adbc_home(fed) as conn:
        tables = catalog_columns(conn)
        assert SQL_FEDERATION in tables and FEDERATION in tables and HOME_DATASET in tables, sorted(tables)
        queried = sql(conn, f"SELECT * FROM {SQL_FEDERATION} LIMIT 0").schema.names
        assert sorted(tables[SQL_FEDERATION]) == sorted(queried), (tables[SQL_FEDERATION], queried)
        assert sorted(conn.adbc_get_table_schema(SQL_FEDERATION).names) == sorted(queried)
        # eu_diabetes is listed as ListFlights lists it (gw-it, which refuses, does not show its part); a query
        # over it fails naming gw-it (test_federated_sql_fails_naming_a_refusing_node).
        union = {c for s in SPECS if s.permit for c in released_columns(s)}
        assert set(tables[FEDERATION]) == union, (tables[FEDERATION], union)
        only = conn.adbc_get_objects(depth="tables", table_name_filter=SQL_FEDERATION).read_all().to_pylist()
        names = [t["table_name"] for c in only for s in c["catalog_db_schemas"] or [] for t in s["db_schema_tables"] or []]
        assert names == [SQL_FEDERATION], names
    with adbc_home(fed, purpose="research/marketing") as conn:
        hidden = catalog_columns(conn)
    assert not {SQL_FEDERATION, FEDERATION, HOME_DATASET} & set(hidden), sorted(hidden)


MIXED_FEDERATION = "eu_mixed"
MIXED_NODES = {"gw-fr": "mixed_fr", "gw-de": "mixed_de"}


@pytest.fixture(scope="module")
def mixed_parts(fed: Federation) -> dict[str, int]:
    """`eu_mixed`: gw-fr drops `postcode` from its part, gw-de releases it (as its 2-character prefix). Returns the
    rows each part releases to trainer-de."""
    counts = {}
    for node_id, name in MIXED_NODES.items():
        node = fed.nodes[node_id]
        drop = {"postcode": {"class": "quasi-identifier", "mask": "drop"}} if node_id == "gw-fr" else None
        register_aggregable_part(node, name, MIXED_FEDERATION, columns=drop)
        counts[node_id] = local_aggregate(node, name, {"measures": [{"func": "count"}]}).column(0)[0].as_py()
    return counts


def test_federated_sql_over_parts_releasing_different_columns(fed: Federation, mixed_parts):
    """A column one node withholds is null in that node's rows, in SQL as in plain Flight: selecting it, filtering on
    it, grouping by it and summarising it work over every part, and gw-fr never sees a request naming it."""
    fr, de = mixed_parts["gw-fr"], mixed_parts["gw-de"]
    since = datetime.now(timezone.utc).isoformat()
    with adbc_home(fed) as conn:
        rows = sql(conn, f"SELECT postcode, diagnosis FROM {MIXED_FEDERATION}")
        assert rows.num_rows == fr + de
        assert rows.column("postcode").null_count == fr
        everything = sql(conn, f"SELECT * FROM {MIXED_FEDERATION}")
        assert everything.num_rows == fr + de and "postcode" in everything.schema.names
        assert sql(conn, f"SELECT count(*) AS n FROM {MIXED_FEDERATION} WHERE postcode IS NULL").column("n")[0].as_py() == fr
        some = sql(conn, f"SELECT count(*) AS n FROM {MIXED_FEDERATION} WHERE postcode = '75' OR diagnosis = 'E11'")
        expected = sql(conn, f"SELECT count(*) AS n FROM (SELECT postcode, diagnosis FROM {MIXED_FEDERATION}) "
                             f"WHERE postcode = '75' OR diagnosis = 'E11'")
        assert some.column("n")[0].as_py() == expected.column("n")[0].as_py()
        groups = sql(conn, f"SELECT postcode, count(*) AS n, count(postcode) AS c FROM {MIXED_FEDERATION} GROUP BY postcode")
        by_key = {r["postcode"]: (r["n"], r["c"]) for r in groups.to_pylist()}
        assert sum(n for n, _ in by_key.values()) == fr + de
        assert by_key.get(None, (0, 0))[0] == fr and by_key.get(None, (0, 0))[1] == 0, by_key
        reference = Counter(rows.column("postcode").to_pylist())
        assert {k: n for k, (n, _) in by_key.items()} == dict(reference)
        per_diag = sql(conn, f"SELECT diagnosis, count(postcode) AS c, min(postcode) AS lo FROM {MIXED_FEDERATION} "
                             f"WHERE postcode IS NOT NULL OR hba1c > 7 GROUP BY diagnosis")
        ref = sql(conn, f"SELECT diagnosis, count(postcode) AS c, min(postcode) AS lo FROM "
                        f"(SELECT diagnosis, postcode, hba1c FROM {MIXED_FEDERATION} LIMIT 100000000) "
                        f"WHERE postcode IS NOT NULL OR hba1c > 7 GROUP BY diagnosis")
        assert sorted(per_diag.to_pylist(), key=str) == sorted(ref.to_pylist(), key=str)
    # The GROUP BY travelled as an aggregate to gw-fr too, which read (and audited) only columns it releases.
    gets = [e for e in audit_entries(fed.nodes["gw-fr"], FEDERATED_PRINCIPAL, since=since)
            if e["action"] == "do_get" and (e.get("statement") or "").startswith("GROUP BY postcode")]
    assert len(gets) == 1 and gets[0]["rows_sent"] == 1, gets
    assert "not sent by this node, answered as nulls: postcode" in gets[0]["reason"], gets


def test_plain_flight_parts_share_the_flightinfo_schema(fed: Federation, mixed_parts):
    """Over plain Flight too, every node streams the FlightInfo's columns in its order: gw-fr answers `postcode`,
    which it does not send, as nulls, so the parts concatenate as they are (no schema promotion) and selecting,
    filtering on or grouping by the column works across parts."""
    fr, de = mixed_parts["gw-fr"], mixed_parts["gw-de"]
    since = datetime.now(timezone.utc).isoformat()

    def pull(**command: Any) -> tuple[Federated, dict[str, pa.Table]]:
        answer = fed.parse(fed.get_info(flight.FlightDescriptor.for_command(
            json.dumps({"dataset": MIXED_FEDERATION, **command}).encode())), MIXED_FEDERATION)
        assert answer.status() == {"gw-fr": "ok", "gw-de": "ok"}, answer.nodes
        return answer, fed.read_parts(answer)

    answer, parts = pull()
    schema = answer.info.schema
    assert "postcode" in schema.names, schema
    for node_id, part in parts.items():
        assert part.schema.names == schema.names, f"{node_id} streams {part.schema.names}, FlightInfo says {schema.names}"
        assert [f.type for f in part.schema] == [f.type for f in schema], f"{node_id}: {part.schema} vs {schema}"
    everything = pa.concat_tables([parts["gw-fr"], parts["gw-de"]])
    assert everything.num_rows == fr + de
    assert parts["gw-fr"].column("postcode").null_count == fr
    assert parts["gw-de"].column("postcode").null_count < de, "gw-de releases postcode: the test proves nothing"

    _, chosen = pull(columns=["postcode", "diagnosis"])
    assert {n: t.column_names for n, t in chosen.items()} == {n: ["postcode", "diagnosis"] for n in MIXED_NODES}
    assert chosen["gw-fr"].num_rows == fr and chosen["gw-fr"].column("postcode").null_count == fr

    _, nulls = pull(columns=["diagnosis"], filter="postcode IS NULL")
    de_nulls = parts["gw-de"].column("postcode").null_count
    assert (nulls["gw-fr"].num_rows, nulls["gw-de"].num_rows if "gw-de" in nulls else 0) == (fr, de_nulls)

    grouped, groups = pull(aggregate={"group_by": ["postcode"], "measures": [{"func": "count"}]})
    assert groups["gw-fr"].to_pylist() == [{"postcode": None, "count(*)": fr}], groups["gw-fr"]
    assert sum(groups["gw-de"].column("count(*)").to_pylist()) == de
    # gw-fr was asked for the column as nulls (and said so in its audit), never for its values.
    gets = [e for e in audit_entries(fed.nodes["gw-fr"], FEDERATED_PRINCIPAL, since=since) if e["action"] == "do_get"]
    assert len(gets) == 4 and all("answered as nulls: postcode" in e["reason"] for e in gets), gets


def test_a_nullified_direct_identifier_in_one_part_is_nulls_everywhere(fed: Federation):
    """gw-fr releases its direct identifier `full_name` as nulls (mask nullify), gw-de drops it: the union names it,
    both parts stream it, entirely null, and neither node refuses the aligned request."""
    register_aggregable_part(fed.nodes["gw-fr"], "nullid_fr", "eu_nullid",
                             columns={"full_name": {"class": "direct-identifier", "mask": "nullify"}})
    register_aggregable_part(fed.nodes["gw-de"], "nullid_de", "eu_nullid")
    answer = fed.parse(fed.get_info(flight.FlightDescriptor.for_command(
        json.dumps({"dataset": "eu_nullid"}).encode())), "eu_nullid")
    assert answer.status() == {"gw-fr": "ok", "gw-de": "ok"}, answer.nodes
    parts = fed.read_parts(answer)
    assert "full_name" in answer.info.schema.names
    for node_id, part in parts.items():
        assert part.num_rows > 0 and part.column("full_name").null_count == part.num_rows, node_id


@pytest.mark.parametrize("limit", [1, 1001])
def test_a_federated_limit_bounds_all_parts_together(fed: Federation, mixed_parts, limit: int):
    """`limit` counts rows across all endpoints, so across nodes: each node gets its share (rows flow straight
    from it to the reader), and together they send exactly `limit` when every node has enough rows."""
    assert min(mixed_parts.values()) > limit
    answer = fed.parse(fed.get_info(flight.FlightDescriptor.for_command(
        json.dumps({"dataset": MIXED_FEDERATION, "limit": limit}).encode())), MIXED_FEDERATION)
    rows = {n: t.num_rows for n, t in fed.read_parts(answer).items()}
    assert sum(rows.values()) == limit and max(rows.values()) == -(-limit // 2), rows


def test_a_bare_organisation_permit_does_not_reach_a_peers_principal(fed: Federation):
    """gw-fr grants `dkfz` (bare): its own trainer of dkfz may pull, but gw-de's principal of dkfz is refused there, for
    any peer could claim that name; `DE/dkfz` (vouched for by DE's node) lets it in."""
    fr = fed.nodes["gw-fr"]
    register_aggregable_part(fr, "bare_fr", "eu_bare", permit_org=ORG)  # returns once fr's own trainer may use it
    with pytest.raises(flight.FlightUnauthorizedError) as refused:
        fed.get_info(dataset="eu_bare")
    assert "gw-fr" in str(refused.value), str(refused.value)
    steward = fr.key(STEWARD)
    resp = fr.rest("POST", "/api/v1/datasets/bare_fr/permits", key=steward, body={"org": PERMIT_ORG, "purpose": PURPOSE})
    assert resp.status in (200, 201), resp.text[:500]
    answer, _ = poll_until(lambda: _try_info(fed, "eu_bare"), deadline=PEER_HEALTH_DEADLINE, interval=0.25,
                           what="gw-fr answers gw-de's principal under DE/dkfz")
    assert fed.parse(answer, "eu_bare").status() == {"gw-fr": "ok"}
    # A permit naming a wildcard or a malformed member state is refused.
    for bad in ("DE/*", "*", "de/dkfz", "DE/a/b"):
        resp = fr.rest("POST", "/api/v1/datasets/bare_fr/permits", key=steward, body={"org": bad, "purpose": PURPOSE})
        assert resp.status == 400, (bad, resp.status, resp.text[:300])


def _try_info(fed: Federation, dataset: str) -> flight.FlightInfo | None:
    try:
        return fed.get_info(dataset=dataset)
    except flight.FlightUnauthorizedError:
        return None


def test_federated_sql_pushes_columns_and_filters_to_each_node(fed: Federation, sql_parts):
    since = datetime.now(timezone.utc).isoformat()
    with adbc_home(fed) as conn:
        rows = sql(conn, f"SELECT hba1c FROM {SQL_FEDERATION} WHERE hba1c > 9")
    assert rows.num_rows > 0 and min(rows.column("hba1c").to_pylist()) > 9
    entries = audit_entries(fed.nodes["gw-fr"], FEDERATED_PRINCIPAL, since=since)
    gets = [e for e in entries if e["action"] == "do_get"]
    assert gets, entries
    assert all(e["columns"] == ["hba1c"] and "hba1c > 9" in (e["filter"] or "") for e in gets), gets
    assert sum(e["rows_sent"] for e in gets) < sql_parts["gw-fr"], gets


def test_federated_sql_pushes_a_group_by_to_each_node(fed: Federation, sql_parts):
    """A GROUP BY over a federated table travels as groups: each node sends one row per group (audited with the
    aggregate), and the combined answer equals grouping every node's rows."""
    since = datetime.now(timezone.utc).isoformat()
    query = (f"SELECT diagnosis, count(*) AS n, sum(hba1c) AS s, avg(hba1c) AS a, min(hba1c) AS lo, max(hba1c) AS hi "
             f"FROM {SQL_FEDERATION} WHERE hba1c > 7 GROUP BY diagnosis")
    with adbc_home(fed) as conn:
        got = sql(conn, query)
        rows = sql(conn, f"SELECT diagnosis, hba1c FROM {SQL_FEDERATION} WHERE hba1c > 7")
    expected: dict[Any, list[float]] = {}
    for d, h in zip(rows.column("diagnosis").to_pylist(), rows.column("hba1c").to_pylist()):
        expected.setdefault(d, []).append(h)
    assert sorted(got.column("diagnosis").to_pylist(), key=str) == sorted(expected, key=str)
    for r in got.to_pylist():
        values = [v for v in expected[r["diagnosis"]] if v is not None]
        assert r["n"] == len(expected[r["diagnosis"]]), r
        assert r["s"] == pytest.approx(sum(values), rel=1e-9), r
        assert r["a"] == pytest.approx(sum(values) / len(values), rel=1e-9), r
        assert (r["lo"], r["hi"]) == (min(values), max(values)), r
    gets = [e for e in audit_entries(fed.nodes["gw-fr"], FEDERATED_PRINCIPAL, since=since)
            if e["action"] == "do_get" and (e.get("statement") or "").startswith("GROUP BY diagnosis")]
    assert len(gets) == 1, gets
    assert gets[0]["columns"] == ["diagnosis", "hba1c"] and "hba1c > 7" in (gets[0]["filter"] or ""), gets
    assert gets[0]["rows_sent"] <= len(expected), gets


def test_federated_sql_fails_naming_a_refusing_node(fed: Federation, sql_parts):
    with adbc_home(fed) as conn:
        with pytest.raises(Exception) as info:
            sql(conn, f"SELECT count(*) FROM {FEDERATION}")
    assert "gw-it" in str(info.value), str(info.value)


def test_a_peers_principal_gets_no_sql_at_a_peer(fed: Federation, sql_parts):
    """With a valid assertion for gw-fr, trainer-de@gw-de may read its part over Flight, but not run SQL there."""
    import adbc_driver_flightsql.dbapi as flight_sql
    info = fed.request(on_partial="skip")
    fr = info.nodes["gw-fr"]
    kwargs = {"adbc.flight.sql.rpc.call_header.x-passerelle-assertion": fr["assertion"],
              "adbc.flight.sql.rpc.call_header.x-passerelle-purpose": PURPOSE}
    if fed.tls:
        assert fed.pki is not None
        kwargs["adbc.flight.sql.client_option.tls_root_certs"] = fed.pki.bundle.read_text()
    conn = flight_sql.connect(fed.nodes["gw-fr"].advertise_url, db_kwargs=kwargs, autocommit=True)
    with conn:
        with pytest.raises(Exception) as refused:
            sql(conn, "SELECT count(*) FROM sql_fr")
    assert "not SQL" in str(refused.value), str(refused.value)


# ======================================================================================================================
# An aggregates-only part: a federated GROUP BY is answered, raw rows are refused
# ======================================================================================================================

AGG_FEDERATION = "eu_agg"
AGG_FLOOR = 25      # gw-fr's min_group_size for its aggregates-only part
AGG_NODES = {"gw-fr": "agg_fr", "gw-de": "agg_de"}


def register_aggregable_part(node: FedNode, name: str, federation: str, columns: dict[str, Any] | None = None,
                             aggregates_only: bool = False, permit_org: str = PERMIT_ORG) -> None:
    """`node`'s demo manifest as `name` in `federation` (optionally released as aggregates only with the floor
    AGG_FLOOR, and with column classes replaced), registered by the steward with dkfz's permit; returns once
    trainer-de may aggregate it there."""
    manifest = manifest_json(node.gw, name)
    manifest["member_state"] = node.spec.member_state
    manifest["federation"] = federation
    if aggregates_only:
        manifest["release"] = "aggregates"
        manifest["min_group_size"] = AGG_FLOOR
    manifest["columns"].update(columns or {})
    steward = node.key(STEWARD)
    resp = node.rest("POST", "/api/v1/datasets", key=steward, body=manifest)
    assert resp.status in (200, 201), resp.text[:500]
    resp = node.rest("POST", f"/api/v1/datasets/{name}/permits", key=steward, body={"org": permit_org, "purpose": PURPOSE})
    assert resp.status in (200, 201), resp.text[:500]

    def permitted():
        try:
            return local_aggregate(node, name, {"measures": [{"func": "count"}]}).num_rows == 1
        except flight.FlightError:
            return False

    poll_until(permitted, what=f"trainer-de may aggregate {name} at {node.node_id}")


@pytest.fixture(scope="module")
def agg_parts(fed: Federation) -> None:
    """`eu_agg`: gw-fr's part is released as aggregates only (groups under AGG_FLOOR rows suppressed), gw-de's as
    rows; dkfz holds a permit at both."""
    for node_id, name in AGG_NODES.items():
        register_aggregable_part(fed.nodes[node_id], name, AGG_FEDERATION, aggregates_only=node_id == "gw-fr")


def local_aggregate(node: FedNode, dataset: str, aggregate: dict[str, Any], filter: str | None = None,
                    fill_nulls: dict[str, str] | None = None) -> pa.Table:
    """A plain Flight aggregate command at `node` by its own trainer-de."""
    command: dict[str, Any] = {"dataset": dataset, "aggregate": aggregate}
    if filter is not None:
        command["filter"] = filter
    if fill_nulls is not None:
        command["fill_nulls"] = fill_nulls
    c = node.connect()
    try:
        opts = node.local_options(TRAINER)
        info = c.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command).encode()), opts)
        tables = [c.do_get(ep.ticket, opts).read_all() for ep in info.endpoints]
    finally:
        c.close()
    assert len(tables) == 1, info
    return tables[0]


GROUPS = {"group_by": ["diagnosis"], "measures": [{"func": "count"}, {"func": "sum", "column": "hba1c"},
                                                  {"func": "count", "column": "hba1c"}]}


def test_an_aggregates_part_answers_a_federated_group_by(fed: Federation, agg_parts):
    """The federated GROUP BY equals gw-fr's own groups (floored there) plus gw-de's rows grouped here."""
    fr = local_aggregate(fed.nodes["gw-fr"], "agg_fr", GROUPS, "hba1c > 6").to_pylist()
    assert fr and all(g["count(*)"] >= AGG_FLOOR for g in fr), fr
    de_rows = fed.local_pull("gw-de")
    expected: dict[Any, list] = {}
    for g in fr:
        expected[g["diagnosis"]] = [g["count(*)"], g["sum(hba1c)"], g["count(hba1c)"]]
    for d, h in zip(de_rows.column("diagnosis").to_pylist(), de_rows.column("hba1c").to_pylist()):
        if h is None or h <= 6:
            continue
        e = expected.setdefault(d, [0, 0.0, 0])
        e[0] += 1
        e[1] += h
        e[2] += 1
    with adbc_home(fed) as conn:
        got = sql(conn, f"SELECT diagnosis, count(*) AS n, sum(hba1c) AS s, avg(hba1c) AS a FROM {AGG_FEDERATION} "
                        f"WHERE hba1c > 6 GROUP BY diagnosis")
    assert sorted(got.column("diagnosis").to_pylist(), key=str) == sorted(expected, key=str)
    for r in got.to_pylist():
        n, total, counted = expected[r["diagnosis"]]
        assert r["n"] == n and r["s"] == pytest.approx(total, rel=1e-9), (r, expected[r["diagnosis"]])
        assert r["a"] == pytest.approx(total / counted, rel=1e-9), r


def test_an_aggregates_part_answers_with_columns_it_does_not_send_as_nulls(fed: Federation, agg_parts):
    """A null column under the aggregate (what federated SQL asks of a part that lacks a column) cannot single out a
    row: gw-fr's aggregates-only part still groups, and a group keyed by the null column is one group of every row,
    above the floor like any other."""
    node = fed.nodes["gw-fr"]
    plain = local_aggregate(node, AGG_NODES["gw-fr"], {"group_by": ["diagnosis"], "measures": [{"func": "count"}]})
    filled = local_aggregate(node, AGG_NODES["gw-fr"], {"group_by": ["diagnosis"], "measures": [{"func": "count"}]},
                             fill_nulls={"only_elsewhere": "Utf8"})
    assert sorted(filled.to_pylist(), key=str) == sorted(plain.to_pylist(), key=str)
    by_null = local_aggregate(node, AGG_NODES["gw-fr"], {"group_by": ["only_elsewhere"], "measures": [{"func": "count"}]},
                              fill_nulls={"only_elsewhere": "Utf8"})
    assert by_null.to_pylist() == [{"only_elsewhere": None, "count(*)": sum(plain.column("count(*)").to_pylist())}]


def test_an_aggregates_part_refuses_raw_rows_and_order_statistics(fed: Federation, agg_parts):
    with adbc_home(fed) as conn:
        for query in (f"SELECT hba1c FROM {AGG_FEDERATION}",
                      f"SELECT diagnosis, max(hba1c) FROM {AGG_FEDERATION} GROUP BY diagnosis",
                      f"SELECT count(DISTINCT hba1c) FROM {AGG_FEDERATION}"):
            with pytest.raises(Exception) as refused:
                sql(conn, query)
            message = str(refused.value)
            assert "gw-fr" in message and "aggregates only" in message, (query, message)
    # Plain Flight: the rows of eu_agg are refused by gw-fr (on_partial = fail).
    with fed.home_client() as (c, opts):
        with pytest.raises(flight.FlightUnauthorizedError) as denied:
            c.get_flight_info(flight.FlightDescriptor.for_command(json.dumps({"dataset": AGG_FEDERATION}).encode()),
                              opts)
    assert "gw-fr" in str(denied.value) and "aggregates only" in str(denied.value), str(denied.value)


def test_plain_flight_aggregate_reads_each_nodes_groups_from_that_node(fed: Federation, agg_parts):
    """A federated `aggregate` command over plain Flight: one endpoint per node, read from that node, each the
    node's own groups; gw-fr's equal its local answer and suppress the groups under its floor."""
    fine = {"group_by": ["postcode", "birth_date", "diagnosis"], "measures": [{"func": "count"}]}
    answer = fed.parse(fed.get_info(dataset=AGG_FEDERATION, aggregate=fine), AGG_FEDERATION)
    assert answer.status() == {"gw-fr": "ok", "gw-de": "ok"}, answer.nodes
    fr = fed.read_node(answer, "gw-fr")
    local = local_aggregate(fed.nodes["gw-fr"], "agg_fr", fine)
    key = lambda r: (str(r["postcode"]), str(r["birth_date"]), str(r["diagnosis"]))  # noqa: E731
    assert sorted(fr.to_pylist(), key=key) == sorted(local.to_pylist(), key=key)
    assert all(r["count(*)"] >= AGG_FLOOR for r in fr.to_pylist()), fr
    total = local_aggregate(fed.nodes["gw-fr"], "agg_fr", {"measures": [{"func": "count"}]}).column("count(*)")[0]
    assert sum(fr.column("count(*)").to_pylist()) < total.as_py(), "no fine group was suppressed: the test proves nothing"
    de = fed.read_node(answer, "gw-de")
    assert sum(de.column("count(*)").to_pylist()) == fed.local_pull("gw-de").num_rows
