"""Consent subject ids are byte-exact, through every ingestion path (issue #15, item 2).

No path (CSV and JSON Lines `consent import`, REST `POST /api/v1/consent/{registry}/events`, `consent withdraw`)
trims, case-folds or normalises a subject id: `carol` and `  carol  ` are two subjects, and so are NFC `élodie`
(U+00E9) and NFD `élodie` (`e` + U+0301). An integer subject column matches only the canonical decimal text of the
integer (`42`, `-5`), never `042`, ` 42`, `+42` or `42 `. An empty or over-long (> 256 bytes) id is refused with its
line (file) or event (REST) number, and nothing of the file or request is imported.

This module runs its own demo node, whose configuration declares a storage location for small Parquet datasets
written here (REST registration by a steward needs one). Each ingestion path gets datasets of its own, each with its
own consent registry, so the tests are independent of each other's consent:
- `twins_<path>`: a Utf8 subject column holding near-twins of `carol` and an NFC/NFD pair, two rows each;
- `ints_<path>`: an Int64 subject column (42, -5, 7, 0);
- `pi_<path>`: an Int64 subject column under `legal_basis = "public-interest"` (rows kept unless the subject
  objected), to show a withdrawal spelled `042` is not subject 42's objection;
- `refuse_<path>`: subjects for the refusal tests.
Every row carries a non-personal `tag` column naming its subject, since the subject column itself is released as a
pseudonym. A trainer of its own organisation pulls each dataset over Flight with pyarrow, for two purposes (two
independent consent channels), and the test compares the multiset of released tags with the expected one.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import (OTHER_PURPOSE, PSEUDONYM_RE, PURPOSE, Gateway, assert_json_error, call_options, http,
                      listed_datasets, path_descriptor, poll_until, pull, rfc3339, run_cli, start_gateway,
                      stop_process)

TRAINER = "trainer-ids"
TRAINER_ORG = "ids-lab"
STEWARD = "steward-fr"
CONTROLLER = "aphp"
PURPOSES = (PURPOSE, OTHER_PURPOSE)
ROWS_PER_SUBJECT = 2
# Not a propagation-latency test (test_consent_live.py is): leave room for a loaded 2-core machine.
DEADLINE = 10.0

# tag -> subject id of the Utf8 dataset.
TWINS = {
    "plain": "carol",
    "padded": "  carol  ",
    "trail": "carol ",
    "lead": " carol",
    "tab": "carol\t",
    "nbsp": "carol\u00a0",
    "upper": "Carol",
    "nfc": "\u00e9lodie",
    "nfd": "e\u0301lodie",
    "long256": "\u00e9" * 128,  # 256 bytes: the longest id accepted
}
assert len(TWINS["long256"].encode()) == 256
# Twins granted per purpose, in opposite directions: for PURPOSE the padded `carol`, `Carol` and the NFD name (and
# the 256-byte id), for OTHER_PURPOSE the plain `carol` and the NFC name. The other twins are never granted.
GRANTED = {PURPOSE: ["padded", "nfd", "upper", "long256"], OTHER_PURPOSE: ["plain", "nfc"]}

# tag -> subject id of the Int64 datasets.
INTS = {"42": 42, "-5": -5, "7": 7, "0": 0}
# Spellings that are not the canonical decimal text of 42 (or 0): other subjects, which no integer names.
NOT_42 = ["042", " 42", "+42", "42 ", "0042", "42.0", "\u0664\u0662"]  # the last: Arabic-Indic digits 4 2
NOT_0 = ["-0", "00", "+0"]

# Ids that must be refused: (label, id, fragment of the message).
EMPTY = ("empty", "", "subject_id is empty")
LONG_ASCII = ("257-ascii", "x" * 257, "longer than 256 bytes")
# 129 characters but 257 bytes; cut to 256 bytes it would be the `long256` subject.
LONG_UTF8 = ("257-utf8", "\u00e9" * 128 + "a", "longer than 256 bytes")
BAD_IDS = [EMPTY, LONG_ASCII, LONG_UTF8]

# CSV: plain fields with LF line ends; every field quoted, LF; every field quoted, CRLF (as spreadsheets export).
FILE_PATHS = ["csv", "csv-quoted", "csv-crlf", "jsonl", "rest"]
ALL_PATHS = FILE_PATHS + ["withdraw"]


def grant_time() -> str:
    """A grant time safely in the past (events dated in the future are refused), before any CLI withdrawal."""
    return rfc3339(datetime.now(timezone.utc) - timedelta(minutes=10))


# ---------------------------------------------------------------------------------------------------------------------
# The node, its datasets and the trainer
# ---------------------------------------------------------------------------------------------------------------------


class Node:
    def __init__(self, gw: Gateway, files: Path, tmp: Path):
        self.gw = gw
        self.files = files
        self.tmp = tmp
        self.client = gw.connect()
        self.registered: set[str] = set()
        self._n = 0

    @property
    def trainer(self) -> str:
        return self.gw.keys[TRAINER]

    def scratch_file(self, suffix: str) -> Path:
        self._n += 1
        return self.tmp / f"events-{self._n}{suffix}"

    def dataset(self, name: str, subjects: dict[str, str | int], *, legal_basis: str = "consent") -> str:
        """Writes `subjects` (tag -> id, ROWS_PER_SUBJECT rows each) as Parquet under the declared location, registers
        it over REST as the steward with its own consent registry, and permits the trainer for both purposes."""
        if name in self.registered:
            return name
        ints = all(isinstance(v, int) for v in subjects.values())
        sids = [v for v in subjects.values() for _ in range(ROWS_PER_SUBJECT)]
        tags = [t for t in subjects for _ in range(ROWS_PER_SUBJECT)]
        table = pa.table({"sid": pa.array(sids, pa.int64() if ints else pa.string()), "tag": pa.array(tags)})
        d = self.files / name
        d.mkdir()
        pq.write_table(table, d / "part-0.parquet")
        manifest = {
            "name": name, "location": f"file://{d}/", "format": "parquet", "member_state": "FR",
            "controller": CONTROLLER, "subject_column": "sid", "legal_basis": legal_basis,
            "consent_registry": registry(name), "purposes": list(PURPOSES),
            "columns": {"sid": {"class": "identifier"}, "tag": {"class": "non-personal"}},
        }
        steward = self.gw.keys[STEWARD]
        resp = http("POST", self.gw.url("/api/v1/datasets"), key=steward, body=manifest)
        assert resp.status == 201, f"registering {name}: {resp.status} {resp.text[:800]}"
        for purpose in PURPOSES:
            resp = http("POST", self.gw.url(f"/api/v1/datasets/{name}/permits"), key=steward,
                        body={"org": TRAINER_ORG, "purpose": purpose})
            assert resp.status == 201, f"permit on {name}: {resp.status} {resp.text[:800]}"
        self.registered.add(name)
        return name

    def released(self, dataset: str, purpose: str) -> Counter:
        """The multiset of tags the trainer receives, checking that the subject column went out as a pseudonym that
        is one per subject (twins are different subjects: different pseudonyms)."""
        table = pull(self.client, call_options(self.trainer, purpose), path_descriptor(dataset)).table
        assert table.schema.names == ["sid", "tag"], table.schema
        rows = table.to_pylist()
        by_tag: dict[str, set[str]] = {}
        for r in rows:
            assert isinstance(r["sid"], str) and PSEUDONYM_RE.match(r["sid"]), f"not a pseudonym: {r}"
            by_tag.setdefault(r["tag"], set()).add(r["sid"])
        for tag, pseudonyms in by_tag.items():
            assert len(pseudonyms) == 1, f"{dataset}: subject {tag} released under several pseudonyms {pseudonyms}"
        owners: dict[str, str] = {}
        for tag, (p,) in by_tag.items():
            assert p not in owners, f"{dataset}: subjects {owners[p]!r} and {tag!r} share the pseudonym {p}"
            owners[p] = tag
        return Counter(r["tag"] for r in rows)

    def wait_released(self, dataset: str, purpose: str, tags: list[str] | set[str], what: str) -> None:
        """Polls until the trainer receives exactly the rows of `tags` (a change may take up to a second to reach the
        server, and a leak keeps the release from ever matching)."""
        expected = Counter({t: ROWS_PER_SUBJECT for t in tags})
        last: list[Counter] = []

        def matches() -> bool:
            last[:] = [self.released(dataset, purpose)]
            return last[0] == expected

        try:
            poll_until(matches, deadline=DEADLINE, interval=0.1, what=what)
        except AssertionError:
            got = last[0] if last else Counter()
            raise AssertionError(
                f"{what}: {dataset} for {purpose} released {sorted(got.elements())}, expected exactly "
                f"{sorted(expected.elements())} (unexpected: {sorted((got - expected).elements())}, missing: "
                f"{sorted((expected - got).elements())})") from None

    # ------------------------------------------------------------------------------------------------- ingestion

    def ingest(self, path: str, dataset: str, events: list[tuple[str | int, str, str]]) -> None:
        """Records `events` (subject, purpose, status) in the dataset's registry through `path`; must succeed."""
        ok, message = self.try_ingest(path, dataset, events)
        assert ok, f"{path}: import refused: {message}"

    def try_ingest(self, path: str, dataset: str, events: list[tuple[str | int, str, str]]) -> tuple[bool, str]:
        """(accepted, error message) of one import (or one `consent withdraw` per event, in order)."""
        reg = registry(dataset)
        ts = grant_time()
        if path == "withdraw":
            for subject, purpose, status in events:
                assert status == "withdrawn"
                proc = run_cli(self.gw.bin, self.gw.data_dir, "consent", "withdraw", "--registry", reg,
                               f"--subject={subject}", "--purpose", purpose, check=False)
                if proc.returncode != 0:
                    return False, cli_error(proc.stderr)
            return True, ""
        if path == "rest":
            body = [{"subject_id": s, "purpose": p, "status": st, "timestamp": ts} for s, p, st in events]
            resp = http("POST", self.gw.url(f"/api/v1/consent/{reg}/events"), key=self.gw.keys[STEWARD], body=body)
            if resp.status == 201:
                assert resp.body.get("accepted") == len(events), resp.body
                return True, ""
            err = assert_json_error(resp, 400)
            return False, err["error"]
        if path == "jsonl":
            f = self.scratch_file(".jsonl")
            # Raw UTF-8 here (the REST path sends \u escapes): NFC and NFD must survive both.
            f.write_text("".join(json.dumps({"subject_id": s, "purpose": p, "status": st, "timestamp": ts},
                                            ensure_ascii=False) + "\n" for s, p, st in events), encoding="utf-8")
        else:
            quoted = path in ("csv-quoted", "csv-crlf")
            for s, _, _ in events:
                assert quoted or not any(c in str(s) for c in ',"\n'), f"{s!r} needs quoting"
            f = self.scratch_file(".csv")
            lines = ["subject_id,purpose,status,timestamp"]
            lines += [",".join(csv_field(str(v), quoted) for v in (s, p, st, ts)) for s, p, st in events]
            eol = "\r\n" if path == "csv-crlf" else "\n"
            f.write_bytes((eol.join(lines) + eol).encode())
        proc = run_cli(self.gw.bin, self.gw.data_dir, "consent", "import", "--registry", reg, "--file", str(f),
                       "--json", check=False)
        if proc.returncode != 0:
            return False, cli_error(proc.stderr)
        out = json.loads(proc.stdout)
        assert out.get("imported") == len(events), out
        return True, ""


