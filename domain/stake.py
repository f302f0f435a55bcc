"""Provider stake: bond, unbond after a delay, and slash. Pure rules.

No I/O and no clock reads: the caller passes `now`. Each decision is a plain function from a
`ProviderStake` (and the command's fields) to a result code and the facts to record; the
result codes are declared in the order they are checked and never renumbered. `apply` folds
one fact into a new state and `replay` rebuilds a provider's state from its facts in log
order, so the live state and the replayed state are always equal.

Money is an integer in the token's smallest unit (`ledger.money`); fractions are integer
pairs (`Ratio`), never floats.

The rules, with the numbers
---------------------------

Required stake. A provider may place asks only while its bonded stake covers the GPUs of
its listed nodes::

    required = sum over listed nodes of gpu_count * K[gpu_model]

K (`StakeRules.stake_per_gpu`) is a per-GPU-model coefficient, an amount per GPU. A node
whose model has no K (or an impossible gpu_count) makes the requirement unknown: the result
is a code (`gpu_model_not_found`...), and whatever depends on the requirement is refused.
Unbonding stake does not count towards the requirement; only bonded stake does.

Bond. `bond` adds an amount > 0 to bonded stake.

Unbond. `request_unbond` moves an amount > 0 from bonded stake into a new unbonding entry
that becomes available `unbond_delay_s` after the request. It is refused when the amount
exceeds bonded stake or would leave bonded stake below the required stake of the provider's
listed nodes. `complete_unbond(now)` releases to the provider every entry whose
available_at <= now, and no other. A provider holds at most `UNBONDING_ENTRIES_MAX` entries.

Slash. `slash(kind, gpu_model, gpu_count, offence_at, now)` sizes the penalty as::

    amount_sized = floor(K[gpu_model] * gpu_count * numerator / denominator)

with the fraction of the offence's kind (defaults: downtime 1/3, fraud 1/1). It is rounded
DOWN, once, on the total (not per GPU): a slash never takes a fraction of a unit more than
the rule says. The amount taken is min(amount_sized, bonded + unbonding): bonded stake
first, then the unbonding entries still pending, oldest request first. `amount_sized` is
recorded beside the amount taken, so a shortfall is visible.

Every entry still pending is liable, whenever its request was made and even when it is
already available but not yet completed: stake stays at stake until it is released, so
unbonding never escapes a slash for an offence committed before its release. An entry
already completed has left the protocol and cannot be slashed. Therefore `unbond_delay_s`
must be longer than the time it takes to detect an offence and decide its slash (the
checkers' quorum window); otherwise stake could leave before its offences are judged. An
entry slashed down to zero is dropped: it never completes.

Defaults (for a demo that shows each rule within minutes; all configuration):

- unbond_delay_s = 120 (live networks: 14 days = 1_209_600 s, or 180 days = 15_552_000 s);
- downtime slash = 1/3 of K per affected GPU; fraud slash = 1/1 of K per affected GPU;
- K per GPU: `DEMO_STAKE_PER_GPU` (H200 120, H100 100, A100 60, L40S 30, RTX4090 20 AETH).

Invariants (asserted after every fact): nothing is negative; every pending entry holds more
than zero; and every unit ever bonded is in exactly one place::

    bonded + unbonding + released + slashed == bonded_total

Ledger mirror
-------------

Every fact carries the amount that moves, so that the ledger can mirror each one as
transfers between the accounts of `domain.codes.AccountCode`:

- `StakeBonded`: `amount` into provider_stake_bonded (TransferCode.stake_bond);
- `UnbondRequested`: `amount` provider_stake_bonded -> provider_stake_unbonding
  (stake_unbond);
- `UnbondCompleted`: `amount` out of provider_stake_unbonding, back to the provider
  (stake_unbond);
- `StakeSlashed`: `from_bonded` provider_stake_bonded -> insurance_pool, and each entry of
  `from_unbonding` provider_stake_unbonding -> insurance_pool (slash).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import IntEnum
from types import MappingProxyType
from typing import Protocol
from uuid import UUID

from domain.checks import require_int
from ledger.limits import AMOUNT_MAX
from ledger.money import units

GPU_COUNT_MAX = 65_536
"""Most GPUs one node listing or one slash may name: a bound against typos, not hardware."""
UNBONDING_ENTRIES_MAX = 32
"""Most unbonding entries pending at once per provider."""
UNBOND_DELAY_S_MAX = 2 * 366 * 24 * 3600
"""Longest unbonding delay the rules accept (two years; live networks use up to 180 days)."""

DEMO_STAKE_PER_GPU: Mapping[str, int] = MappingProxyType(
    {
        "H200": units(120),
        "H100": units(100),
        "A100": units(60),
        "L40S": units(30),
        "RTX4090": units(20),
    }
)
"""K per GPU model for the demo, in the token's smallest unit."""
DEMO_UNBOND_DELAY_S = 120
"""Two minutes, so a demo shows an unbond complete (live networks: 14 or 180 days)."""


