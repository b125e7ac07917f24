"""Issue #15, items 6 and 7, against the real binary.

Hygiene: the data directory is private (0700, files 0600, looser modes tightened), one `serve` per data directory (a
second is refused; a crashed one does not block a restart; the CLI keeps working meanwhile), keys made once when
processes start at once, and pseudonyms per recipient `member_state/org` (a new key version; data directories of
earlier releases keep their pseudonyms until a rotation). Expected pseudonyms are computed here from the key files
with Python's own HMAC, independently of the Rust code.

The contract as published: a permit for an ancestor of a dataset's purposes covers them (and nothing outside the
dataset's purposes); the default `limits.max_streams_per_principal` is 64, and the refusal names it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import stat
import subprocess
import time
from pathlib import Path

import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import (CLI_TIMEOUT, DATASET, OTHER_PURPOSE, PROPAGATION_LIMIT, PURPOSE, REGISTRY, SUB_PURPOSE,
                      SUBJECT_COLUMN, Gateway, assert_json_error, call_options, expect_status, http, listed_datasets,
                      path_descriptor, poll_until, pull, run_cli, start_gateway, stop_process)
from test_federation import ORG, PERMITTED, fed, skip_pull  # noqa: F401 (fixtures: the three-node federation)
from test_hardening import expect_exhausted

# ======================================================================================================================
# Helpers
# ======================================================================================================================


def modes(data_dir: Path) -> dict[str, int]:
    """Permission bits of the data directory (key "."), and of everything in it, by relative path."""
    out = {".": stat.S_IMODE(data_dir.stat().st_mode)}
    for p in data_dir.rglob("*"):
        out[str(p.relative_to(data_dir))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(data_dir: Path) -> dict[str, int]:
    got = modes(data_dir)
    wrong = {p: oct(m) for p, m in got.items()
             if m != (0o700 if (data_dir / p).is_dir() else 0o600)}
    assert not wrong, f"not private (dirs 0700, files 0600): {wrong}"
    return got


def fresh_serve_json(gw_dir: Path) -> None:
    """A killed or refused server leaves serve.json behind; start_gateway reads it, so remove it before a restart."""
    (gw_dir / "serve.json").unlink(missing_ok=True)


def expected_pseudonyms(master: bytes, version: int, recipient: bytes, ids) -> set[str]:
    """The contract's pseudonym, computed here: hex(version || HMAC(HMAC(master, label), decimal id)[:15])."""
    k = hmac.new(master, recipient, hashlib.sha256).digest()
    return {f"{version:02x}" + hmac.new(k, str(i).encode(), hashlib.sha256).digest()[:15].hex() for i in ids}


def v2(member_state: str, org: str) -> bytes:
    return f"passerelle/pseudonym/v2/{member_state}/{org}".encode()


def v1(org: str) -> bytes:
    return f"passerelle/pseudonym/v1/{org}".encode()


def raw_ids(gw: Gateway) -> list[int]:
    return [i for i in pq.read_table(gw.data_dir / "demo" / "patients" / "patients.parquet")
            .column(SUBJECT_COLUMN).to_pylist() if i is not None]


def pulled_pseudonyms(gw: Gateway, key: str, purpose: str = PURPOSE) -> set[str]:
    c = gw.connect()
    try:
        table = pull(c, call_options(key, purpose)).table
    finally:
        c.close()
    got = {p for p in table.column(SUBJECT_COLUMN).to_pylist() if p is not None}
    assert got, "the pull sent no rows"
    return got


def wait_until_usable(gw: Gateway, key: str) -> float:
    """Waits until a principal the CLI added lists the demo dataset; returns the seconds it took."""
    c = gw.connect()
    try:
        def seen():
            try:
                return listed_datasets(c, call_options(key)) == [DATASET]
            except flight.FlightUnauthenticatedError:
                return False
        return poll_until(seen, what="the new principal lists the demo dataset")[1]
    finally:
        c.close()


@pytest.fixture
def own_gateway(passerelle_bin: Path, tmp_path: Path):
    """A demo server of this test only (started by the test through `start`), stopped at the end."""
    started: list[Gateway] = []

    def start(data_dir: Path | None = None, **kw) -> Gateway:
        gw = start_gateway(passerelle_bin, data_dir or tmp_path / "data", **kw)
        started.append(gw)
        return gw
    yield start
    for gw in started:
        stop_process(gw.proc)


# ======================================================================================================================
# Item 6: a private data directory
# ======================================================================================================================