def cli_error(stderr: str) -> str:
    """The CLI's error message without the backtrace RUST_BACKTRACE may add."""
    return stderr.split("\n\nStack backtrace:")[0].strip()


def csv_field(value: str, quoted: bool) -> str:
    return '"' + value.replace('"', '""') + '"' if quoted else value


def registry(dataset: str) -> str:
    return "reg-" + dataset.replace("_", "-")


def ds_name(kind: str, path: str) -> str:
    return f"{kind}_{path.replace('-', '_')}"


@pytest.fixture(scope="module")
def node(passerelle_bin: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("consent-ids").resolve()
    files = base / "ids"
    files.mkdir()
    tmp = base / "events"
    tmp.mkdir()
    config = base / "passerelle.toml"
    config.write_text(f'[locations.ids]\nurl = "file://{files}/"\ncontrollers = ["{CONTROLLER}"]\n')
    gw = start_gateway(passerelle_bin, base / "data", demo_rows=200, config=config)
    n = Node(gw, files, tmp)
    try:
        gw.add_principal(TRAINER, TRAINER_ORG, "DE", "trainer")
        probe = n.dataset("ids_probe", {"p": "p"})

        def known():
            try:
                return listed_datasets(n.client, call_options(n.trainer)) == [probe]
            except flight.FlightUnauthenticatedError:
                return False

        poll_until(known, deadline=DEADLINE, what=f"{TRAINER} is known and lists {probe}")
        yield n
    finally:
        n.client.close()
        died = gw.proc.poll()
        rc = stop_process(gw.proc)
        if died is not None:
            raise AssertionError(f"passerelle serve (consent ids) died during the tests with exit code {died}; "
                                 f"log tail:\n{gw.log_tail()}")
        if rc is None:
            raise AssertionError(f"passerelle serve (consent ids) ignored SIGTERM and was killed; log tail:\n"
                                 f"{gw.log_tail()}")


# ---------------------------------------------------------------------------------------------------------------------
# String twins
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FILE_PATHS)
def test_grants_release_exactly_the_twin_spelled(node: Node, path: str):
    """One import grants, for PURPOSE, `  carol  `, NFD `élodie`, `Carol` and a 256-byte id, and for OTHER_PURPOSE
    the plain `carol` and NFC `élodie`. Each purpose releases exactly the rows of the ids spelled, none of their
    twins (`carol `, ` carol`, `carol<TAB>`, `carol<NBSP>` are never granted)."""
    ds = node.dataset(ds_name("twins", path), TWINS)
    for purpose in PURPOSES:
        node.wait_released(ds, purpose, [], "precondition: no consent, no row")
    events = [(TWINS[t], p, "granted") for p, tags in GRANTED.items() for t in tags]
    node.ingest(path, ds, events)
    for purpose, tags in GRANTED.items():
        node.wait_released(ds, purpose, tags, f"{path}: grants spelled {[TWINS[t] for t in tags]!r}")