@dataclass(frozen=True, slots=True)
class Ratio:
    """A fraction as two integers, 0 <= numerator <= denominator, denominator > 0."""

    numerator: int
    denominator: int

    def __post_init__(self) -> None:
        require_int("numerator", self.numerator)
        require_int("denominator", self.denominator)
        if self.denominator <= 0:
            raise ValueError(f"denominator must be > 0, got {self.denominator}")
        if not 0 <= self.numerator <= self.denominator:
            raise ValueError(
                f"numerator must be within 0..{self.denominator}, got {self.numerator}"
            )

    def floor_of(self, amount: int) -> int:
        """floor(amount * numerator / denominator): rounded down, exactly, in integers."""
        return amount * self.numerator // self.denominator


class SlashKind(IntEnum):
    """What the provider did wrong; decides the fraction of K slashed. Never renumber."""

    downtime = 1
    """Missed heartbeats beyond the threshold, or failed uptime checks."""
    fraud = 2
    """Malicious behaviour: forged usage, results not computed, lying about hardware."""


@dataclass(frozen=True, slots=True)
class StakeRules:
    """How much stake a provider needs, how long unbonding takes and how much a slash takes.

    Validated at construction (a ValueError names what is wrong). `stake_per_gpu` is copied
    into a read-only mapping, so the rules cannot change under a caller's feet.
    """

    stake_per_gpu: Mapping[str, int] = field(default_factory=lambda: DEMO_STAKE_PER_GPU)
    """K: GPU model -> stake required per listed GPU, > 0, in the token's smallest unit."""
    unbond_delay_s: int = DEMO_UNBOND_DELAY_S
    """Seconds from an unbond request until its entry may complete;
    0..UNBOND_DELAY_S_MAX."""
    downtime_slash_fraction: Ratio = Ratio(1, 3)
    """Fraction of K slashed per affected GPU for downtime."""
    fraud_slash_fraction: Ratio = Ratio(1, 1)
    """Fraction of K slashed per affected GPU for fraud."""

    def __post_init__(self) -> None:
        for gpu_model, k in self.stake_per_gpu.items():
            if not isinstance(gpu_model, str) or not gpu_model:
                raise ValueError(f"gpu model must be a non-empty string, got {gpu_model!r}")
            require_int(f"stake_per_gpu[{gpu_model!r}]", k)
            if not 0 < k <= AMOUNT_MAX:
                raise ValueError(f"stake_per_gpu[{gpu_model!r}] must be within 1..AMOUNT_MAX")
        require_int("unbond_delay_s", self.unbond_delay_s)
        if not 0 <= self.unbond_delay_s <= UNBOND_DELAY_S_MAX:
            raise ValueError(
                f"unbond_delay_s must be within 0..{UNBOND_DELAY_S_MAX}, got {self.unbond_delay_s}"
            )
        for name in ("downtime_slash_fraction", "fraud_slash_fraction"):
            if not isinstance(getattr(self, name), Ratio):
                raise TypeError(f"{name} must be a Ratio")
        object.__setattr__(self, "stake_per_gpu", MappingProxyType(dict(self.stake_per_gpu)))

    def slash_fraction(self, kind: SlashKind) -> Ratio:
        """The fraction of K slashed per affected GPU for an offence of this kind."""
        if kind is SlashKind.downtime:
            return self.downtime_slash_fraction
        return self.fraud_slash_fraction


