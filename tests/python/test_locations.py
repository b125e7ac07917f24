"""Storage locations owned by controllers (issue 15, item 1), tried as a steward of another organisation would.

One gateway declares two storage locations:

    [locations.aphp-files]  url = <tmp>/aphp/   controllers = ["aphp"]      (the demo's steward-fr is aphp's)
    [locations.evil-files]  url = <tmp>/evil/   controllers = ["evilcorp"]
    [locations.evil-web]    url = http://127.0.0.1:9/base/  store = "web"  controllers = ["evilcorp"]

aphp registers an HIV dataset under consent (nobody consented, so it releases nothing). evilcorp's steward then tries
to register aphp's file under its own, weaker policy (public interest, the diagnosis `non-personal`) through every
other spelling of the path: `/proc/self/root`, `..`, doubled and percent-encoded separators, symlinks to the file and
to its directory, and a symlink planted later inside a dataset it registered legitimately. Every attempt is refused
with one message that reveals nothing of what lies at the path, nothing is stored, and evilcorp's trainer never
receives a row of aphp's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import (Gateway, assert_json_error, call_options, dataset_names, http, poll_until, run_cli,
                      start_gateway, stop_process, STARTUP_DEADLINE, _read_json_file)

PURPOSE = "research/ai-training"
SECRET = "TOP-SECRET-LINE-3f9a"
HIV_ROWS = [(i, "HIV", float(i)) for i in range(1, 41)]
EVIL_ROWS = [(1000 + i, "flu", float(i)) for i in range(1, 6)]


def write_parquet(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"patient_id": pa.array([r[0] for r in rows], pa.int64()),
                      "diagnosis": [r[1] for r in rows], "score": [r[2] for r in rows]})
    pq.write_table(table, path)


def manifest(name: str, location: str, controller: str, *, basis: str, diagnosis: str = "sensitive",
             **extra) -> dict:
    return {"name": name, "location": location, "format": extra.pop("format", "parquet"), "member_state": "FR",
            "controller": controller, "subject_column": "patient_id", "legal_basis": basis,
            "consent_registry": name.replace("_", "-"), "purposes": [PURPOSE],
            "columns": {"patient_id": {"class": "identifier"}, "diagnosis": {"class": diagnosis},
                        "score": {"class": "non-personal"}}, **extra}


class Site:
    def __init__(self, gw: Gateway, root: Path):
        self.gw, self.root = gw, root
        self.aphp, self.evil = root / "aphp", root / "evil"
        self.steward_fr = gw.keys["steward-fr"]
        self.steward_evil = gw.add_principal("steward-evil", "evilcorp", "DE", "steward")
        self.trainer_evil = gw.add_principal("trainer-evil", "evilcorp", "DE", "trainer")
        self.admin = gw.add_principal("admin-loc", "ops", "FR", "admin")
        # Principals added by the CLI reach the running server within its refresh interval.
        for key in (self.steward_evil, self.trainer_evil, self.admin):
            poll_until(lambda key=key: http("GET", gw.url("/api/v1/datasets"), key=key).status == 200,
                       what="the new principals are known to the server")

    def register(self, key: str, body: dict):
        return http("POST", self.gw.url("/api/v1/datasets"), key=key, body=body)

    def all_names(self) -> list[str]:
        return dataset_names(http("GET", self.gw.url("/api/v1/datasets"), key=self.admin).body)

    def pull(self, name: str) -> pa.Table:
        client = self.gw.connect()
        try:
            opts = call_options(self.trainer_evil)
            info = client.get_flight_info(flight.FlightDescriptor.for_path(name), opts)
            tables = [client.do_get(ep.ticket, opts).read_all() for ep in info.endpoints]
            return pa.concat_tables(tables) if tables else info.schema.empty_table()
        finally:
            client.close()


@pytest.fixture(scope="module")
def site(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("locations").resolve()
    (base / "aphp").mkdir()
    (base / "evil").mkdir()
    write_parquet(base / "aphp" / "hiv" / "hiv.parquet", HIV_ROWS)
    (base / "secret.csv").write_text(SECRET + "\n")
    cfg = base / "passerelle.toml"
    cfg.write_text(f"""
[stores.web]
kind = "http"
allow_http = true

[locations.aphp-files]
url = "file://{base}/aphp/"
controllers = ["aphp"]

[locations.evil-files]
url = "file://{base}/evil/"
controllers = ["evilcorp"]