def test_withdrawals_remove_exactly_the_twin_spelled(node: Node):
    """Every twin granted for both purposes (REST); `consent withdraw` of `  carol  ` and NFD `élodie` for PURPOSE,
    of `carol` and NFC `élodie` for OTHER_PURPOSE, removes exactly those subjects."""
    ds = node.dataset(ds_name("twins", "withdraw"), TWINS)
    node.ingest("rest", ds, [(s, p, "granted") for s in TWINS.values() for p in PURPOSES])
    for purpose in PURPOSES:
        node.wait_released(ds, purpose, set(TWINS), "precondition: every twin granted")
    node.ingest("withdraw", ds, [(TWINS[t], p, "withdrawn") for p, tags in GRANTED.items() for t in tags])
    for purpose, tags in GRANTED.items():
        node.wait_released(ds, purpose, set(TWINS) - set(tags),
                           f"withdrawals spelled {[TWINS[t] for t in tags]!r}")


@pytest.mark.parametrize("path", FILE_PATHS)
def test_withdrawals_through_imports_remove_exactly_the_twin_spelled(node: Node, path: str):
    """The same withdrawals as above, as `withdrawn` events of a CSV/JSON Lines import or a REST request (dated after
    the grants: the grants are made ten minutes earlier still)."""
    ds = node.dataset(ds_name("twinsw", path), TWINS)
    early = rfc3339(datetime.now(timezone.utc) - timedelta(minutes=20))
    body = [{"subject_id": s, "purpose": p, "status": "granted", "timestamp": early}
            for s in TWINS.values() for p in PURPOSES]
    resp = http("POST", node.gw.url(f"/api/v1/consent/{registry(ds)}/events"), key=node.gw.keys[STEWARD], body=body)
    assert resp.status == 201, resp.text[:500]
    for purpose in PURPOSES:
        node.wait_released(ds, purpose, set(TWINS), "precondition: every twin granted")
    node.ingest(path, ds, [(TWINS[t], p, "withdrawn") for p, tags in GRANTED.items() for t in tags])
    for purpose, tags in GRANTED.items():
        node.wait_released(ds, purpose, set(TWINS) - set(tags),
                           f"{path}: withdrawals spelled {[TWINS[t] for t in tags]!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Integer subject columns
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FILE_PATHS)
def test_integer_column_matches_only_canonical_decimal_text(node: Node, path: str):
    """Grants spelled `042`, ` 42`, `+42`, `42 `, `0042`, `42.0`, Arabic-Indic `٤٢` (and `-0`, `00`, `+0` for 0)
    release nothing of subjects 42 and 0, while `-5` in the same import releases -5. Then `42` releases 42 (JSON
    paths send it as a JSON number)."""
    ds = node.dataset(ds_name("ints", path), INTS)
    node.wait_released(ds, PURPOSE, [], "precondition: no consent, no row")
    node.ingest(path, ds, [(s, PURPOSE, "granted") for s in NOT_42 + NOT_0 + ["-5"]])
    node.wait_released(ds, PURPOSE, ["-5"], f"{path}: grants spelled {NOT_42 + NOT_0!r} and '-5'")
    node.ingest(path, ds, [(42 if path in ("jsonl", "rest") else "42", PURPOSE, "granted")])
    node.wait_released(ds, PURPOSE, ["-5", "42"], f"{path}: a grant spelled '42'")
    node.wait_released(ds, OTHER_PURPOSE, [], f"{path}: grants for {PURPOSE} only")