class ListedGpus(Protocol):
    """What the stake rules need to know of a listed node (any node type with these two)."""

    @property
    def gpu_model(self) -> str: ...

    @property
    def gpu_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class NodeGpus:
    """The GPUs of one listed node: the plain `ListedGpus`."""

    gpu_model: str
    gpu_count: int


class RequiredStakeResult(IntEnum):
    """Result of sizing the required stake, checked node by node in the order given (the
    first failing node decides), each node in this order. Never renumber."""

    ok = 0
    gpu_count_must_not_be_negative = 1
    gpu_count_exceeds_max = 2
    gpu_model_not_found = 3
    """The rules have no K for the node's GPU model."""


def required_stake(
    nodes: Iterable[ListedGpus], rules: StakeRules
) -> tuple[RequiredStakeResult, int]:
    """The bonded stake needed to list `nodes`: sum of gpu_count * K[gpu_model].

    Returns (ok, amount), or (the failing rule, 0).
    """
    r = RequiredStakeResult
    total = 0
    for node in nodes:
        require_int("gpu_count", node.gpu_count)
        if node.gpu_count < 0:
            return r.gpu_count_must_not_be_negative, 0
        if node.gpu_count > GPU_COUNT_MAX:
            return r.gpu_count_exceeds_max, 0
        k = rules.stake_per_gpu.get(node.gpu_model)
        if k is None:
            return r.gpu_model_not_found, 0
        total += node.gpu_count * k
    return r.ok, total


# -- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnbondingEntry:
    """Stake on its way out: no longer bonded, not yet released, still slashable."""

    unbond_id: int
    """The request's number within the provider: 1, 2, 3... in request order."""
    amount: int
    """What is left of the request after slashes; > 0 (an entry slashed to zero is dropped)."""
    requested_at: datetime
    available_at: datetime
    """requested_at + unbond_delay_s: the earliest time the entry may complete."""


@dataclass(frozen=True, slots=True)
class ProviderStake:
    """One provider's stake. Immutable: `apply` returns a new state."""

    provider_id: UUID
    bonded: int = 0
    """Stake at work: counts towards the required stake."""
    unbonding: tuple[UnbondingEntry, ...] = ()
    """Pending unbonding entries, oldest request first."""
    released: int = 0
    """Total returned to the provider by completed unbonds."""
    slashed: int = 0
    """Total slashed (to the insurance pool)."""
    bonded_total: int = 0
    """Every unit ever bonded: bonded + unbonding + released + slashed."""
    unbond_requests_count: int = 0
    """Unbond requests accepted so far; the last unbond_id given out."""

    @property
    def unbonding_total(self) -> int:
        """The sum of the pending unbonding entries."""
        return sum(entry.amount for entry in self.unbonding)

    @property
    def slashable(self) -> int:
        """What a slash can take right now: bonded + unbonding."""
        return self.bonded + self.unbonding_total


# -- facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StakeBonded:
    """Fact: the provider bonded `amount` more stake."""

    provider_id: UUID
    amount: int
    """> 0; moves into bonded stake."""
    bonded_at: datetime


@dataclass(frozen=True, slots=True)
class UnbondRequested:
    """Fact: `amount` moved from bonded stake into a new unbonding entry."""

    provider_id: UUID
    unbond_id: int
    """The new entry's number: the provider's previous unbond_requests_count + 1."""
    amount: int
    """> 0; moves from bonded to unbonding."""
    requested_at: datetime
    available_at: datetime
    """requested_at + unbond_delay_s under the rules of the time."""


@dataclass(frozen=True, slots=True)
class UnbondCompleted:
    """Fact: an unbonding entry was released to the provider, whole (what slashes left)."""

    provider_id: UUID
    unbond_id: int
    amount: int
    """> 0; moves from unbonding to released (out of the protocol, back to the provider)."""
    completed_at: datetime


@dataclass(frozen=True, slots=True)
class UnbondingSlash:
    """The part of a slash taken from one unbonding entry."""

    unbond_id: int
    amount: int
    """> 0; moves from this entry to slashed (the insurance pool)."""