[locations.evil-web]
url = "http://127.0.0.1:9/base/"
store = "web"
controllers = ["evilcorp"]
""")
    gw = start_gateway(passerelle_bin, base / "data", demo_rows=200, config=cfg)
    try:
        s = Site(gw, base)
        resp = s.register(s.steward_fr, manifest("aphp_hiv", f"file://{base}/aphp/hiv/", "aphp", basis="consent"))
        assert resp.status == 201, resp.text
        yield s
    finally:
        stop_process(gw.proc)


def refused_alike(resp) -> str:
    body = assert_json_error(resp, 400)
    assert "is not available for registration" in body["error"], body
    assert "locations" in body["hint"], body
    for leak in (SECRET, "HIV", "patient_id", "No such file", "Permission denied", "aphp_hiv", "symbolic"):
        assert leak not in json.dumps(body), f"{leak!r} leaked: {body}"
    return body["hint"]


def attack_spellings(s: Site) -> dict[str, str]:
    a, e = s.aphp, s.evil
    (e / "link.parquet").unlink(missing_ok=True)
    os.symlink(a / "hiv" / "hiv.parquet", e / "link.parquet")
    if not (e / "linkdir").exists():
        os.symlink(a / "hiv", e / "linkdir")
    return {
        "proc-self-root": f"file:///proc/self/root{a}/hiv/hiv.parquet",
        "proc-self-root-bare": f"/proc/self/root{a}/hiv/",
        "dot-dot": f"{e}/../aphp/hiv/hiv.parquet",
        "dot-dot-url": f"file://{e}/../aphp/hiv/",
        "doubled-slashes": f"file://{e}//..//aphp//hiv/",
        "percent-encoded-dots": f"file://{e}/%2E%2E/aphp/hiv/hiv.parquet",
        "percent-encoded-slash": f"file://{e}/..%2Faphp/hiv/",
        "symlink-to-file": f"file://{e}/link.parquet",
        "symlink-to-directory": f"file://{e}/linkdir/",
        "glob-through-symlink": f"file://{e}/linkdir/*.parquet",
        "the-file-itself": f"file://{a}/hiv/hiv.parquet",
        "a-parent-of-it": f"file://{a}/",
    }


def test_another_controllers_file_cannot_be_registered_under_any_spelling(site: Site):
    before = site.all_names()
    hints = set()
    for i, (what, location) in enumerate(attack_spellings(site).items()):
        name = f"evil_attack_{i}"
        body = manifest(name, location, "evilcorp", basis="public-interest", diagnosis="non-personal")
        hints.add(refused_alike(site.register(site.steward_evil, body)))
        # The operator's own REST key is held to the same rules once locations are declared.
        admin_body = {**body, "name": f"admin_attack_{i}"}
        refused_alike(site.register(site.admin, admin_body))
    assert len(hints) == 1, hints
    assert site.all_names() == before, "nothing may be stored by a refused registration"
    # Even had a permit been granted, no dataset of evilcorp's can reach aphp's rows.
    for name in before:
        if name.startswith("evil"):
            assert "HIV" not in site.pull(name).column("diagnosis").to_pylist()


def test_a_file_outside_every_location_leaks_nothing(site: Site):
    """The reproduction: registering a one-line secret file as CSV used to answer `column <the secret> is not
    classified`. Outside the caller's locations nothing is read, so the answer is the one refusal."""
    secret = site.root / "secret.csv"
    (site.evil / "secret-link.csv").unlink(missing_ok=True)
    os.symlink(secret, site.evil / "secret-link.csv")
    for i, location in enumerate([f"file://{secret}", f"file://{site.evil}/secret-link.csv",
                                  f"file://{site.evil}/../secret.csv", "file:///etc/passwd",
                                  f"file://{site.gw.data_dir.resolve()}/node.key", "/proc/self/environ",
                                  f"file://{site.evil}/does-not-exist.csv"]):
        body = manifest(f"secret_{i}", location, "evilcorp", basis="public-interest", format="csv")
        refused_alike(site.register(site.steward_evil, body))