def test_integer_column_withdrawals_match_only_canonical_decimal_text(node: Node):
    """42, -5, 7 and 0 granted; `consent withdraw` of every other spelling of 42 and 0 removes nothing of them,
    `-5` removes -5, then `42` removes 42."""
    ds = node.dataset(ds_name("ints", "withdraw"), INTS)
    node.ingest("rest", ds, [(v, PURPOSE, "granted") for v in INTS.values()])
    node.wait_released(ds, PURPOSE, set(INTS), "precondition: every subject granted")
    node.ingest("withdraw", ds, [(s, PURPOSE, "withdrawn") for s in NOT_42 + NOT_0 + ["-5"]])
    node.wait_released(ds, PURPOSE, {"42", "7", "0"}, f"withdrawals spelled {NOT_42 + NOT_0!r} and '-5'")
    node.ingest("withdraw", ds, [("42", PURPOSE, "withdrawn")])
    node.wait_released(ds, PURPOSE, {"7", "0"}, "a withdrawal spelled '42'")


@pytest.mark.parametrize("path", ALL_PATHS)
def test_public_interest_objection_needs_the_canonical_spelling(node: Node, path: str):
    """Under public interest every row is released unless its subject objected (withdrew). Objections spelled `042`,
    ` 42`, `+42`, … are not subject 42's objection (nor `-0`, `00` subject 0's); `-5` objects for -5, and then `42`
    for 42."""
    ds = node.dataset(ds_name("pi", path), INTS, legal_basis="public-interest")
    node.wait_released(ds, PURPOSE, set(INTS), "precondition: public interest, no objection")
    node.ingest(path, ds, [(s, PURPOSE, "withdrawn") for s in NOT_42 + NOT_0 + ["-5"]])
    node.wait_released(ds, PURPOSE, {"42", "7", "0"}, f"{path}: objections spelled {NOT_42 + NOT_0!r} and '-5'")
    node.ingest(path, ds, [(42 if path in ("jsonl", "rest") else "42", PURPOSE, "withdrawn")])
    node.wait_released(ds, PURPOSE, {"7", "0"}, f"{path}: an objection spelled '42'")
    node.wait_released(ds, OTHER_PURPOSE, set(INTS), f"{path}: objections for {PURPOSE} only")