@dataclass(frozen=True, slots=True)
class StakeSlashed:
    """Fact: stake was slashed for an offence. amount == from_bonded + sum(from_unbonding)."""

    provider_id: UUID
    kind: SlashKind
    gpu_model: str
    gpu_count: int
    """GPUs affected by the offence; > 0."""
    amount_sized: int
    """What the rule asked for: floor(K[gpu_model] * gpu_count * fraction)."""
    amount: int
    """What was taken: min(amount_sized, bonded + unbonding); > 0; moves to slashed."""
    from_bonded: int
    """The part taken from bonded stake (first)."""
    from_unbonding: tuple[UnbondingSlash, ...]
    """The parts taken from pending unbonding entries (then), oldest request first."""
    offence_at: datetime
    """When the offence was committed; <= slashed_at."""
    slashed_at: datetime


Fact = StakeBonded | UnbondRequested | UnbondCompleted | StakeSlashed
"""What the stake rules record."""


# -- decisions ----------------------------------------------------------------------------


class BondResult(IntEnum):
    """Result of `bond`, in the order the rules are checked. Never renumber."""

    ok = 0
    amount_must_not_be_negative = 1
    amount_must_not_be_zero = 2
    amount_exceeds_max = 3
    overflows_bonded_total = 4
    """bonded_total + amount would exceed AMOUNT_MAX."""


def bond(state: ProviderStake, amount: int, now: datetime) -> tuple[BondResult, tuple[Fact, ...]]:
    """Bond `amount` more stake."""
    r = BondResult
    require_int("amount", amount)
    if amount < 0:
        return r.amount_must_not_be_negative, ()
    if amount == 0:
        return r.amount_must_not_be_zero, ()
    if amount > AMOUNT_MAX:
        return r.amount_exceeds_max, ()
    if state.bonded_total + amount > AMOUNT_MAX:
        return r.overflows_bonded_total, ()
    return r.ok, (StakeBonded(state.provider_id, amount, now),)


class RequestUnbondResult(IntEnum):
    """Result of `request_unbond`, in the order the rules are checked. Never renumber.

    The three node codes are those of `required_stake` for the provider's listed nodes.
    """

    ok = 0
    amount_must_not_be_negative = 1
    amount_must_not_be_zero = 2
    gpu_count_must_not_be_negative = 3
    gpu_count_exceeds_max = 4
    gpu_model_not_found = 5
    amount_exceeds_bonded = 6
    unbonding_entries_exceed_max = 7
    unbond_would_leave_stake_below_required = 8
    """bonded - amount < required stake of the listed nodes."""


def request_unbond(
    state: ProviderStake,
    amount: int,
    nodes: Iterable[ListedGpus],
    rules: StakeRules,
    now: datetime,
) -> tuple[RequestUnbondResult, tuple[Fact, ...]]:
    """Start unbonding `amount`: it leaves bonded stake now and may complete after the delay.

    `nodes` are the provider's listed nodes; their required stake must stay bonded.
    """
    r = RequestUnbondResult
    require_int("amount", amount)
    if amount < 0:
        return r.amount_must_not_be_negative, ()
    if amount == 0:
        return r.amount_must_not_be_zero, ()
    required_result, required = required_stake(nodes, rules)
    if required_result is not RequiredStakeResult.ok:
        return r[required_result.name], ()
    if amount > state.bonded:
        return r.amount_exceeds_bonded, ()
    if len(state.unbonding) >= UNBONDING_ENTRIES_MAX:
        return r.unbonding_entries_exceed_max, ()
    if state.bonded - amount < required:
        return r.unbond_would_leave_stake_below_required, ()
    fact = UnbondRequested(
        provider_id=state.provider_id,
        unbond_id=state.unbond_requests_count + 1,
        amount=amount,
        requested_at=now,
        available_at=now + timedelta(seconds=rules.unbond_delay_s),
    )
    return r.ok, (fact,)