def test_a_symlink_planted_after_registration_serves_nothing_of_aphp(site: Site):
    own = site.evil / "ds"
    write_parquet(own / "own.parquet", EVIL_ROWS)
    body = manifest("evil_own", f"file://{own}/", "evilcorp", basis="public-interest", diagnosis="non-personal")
    resp = site.register(site.steward_evil, body)
    assert resp.status == 201, resp.text
    grant = http("POST", site.gw.url("/api/v1/datasets/evil_own/permits"), key=site.steward_evil,
                 body={"org": "evilcorp", "purpose": PURPOSE})
    assert grant.status == 201, grant.text
    table = site.pull("evil_own")
    assert sorted(table.column("diagnosis").to_pylist()) == ["flu"] * len(EVIL_ROWS)
    # Now a link to aphp's file appears inside evilcorp's registered directory.
    os.symlink(site.aphp / "hiv" / "hiv.parquet", own / "zz-aphp.parquet")
    try:
        try:
            table = site.pull("evil_own")
        except flight.FlightError as exc:  # the scan refuses the linked file
            assert "HIV" not in str(exc)
        else:
            assert "HIV" not in table.column("diagnosis").to_pylist(), "a symlink served another controller's rows"
            assert table.num_rows == len(EVIL_ROWS)
    finally:
        (own / "zz-aphp.parquet").unlink()
    assert site.pull("evil_own").num_rows == len(EVIL_ROWS), "its own data is served again once the link is gone"


def test_locations_are_stored_in_their_canonical_spelling(site: Site):
    own = site.evil / "canon"
    write_parquet(own / "c.parquet", EVIL_ROWS)
    body = manifest("evil_canon", f"file://{site.evil}//canon/./", "evilcorp", basis="public-interest")
    resp = site.register(site.steward_evil, body)
    assert resp.status == 201, resp.text
    assert resp.body["location"] == f"file://{own}/", resp.body
    shown = http("GET", site.gw.url("/api/v1/datasets/evil_canon"), key=site.steward_evil).body
    assert shown["location"] == f"file://{own}/", shown
    # aphp's steward may still register inside its own location, but not over evilcorp's dataset.
    refused_alike(site.register(site.steward_fr, manifest("aphp_grab", f"file://{own}/", "aphp", basis="consent")))


def test_another_controllers_name_is_never_echoed(site: Site):
    """A clash says only that the name is taken, never whose dataset, store or location it is."""
    own = site.evil / "clash"
    write_parquet(own / "x.parquet", EVIL_ROWS)
    resp = site.register(site.steward_evil, manifest("aphp_hiv", f"file://{own}/", "evilcorp",
                                                     basis="public-interest"))
    body = assert_json_error(resp, 409)
    assert str(site.aphp) not in json.dumps(body) and "consent" not in body["error"], body


def test_an_http_store_reaches_only_its_declared_base(site: Site):
    for location in ["http://127.0.0.1:9/other/x.parquet", "http://127.0.0.1:8080/base/x.parquet",
                     "http://169.254.169.254/base/latest/meta-data", "http://localhost:9/base/x.parquet",
                     "http://127.0.0.1:9/basement/x.parquet"]:
        body = manifest("evil_web", location, "evilcorp", basis="public-interest", store="web")
        refused_alike(site.register(site.steward_evil, body))
    # Dot segments are refused as malformed before any location is looked at, also percent-encoded.
    for location in ["http://127.0.0.1:9/base/../other/x.parquet", "http://127.0.0.1:9/base/%2E%2E/other/x.parquet"]:
        body = manifest("evil_web", location, "evilcorp", basis="public-interest", store="web")
        err = assert_json_error(site.register(site.steward_evil, body), 400)
        assert "`..` are not allowed" in err["error"], err
    # Inside the base the location is admitted and the source is then read (nothing listens on port 9).
    body = manifest("evil_web", "http://127.0.0.1:9/base/x.parquet", "evilcorp", basis="public-interest", store="web")
    err = assert_json_error(site.register(site.steward_evil, body), 400)
    assert "not available for registration" not in err["error"], err
    # A file location named with a store, or an object-store one without, is refused the same way.
    body = manifest("evil_web", f"file://{site.evil}/ds/", "evilcorp", basis="public-interest", store="web")
    assert_json_error(site.register(site.steward_evil, body), 400)


