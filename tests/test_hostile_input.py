"""Bad input never hurts: every decoder that sees bytes from outside either
decodes them or refuses them with our error and a reason to count, never
another exception, never a hang, never memory out of proportion.

The decoders: the CBOR envelope (``wire.decode``), bundle verification
(``SignedBundle`` + ``Verifier``/``CachingVerifier``), telemetry records and
heartbeats (``from_message``), and the policy YAML parser. Limits and where
they are enforced: docs/architecture.md, "Hostile input".
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgeward.actors.collector import Batch
from edgeward.actors.core import Ack, AgentCore, Apply, Delivery, LinkUp, Started
from edgeward.enforcement import policy
from edgeward.enforcement.digest import state_digest
from edgeward.enforcement.policy import PolicyValidationError, load_policy_files, parse_policies
from edgeward.transport import wire
from edgeward.transport.errors import MAX_DETAIL_CHARS, RemoteProtocolError
from edgeward.transport.signing import CachingVerifier, Signer, Verifier
from edgeward.transport.wire import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_RECORD_VALUES,
    MODES,
    Bundle,
    Heartbeat,
    Record,
    SignedBundle,
    decode,
    encode,
)

CBOR = settings(
    max_examples=150,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(CBOR, max_examples=40, deadline=timedelta(seconds=5))

SIGNER = Signer.generate()
TRUSTED = {SIGNER.key_id: SIGNER.public_b64}
POLICY = {
    "apiVersion": "security.kubearmor.com/v1",
    "kind": "KubeArmorHostPolicy",
    "metadata": {"name": "block-x"},
    "spec": {
        "nodeSelector": {"matchLabels": {"store": "berlin"}},
        "process": {"matchPaths": [{"path": "/usr/bin/x"}]},
        "action": "Block",
    },
}
VALID_ENVELOPE = SIGNER.sign(
    Bundle(1, 1.0, "delta", (POLICY,), sha256=state_digest([POLICY]))
).encode()


@pytest.fixture(autouse=True)
def no_test_hangs() -> Iterator[None]:
    """A hang fails the test instead of stopping the run (hypothesis's
    deadline only judges an example once it has returned)."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("hung for more than 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What a decoder made of its input: ("ok", repr) or ("refused", reason).
    Anything else it raises fails the test."""
    try:
        return "ok", repr(call())
    except RemoteProtocolError as exc:
        assert exc.reason and len(exc.detail) <= MAX_DETAIL_CHARS
        return "refused", exc.reason


def decode_measured(data: bytes) -> tuple[tuple[str, str], float, int]:
    """The outcome of decoding ``data``, the seconds it took and the peak
    bytes it allocated."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        verdict = outcome(lambda: decode(data))
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return verdict, elapsed, peak