class CompleteUnbondResult(IntEnum):
    """Result of `complete_unbond`, in the order the rules are checked. Never renumber."""

    ok = 0
    nothing_unbonding = 1
    """No unbonding entry is pending."""
    unbonding_not_yet_available = 2
    """Entries are pending, but none has reached its available_at."""


def complete_unbond(
    state: ProviderStake, now: datetime
) -> tuple[CompleteUnbondResult, tuple[Fact, ...]]:
    """Release every pending entry whose available_at <= now: one fact per entry."""
    r = CompleteUnbondResult
    if not state.unbonding:
        return r.nothing_unbonding, ()
    facts = tuple(
        UnbondCompleted(state.provider_id, entry.unbond_id, entry.amount, now)
        for entry in state.unbonding
        if entry.available_at <= now
    )
    if not facts:
        return r.unbonding_not_yet_available, ()
    return r.ok, facts


class SlashResult(IntEnum):
    """Result of `slash`, in the order the rules are checked. Never renumber."""

    ok = 0
    gpu_count_must_not_be_negative = 1
    gpu_count_must_not_be_zero = 2
    gpu_count_exceeds_max = 3
    gpu_model_not_found = 4
    offence_must_not_be_after_now = 5
    """offence_at > now: an offence cannot be judged before it happens."""
    slash_amount_must_not_be_zero = 6
    """floor(K * gpu_count * fraction) is zero (e.g. a fraction of 0/1 turns the kind off)."""
    no_stake_to_slash = 7
    """bonded + unbonding is zero: nothing is left to take."""


def slash(
    state: ProviderStake,
    rules: StakeRules,
    *,
    kind: SlashKind,
    gpu_model: str,
    gpu_count: int,
    offence_at: datetime,
    now: datetime,
) -> tuple[SlashResult, tuple[Fact, ...]]:
    """Slash for an offence on `gpu_count` GPUs of `gpu_model`, committed at `offence_at`.

    Takes min(floor(K * gpu_count * fraction), bonded + unbonding): bonded stake first, then
    every pending unbonding entry, oldest request first.
    """
    r = SlashResult
    require_int("gpu_count", gpu_count)
    fraction = rules.slash_fraction(kind)
    if gpu_count < 0:
        return r.gpu_count_must_not_be_negative, ()
    if gpu_count == 0:
        return r.gpu_count_must_not_be_zero, ()
    if gpu_count > GPU_COUNT_MAX:
        return r.gpu_count_exceeds_max, ()
    k = rules.stake_per_gpu.get(gpu_model)
    if k is None:
        return r.gpu_model_not_found, ()
    if offence_at > now:
        return r.offence_must_not_be_after_now, ()
    amount_sized = fraction.floor_of(k * gpu_count)
    if amount_sized == 0:
        return r.slash_amount_must_not_be_zero, ()
    if state.slashable == 0:
        return r.no_stake_to_slash, ()
    amount = min(amount_sized, state.slashable)
    from_bonded = min(amount, state.bonded)
    left = amount - from_bonded
    from_unbonding: list[UnbondingSlash] = []
    for entry in state.unbonding:
        if left == 0:
            break
        take = min(entry.amount, left)
        from_unbonding.append(UnbondingSlash(entry.unbond_id, take))
        left -= take
    assert left == 0, f"provider {state.provider_id}: slash of {amount} not fully covered"
    fact = StakeSlashed(
        provider_id=state.provider_id,
        kind=kind,
        gpu_model=gpu_model,
        gpu_count=gpu_count,
        amount_sized=amount_sized,
        amount=amount,
        from_bonded=from_bonded,
        from_unbonding=tuple(from_unbonding),
        offence_at=offence_at,
        slashed_at=now,
    )
    return r.ok, (fact,)


def can_place_asks(state: ProviderStake, nodes: Iterable[ListedGpus], rules: StakeRules) -> bool:
    """Whether bonded stake covers the required stake of `nodes` (False when unknown)."""
    result, required = required_stake(nodes, rules)
    return result is RequiredStakeResult.ok and state.bonded >= required


# -- appliers (shared by decisions and replay) --------------------------------------------


