"""REST API reads and the read-only CLI commands, on the demo server (no state is changed here)."""

from __future__ import annotations

import pytest

from conftest import DATASET, Gateway, assert_json_error, dataset_names, http, run_cli

BAD_KEY = "not-a-valid-key-" + "z" * 32


def test_healthz(gateway: Gateway):
    resp = http("GET", gateway.url("/healthz"))
    assert resp.status == 200, resp.text


@pytest.mark.parametrize("who", ["steward-fr", "trainer-de", "auditor-eu"])
def test_datasets_list_shows_demo_patients_to_those_who_may_see_it(gateway: Gateway, who):
    """The controller's steward, a permitted trainer and the auditor see it."""
    resp = http("GET", gateway.url("/api/v1/datasets"), key=gateway.keys[who])
    assert resp.status == 200, resp.text[:500]
    assert resp.headers.get("content-type", "").startswith("application/json")
    assert DATASET in dataset_names(resp.body)


def test_datasets_are_invisible_without_a_permit(gateway: Gateway, second_org):
    """An organisation without a permit sees no dataset, and asking for one by name is the 404 of an unknown one."""
    key = second_org["noperm"]
    resp = http("GET", gateway.url("/api/v1/datasets"), key=key)
    assert resp.status == 200, resp.text[:500]
    assert DATASET not in dataset_names(resp.body)
    hidden = assert_json_error(http("GET", gateway.url(f"/api/v1/datasets/{DATASET}"), key=key), 404)
    unknown = assert_json_error(http("GET", gateway.url("/api/v1/datasets/no_such_dataset"), key=key), 404)
    mask = {k: v.replace(DATASET, "<d>") for k, v in hidden.items()}
    assert mask == {k: v.replace("no_such_dataset", "<d>") for k, v in unknown.items()}


@pytest.mark.parametrize("path", ["/api/v1/datasets", f"/api/v1/datasets/{DATASET}", "/api/v1/audit"])
@pytest.mark.parametrize("key", [None, BAD_KEY], ids=["no-key", "bad-key"])
def test_rest_without_a_valid_key_is_401_json(gateway: Gateway, path, key):
    assert_json_error(http("GET", gateway.url(path), key=key), 401)


def test_dataset_show(gateway: Gateway):
    resp = http("GET", gateway.url(f"/api/v1/datasets/{DATASET}"), key=gateway.keys["steward-fr"])
    assert resp.status == 200, resp.text[:500]
    assert isinstance(resp.body, dict) and resp.body.get("name") == DATASET, resp.text[:500]
    assert "aphp-patients" in resp.text
    assert "research/ai-training" in resp.text


def test_dataset_show_unknown_is_404_json(gateway: Gateway):
    resp = http("GET", gateway.url("/api/v1/datasets/no_such_dataset"), key=gateway.keys["steward-fr"])
    assert_json_error(resp, 404)


def test_cli_dataset_list_and_show(gateway: Gateway):
    listed = gateway.cli_json("dataset", "list")
    assert DATASET in dataset_names(listed)
    shown = gateway.cli_json("dataset", "show", DATASET)
    assert isinstance(shown, dict) and shown.get("name") == DATASET, shown


def test_cli_dataset_show_unknown_fails(gateway: Gateway):
    proc = run_cli(gateway.bin, gateway.data_dir, "dataset", "show", "no_such_dataset", check=False)
    assert proc.returncode != 0
    assert "no_such_dataset" in proc.stderr