def head(major: int, arg: int) -> bytes:
    """A CBOR item head in its shortest form."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * width):
            return bytes([major << 5 | info]) + arg.to_bytes(width, "big")
    raise ValueError(arg)


def envelope(**fields: Any) -> bytes:
    return cbor2.dumps({"v": 1, "kind": "record", **fields})


# -- strategies ------------------------------------------------------------------

# Bytes that look like CBOR: heads of every type (containers, tags, absurd
# lengths, indefinite lengths, reserved codes) mixed with fragments of real
# messages, so that most examples get past the first byte.
TOKENS = st.one_of(
    st.builds(head, st.integers(0, 7), st.integers(0, 30)),
    st.builds(head, st.sampled_from([2, 3, 4, 5, 6]), st.sampled_from([2**16, 2**31, 2**62])),
    st.sampled_from(
        [b"\x9f", b"\xbf", b"\x7f", b"\x5f", b"\xff", b"\xf7", b"\xf8\x10", b"\xfc", b"\x1c"]
        + [b"\xd8\x18", b"\xd8\x1c", b"\xd8\x1d", b"\xc2", b"\xd9\xd9\xf7", b"\x61v", b"\x01"]
        + [b"\x64kind", b"\x66record", b"\x66bundle", b"\x69heartbeat", b"\xa7", b"\xa2"]
    ),
    st.binary(max_size=4),
)
CBOR_ISH = st.lists(TOKENS, max_size=40).map(b"".join) | st.binary(max_size=64)

KEYS = st.sampled_from(["v", "kind", "device", "seq", "time", "type", "body", "labels"]) | st.text(
    max_size=5
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)  # past 64 bits: a bignum tag
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
# What cbor2 encodes with a tag, which no message of ours carries.
TAGGED = (
    st.datetimes(timezones=st.just(dt.UTC))
    | st.uuids()
    | st.builds(cbor2.CBORTag, st.integers(0, 2**64 - 1), st.integers(0, 3))
    | st.just(cbor2.CBORTag(24, cbor2.dumps({"v": 1, "kind": "record"})))
    | st.just(cbor2.undefined)
)
VALUES = st.recursive(
    SCALARS | TAGGED,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(KEYS, inner, max_size=4)
        | st.dictionaries(st.integers(0, 3) | st.binary(max_size=2), inner, max_size=2)
    ),
    max_leaves=16,
)
MESSAGES = st.fixed_dictionaries(
    {
        "v": st.just(1) | VALUES,
        "kind": st.sampled_from(["bundle", "record", "heartbeat", "revision"]) | VALUES,
    },
    optional={key: VALUES for key in ("key_id", "sig", "body", "device", "time", "x")},
)


def dumps(obj: Any, *, sharing: bool = False) -> bytes:
    try:
        return cbor2.dumps(obj, value_sharing=sharing)
    except (ValueError, TypeError, OverflowError):
        assume(False)  # not encodable at all: nothing anyone could send
        raise


# == the envelope: decode() =======================================================


@CBOR
@given(CBOR_ISH)
def test_any_bytes_decode_to_a_versioned_map_or_are_refused_with_our_error(data: bytes) -> None:
    # Given any bytes on any stream, When they are decoded
    verdict, what = outcome(lambda: decode(data))
    # Then they are a map of our schema version, or refused with our error
    if verdict == "ok":
        assert what.startswith("{") and "'v': 1" in what


def plain(value: Any) -> bool:
    """Whether ``value`` is made of what our encoder writes, and nothing else."""
    if isinstance(value, dict):
        return all(isinstance(k, str | bytes) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**64) <= value < 2**64
    # Simple values (undefined, 0-255) pass as scalars: no typed field takes them.
    return (
        value is None
        or isinstance(value, bool | float | str | bytes | cbor2.CBORSimpleValue)
        or (value is cbor2.undefined)
    )


@CBOR
@given(MESSAGES, st.booleans())
def test_any_nested_cbor_value_decodes_to_plain_values_or_is_refused(
    obj: dict[str, Any], sharing: bool
) -> None:
    # Given any CBOR-encodable message, tagged values and shared references included
    data = dumps(obj, sharing=sharing)
    # When it is decoded, and read as each kind of message
    for read in (Record.from_message, Heartbeat.from_message, SignedBundle.from_message):
        outcome(lambda read=read: read(decode(data)))
    # Then what decodes holds only plain values: no tag got through
    try:
        decoded = decode(data)
    except RemoteProtocolError:
        return
    assert plain(decoded)


@CBOR
@given(CBOR_ISH | MESSAGES.map(dumps))
def test_the_walk_over_the_bytes_refuses_exactly_what_the_decoder_refuses(data: bytes) -> None:
    # Given a message short enough that the decoder alone judges it
    assume(len(data) <= MAX_ITEMS)
    # When it is also walked first, as every message longer than MAX_ITEMS is
    # Then both say the same, down to the reason (the walk never refuses more)
    alone = outcome(lambda: decode(data))
    walked = outcome(lambda: (wire._scan(data), decode(data))[1])
    assert walked == alone


@settings(CBOR, max_examples=60)
@given(
    depth=st.integers(0, MAX_DEPTH + 20),
    container=st.sampled_from([b"\x81", b"\xa1\x61k"]),
    long=st.booleans(),
)
def test_nesting_is_refused_as_too_deep_exactly_past_the_limit(
    depth: int, container: bytes, long: bool
) -> None:
    # Given a message whose field x nests `depth` one-item arrays or maps
    # (padded past MAX_ITEMS bytes or not: walked first, or left to cbor2)
    padding = {"pad": b"\x00" * (MAX_ITEMS + 1)} if long else {}
    data = envelope(**padding, x=0)[:-1] + container * depth + b"\x00"
    # When it is decoded
    verdict, reason = outcome(lambda: decode(data))
    # Then it decodes while the innermost item sits in at most MAX_DEPTH containers
    # (the envelope itself is one), and is refused as too_deep past that
    if depth + 1 <= MAX_DEPTH:
        assert verdict == "ok"
    else:
        assert (verdict, reason) == ("refused", "too_deep")


def test_an_oversized_message_is_refused_by_its_size_before_anything_parses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a decoder that fails the test if it is ever asked to parse
    def parser_called(*_: Any) -> None:
        raise AssertionError("the parser saw an oversized message")

    monkeypatch.setattr(wire, "_load", parser_called)
    monkeypatch.setattr(wire, "_scan", parser_called)
    monkeypatch.setattr(wire.cbor2, "CBORDecoder", parser_called)
    oversized = b"\xa1" + b"\x00" * MAX_BODY_BYTES
    # When a message one byte over the limit arrives, in any buffer type
    for data in (oversized, bytearray(oversized), memoryview(oversized)):
        with pytest.raises(RemoteProtocolError) as refused:
            decode(data)
        # Then it is refused as too_large, and nothing parsed it
        assert refused.value.reason == "too_large"


@pytest.mark.parametrize("major", [2, 3, 4, 5], ids=["bytes", "text", "array", "map"])
@pytest.mark.parametrize("where", ["alone", "in-an-envelope", "in-a-long-envelope"])
def test_a_head_declaring_a_2_62_byte_item_is_refused_at_once_without_allocating(
    major: int, where: str
) -> None:
    # Given a 9-byte head that declares 2**62 bytes (or items), alone or as a
    # field of an envelope (one long enough to be walked before decoding)
    lie = head(major, 2**62)
    padding = {"pad": b"\x00" * (MAX_ITEMS + 1)} if where == "in-a-long-envelope" else {}
    data = lie if where == "alone" else envelope(**padding, x=0)[:-1] + lie
    # When it is decoded
    verdict, elapsed, peak = decode_measured(data)
    # Then it is refused as malformed, at once, having allocated next to nothing
    assert verdict == ("refused", "malformed")
    assert elapsed < 0.5
    assert peak < len(data) * 3 + 256 * 1024


@pytest.mark.parametrize(
    "item",
    [b"\xa0", b"\x80", b"\x62ab", b"\xf9\x3c\x00"],
    ids=["empty-maps", "empty-arrays", "short-strings", "half-floats"],
)
def test_a_full_size_message_of_tiny_items_is_refused_before_they_are_built(item: bytes) -> None:
    # Given a message just under the size limit: an array of one-to-three-byte
    # items, which cbor2 would turn into up to ~75 MB of objects
    count = (MAX_BODY_BYTES - 9) // len(item)
    data = head(4, count) + item * count
    # When it is decoded
    verdict, _, peak = decode_measured(data)
    # Then it is refused as too_large by the walk over its bytes: nothing was built
    assert verdict == ("refused", "too_large")
    assert peak < 4 * MAX_BODY_BYTES


def test_the_most_one_message_can_build_is_bounded_by_the_item_limit() -> None:
    # Given the costliest message the decoder builds: MAX_ITEMS bytes of empty maps
    count = MAX_ITEMS - 5
    data = head(4, count) + b"\xa0" * count
    # When it is decoded
    verdict, _, peak = decode_measured(data)
    # Then it is refused (not a map), having built at most ~100 bytes per item
    assert verdict == ("refused", "malformed")
    assert peak < 100 * MAX_ITEMS


def test_no_cbor_tag_decodes_whatever_its_number() -> None:
    # Given a message with a tagged value, for every tag number below 2**16
    # (where cbor2's own decoders all are: 0-5, 24-37, 52, 54, 100, 256-261,
    # 1004, 55799) and a few above
    tags = [*range(2**16), 2**16 + 1, 55799, 2**32, 2**64 - 1]
    prefix = cbor2.dumps({"v": 1, "kind": "record", "x": 0})[:-1]
    # When each is decoded, Then each is refused as malformed
    for tag in tags:
        data = prefix + head(6, tag) + b"\x41\x00"
        assert outcome(lambda data=data: decode(data)) == ("refused", "malformed"), tag


@pytest.mark.parametrize(
    "value",
    [
        cbor2.CBORTag(24, cbor2.dumps({"v": 1})),  # embedded CBOR
        cbor2.CBORTag(2, b"\x01" * 2000),  # a 4,800-digit integer
        2**64,  # the smallest bignum
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        uuid.UUID(int=7),
        frozenset({1}),
    ],
    ids=["embedded-cbor", "huge-bignum", "bignum", "datetime", "uuid", "set"],
)
def test_a_tagged_value_is_refused_and_our_encoder_never_makes_one(value: Any) -> None:
    # Given a message with a value cbor2 encodes with a tag
    obj = {"v": 1, "kind": "record", "x": value}
    # When it is decoded, Then it is refused as malformed
    assert outcome(lambda: decode(cbor2.dumps(obj))) == ("refused", "malformed")
    # And our encoder refuses to make it in the first place
    with pytest.raises(ValueError):
        encode(obj)


def test_a_self_referencing_message_is_refused() -> None:
    # Given a list that contains itself (CBOR value sharing, tags 28/29)
    loop: list[Any] = []
    loop.append(loop)
    data = cbor2.dumps({"v": 1, "kind": "record", "x": loop}, value_sharing=True)
    # When it is decoded, Then it is refused as malformed
    assert outcome(lambda: decode(data)) == ("refused", "malformed")


@pytest.mark.parametrize(
    "data",
    [
        envelope() + b"\x00",
        b"\xbf\x61v\x01\x64kind\x66record\xff",
        b"\xa3\x61v\x01\x64kind\x66record\x61v\x01",
        b"\xa3\x61v\x01\x64kind\x66record\x01\x02",
    ],
    ids=["trailing-byte", "indefinite-map", "duplicate-key", "integer-key"],
)
def test_a_message_in_a_form_our_encoder_never_writes_is_refused(data: bytes) -> None:
    # When a message arrives with bytes after it, an indefinite length, a key
    # twice or a key that is not a string, Then it is refused as malformed
    assert outcome(lambda: decode(data)) == ("refused", "malformed")


@pytest.mark.parametrize("version", [True, 1.0, "1", [1]])
def test_a_version_that_merely_compares_equal_to_one_is_not_version_one(version: Any) -> None:
    # When a message says it is version True, 1.0, "1" or [1]
    data = cbor2.dumps({"v": version, "kind": "record"})
    # Then it is refused as of an unknown version (True == 1 in Python)
    assert outcome(lambda: decode(data)) == ("refused", "unknown_version")


def test_what_a_peer_sent_is_quoted_in_an_error_only_in_part() -> None:
    # Given a message whose version is a megabyte-long string
    data = cbor2.dumps({"v": "9" * (MAX_BODY_BYTES - 100), "kind": "record"})
    # When it is refused, Then the detail that goes on into logs and events is short
    with pytest.raises(RemoteProtocolError) as refused:
        decode(data)
    assert len(refused.value.detail) <= MAX_DETAIL_CHARS
    assert len(str(refused.value)) < MAX_DETAIL_CHARS + 50


def test_our_encoder_refuses_what_our_decoder_would_refuse() -> None:
    # Given messages too deep, or with a key that is not a string
    deep: Any = 0
    for _ in range(MAX_DEPTH):
        deep = [deep]
    # When they are encoded, Then encoding fails instead of publishing them
    for obj in ({"v": 1, "kind": "record", "x": deep}, {"v": 1, "kind": "record", 1: 2}):
        with pytest.raises(ValueError):
            encode(obj)


def test_a_policy_nested_as_deep_as_the_validator_allows_still_travels_in_a_bundle() -> None:
    # Given a policy nested to the validator's limit (spec.tags[...]: 2 levels in)
    tags: Any = "x"
    for _ in range(policy.MAX_DEPTH - 2):
        tags = [tags]
    doc = {**POLICY, "spec": {**POLICY["spec"], "tags": tags}}
    (valid,) = parse_policies(json.dumps(doc))
    with pytest.raises(PolicyValidationError):  # one level more is refused
        parse_policies(json.dumps({**doc, "spec": {**doc["spec"], "tags": [tags]}}))
    # When it is signed into a bundle and read back by a device
    bundle = Bundle(1, 1.0, "snapshot", (valid.document,), sha256=state_digest([doc]))
    read = Verifier(TRUSTED).verify(SignedBundle.from_message(decode(SIGNER.sign(bundle).encode())))
    # Then it arrives whole: the wire's depth limit leaves room for it
    assert read.policies == (doc,)


# == bundles: SignedBundle + Verifier ===========================================


def verify(data: bytes, verifier: Verifier) -> Bundle:
    """What a device does with a delivery on the policy stream."""
    return verifier.verify(SignedBundle.from_message(decode(data)))


@CBOR
@given(CBOR_ISH | MESSAGES.map(dumps))
def test_any_bytes_on_the_policy_stream_are_refused_by_the_verifier(data: bytes) -> None:
    # Given anything not signed by a trusted key
    for verifier in (Verifier(TRUSTED), CachingVerifier(TRUSTED)):
        # When a device verifies it, Then it is refused with our error
        verdict, _ = outcome(lambda verifier=verifier: verify(data, verifier))
        assert verdict == "refused"


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate", "append"]),
        st.integers(0, 2**16),
        st.integers(1, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, byte in mutations:
        at = where % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= byte
        elif op == "insert":
            out.insert(at, byte)
        elif op == "delete" and at < len(out):
            del out[at]
        elif op == "truncate":
            del out[at:]
        elif op == "append":
            out += bytes([byte]) * (where % 8 + 1)
    return bytes(out)


@settings(CBOR, max_examples=300)
@given(MUTATIONS)
def test_every_byte_level_mutation_of_a_signed_bundle_is_refused(
    mutations: list[tuple[str, int, int]],
) -> None:
    # Given a valid signed bundle, already accepted once by a caching verifier
    caching = CachingVerifier(TRUSTED)
    verify(VALID_ENVELOPE, caching)
    # When any of its bytes are flipped, inserted, deleted, cut or added
    data = mutate(VALID_ENVELOPE, mutations)
    assume(data != VALID_ENVELOPE)
    # Then no verifier accepts it: each refuses it with our error
    for verifier in (Verifier(TRUSTED), caching):
        assert outcome(lambda verifier=verifier: verify(data, verifier))[0] == "refused"


@CBOR
@given(st.sampled_from(["v", "kind", "key_id", "sig", "body", "extra"]), VALUES)
def test_every_field_replaced_or_added_in_a_signed_envelope_is_refused(
    name: str, value: Any
) -> None:
    # Given a valid signed envelope with one field replaced (or one added)
    obj = cbor2.loads(VALID_ENVELOPE)
    assume(name not in obj or obj[name] != value or type(obj[name]) is not type(value))
    data = dumps({**obj, name: value})
    # When a device verifies it, Then it is refused with our error
    assert outcome(lambda: verify(data, CachingVerifier(TRUSTED)))[0] == "refused"


REVISIONS = st.fixed_dictionaries(
    {"v": st.just(1), "kind": st.just("revision")},
    optional={
        "revision": st.integers(-2, 3) | VALUES,
        "issued_at": st.floats() | VALUES,
        "mode": st.sampled_from(MODES) | VALUES,
        "policies": st.lists(
            st.fixed_dictionaries({"metadata": st.fixed_dictionaries({"name": KEYS})}) | VALUES,
            max_size=3,
        )
        | VALUES,
        "digests": st.dictionaries(KEYS, st.text(max_size=3) | VALUES, max_size=3) | VALUES,
        "deleted": st.lists(KEYS, max_size=3) | VALUES,
        "sha256": st.text(max_size=4) | VALUES,
    },
)


@CBOR
@given(CBOR_ISH | REVISIONS.map(dumps))
def test_any_body_a_trusted_key_signs_is_a_bundle_or_is_refused_with_our_error(
    body: bytes,
) -> None:
    # Given any body, signed by a key the device trusts (a control plane bug,
    # or a stolen key: the signature is no excuse to crash)
    data = SignedBundle(SIGNER.key_id, SIGNER.private_key.sign(body), body).encode()
    # When the device verifies it
    try:
        bundle = verify(data, Verifier(TRUSTED))
    except RemoteProtocolError:
        return  # Then it is refused with our error
    # Or it is a bundle that holds together
    assert bundle.revision >= 1 and bundle.mode in MODES
    assert set(bundle.digests) == {p["metadata"]["name"] for p in bundle.policies}


# == telemetry: records and heartbeats ========================================

HEARTBEATS = st.fixed_dictionaries(
    {"v": st.just(1), "kind": st.just("heartbeat")},
    optional={
        "device": st.just("pos-1") | VALUES,
        "time": st.floats() | VALUES,
        "revision": st.integers() | VALUES,
        "applied_revision": st.integers() | VALUES,
        "hash": st.text(max_size=4) | VALUES,
        "status": st.sampled_from(["ok", "failed"]) | VALUES,
        "rejected": st.dictionaries(KEYS, st.integers() | VALUES, max_size=3) | VALUES,
        "gaps": st.integers() | VALUES,
        "awaiting_snapshot": st.booleans() | VALUES,
        "labels": st.dictionaries(KEYS, st.text(max_size=3) | VALUES, max_size=3) | VALUES,
        "error": st.text(max_size=4) | VALUES,
        "outbox": st.integers() | VALUES,
        "dropped": st.dictionaries(KEYS, st.integers() | VALUES, max_size=3) | VALUES,
        "confirms": st.lists(st.integers(0, 9), min_size=13, max_size=13) | VALUES,
        "confirm_seconds": st.floats(0, 100) | VALUES,
    },
)


@CBOR
@given(HEARTBEATS)
def test_any_heartbeat_shaped_map_is_a_heartbeat_or_is_refused_with_our_error(
    obj: dict[str, Any],
) -> None:
    # Given any map claiming to be a heartbeat, When the control plane reads it
    try:
        beat = Heartbeat.from_message(decode(dumps(obj)))
    except RemoteProtocolError:
        return  # Then it is refused with our error
    # Or it is a heartbeat whose every field has its type
    assert all(isinstance(v, str) for v in beat.labels.values())
    assert isinstance(beat.gaps, int) and isinstance(beat.awaiting_snapshot, bool)
    assert isinstance(beat.error, str) and beat.time == beat.time
    assert beat == Heartbeat.from_message(decode(beat.encode()))


def test_a_record_body_holding_more_values_than_the_collector_keeps_is_refused() -> None:
    # Given two alerts whose bodies hold exactly the limit of values, and one more
    fits = Record("pos-1", 1, 1.0, "alert", {"tags": list(range(MAX_RECORD_VALUES - 2))})
    obj = cbor2.loads(fits.encode())
    obj["body"]["tags"].append(0)
    # When the collector reads them
    # Then the first is kept and the second refused as malformed
    assert Record.from_message(decode(fits.encode())) == fits
    assert outcome(lambda: Record.from_message(decode(cbor2.dumps(obj)))) == (
        "refused",
        "malformed",
    )


# == a bad message never stops a consumer =====================================

HOSTILE = CBOR_ISH | MESSAGES.map(dumps)


@SLOW
@given(st.lists(HOSTILE, min_size=1, max_size=5))
def test_hostile_deliveries_never_stop_the_agent_from_applying_the_next_bundle(
    bodies: list[bytes],
) -> None:
    # Given a linked device
    core = AgentCore("pos-1", {"store": "berlin"}, Verifier(TRUSTED))
    core.handle(Started(0.0))
    core.handle(LinkUp(0.0))
    # When hostile deliveries arrive on the policy stream
    for tag, body in enumerate(bodies, start=1):
        effects = core.handle(Delivery(1.0, tag, tag, body))
        # Then each is acked once and changes nothing
        assert [e.tag for e in effects if isinstance(e, Ack)] == [tag]
    assert core.state.revision == 0
    assert sum(core.state.rejected.values()) == len(bodies)
    # And the next good bundle is put in force
    effects = core.handle(Delivery(2.0, 99, 99, VALID_ENVELOPE))
    assert [e.revision for e in effects if isinstance(e, Apply)] == [1]


@CBOR
@given(st.lists(HOSTILE, min_size=1, max_size=5))
def test_hostile_records_never_stop_the_collector_from_keeping_the_next(
    bodies: list[bytes],
) -> None:
    # Given a collector's batch, When hostile deliveries then a good record arrive
    batch = Batch()
    for offset, body in enumerate(bodies):
        batch.add(offset, "telemetry.pos-1.alert", body, offset + 1, 0.0, user_id="pos-1")
    good = Record("pos-1", 1, 1.0, "alert", {"policy": "block-x"})
    batch.add(len(bodies), good.routing_key, good.encode(), len(bodies) + 1, 0.0, user_id="pos-1")
    # Then each hostile one is refused with a reason, and the good one kept
    assert [record for _, record in batch.records][-1] == good
    assert len(batch.refusals) + len(batch.records) == len(bodies) + 1
    assert all(refusal.reason for refusal in batch.refusals)


# == policy YAML ================================================================


def parses_or_refuses(text: str) -> None:
    try:
        parse_policies(text, "hostile.yaml")
    except PolicyValidationError as error:
        assert error.problems and str(error)


def alias_bomb(fan_out: int, levels: int, merge: bool) -> str:
    """Each anchor refers to the previous one ``fan_out`` times: fan_out**levels values."""
    lines = ["a0: &a0 {x: 1}" if merge else "a0: &a0 [x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * fan_out)
        lines.append(f"a{i}: &a{i} {{<<: [{refs}], k{i}: 1}}" if merge else f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def nesting(depth: int, style: str) -> str:
    if style == "flow-list":
        return "a: " + "[" * depth + "]" * depth + "\n"
    if style == "flow-map":
        return "a: " + "{b: " * depth + "1" + "}" * depth + "\n"
    return "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "b: 1\n"


YAML_BOMBS = st.one_of(
    st.builds(alias_bomb, st.integers(2, 12), st.integers(1, 10), st.booleans()),
    st.builds(
        nesting,
        st.integers(0, 2000),
        st.sampled_from(["flow-list", "flow-map", "block"]),
    ),
    st.builds(
        lambda n, style: style.format("x" * n),
        st.integers(0, 50_000),
        st.sampled_from(["a: {}\n", "a: '{}'\n", "a: |\n  {}\n", "? {}\n: 1\n", "a: 0x{}\n"]),
    ),
    st.builds(lambda n: "---\n" * n, st.integers(0, 2000)),
    st.builds(lambda n: "0: " + "9" * n + "\n", st.integers(15, 25)),
)


@SLOW
@given(YAML_BOMBS)
def test_yaml_bombs_are_parsed_or_refused_with_a_validation_error_in_bounded_time(
    text: str,
) -> None:
    # Given alias fan-outs, merge-key fan-outs, deep nesting, long scalars,
    # huge integers, many documents
    # When the policy parser reads it, Then it is refused (or parsed), quickly
    parses_or_refuses(text)


def test_a_10_mb_yaml_is_refused_by_its_size_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a YAML loader that fails the test if it is ever made
    def loader_made(*_: Any) -> None:
        raise AssertionError("the YAML parser saw an oversized text")

    monkeypatch.setattr(policy, "_UniqueKeyLoader", loader_made)
    # When 10 MB of YAML (or just past the limit in UTF-8) is parsed
    for text in ("a: " + "x" * 10_000_000 + "\n", "a: " + "é" * (policy.MAX_TEXT_BYTES // 2)):
        with pytest.raises(PolicyValidationError) as refused:
            parse_policies(text, "big.yaml")
        # Then it is refused by its size, as a problem of the file itself
        [problem] = refused.value.problems
        assert (problem.document, problem.reason.split(":")[0]) == (0, "too large")


def test_a_policy_file_is_read_no_further_than_the_size_limit(tmp_path: Path) -> None:
    # Given a 10 MB policy file, and a "file" that never ends
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 10_000_000 + "\n")
    # When they are loaded, Then each is refused by its size (the endless one
    # too: it is read up to the limit, not to its end)
    with pytest.raises(PolicyValidationError) as refused:
        load_policy_files([big, "/dev/zero"])
    assert [(p.source, p.reason.split(":")[0]) for p in refused.value.problems] == [
        (str(big), "too large"),
        ("/dev/zero", "too large"),
    ]


@pytest.mark.parametrize(
    "value",
    ["0x" + "f" * 4000, "9" * 30, "-9223372036854775809", "1:" + "59:" * 20 + "1"],
    ids=["4000-hex-digits", "30-digits", "below-int64", "sexagesimal"],
)
def test_an_integer_beyond_64_bits_is_a_yaml_error_with_its_line(value: str) -> None:
    # Given a policy whose severity is an integer JSON and CBOR cannot carry
    # (4,000 hex digits used to escape as a ValueError from its repr())
    text = (
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\n"
        "metadata: {name: a}\nspec:\n  nodeSelector: {matchLabels: {a: b}}\n"
        f"  severity: {value}\n"
    )
    # When it is parsed, Then it is refused with the line of the value
    with pytest.raises(PolicyValidationError) as refused:
        parse_policies(text)
    assert refused.value.problems[0].reason.startswith("invalid YAML at line 6")