def apply(state: ProviderStake, fact: Fact) -> ProviderStake:
    """The state after `fact` (a fact decided for this state, or read back from the log)."""
    assert fact.provider_id == state.provider_id, (
        f"fact of provider {fact.provider_id} applied to provider {state.provider_id}"
    )
    if isinstance(fact, StakeBonded):
        after = replace(
            state,
            bonded=state.bonded + fact.amount,
            bonded_total=state.bonded_total + fact.amount,
        )
    elif isinstance(fact, UnbondRequested):
        assert fact.unbond_id == state.unbond_requests_count + 1, (
            f"provider {state.provider_id}: unbond {fact.unbond_id} out of order"
        )
        entry = UnbondingEntry(fact.unbond_id, fact.amount, fact.requested_at, fact.available_at)
        after = replace(
            state,
            bonded=state.bonded - fact.amount,
            unbonding=(*state.unbonding, entry),
            unbond_requests_count=fact.unbond_id,
        )
    elif isinstance(fact, UnbondCompleted):
        matches = [e for e in state.unbonding if e.unbond_id == fact.unbond_id]
        assert len(matches) == 1 and matches[0].amount == fact.amount, (
            f"provider {state.provider_id}: unbond {fact.unbond_id} is not pending "
            f"with amount {fact.amount}"
        )
        assert matches[0].available_at <= fact.completed_at, (
            f"provider {state.provider_id}: unbond {fact.unbond_id} completed early"
        )
        after = replace(
            state,
            unbonding=tuple(e for e in state.unbonding if e.unbond_id != fact.unbond_id),
            released=state.released + fact.amount,
        )
    else:
        taken = {part.unbond_id: part.amount for part in fact.from_unbonding}
        assert len(taken) == len(fact.from_unbonding)
        assert fact.amount == fact.from_bonded + sum(taken.values())
        assert fact.offence_at <= fact.slashed_at
        unbonding: list[UnbondingEntry] = []
        for entry in state.unbonding:
            left = entry.amount - taken.pop(entry.unbond_id, 0)
            if left:
                unbonding.append(replace(entry, amount=left))
        assert not taken, f"provider {state.provider_id}: slash of unknown unbonds {taken}"
        after = replace(
            state,
            bonded=state.bonded - fact.from_bonded,
            unbonding=tuple(unbonding),
            slashed=state.slashed + fact.amount,
        )
    _assert_invariants(after)
    return after


def _assert_invariants(state: ProviderStake) -> None:
    assert state.bonded >= 0, f"provider {state.provider_id}: bonded below zero"
    assert all(entry.amount > 0 for entry in state.unbonding), (
        f"provider {state.provider_id}: an unbonding entry at or below zero"
    )
    assert state.released >= 0 and state.slashed >= 0
    assert len(state.unbonding) <= UNBONDING_ENTRIES_MAX
    assert state.bonded_total <= AMOUNT_MAX
    assert (
        state.bonded + state.unbonding_total + state.released + state.slashed == state.bonded_total
    ), f"provider {state.provider_id}: stake not conserved"


def replay(provider_id: UUID, facts: Iterable[Fact]) -> ProviderStake:
    """Rebuild a provider's stake from its facts in log order."""
    state = ProviderStake(provider_id)
    for fact in facts:
        state = apply(state, fact)
    return state


__all__ = [
    "DEMO_STAKE_PER_GPU",
    "DEMO_UNBOND_DELAY_S",
    "GPU_COUNT_MAX",
    "UNBONDING_ENTRIES_MAX",
    "UNBOND_DELAY_S_MAX",
    "BondResult",
    "CompleteUnbondResult",
    "Fact",
    "ListedGpus",
    "NodeGpus",
    "ProviderStake",
    "Ratio",
    "RequestUnbondResult",
    "RequiredStakeResult",
    "SlashKind",
    "SlashResult",
    "StakeBonded",
    "StakeRules",
    "StakeSlashed",
    "UnbondCompleted",
    "UnbondRequested",
    "UnbondingEntry",
    "UnbondingSlash",
    "apply",
    "bond",
    "can_place_asks",
    "complete_unbond",
    "replay",
    "request_unbond",
    "required_stake",
    "slash",
]