# ---------------------------------------------------------------------------------------------------------------------
# Refused ids
# ---------------------------------------------------------------------------------------------------------------------

REFUSE_SUBJECTS = {"long256": TWINS["long256"], **{f"good-{label}": f"good-{label}" for label, _, _ in BAD_IDS},
                   **{f"marker-{label}": f"marker-{label}" for label, _, _ in BAD_IDS}}


@pytest.mark.parametrize("bad", BAD_IDS, ids=[b[0] for b in BAD_IDS])
@pytest.mark.parametrize("path", FILE_PATHS)
def test_empty_or_overlong_id_refuses_the_whole_import(node: Node, path: str, bad):
    """A good grant, then a grant whose id is empty or 257 bytes long: the import is refused naming the bad line
    (CSV: line 3, after the header; JSON Lines: line 2) or event (REST: event 1), and the good grant is not imported
    either. A later marker import proves the refused one had its chance to land. A 257-byte id is not cut to 256
    bytes (`é`×128 + `a` would then be the granted `long256` subject)."""
    label, bad_id, fragment = bad
    ds = node.dataset(ds_name("refuse", path), REFUSE_SUBJECTS)
    good, marker = f"good-{label}", f"marker-{label}"
    ok, message = node.try_ingest(path, ds, [(good, PURPOSE, "granted"), (bad_id, PURPOSE, "granted")])
    assert not ok, f"{path}: an import with a {label} subject id was accepted"
    where = {"csv": "line 3", "csv-quoted": "line 3", "csv-crlf": "line 3", "jsonl": "line 2", "rest": "event 1"}[path]
    assert where in message, f"{path}: the refusal should name {where!r}: {message!r}"
    assert fragment in message, f"{path}: the refusal should say {fragment!r}: {message!r}"

    node.ingest(path, ds, [(marker, PURPOSE, "granted")])

    def marker_seen():
        return node.released(ds, PURPOSE)[marker] == ROWS_PER_SUBJECT

    poll_until(marker_seen, deadline=DEADLINE, interval=0.1, what=f"{path}: marker {marker} released")
    got = node.released(ds, PURPOSE)
    assert got[good] == 0, f"{path}: the good line of a refused import was imported: {sorted(got.elements())}"
    assert got["long256"] == 0, f"{path}: a 257-byte id was cut to the 256-byte subject: {sorted(got.elements())}"


