"""gRPC status codes of the Flight service, checked by pyarrow's exact exception class (see STATUS_EXCEPTION in
conftest.py) and, where the contract says the message names something, by a message fragment. A precise class check
also proves the status is never INTERNAL."""

from __future__ import annotations

import pyarrow.flight as flight
import pytest

from conftest import (DATASET, OTHER_PURPOSE, PURPOSE, PURPOSE_HEADER, SUB_PURPOSE, Gateway, call_options,
                      command_descriptor, expect_status, path_descriptor)

UNKNOWN = "no_such_dataset"


@pytest.fixture
def ticket(gateway: Gateway, client: flight.FlightClient) -> flight.Ticket:
    """A valid ticket of trainer-de for research/ai-training (a small command)."""
    info = client.get_flight_info(command_descriptor(columns=["hba1c"], limit=5),
                                  call_options(gateway.keys["trainer-de"]))
    assert len(info.endpoints) >= 1
    return info.endpoints[0].ticket


def _calls(client: flight.FlightClient, opts: flight.FlightCallOptions, ticket: flight.Ticket):
    """The four data RPCs, as (rpc name, thunk)."""
    return [
        ("list_flights", lambda: list(client.list_flights(b"", opts))),
        ("get_flight_info", lambda: client.get_flight_info(path_descriptor(), opts)),
        ("get_schema", lambda: client.get_schema(path_descriptor(), opts)),
        ("do_get", lambda: client.do_get(ticket, opts).read_all()),
    ]


def test_ticket_owner_can_read(gateway: Gateway, client, ticket):
    """Positive control for the ticket denials below."""
    assert client.do_get(ticket, call_options(gateway.keys["trainer-de"])).read_all().num_rows == 5


# ---------------------------------------------------------------------------------------------- UNAUTHENTICATED

@pytest.mark.parametrize("rpc", ["list_flights", "get_flight_info", "get_schema", "do_get"])
@pytest.mark.parametrize("credential", ["none", "wrong-key", "bearer-without-key", "not-bearer"])
def test_missing_or_wrong_key_is_unauthenticated(gateway: Gateway, client, ticket, rpc, credential):
    if credential == "none":
        opts = call_options(None)
    elif credential == "wrong-key":
        opts = call_options("not-a-valid-key-" + "x" * 32)
    elif credential == "bearer-without-key":  # no trailing space: HTTP/2 forbids it in header values
        opts = call_options("Bearer", bearer=False)
    else:  # the right key without the Bearer scheme
        opts = call_options(gateway.keys["trainer-de"], bearer=False)
    expect_status("UNAUTHENTICATED", dict(_calls(client, opts, ticket))[rpc], rpc=rpc)


# ------------------------------------------------------------------------------------------- INVALID_ARGUMENT

@pytest.mark.parametrize("rpc", ["list_flights", "get_flight_info", "get_schema", "do_get"])
def test_missing_purpose_header_is_invalid_argument_naming_it(gateway: Gateway, client, ticket, rpc):
    opts = call_options(gateway.keys["trainer-de"], purpose=None)
    expect_status("INVALID_ARGUMENT", dict(_calls(client, opts, ticket))[rpc], rpc=rpc, fragment=PURPOSE_HEADER)


@pytest.mark.parametrize("command", [b"{not json", b"[1, 2]", b'{"dataset": 42}', b""],
                         ids=["not-json", "not-an-object", "dataset-not-a-string", "empty"])
@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
def test_malformed_command_is_invalid_argument(gateway: Gateway, client, rpc, command):
    desc = flight.FlightDescriptor.for_command(command)
    opts = call_options(gateway.keys["trainer-de"])
    expect_status("INVALID_ARGUMENT", lambda: getattr(client, rpc)(desc, opts), rpc=rpc)


@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
def test_unknown_column_is_invalid_argument(gateway: Gateway, client, rpc):
    desc = command_descriptor(columns=["hba1c", "no_such_column"])
    opts = call_options(gateway.keys["trainer-de"])
    expect_status("INVALID_ARGUMENT", lambda: getattr(client, rpc)(desc, opts), rpc=rpc)