def test_config_locations_are_checked_at_start(passerelle_bin: Path, tmp_path: Path):
    for section, needle in [
        ('[locations.a]\nurl = "file:///srv/"\ncontrollers = ["a"]\n[locations.b]\nurl = "/srv/b/"\ncontrollers = ["b"]',
         "overlaps"),
        ('[locations.a]\nurl = "s3://bucket/p/"\ncontrollers = ["a"]', "store"),
        ('[locations.a]\nurl = "s3://bucket/p/"\nstore = "nope"\ncontrollers = ["a"]', "not configured"),
        ('[locations.a]\nurl = "/srv/"\ncontrollers = []', "controllers"),
        ('[locations.a]\nurl = "ftp://host/p/"\ncontrollers = ["a"]', "not supported"),
    ]:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(section + "\n")
        proc = subprocess.run([str(passerelle_bin), "--data-dir", str(tmp_path / "d"), "config", "show", "--config",
                               str(cfg)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, section
        assert needle in proc.stderr, (section, proc.stderr)


def start_plain(binary: Path, data_dir: Path) -> tuple[subprocess.Popen, dict]:
    """`passerelle serve` without the demo (so without any declared location)."""
    data_dir.mkdir(parents=True)
    log = open(data_dir.parent / "plain.log", "wb")
    proc = subprocess.Popen([str(binary), "serve", "--data-dir", str(data_dir), "--flight-addr", "127.0.0.1:0",
                             "--http-addr", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not (serve := _read_json_file(data_dir / "serve.json")) or not serve.get("http_addr"):
        assert proc.poll() is None, (data_dir.parent / "plain.log").read_text()
        assert time.monotonic() - t0 < STARTUP_DEADLINE
        time.sleep(0.05)
    return proc, serve


def test_without_declared_locations_only_the_operator_registers(passerelle_bin: Path, tmp_path: Path):
    data = tmp_path / "data"
    proc, serve = start_plain(passerelle_bin, data)
    try:
        own = tmp_path / "own"
        write_parquet(own / "x.parquet", EVIL_ROWS)
        steward = json.loads(run_cli(passerelle_bin, data, "principal", "add", "--name", "s", "--org", "org1",
                                     "--member-state", "FR", "--role", "steward", "--json").stdout)["key"]
        body = manifest("steward_try", f"file://{own}/", "org1", basis="public-interest")
        url = f"http://{serve['http_addr']}/api/v1/datasets"
        poll_until(lambda: http("GET", url, key=steward).status == 200, what="the new steward is known")
        err = assert_json_error(http("POST", url, key=steward, body=body), 400)
        assert "declares no storage locations" in err["error"] and "[locations" in err["hint"], err
        # The operator's CLI may register anywhere outside the data dir, canonicalised.
        toml = tmp_path / "m.toml"
        cols = "\n".join(f'{c} = {{ class = "{k}" }}' for c, k in
                         [("patient_id", "identifier"), ("diagnosis", "sensitive"), ("score", "non-personal")])

        def register(location: str, name: str):
            toml.write_text(f'name = "{name}"\nlocation = "{location}"\nformat = "parquet"\nmember_state = "FR"\n'
                            f'controller = "org1"\nsubject_column = "patient_id"\nlegal_basis = "consent"\n'
                            f'purposes = ["{PURPOSE}"]\n[columns]\n{cols}\n')
            return run_cli(passerelle_bin, data, "dataset", "register", "--manifest", str(toml), "--json",
                           check=False)

        ok = register(f"{tmp_path}/x/../own//", "op_ok")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["location"] == f"file://{own.resolve()}/", ok.stdout
        for i, location in enumerate(["/proc/self/environ", f"file://{data.resolve()}/node.key",
                                      f"/proc/self/root{data.resolve()}/passerelle.db"]):
            bad = register(location, f"op_bad_{i}")
            assert bad.returncode != 0, location
            assert "pseudo-filesystem" in bad.stderr or "not available" in bad.stderr, bad.stderr
    finally:
        stop_process(proc)


def test_registrations_allowed_and_refused_are_audited_with_the_location(site: Site):
    auditor = site.gw.keys["auditor-eu"]
    attack = f"{site.evil}/../aphp/hiv/hiv.parquet"
    refused_alike(site.register(site.steward_evil, manifest("evil_audited", attack, "evilcorp",
                                                           basis="public-interest")))
    rows = http("GET", site.gw.url("/api/v1/audit?dataset=evil_audited"), key=auditor).body
    assert [(r["action"], r["decision"], r["principal"]) for r in rows] == \
        [("register_dataset", "deny", "steward-evil")], rows
    assert rows[0]["statement"] == f"location {attack}", rows[0]
    ok = http("GET", site.gw.url("/api/v1/audit?dataset=aphp_hiv"), key=auditor).body
    registered = [r for r in ok if r["action"] == "register_dataset" and r["decision"] == "allow"]
    assert len(registered) == 1 and registered[0]["principal"] == "steward-fr", ok
    assert registered[0]["statement"] == f"location file://{site.aphp}/hiv/", registered[0]
    verify = http("GET", site.gw.url("/api/v1/audit/verify"), key=auditor)
    assert verify.status == 200 and verify.body.get("ok") is True, verify.text