def test_a_new_data_directory_is_private_from_first_use(passerelle_bin: Path, tmp_path: Path, own_gateway):
    data = tmp_path / "parent" / "data"
    # The CLI creates the directory on first use: 0700, its files 0600.
    run_cli(passerelle_bin, data, "principal", "add", "--name", "t-first", "--org", "acme", "--member-state", "FR",
            "--role", "trainer")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert_private(data)
    # A server on it (demo data, serve.json, demo-keys.json, keys, lock files) and a pull (the SQLite WAL).
    gw = own_gateway(data, demo_rows=2000)
    pulled_pseudonyms(gw, gw.keys["trainer-de"])
    gw.cli("keys", "rotate-pseudonym")
    got = assert_private(data)
    for name in ["passerelle.db", "passerelle.db-wal", "passerelle.db-shm", "node.key", "pseudonym.key",
                 "pseudonym.key.v1", "pseudonym.key.v2", "pseudonym.version", "pseudonym.member-state-from",
                 "serve.json", "serve.lock", "keys.lock", "demo-keys.json", "demo", "demo/patients",
                 "demo/patients/patients.parquet", "demo/consent.csv", "demo/demo_patients.toml"]:
        assert name in got, f"{name} missing from the data directory: {sorted(got)}"


def test_a_data_directory_with_loose_modes_is_tightened(passerelle_bin: Path, tmp_path: Path, own_gateway):
    """A data directory of an earlier release (or made by hand with umask 022) is made private at the next command,
    with a warning, and keeps working."""
    gw = own_gateway(demo_rows=2000)
    stop_process(gw.proc)
    data = gw.data_dir
    for p in [data, *data.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    assert modes(data)["node.key"] == 0o644
    proc = run_cli(passerelle_bin, data, "dataset", "list", "--json")
    assert DATASET in proc.stdout
    assert "private" in proc.stderr and "node.key" in proc.stderr, proc.stderr[-2000:]
    assert_private(data)
    # And a server restarted on it serves as before.
    fresh_serve_json(data)
    gw = own_gateway(data, demo_rows=2000)
    pulled_pseudonyms(gw, gw.keys["trainer-de"])
    assert_private(data)


# ======================================================================================================================
# Item 6: one server per data directory
# ======================================================================================================================


def test_a_second_serve_on_a_served_data_directory_is_refused(gateway: Gateway):
    """The second server exits non-zero, naming the running one, before writing anything; the first keeps serving,
    and CLI changes still reach it within a second."""
    before = {n: (gateway.data_dir / n).read_bytes() for n in ("serve.json", "demo-keys.json")}
    cmd = [str(gateway.bin), "serve", "--data-dir", str(gateway.data_dir), "--flight-addr", "127.0.0.1:0",
           "--http-addr", "127.0.0.1:0", "--demo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0, proc.stdout[-1000:]
    err = proc.stderr
    assert "already being served" in err and str(gateway.proc.pid) in err and "--data-dir" in err, err[-2000:]
    assert {n: (gateway.data_dir / n).read_bytes() for n in before} == before
    gateway.assert_alive()
    # CLI commands on the same data directory work while the server runs, and reach it within a second.
    key = gateway.add_principal("trainer-while-served", "dkfz", "DE", "trainer")
    assert wait_until_usable(gateway, key) <= PROPAGATION_LIMIT


def test_a_crashed_server_does_not_block_a_restart(own_gateway):
    gw = own_gateway(demo_rows=2000)
    before = pulled_pseudonyms(gw, gw.keys["trainer-de"])
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(timeout=30)
    assert (gw.data_dir / "serve.lock").exists(), "the lock file stays behind after a crash"
    fresh_serve_json(gw.data_dir)
    again = own_gateway(gw.data_dir, demo_rows=2000)
    assert pulled_pseudonyms(again, again.keys["trainer-de"]) == before


def test_processes_starting_at_once_on_an_empty_data_directory_make_one_key(passerelle_bin: Path, tmp_path: Path):
    """A server and several CLI commands start together on a directory that does not exist: all show the same node
    key, and the server pseudonymises with the pseudonym key left on disk (not one it made and lost)."""
    data = tmp_path / "data"
    procs = [subprocess.Popen([str(passerelle_bin), "--data-dir", str(data), "keys"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(6)]
    gw = start_gateway(passerelle_bin, data, demo_rows=2000)
    try:
        kids = set()
        for p in procs:
            out, err = p.communicate(timeout=CLI_TIMEOUT)
            assert p.returncode == 0, err[-2000:]
            kids.add(json.loads(out)["keys"][0]["kid"])
        served = http("GET", gw.url("/api/v1/keys")).body
        assert kids == {served["keys"][0]["kid"]}, (kids, served)
        master = (data / "pseudonym.key").read_bytes()
        got = pulled_pseudonyms(gw, gw.keys["trainer-de"])
        assert got <= expected_pseudonyms(master, 1, v2("DE", "dkfz"), raw_ids(gw))
    finally:
        stop_process(gw.proc)


# ======================================================================================================================
# Item 6: pseudonyms per member state and organisation
# ======================================================================================================================


def test_pseudonyms_are_per_member_state_and_organisation(own_gateway, passerelle_bin: Path):
    """`FR/acme` and `DE/acme` pull the same dataset and get unrelated pseudonyms for the same subjects; two
    principals of `FR/acme` get equal ones. A data directory of an earlier release (no member-state marker) keeps its
    org-only pseudonyms until `keys rotate-pseudonym`, whose new version derives from `CC/org`."""
    gw = own_gateway(demo_rows=2000)
    keys = {n: gw.add_principal(n, "acme", ms, "trainer")
            for n, ms in (("acme-fr-1", "FR"), ("acme-fr-2", "FR"), ("acme-de", "DE"))}
    gw.cli("permit", "add", "--dataset", DATASET, "--org", "acme", "--purpose", PURPOSE)
    for k in keys.values():
        wait_until_usable(gw, k)
    ids = raw_ids(gw)
    master = (gw.data_dir / "pseudonym.key").read_bytes()
    fr1, fr2, de = (pulled_pseudonyms(gw, keys[n]) for n in ("acme-fr-1", "acme-fr-2", "acme-de"))
    assert fr1 == fr2
    assert fr1.isdisjoint(de) and len(fr1) == len(de)
    assert fr1 <= expected_pseudonyms(master, 1, v2("FR", "acme"), ids)
    assert de <= expected_pseudonyms(master, 1, v2("DE", "acme"), ids)

    # An earlier release's data directory: the same key, no marker. Its recipients are organisations alone.
    stop_process(gw.proc)
    (gw.data_dir / "pseudonym.member-state-from").unlink()
    fresh_serve_json(gw.data_dir)
    gw = own_gateway(gw.data_dir, demo_rows=2000)
    legacy = expected_pseudonyms(master, 1, v1("acme"), ids)
    fr_old, de_old = pulled_pseudonyms(gw, keys["acme-fr-1"]), pulled_pseudonyms(gw, keys["acme-de"])
    assert fr_old == de_old and fr_old <= legacy, "an existing data directory keeps its pseudonyms"

    # The rotation's new version is the first to derive from CC/org; the running server takes it up.
    out = json.loads(gw.cli("keys", "rotate-pseudonym", "--json"))
    assert out["pseudonym_key_version"] == 2
    assert (gw.data_dir / "pseudonym.member-state-from").read_text().strip() == "2"
    master2 = (gw.data_dir / "pseudonym.key.v2").read_bytes()
    poll_until(lambda: next(iter(pulled_pseudonyms(gw, keys["acme-fr-1"]))).startswith("02"),
               what="the rotated key in use")
    fr_new, de_new = pulled_pseudonyms(gw, keys["acme-fr-1"]), pulled_pseudonyms(gw, keys["acme-de"])
    assert fr_new.isdisjoint(de_new)
    assert fr_new <= expected_pseudonyms(master2, 2, v2("FR", "acme"), ids)
    assert de_new <= expected_pseudonyms(master2, 2, v2("DE", "acme"), ids)
    assert pulled_pseudonyms(gw, keys["acme-fr-2"]) == fr_new


@pytest.mark.parametrize("node_id", PERMITTED)
def test_a_peers_principal_is_pseudonymised_under_the_member_state_its_node_vouches_for(fed, skip_pull,
                                                                                         node_id: str):
    """trainer-de@gw-de (dkfz, vouched DE by gw-de) gets from every node, gw-fr included, the pseudonyms of recipient
    `DE/dkfz` under that node's own key: never those of the serving node's member state."""
    _, parts = skip_pull
    node = fed.nodes[node_id]
    master = (node.data_dir / "pseudonym.key").read_bytes()
    ids = [i for i in node.reference.raw.column(SUBJECT_COLUMN).to_pylist() if i is not None]
    got = {p for p in parts[node_id].column(SUBJECT_COLUMN).to_pylist() if p is not None}
    assert got, f"{node_id} sent no rows"
    assert got <= expected_pseudonyms(master, 1, v2("DE", ORG), ids), f"{node_id}: not the pseudonyms of DE/{ORG}"
    for other in ("FR", "IT"):
        assert got.isdisjoint(expected_pseudonyms(master, 1, v2(other, ORG), ids))


# ======================================================================================================================
# Item 7: permits for an ancestor of the dataset's purposes
# ======================================================================================================================


@pytest.fixture(scope="module")
def narrow(scratch_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A dataset registered for `research/ai-training` only (the demo's rows, outside the data directory)."""
    gw = scratch_gateway
    src = tmp_path_factory.mktemp("narrow")
    (src / "data").mkdir()
    (src / "data" / "p.parquet").write_bytes(gw.reference.parquet_path.read_bytes())
    name = "narrow_patients"
    manifest = src / "narrow.toml"
    text = gw.reference.manifest_path.read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("name"):
            line = f'name = "{name}"'
        elif line.startswith("location"):
            line = f'location = "file://{src / "data"}/"'
        elif line.startswith("purposes"):
            line = f'purposes = ["{PURPOSE}"]'
        elif line.startswith("consent_registry"):
            line = f'consent_registry = "{REGISTRY}"'
        lines.append(line)
    if not any(line.startswith("consent_registry") for line in lines):
        lines.insert(1, f'consent_registry = "{REGISTRY}"')
    manifest.write_text("\n".join(lines) + "\n")
    gw.cli("dataset", "register", "--manifest", str(manifest))
    # The CLI's change reaches the running server within its refresh interval: wait until it has.
    poll_until(lambda: http("GET", gw.url(f"/api/v1/datasets/{name}"), key=gw.keys["steward-fr"]).status == 200,
               what="the server knows the dataset the CLI registered")
    return name


def test_a_permit_for_an_ancestor_purpose_covers_the_datasets_purposes_only(scratch_gateway: Gateway, narrow: str):
    gw = scratch_gateway
    # CLI: accepted, and it covers the dataset's purpose and its sub-purposes.
    cli_key = gw.add_principal("trainer-anc-cli", "anc-cli", "NL", "trainer")
    out = gw.cli_json("permit", "add", "--dataset", narrow, "--org", "anc-cli", "--purpose", "research")
    assert out["purpose"] == "research", out
    # REST, by the dataset's steward: accepted as well.
    rest_key = gw.add_principal("trainer-anc-rest", "anc-rest", "BE", "trainer")
    resp = http("POST", gw.url(f"/api/v1/datasets/{narrow}/permits"), key=gw.keys["steward-fr"],
                body={"org": "anc-rest", "purpose": "research"})
    assert resp.status == 201, resp.text[:500]
    c = gw.connect()
    try:
        for key in (cli_key, rest_key):
            def served(key=key):
                try:
                    return pull(c, call_options(key, PURPOSE), path_descriptor(narrow)).table.num_rows > 0
                except (flight.FlightUnauthorizedError, KeyError, OSError):
                    return False
            _, seconds = poll_until(served, what="a trainer under an ancestor permit gets data")
            assert seconds <= PROPAGATION_LIMIT, seconds
            assert pull(c, call_options(key, SUB_PURPOSE), path_descriptor(narrow)).table.num_rows > 0
            # A purpose outside the dataset's purposes stays refused, as does the ancestor itself.
            for outside in (OTHER_PURPOSE, "research"):
                msg = expect_status("PERMISSION_DENIED",
                                    lambda o=outside, k=key: c.get_flight_info(path_descriptor(narrow),
                                                                               call_options(k, o)))
                assert "not registered for purpose" in msg, msg
    finally:
        c.close()
    # A purpose unrelated to the dataset's is still refused, by the CLI and over REST.
    proc = run_cli(gw.bin, gw.data_dir, "permit", "add", "--dataset", narrow, "--org", "anc-cli", "--purpose",
                   OTHER_PURPOSE, check=False)
    assert proc.returncode != 0 and "not registered for purpose" in proc.stderr, proc.stderr[-2000:]
    err = assert_json_error(http("POST", gw.url(f"/api/v1/datasets/{narrow}/permits"), key=gw.keys["steward-fr"],
                                 body={"org": "anc-rest", "purpose": "marketing"}), 400)
    assert "not registered for purpose" in err["error"], err


# ======================================================================================================================
# Item 7: the default stream limit
# ======================================================================================================================


def test_one_training_job_may_run_64_readers_by_default(own_gateway):
    """With the default configuration one principal holds 64 open streams; the 65th is RESOURCE_EXHAUSTED naming
    `limits.max_streams_per_principal = 64`, and a slot frees when a stream ends.

    The readers read nothing beyond the schema, on a connection without gRPC's BDP probing (which would grow the
    flow-control windows until the client had buffered whole streams and the server had finished them): HTTP/2 flow
    control then keeps every stream open on the server."""
    gw = own_gateway(demo_rows=20000)
    client = flight.connect(gw.flight_uri, generic_options=[("grpc.http2.bdp_probe", 0)])
    opts = call_options(gw.keys["trainer-de"])
    info = client.get_flight_info(path_descriptor(), opts)
    readers = []
    try:
        for _ in range(64):
            readers.append(client.do_get(info.endpoints[0].ticket, opts))  # returns once the schema arrived
        text = expect_exhausted(lambda: client.do_get(info.endpoints[0].ticket, opts).read_all(),
                                "limits.max_streams_per_principal = 64")
        assert "trainer-de" in text and "64 streams open" in text, text
    finally:
        for r in readers:
            r.cancel()

    def free():
        try:
            return client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows > 0
        except flight.FlightError:
            return False
    poll_until(free, deadline=10, interval=0.3, what="a stream slot freed after cancelling")
    client.close()
