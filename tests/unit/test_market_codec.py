"""Marketplace facts <-> plain JSON (ledger.market.codec) and the stored-event mapper."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar
from uuid import UUID, uuid4

import orjson
import pytest
from eventsourcing.persistence import JSONTranscoder, StoredEvent
from hypothesis import given
from hypothesis import strategies as st

from domain.lease import CloseReason, LeaseClosed
from domain.orderbook import Ask, AskPlaced
from domain.providers import Node, ProviderRegistered
from domain.stake import SlashKind, StakeSlashed, UnbondingSlash
from domain.verdicts import FailureKind, QuorumFailed
from ledger.market.codec import JSON_SAFE_INT_MAX, CodecError, decode, encode
from ledger.market.store import MarketEvent, MarketMapper

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
AMOUNT = 123_456_789 * 10**18


def test_amounts_past_two_to_the_53_are_written_as_decimal_strings():
    fact = StakeSlashed(
        uuid4(),
        SlashKind.fraud,
        "H100",
        2,
        AMOUNT,
        AMOUNT,
        AMOUNT - 5,
        (UnbondingSlash(1, 5),),
        T0,
        T0,
    )
    state = encode(fact)
    assert state["amount"] == str(AMOUNT)
    assert state["from_unbonding"] == [{"unbond_id": 1, "amount": 5}]
    assert state["kind"] == "fraud"
    assert decode(StakeSlashed, state) == fact
    assert (
        encode(decode(StakeSlashed, {**state, "gpu_count": JSON_SAFE_INT_MAX}))["gpu_count"]
        == JSON_SAFE_INT_MAX
    )


def test_nested_dataclasses_tuples_optional_values_and_offsets_round_trip():
    node = Node(uuid4(), "H100", 8, 81_920, "eu-west", "ab" * 32)
    registered = ProviderRegistered(uuid4(), "0x" + "1" * 40, (node,), T0)
    assert decode(ProviderRegistered, encode(registered)) == registered
    ask = Ask(
        uuid4(), uuid4(), uuid4(), "H100", 1, 10**20, T0.astimezone(timezone(timedelta(hours=2)))
    )
    placed = AskPlaced(ask, 7, T0)
    back = decode(AskPlaced, orjson.loads(orjson.dumps(encode(placed))))
    assert back == placed and back.ask.expires_at.utcoffset() == timedelta(hours=2)
    failed = QuorumFailed(
        uuid4(),
        uuid4(),
        T0,
        T0 + timedelta(minutes=15),
        3,
        FailureKind.downtime,
        SlashKind.downtime,
        (uuid4(), uuid4()),
        (),
        (uuid4(),),
        300_000,
        9_000,
        T0,
    )
    assert decode(QuorumFailed, encode(failed)) == failed


@given(
    amount=st.integers(min_value=0, max_value=2**128),
    seconds=st.integers(min_value=0, max_value=10**9),
    reason=st.sampled_from(CloseReason),
)
def test_any_lease_close_round_trips_exactly(amount, seconds, reason):
    fact = LeaseClosed(uuid4(), reason, uuid4(), T0, amount, seconds)
    assert decode(LeaseClosed, orjson.loads(orjson.dumps(encode(fact)))) == fact


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="naive"):
        encode(LeaseClosed(uuid4(), CloseReason.consumer, uuid4(), datetime(2026, 1, 1), 1, 0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("amount"), "missing"),
        (lambda s: s.update(extra=1), "unknown fields"),
        (lambda s: s.update(amount=1.5), "integer"),
        (lambda s: s.update(amount=True), "integer"),
        (lambda s: s.update(kind="volcano"), "kind"),
        (lambda s: s.update(provider_id="not-a-uuid"), "provider_id"),
        (lambda s: s.update(slashed_at="2026-01-01T00:00:00"), "offset"),
        (lambda s: s.update(from_unbonding={}), "array"),
    ],
)
def test_a_state_that_does_not_fit_its_type_is_a_clear_codec_error(change, message):
    fact = StakeSlashed(uuid4(), SlashKind.fraud, "H100", 2, 10, 10, 10, (), T0, T0)
    state = encode(fact)
    change(state)
    with pytest.raises(CodecError, match=message):
        decode(StakeSlashed, state)


@dataclass(frozen=True, slots=True)
class Renamed:
    """A fact whose shape changed: v1 called `amount` `value`, v2 adds `note`."""

    class_version: ClassVar[int] = 3
    amount: int
    note: str

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["amount"] = state.pop("value")

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["note"] = ""


def test_old_stored_states_are_upcast_on_read():
    mapper = MarketMapper(transcoder=JSONTranscoder())
    stream = uuid4()
    v1 = StoredEvent(
        originator_id=stream,
        originator_version=1,
        topic=f"{__name__}:Renamed",
        state=orjson.dumps({"recorded_at": T0.isoformat(), "fact": {"value": "7"}}),
    )
    event = mapper.to_domain_event(v1)
    assert event.fact == Renamed(7, "")
    stored = mapper.to_stored_event(MarketEvent(stream, 2, T0, Renamed(8, "x")))
    assert orjson.loads(stored.state)["class_version"] == 3
    assert mapper.to_domain_event(stored) == MarketEvent(stream, 2, T0, Renamed(8, "x"))


def test_an_unknown_topic_is_a_clear_error():
    mapper = MarketMapper(transcoder=JSONTranscoder())
    stored = StoredEvent(uuid4(), 1, "domain.nowhere:Gone", b'{"recorded_at":"x","fact":{}}')
    with pytest.raises(CodecError, match="unknown event topic"):
        mapper.to_domain_event(stored)


def test_uuids_are_canonical_strings():
    fact = LeaseClosed(UUID(int=5), CloseReason.expiry, UUID(int=1), T0, 0, 0)
    assert encode(fact)["lease_id"] == "00000000-0000-0000-0000-000000000005"