@pytest.mark.parametrize("flt", ["hba1c >>> 7", "hba1c >", "no_such_column > 1", "hba1c > 7; DROP TABLE x"])
def test_bad_filter_is_invalid_argument(gateway: Gateway, client, flt):
    opts = call_options(gateway.keys["trainer-de"])

    def call():
        info = client.get_flight_info(command_descriptor(columns=["hba1c"], filter=flt), opts)
        return [client.do_get(ep.ticket, opts).read_all() for ep in info.endpoints]

    expect_status("INVALID_ARGUMENT", call)


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("how", ["last-byte", "middle-byte", "first-byte", "truncated", "garbage", "empty"])
def test_tampered_or_garbage_ticket_is_invalid_argument(gateway: Gateway, client, ticket, how):
    raw = ticket.ticket
    forged = {
        "last-byte": lambda: _flip(raw, len(raw) - 1),
        "middle-byte": lambda: _flip(raw, len(raw) // 2),
        "first-byte": lambda: _flip(raw, 0),
        "truncated": lambda: raw[: len(raw) // 2],
        "garbage": lambda: b"garbage\x00\xff not a ticket",
        "empty": lambda: b"",
    }[how]()
    assert forged != raw
    opts = call_options(gateway.keys["trainer-de"])
    expect_status("INVALID_ARGUMENT", lambda: client.do_get(flight.Ticket(forged), opts).read_all())


# ------------------------------------------------------------------------------------------------- NOT_FOUND

def _not_found(client, key: str, dataset: str, rpc: str, purpose: str = PURPOSE) -> str:
    opts = call_options(key, purpose)
    desc = path_descriptor(dataset)
    msg = expect_status("NOT_FOUND", lambda: getattr(client, rpc)(desc, opts), rpc=rpc)
    assert msg, "NOT_FOUND should carry a message"
    return msg.replace(dataset, "<dataset>")


@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
def test_unknown_and_invisible_datasets_are_the_same_not_found(gateway: Gateway, client, second_org, rpc):
    """A dataset the caller may not see (its organisation neither controls it nor holds a permit) gets exactly the
    NOT_FOUND an unknown one gets (messages compared with the dataset name masked)."""
    k = gateway.keys
    messages = {
        "trainer-de, unknown": _not_found(client, k["trainer-de"], UNKNOWN, rpc),
        "steward-fr, unknown": _not_found(client, k["steward-fr"], UNKNOWN, rpc),
        "trainer-noperm, unknown": _not_found(client, second_org["noperm"], UNKNOWN, rpc),
        "trainer-noperm, demo_patients (invisible)": _not_found(client, second_org["noperm"], DATASET, rpc),
    }
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
@pytest.mark.parametrize("who", ["steward-fr", "auditor-eu"])
def test_roles_that_see_but_may_not_pull_are_permission_denied(gateway: Gateway, client, who, rpc):
    """The controller's steward and the auditor may know demo_patients exists (it is not hidden from them), but only
    trainers pull data: PERMISSION_DENIED, which the privacy rule allows for datasets the caller can see."""
    opts = call_options(gateway.keys[who])
    expect_status("PERMISSION_DENIED", lambda: getattr(client, rpc)(path_descriptor(), opts), rpc=rpc)


def test_unknown_dataset_in_a_command_is_not_found(gateway: Gateway, client):
    opts = call_options(gateway.keys["trainer-de"])
    expect_status("NOT_FOUND", lambda: client.get_flight_info(command_descriptor(UNKNOWN, columns=["hba1c"]), opts))


# ----------------------------------------------------------------------------------------- PERMISSION_DENIED

@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
def test_purpose_not_permitted_is_permission_denied(gateway: Gateway, client, rpc):
    opts = call_options(gateway.keys["trainer-de"], OTHER_PURPOSE)
    expect_status("PERMISSION_DENIED", lambda: getattr(client, rpc)(path_descriptor(), opts), rpc=rpc)


@pytest.mark.parametrize("rpc", ["get_flight_info", "get_schema"])
@pytest.mark.parametrize("columns", [["full_name"], ["patient_id", "full_name", "hba1c"]])
def test_direct_identifier_column_is_permission_denied_naming_it(gateway: Gateway, client, rpc, columns):
    opts = call_options(gateway.keys["trainer-de"])
    desc = command_descriptor(columns=columns)
    expect_status("PERMISSION_DENIED", lambda: getattr(client, rpc)(desc, opts), rpc=rpc, fragment="full_name")


def test_filter_on_a_direct_identifier_is_refused(gateway: Gateway, client):
    """A filter must not probe a hidden column (a side channel): refused as unknown column or as denied."""
    opts = call_options(gateway.keys["trainer-de"])

    def call():
        info = client.get_flight_info(command_descriptor(columns=["hba1c"], filter="full_name LIKE 'A%'"), opts)
        return [client.do_get(ep.ticket, opts).read_all() for ep in info.endpoints]

    try:
        expect_status("INVALID_ARGUMENT", call)
    except AssertionError:
        expect_status("PERMISSION_DENIED", call, fragment="full_name")


@pytest.mark.parametrize("thief", ["dkfz2", "embl", "steward-fr"])
def test_ticket_of_another_principal_is_permission_denied(gateway: Gateway, client, ticket, second_org, thief):
    key = second_org.get(thief) or gateway.keys[thief]
    expect_status("PERMISSION_DENIED", lambda: client.do_get(ticket, call_options(key)).read_all())


@pytest.mark.parametrize("purpose", [SUB_PURPOSE, OTHER_PURPOSE, "research"])
def test_ticket_with_another_purpose_is_permission_denied(gateway: Gateway, client, ticket, purpose):
    opts = call_options(gateway.keys["trainer-de"], purpose)
    expect_status("PERMISSION_DENIED", lambda: client.do_get(ticket, opts).read_all())
