"""Telemetry records on the wire: what a device encodes, the collector decodes,
and anything else is refused with our error, never another exception."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.transport.errors import RemoteProtocolError
from edgeward.transport.wire import (
    CONFIRM_BUCKETS,
    MAX_HEARTBEAT_ENTRIES,
    RECORD_TYPES,
    Heartbeat,
    Record,
    decode,
    encode,
)

ALERT = Record(
    device="pos-0001",
    seq=42,
    time=1_790_000_000.25,
    type="alert",
    body={
        "policy": "pos-block-network-tools",
        "action": "Block",
        "severity": 7,
        "operation": "Process",
        "resource": "/usr/bin/curl",
        "source": "/bin/bash",
        "tags": ["MITRE"],
        "message": "network tool executed",
        "revision": 3,
    },
)


def test_a_record_survives_the_round_trip() -> None:
    assert Record.from_message(decode(ALERT.encode())) == ALERT


def test_a_record_names_its_message_id_and_routing_key_after_its_device() -> None:
    assert ALERT.message_id == "pos-0001:42"
    assert ALERT.routing_key == "telemetry.pos-0001.alert"


def test_alerts_and_agent_events_outrank_logs_when_the_outbox_must_drop() -> None:
    log = Record("pos-0001", 1, 0.0, "log")
    event = Record("pos-0001", 2, 0.0, "event", {"event": "gap"})
    assert log.priority < event.priority == ALERT.priority


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"seq": 0}, "malformed"),
        ({"seq": "7"}, "malformed"),
        ({"seq": True}, "malformed"),
        ({"device": ""}, "malformed"),
        ({"type": "heartbeat"}, "malformed"),
        ({"body": ["not", "a", "map"]}, "malformed"),
        ({"body": {1: "x"}}, "malformed"),
        ({"body": {"a": [{b"x": 1}]}}, "malformed"),  # the audit store keeps bodies as JSON
        ({"time": float("nan")}, "malformed"),
        ({"time": None}, "malformed"),
        ({"kind": "bundle"}, "unknown_kind"),
    ],
    ids=lambda v: str(v),
)
def test_a_record_that_does_not_hold_together_is_refused_by_reason(
    change: dict, reason: str
) -> None:
    obj = {**cbor2.loads(ALERT.encode()), **change}
    with pytest.raises(RemoteProtocolError) as refused:
        Record.from_message(decode(cbor2.dumps(obj)))
    assert refused.value.reason == reason


def test_a_record_of_another_schema_version_is_refused_before_its_fields() -> None:
    obj = {**cbor2.loads(ALERT.encode()), "v": 99}
    with pytest.raises(RemoteProtocolError) as refused:
        decode(cbor2.dumps(obj))
    assert refused.value.reason == "unknown_version"


def test_making_a_record_of_an_unknown_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        Record("pos-1", 1, 0.0, "heartbeat")


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
VALUES = st.recursive(
    SCALARS | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCALARS, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"v": st.just(1), "kind": st.just("record")},
        optional={
            "device": VALUES,
            "seq": VALUES,
            "time": VALUES,
            "type": st.sampled_from(sorted(RECORD_TYPES)) | VALUES,
            "body": VALUES,
        },
    )
)
def test_any_record_shaped_map_decodes_or_is_refused_with_our_error(obj: dict) -> None:
    try:
        data = cbor2.dumps(obj)
    except (ValueError, TypeError):
        return  # not encodable (e.g. an unhashable map key): nothing to send
    try:
        record = Record.from_message(decode(data))
    except RemoteProtocolError:
        return
    assert record.seq >= 1 and record.device and record.type in RECORD_TYPES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_decode_or_are_refused_with_our_error(data: bytes) -> None:
    try:
        Record.from_message(decode(data))
    except RemoteProtocolError:
        pass


def test_a_heartbeat_carries_outbox_depth_and_drops_by_type() -> None:
    beat = Heartbeat("pos-1", 1.0, 3, 3, "abc", "ok", outbox=12, dropped={"log": 4})
    assert Heartbeat.from_message(decode(beat.encode())) == beat


def test_a_heartbeat_carries_the_confirm_latency_counts_since_the_last_one() -> None:
    confirms = tuple(range(len(CONFIRM_BUCKETS) + 1))
    beat = Heartbeat("pos-1", 1.0, 3, 3, "abc", "ok", confirms=confirms, confirm_seconds=2.5)
    assert Heartbeat.from_message(decode(beat.encode())) == beat


@pytest.mark.parametrize(
    "change",
    [
        {"dropped": {"log": "many"}},
        {"rejected": {"stale": 1.5}},
        {"outbox": "3"},
        {"dropped": []},
        {"confirms": [1, 2, 3]},
        {"confirms": [-1] * 13},
        {"confirms": "13"},
        {"confirm_seconds": -1.0},
        {"confirm_seconds": float("nan")},
        {"gaps": "x"},  # these six used to escape as ValueError or pass as garbage
        {"awaiting_snapshot": "no"},
        {"labels": {"store": 7}},
        {"error": ["x"]},
        {"time": float("inf")},
        {"rejected": {f"r{i}": 1 for i in range(MAX_HEARTBEAT_ENTRIES + 1)}},
    ],
    ids=lambda change: str(change)[:40],
)
def test_a_heartbeat_with_a_field_of_the_wrong_type_is_refused(change: dict) -> None:
    obj = {**cbor2.loads(Heartbeat("pos-1", 1.0, 3, 3, "abc", "ok").encode()), **change}
    with pytest.raises(RemoteProtocolError) as refused:
        Heartbeat.from_message(decode(encode(obj)))
    assert refused.value.reason == "malformed"