@pytest.mark.parametrize("bad", BAD_IDS, ids=[b[0] for b in BAD_IDS])
def test_consent_withdraw_refuses_empty_or_overlong_id(node: Node, bad):
    """`consent withdraw` with an empty or 257-byte subject fails and records nothing: the granted 256-byte subject
    (the 257-byte id cut to 256 bytes) and every other subject stay released, while a later marker withdrawal lands."""
    label, bad_id, fragment = bad
    ds = node.dataset(ds_name("refuse_withdraw", label), REFUSE_SUBJECTS)
    node.ingest("rest", ds, [(s, PURPOSE, "granted") for s in REFUSE_SUBJECTS.values()])
    node.wait_released(ds, PURPOSE, set(REFUSE_SUBJECTS), "precondition: every subject granted")
    ok, message = node.try_ingest("withdraw", ds, [(bad_id, PURPOSE, "withdrawn")])
    assert not ok, f"`consent withdraw` of a {label} subject id succeeded"
    assert fragment in message, f"the refusal should say {fragment!r}: {message[-500:]!r}"
    marker = f"marker-{label}"
    node.ingest("withdraw", ds, [(marker, PURPOSE, "withdrawn")])
    node.wait_released(ds, PURPOSE, set(REFUSE_SUBJECTS) - {marker},
                       f"the refused {label} withdrawal recorded nothing, the marker landed")
