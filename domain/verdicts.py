"""Checker verdicts, quorum decisions and provider reputation. Pure rules.

No I/O and no clock reads: the caller passes `now`. Each decision is a plain function from a
`VerdictState` (and the command's fields) to a result code and the facts to record; the
result codes are declared in the order they are checked and never renumbered. `apply` folds
one fact into a new state and `replay` rebuilds the state from the facts in log order, so
the live state and the replayed state are always equal.

Numbers are integers: uptime in parts per million, throughput in thousandths of a work unit
(sample or token) per second, latency in milliseconds, ratios as integer pairs (`Ratio`),
reputation in basis points. Never floats.

The rules, with the numbers
---------------------------

Checkers. A checker registers with an operator address (``0x`` and 40 hex digits) and a
stake >= `VerdictRules.checker_stake_min`. Registering the same id again with the same
fields is `ok` and records nothing; with other fields it is refused. A verdict from a checker
that never registered is refused (`verdict_from_unregistered_checker`).

Windows. Time is cut into verdict windows of `verdict_window_s` seconds (default 900, the
15-minute proof round), aligned on the Unix epoch: a window is named by its two timezone-aware
datetimes, ``window_start`` (a multiple of `verdict_window_s` seconds after
1970-01-01T00:00Z, whole seconds) and ``window_end == window_start + verdict_window_s``.
A verdict speaks for a whole window, so it is accepted only once the window has ended and
before it closes::

    window_end <= now < window_end + verdict_grace_s

Verdicts. One verdict per checker per node per window. A retry with the same verdict_id
and the same fields is `ok` and records nothing (also after the window closed); the same
verdict_id with other fields is `exists_with_different_fields`; a second verdict (another id)
from the same checker for the same node and window is `verdict_exists_for_checker_node_window`.
All verdicts of a node-window must name the same provider. ``passed`` and
``failure_kind`` must agree: a passing verdict has failure_kind none, a failing one has a kind.

Quorum. `decide_window(state, node_id, window_start, rules, now)` decides a node-window once
it closed (now >= window_end + verdict_grace_s), exactly once: a second call is a no-op
(`window_already_decided`). A window with no verdict has nothing to decide
(`no_verdicts_for_window`). With n verdicts (n distinct checkers, since one checker has at
most one verdict per node-window) of which f fail:

- n < quorum_checkers_min: `QuorumNotReached` (nobody agrees or contradicts);
- f * den >= num * n, with quorum_fail_ratio = num/den (default 2/3): `QuorumFailed`, with
  the most severe failure kind among the failing verdicts (fraud > under_spec > downtime)
  and the `SlashKind` the stake rules must apply (`slash_kind_of`);
- otherwise: `QuorumPassed`.

Checkers whose verdict agrees with a decided outcome are listed in the decision (for
rewards); each checker whose verdict contradicts it gets a `CheckerContradicted` fact (for
penalties). A failing checker agrees with a failed quorum whatever kind it named.

Slash mapping. fraud -> SlashKind.fraud, downtime -> SlashKind.downtime, under_spec ->
`VerdictRules.under_spec_slash_kind` (default SlashKind.fraud: a node that does not deliver
the hardware it listed is "lying about hardware", fraud in `domain.stake`). The stake module
sizes the slash: `stake.slash(kind=fact.slash_kind, offence_at=fact.window_start, ...)`.

Reputation (`reputation`), in basis points 0..10_000, from a provider's decided windows
(`QuorumPassed` and `QuorumFailed` of its nodes; `QuorumNotReached` counts for nothing), its
stake slashes and its registration time. Each window carries the median (lower median) of
its verdicts' uptime_ppm and latency_ms_p99. With W decided windows, P of them passed, and
integer (floor) division everywhere::

    uptime_ppm_mean     = sum(window uptime_ppm_median) // W                  (0 when W == 0)
    latency_ms_p99_mean = sum(window latency_ms_p99_median) // W
    uptime_points       = uptime_weight_bps * uptime_ppm_mean // 1_000_000
    pass_points         = pass_weight_bps * P // W                            (0 when W == 0)
    latency_points      = latency_weight_bps                 if latency_ms_p99_mean <= target
                          latency_weight_bps * target // latency_ms_p99_mean  otherwise
                                                                              (0 when W == 0)
    age_days            = max(0, now - registered_at) // 86_400
    age_points          = age_weight_bps * min(age_days, age_days_max) // age_days_max
    slash_penalty       = sum over slashes of slash_penalty_bps * decay
        decay           = 1 when slash_penalty_decay_s == 0 (no decay), else
                          max(0, decay_s - max(0, now - slashed_at)) / decay_s (floored per slash)
    score_bps           = max(0, uptime + pass + latency + age points - slash_penalty)

The four weights sum to 10_000 (defaults: uptime 4_000, pass 3_000, latency 2_000, age
1_000), so the score is within 0..10_000. Nothing is assumed of a provider without decided
windows: its uptime, pass and latency points are 0. The score does not depend on the order of
the facts, never rises when a slash is added, and never rises when a passing verdict turns
failing (the window's outcome can only go from passed to failed; its medians do not move).

Ledger mirror
-------------

`CheckerRegistered.stake_amount` moves into the checker's checker_stake account
(`domain.codes.AccountCode.checker_stake`). `QuorumFailed` leads to a `stake.StakeSlashed`
of the provider. `CheckerContradicted` is the record a later checker penalty refers to;
`agreeing_checker_ids` of each decision is what checker rewards are paid against.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from types import MappingProxyType
from uuid import UUID

from domain.checks import require_int, require_uuid
from domain.stake import Ratio, SlashKind, StakeSlashed
from ledger.limits import AMOUNT_MAX
from ledger.money import units

NIL_ID = UUID(int=0)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""Verdict windows are aligned on the Unix epoch."""

UPTIME_PPM_MAX = 1_000_000
"""Uptime is in parts per million: 1_000_000 is always up."""
BPS_MAX = 10_000
"""Reputation is in basis points: 10_000 is the best score."""
LATENCY_MS_P99_MAX = 3_600_000
"""Longest p99 latency a verdict may report (an hour): a bound against garbage."""
THROUGHPUT_MILLI_PER_S_MAX = 10**18
"""Largest throughput a verdict may report, in thousandths of a work unit per second."""
VERDICTS_PER_WINDOW_MAX = 64
"""Most verdicts (checkers) per node per window."""
VERDICT_WINDOW_S_MAX = 24 * 3600
"""Longest verdict window the rules accept (a day; live networks use 15 minutes)."""
VERDICT_GRACE_S_MAX = 24 * 3600
"""Longest grace after a window ends during which its verdicts are accepted."""
QUORUM_CHECKERS_MIN_MAX = VERDICTS_PER_WINDOW_MAX
"""The quorum can ask for at most as many checkers as a window may hold."""
AGE_DAYS_MAX_MAX = 3650
"""Longest age (in days) the reputation's age bonus may take to reach full (ten years)."""
SLASH_PENALTY_DECAY_S_MAX = 10 * 366 * 24 * 3600
"""Longest decay of a slash's reputation penalty (ten years)."""
SECONDS_PER_DAY = 86_400

DEMO_VERDICT_WINDOW_S = 900
"""The 15-minute proof round of live networks; short enough for a demo."""
DEMO_VERDICT_GRACE_S = 60
"""One minute after a window ends for its verdicts to arrive; then it may be decided."""
DEMO_QUORUM_FAIL_RATIO = Ratio(2, 3)
"""Two thirds of the verdicts failing fail the window."""
DEMO_CHECKER_STAKE_MIN = units(10)
"""Least stake a checker registers with, in the token's smallest unit (10 AETH)."""

_OPERATOR_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_EVIDENCE_HASH = re.compile(r"[0-9a-f]{64}")


class FailureKind(IntEnum):
    """What a failing verdict found. Never renumber; severity is `FAILURE_SEVERITY`."""

    none = 0
    """The verdict passed."""
    downtime = 1
    """The node was not reachable or missed its uptime target."""
    fraud = 2
    """Results not computed, forged proofs, tampered evidence."""
    under_spec = 3
    """The node serves below the spec it listed (slower GPU, less memory)."""


FAILURE_SEVERITY: Mapping[FailureKind, int] = MappingProxyType(
    {FailureKind.none: 0, FailureKind.downtime: 1, FailureKind.under_spec: 2, FailureKind.fraud: 3}
)
"""Higher is more severe: fraud > under_spec > downtime. A failed quorum takes the most severe
kind among its failing verdicts."""


@dataclass(frozen=True, slots=True)
class VerdictRules:
    """Checker stake, windows, quorum, slash mapping and the reputation formula's numbers.

    Validated at construction (a ValueError names what is wrong).
    """

    checker_stake_min: int = DEMO_CHECKER_STAKE_MIN
    """Least stake a checker registers with; 1..AMOUNT_MAX, token's smallest unit."""
    verdict_window_s: int = DEMO_VERDICT_WINDOW_S
    """Length of a verdict window; 1..VERDICT_WINDOW_S_MAX."""
    verdict_grace_s: int = DEMO_VERDICT_GRACE_S
    """Seconds after a window ends while its verdicts are accepted; 1..VERDICT_GRACE_S_MAX."""
    quorum_checkers_min: int = 3
    """Fewest distinct checkers whose verdicts decide a window; 1..QUORUM_CHECKERS_MIN_MAX."""
    quorum_fail_ratio: Ratio = DEMO_QUORUM_FAIL_RATIO
    """Failing share of the verdicts at or above which the quorum fails; > 0."""
    under_spec_slash_kind: SlashKind = SlashKind.fraud
    """The slash an under_spec quorum failure leads to."""
    uptime_weight_bps: int = 4_000
    pass_weight_bps: int = 3_000
    latency_weight_bps: int = 2_000
    age_weight_bps: int = 1_000
    """The four weights are >= 0 and sum to BPS_MAX."""
    latency_ms_p99_target: int = 250
    """A mean window p99 latency at or below it earns all latency points; 1..LATENCY_MS_P99_MAX."""
    age_days_max: int = 30
    """Days since registration at which the age bonus is full; 1..AGE_DAYS_MAX_MAX."""
    slash_penalty_bps: int = 2_500
    """Reputation taken by each slash (before decay); 0..BPS_MAX."""
    slash_penalty_decay_s: int = 30 * SECONDS_PER_DAY
    """Seconds over which a slash's penalty decays linearly to zero; 0 means it never decays."""

    def __post_init__(self) -> None:
        for name in (
            "checker_stake_min",
            "verdict_window_s",
            "verdict_grace_s",
            "quorum_checkers_min",
            "uptime_weight_bps",
            "pass_weight_bps",
            "latency_weight_bps",
            "age_weight_bps",
            "latency_ms_p99_target",
            "age_days_max",
            "slash_penalty_bps",
            "slash_penalty_decay_s",
        ):
            require_int(name, getattr(self, name))
        bounds = {
            "checker_stake_min": (1, AMOUNT_MAX),
            "verdict_window_s": (1, VERDICT_WINDOW_S_MAX),
            "verdict_grace_s": (1, VERDICT_GRACE_S_MAX),
            "quorum_checkers_min": (1, QUORUM_CHECKERS_MIN_MAX),
            "uptime_weight_bps": (0, BPS_MAX),
            "pass_weight_bps": (0, BPS_MAX),
            "latency_weight_bps": (0, BPS_MAX),
            "age_weight_bps": (0, BPS_MAX),
            "latency_ms_p99_target": (1, LATENCY_MS_P99_MAX),
            "age_days_max": (1, AGE_DAYS_MAX_MAX),
            "slash_penalty_bps": (0, BPS_MAX),
            "slash_penalty_decay_s": (0, SLASH_PENALTY_DECAY_S_MAX),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within {low}..{high}, got {value}")
        weights = (
            self.uptime_weight_bps
            + self.pass_weight_bps
            + self.latency_weight_bps
            + self.age_weight_bps
        )
        if weights != BPS_MAX:
            raise ValueError(f"the four reputation weights must sum to {BPS_MAX}, got {weights}")
        if not isinstance(self.quorum_fail_ratio, Ratio):
            raise TypeError("quorum_fail_ratio must be a Ratio")
        if self.quorum_fail_ratio.numerator == 0:
            raise ValueError("quorum_fail_ratio must be > 0 (0 would fail every window)")
        if not isinstance(self.under_spec_slash_kind, SlashKind):
            raise TypeError("under_spec_slash_kind must be a SlashKind")


def slash_kind_of(kind: FailureKind, rules: VerdictRules) -> SlashKind:
    """The stake slash a failed quorum of this failure kind leads to."""
    assert kind is not FailureKind.none, "a passing verdict leads to no slash"
    if kind is FailureKind.fraud:
        return SlashKind.fraud
    if kind is FailureKind.downtime:
        return SlashKind.downtime
    return rules.under_spec_slash_kind


def window_end_of(window_start: datetime, rules: VerdictRules) -> datetime:
    """The end of the window starting at `window_start`."""
    return window_start + timedelta(seconds=rules.verdict_window_s)


def window_containing(moment: datetime, rules: VerdictRules) -> datetime:
    """The start of the window `moment` (timezone-aware) falls in."""
    delta = moment - EPOCH
    seconds = delta.days * SECONDS_PER_DAY + delta.seconds
    return EPOCH + timedelta(seconds=seconds - seconds % rules.verdict_window_s)


def _window_start_is_aligned(window_start: datetime, rules: VerdictRules) -> bool:
    if window_start.utcoffset() is None or window_start.microsecond != 0:
        return False
    delta = window_start - EPOCH
    return (
        delta.microseconds == 0
        and (delta.days * SECONDS_PER_DAY + delta.seconds) % (rules.verdict_window_s) == 0
    )


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterChecker:
    """Command: register a checker with its stake. The same id with the same fields is `ok`."""

    checker_id: UUID
    operator_address: str
    """The operator's chain address: "0x" and 40 hex digits."""
    stake_amount: int
    """>= rules.checker_stake_min, in the token's smallest unit."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Command: a checker's verdict on one node for one window."""

    verdict_id: UUID
    checker_id: UUID
    node_id: UUID
    provider_id: UUID
    """The provider the node belongs to; the same for every verdict of a node-window."""
    window_start: datetime
    """Timezone-aware, a multiple of verdict_window_s seconds after the Unix epoch."""
    window_end: datetime
    """window_start + verdict_window_s."""
    latency_ms_p99: int
    """99th percentile of the request latencies the checker measured; 0..LATENCY_MS_P99_MAX."""
    throughput_milli_per_s: int
    """Work units (samples or tokens) per second x 1000; 0..THROUGHPUT_MILLI_PER_S_MAX."""
    uptime_ppm: int
    """Share of the window the node answered, parts per million; 0..UPTIME_PPM_MAX."""
    passed: bool
    failure_kind: FailureKind
    """none when passed; downtime, fraud or under_spec when failed."""
    evidence_hash: str
    """SHA-256 (32 bytes) of the checker's evidence: 64 lowercase hex digits."""


# -- facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckerRegistered:
    """Fact: a checker registered and staked `stake_amount`."""

    checker_id: UUID
    operator_address: str
    stake_amount: int
    """> 0; moves into the checker's checker_stake account."""
    registered_at: datetime


@dataclass(frozen=True, slots=True)
class VerdictRecorded:
    """Fact: a verdict was accepted. Its fields are those of the `Verdict` command."""

    verdict_id: UUID
    checker_id: UUID
    node_id: UUID
    provider_id: UUID
    window_start: datetime
    window_end: datetime
    latency_ms_p99: int
    throughput_milli_per_s: int
    uptime_ppm: int
    passed: bool
    failure_kind: FailureKind
    evidence_hash: str
    recorded_at: datetime

    def command(self) -> Verdict:
        """The command this fact accepted (to compare a retry with)."""
        return Verdict(
            self.verdict_id,
            self.checker_id,
            self.node_id,
            self.provider_id,
            self.window_start,
            self.window_end,
            self.latency_ms_p99,
            self.throughput_milli_per_s,
            self.uptime_ppm,
            self.passed,
            self.failure_kind,
            self.evidence_hash,
        )


@dataclass(frozen=True, slots=True)
class QuorumPassed:
    """Fact: a node-window was decided passed."""

    node_id: UUID
    provider_id: UUID
    window_start: datetime
    window_end: datetime
    verdicts_count: int
    """Distinct checkers that spoke: >= quorum_checkers_min."""
    failing_checker_ids: tuple[UUID, ...]
    """Checkers whose verdict failed (too few to fail the quorum), in verdict order."""
    agreeing_checker_ids: tuple[UUID, ...]
    """Checkers whose verdict passed, in verdict order."""
    contradicting_checker_ids: tuple[UUID, ...]
    """== failing_checker_ids."""
    uptime_ppm_median: int
    """Lower median of the verdicts' uptime_ppm."""
    latency_ms_p99_median: int
    """Lower median of the verdicts' latency_ms_p99."""
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class QuorumFailed:
    """Fact: a node-window was decided failed; the provider is to be slashed."""

    node_id: UUID
    provider_id: UUID
    window_start: datetime
    """Also the offence time handed to the stake slash."""
    window_end: datetime
    verdicts_count: int
    kind: FailureKind
    """The most severe failure kind among the failing verdicts."""
    slash_kind: SlashKind
    """`slash_kind_of(kind)` under the rules of the time: the slash the stake rules apply."""
    failing_checker_ids: tuple[UUID, ...]
    """Checkers whose verdict failed, in verdict order."""
    agreeing_checker_ids: tuple[UUID, ...]
    """== failing_checker_ids."""
    contradicting_checker_ids: tuple[UUID, ...]
    """Checkers whose verdict passed, in verdict order."""
    uptime_ppm_median: int
    latency_ms_p99_median: int
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class QuorumNotReached:
    """Fact: a node-window closed with verdicts from too few checkers; nothing follows."""

    node_id: UUID
    provider_id: UUID
    window_start: datetime
    window_end: datetime
    verdicts_count: int
    """< quorum_checkers_min, > 0."""
    checker_ids: tuple[UUID, ...]
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class CheckerContradicted:
    """Fact: a checker's verdict contradicted its window's decided outcome (for penalties)."""

    checker_id: UUID
    verdict_id: UUID
    node_id: UUID
    window_start: datetime
    verdict_passed: bool
    """What the checker said; the quorum said the opposite."""
    decided_at: datetime


Decision = QuorumPassed | QuorumFailed | QuorumNotReached
Fact = (
    CheckerRegistered
    | VerdictRecorded
    | QuorumPassed
    | QuorumFailed
    | QuorumNotReached
    | CheckerContradicted
)
"""What the verdict rules record."""

WindowKey = tuple[UUID, datetime]
"""(node_id, window_start)."""


# -- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerdictState:
    """Checkers, verdicts and decisions. Immutable: `apply` returns a new state.

    The mappings are read-only views; equal states compare equal field by field.
    """

    checkers: Mapping[UUID, CheckerRegistered] = field(default_factory=lambda: MappingProxyType({}))
    verdicts: Mapping[UUID, VerdictRecorded] = field(default_factory=lambda: MappingProxyType({}))
    """By verdict_id."""
    windows: Mapping[WindowKey, tuple[UUID, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """(node_id, window_start) -> verdict ids, one per checker, in the order recorded."""
    decisions: Mapping[WindowKey, Decision] = field(default_factory=lambda: MappingProxyType({}))
    contradicted_counts: Mapping[UUID, int] = field(default_factory=lambda: MappingProxyType({}))
    """checker_id -> verdicts contradicting a decided outcome."""
    agreed_counts: Mapping[UUID, int] = field(default_factory=lambda: MappingProxyType({}))
    """checker_id -> verdicts agreeing with a decided (passed or failed) outcome."""

    def window_verdicts(self, node_id: UUID, window_start: datetime) -> tuple[VerdictRecorded, ...]:
        """The verdicts of one node-window, in the order recorded."""
        return tuple(self.verdicts[v] for v in self.windows.get((node_id, window_start), ()))

    def provider_decisions(self, provider_id: UUID) -> tuple[Decision, ...]:
        """Every decision on a node of the provider, in the order decided."""
        return tuple(d for d in self.decisions.values() if d.provider_id == provider_id)


# -- decisions ----------------------------------------------------------------------------


class RegisterCheckerResult(IntEnum):
    """Result of `register_checker`, in the order the rules are checked. Never renumber."""

    ok = 0
    checker_id_must_not_be_zero = 1
    operator_address_malformed = 2
    """Not "0x" followed by 40 hex digits."""
    stake_amount_must_not_be_negative = 3
    stake_amount_must_not_be_zero = 4
    stake_amount_exceeds_max = 5
    stake_amount_below_minimum = 6
    """stake_amount < rules.checker_stake_min."""
    exists_with_different_operator_address = 7
    exists_with_different_stake_amount = 8


def register_checker(
    state: VerdictState, command: RegisterChecker, rules: VerdictRules, now: datetime
) -> tuple[RegisterCheckerResult, tuple[Fact, ...]]:
    """Register a checker with its stake."""
    r = RegisterCheckerResult
    require_uuid("checker_id", command.checker_id)
    require_int("stake_amount", command.stake_amount)
    if command.checker_id == NIL_ID:
        return r.checker_id_must_not_be_zero, ()
    if not isinstance(command.operator_address, str) or not _OPERATOR_ADDRESS.fullmatch(
        command.operator_address
    ):
        return r.operator_address_malformed, ()
    if command.stake_amount < 0:
        return r.stake_amount_must_not_be_negative, ()
    if command.stake_amount == 0:
        return r.stake_amount_must_not_be_zero, ()
    if command.stake_amount > AMOUNT_MAX:
        return r.stake_amount_exceeds_max, ()
    if command.stake_amount < rules.checker_stake_min:
        return r.stake_amount_below_minimum, ()
    existing = state.checkers.get(command.checker_id)
    if existing is not None:
        if existing.operator_address != command.operator_address:
            return r.exists_with_different_operator_address, ()
        if existing.stake_amount != command.stake_amount:
            return r.exists_with_different_stake_amount, ()
        return r.ok, ()
    fact = CheckerRegistered(
        command.checker_id, command.operator_address, command.stake_amount, now
    )
    return r.ok, (fact,)


class SubmitVerdictResult(IntEnum):
    """Result of `submit_verdict`, in the order the rules are checked. Never renumber."""

    ok = 0
    verdict_id_must_not_be_zero = 1
    checker_id_must_not_be_zero = 2
    node_id_must_not_be_zero = 3
    provider_id_must_not_be_zero = 4
    window_start_must_be_aligned = 5
    """Naive, fractional, or not a multiple of verdict_window_s after the Unix epoch."""
    window_end_must_be_window_start_plus_window_s = 6
    window_must_have_ended = 7
    """window_end > now: the window is still open or in the future."""
    latency_ms_p99_must_not_be_negative = 8
    latency_ms_p99_exceeds_max = 9
    throughput_must_not_be_negative = 10
    throughput_exceeds_max = 11
    uptime_ppm_out_of_range = 12
    """Not within 0..UPTIME_PPM_MAX."""
    failure_kind_must_be_none_when_passed = 13
    failure_kind_must_not_be_none_when_failed = 14
    evidence_hash_malformed = 15
    """Not 64 lowercase hex digits (32 bytes)."""
    exists_with_different_fields = 16
    """The verdict_id was recorded with other fields."""
    verdict_from_unregistered_checker = 17
    window_closed = 18
    """now >= window_end + verdict_grace_s: the window takes no more verdicts."""
    verdict_exists_for_checker_node_window = 19
    """The checker already gave a verdict (another id) for this node and window."""
    provider_differs_from_earlier_verdicts = 20
    """Earlier verdicts of this node-window name another provider."""
    verdicts_per_window_exceed_max = 21


def submit_verdict(
    state: VerdictState, command: Verdict, rules: VerdictRules, now: datetime
) -> tuple[SubmitVerdictResult, tuple[Fact, ...]]:
    """Accept a checker's verdict on a node-window. A retry with the same fields is `ok`."""
    r = SubmitVerdictResult
    c = command
    for name in ("verdict_id", "checker_id", "node_id", "provider_id"):
        require_uuid(name, getattr(c, name))
    for name in ("latency_ms_p99", "throughput_milli_per_s", "uptime_ppm"):
        require_int(name, getattr(c, name))
    if type(c.passed) is not bool:
        raise TypeError(f"passed must be a bool, got {c.passed!r}")
    if not isinstance(c.failure_kind, FailureKind):
        raise TypeError(f"failure_kind must be a FailureKind, got {c.failure_kind!r}")
    if c.verdict_id == NIL_ID:
        return r.verdict_id_must_not_be_zero, ()
    if c.checker_id == NIL_ID:
        return r.checker_id_must_not_be_zero, ()
    if c.node_id == NIL_ID:
        return r.node_id_must_not_be_zero, ()
    if c.provider_id == NIL_ID:
        return r.provider_id_must_not_be_zero, ()
    if not _window_start_is_aligned(c.window_start, rules):
        return r.window_start_must_be_aligned, ()
    if c.window_end.utcoffset() is None or c.window_end != window_end_of(c.window_start, rules):
        return r.window_end_must_be_window_start_plus_window_s, ()
    if c.window_end > now:
        return r.window_must_have_ended, ()
    if c.latency_ms_p99 < 0:
        return r.latency_ms_p99_must_not_be_negative, ()
    if c.latency_ms_p99 > LATENCY_MS_P99_MAX:
        return r.latency_ms_p99_exceeds_max, ()
    if c.throughput_milli_per_s < 0:
        return r.throughput_must_not_be_negative, ()
    if c.throughput_milli_per_s > THROUGHPUT_MILLI_PER_S_MAX:
        return r.throughput_exceeds_max, ()
    if not 0 <= c.uptime_ppm <= UPTIME_PPM_MAX:
        return r.uptime_ppm_out_of_range, ()
    if c.passed and c.failure_kind is not FailureKind.none:
        return r.failure_kind_must_be_none_when_passed, ()
    if not c.passed and c.failure_kind is FailureKind.none:
        return r.failure_kind_must_not_be_none_when_failed, ()
    if not isinstance(c.evidence_hash, str) or not _EVIDENCE_HASH.fullmatch(c.evidence_hash):
        return r.evidence_hash_malformed, ()
    existing = state.verdicts.get(c.verdict_id)
    if existing is not None:
        if existing.command() != c:
            return r.exists_with_different_fields, ()
        return r.ok, ()
    if c.checker_id not in state.checkers:
        return r.verdict_from_unregistered_checker, ()
    if now >= c.window_end + timedelta(seconds=rules.verdict_grace_s):
        return r.window_closed, ()
    earlier = state.window_verdicts(c.node_id, c.window_start)
    if any(v.checker_id == c.checker_id for v in earlier):
        return r.verdict_exists_for_checker_node_window, ()
    if earlier and earlier[0].provider_id != c.provider_id:
        return r.provider_differs_from_earlier_verdicts, ()
    if len(earlier) >= VERDICTS_PER_WINDOW_MAX:
        return r.verdicts_per_window_exceed_max, ()
    fact = VerdictRecorded(
        c.verdict_id,
        c.checker_id,
        c.node_id,
        c.provider_id,
        c.window_start,
        c.window_end,
        c.latency_ms_p99,
        c.throughput_milli_per_s,
        c.uptime_ppm,
        c.passed,
        c.failure_kind,
        c.evidence_hash,
        now,
    )
    return r.ok, (fact,)


class DecideWindowResult(IntEnum):
    """Result of `decide_window`, in the order the rules are checked. Never renumber."""

    ok = 0
    window_start_must_be_aligned = 1
    window_not_closed = 2
    """now < window_end + verdict_grace_s: verdicts may still arrive."""
    window_already_decided = 3
    """Decided before: a no-op that records nothing."""
    no_verdicts_for_window = 4
    """No checker spoke of this node-window: nothing to decide, nothing recorded."""


def _lower_median(values: Iterable[int]) -> int:
    ordered = sorted(values)
    assert ordered, "median of no values"
    return ordered[(len(ordered) - 1) // 2]


def decide_window(
    state: VerdictState,
    node_id: UUID,
    window_start: datetime,
    rules: VerdictRules,
    now: datetime,
) -> tuple[DecideWindowResult, tuple[Fact, ...]]:
    """Decide a closed node-window, once: passed, failed (a slash follows) or not reached.

    Failed facts come first, then one `CheckerContradicted` per contradicting checker.
    """
    r = DecideWindowResult
    require_uuid("node_id", node_id)
    if not _window_start_is_aligned(window_start, rules):
        return r.window_start_must_be_aligned, ()
    window_end = window_end_of(window_start, rules)
    if now < window_end + timedelta(seconds=rules.verdict_grace_s):
        return r.window_not_closed, ()
    if (node_id, window_start) in state.decisions:
        return r.window_already_decided, ()
    verdicts = state.window_verdicts(node_id, window_start)
    if not verdicts:
        return r.no_verdicts_for_window, ()
    # One verdict per checker is enforced at submission; keyed by checker all the same, so a
    # checker can never count twice.
    by_checker: dict[UUID, VerdictRecorded] = {}
    for verdict in verdicts:
        by_checker.setdefault(verdict.checker_id, verdict)
    counted = tuple(by_checker.values())
    provider_id = counted[0].provider_id
    assert all(v.provider_id == provider_id for v in counted)
    window_end = counted[0].window_end
    n = len(counted)
    if n < rules.quorum_checkers_min:
        not_reached = QuorumNotReached(
            node_id,
            provider_id,
            window_start,
            window_end,
            n,
            tuple(v.checker_id for v in counted),
            now,
        )
        return r.ok, (not_reached,)
    failing = tuple(v for v in counted if not v.passed)
    passing = tuple(v for v in counted if v.passed)
    uptime_ppm_median = _lower_median(v.uptime_ppm for v in counted)
    latency_ms_p99_median = _lower_median(v.latency_ms_p99 for v in counted)
    ratio = rules.quorum_fail_ratio
    decision: Decision
    if len(failing) * ratio.denominator >= ratio.numerator * n:
        kind = max((v.failure_kind for v in failing), key=FAILURE_SEVERITY.__getitem__)
        decision = QuorumFailed(
            node_id=node_id,
            provider_id=provider_id,
            window_start=window_start,
            window_end=window_end,
            verdicts_count=n,
            kind=kind,
            slash_kind=slash_kind_of(kind, rules),
            failing_checker_ids=tuple(v.checker_id for v in failing),
            agreeing_checker_ids=tuple(v.checker_id for v in failing),
            contradicting_checker_ids=tuple(v.checker_id for v in passing),
            uptime_ppm_median=uptime_ppm_median,
            latency_ms_p99_median=latency_ms_p99_median,
            decided_at=now,
        )
        contradicting = passing
    else:
        decision = QuorumPassed(
            node_id=node_id,
            provider_id=provider_id,
            window_start=window_start,
            window_end=window_end,
            verdicts_count=n,
            failing_checker_ids=tuple(v.checker_id for v in failing),
            agreeing_checker_ids=tuple(v.checker_id for v in passing),
            contradicting_checker_ids=tuple(v.checker_id for v in failing),
            uptime_ppm_median=uptime_ppm_median,
            latency_ms_p99_median=latency_ms_p99_median,
            decided_at=now,
        )
        contradicting = failing
    contradictions = tuple(
        CheckerContradicted(v.checker_id, v.verdict_id, node_id, window_start, v.passed, now)
        for v in contradicting
    )
    return r.ok, (decision, *contradictions)


# -- reputation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderHistory:
    """What a provider's reputation is computed from: all of it read from the log."""

    provider_id: UUID
    registered_at: datetime
    decisions: tuple[Decision, ...] = ()
    """Decisions on the provider's nodes; any order; other providers' are ignored."""
    slashes: tuple[StakeSlashed, ...] = ()
    """The provider's stake slashes; any order; other providers' are ignored."""


@dataclass(frozen=True, slots=True)
class ReputationScore:
    """A provider's reputation and each component of it (see the module's formula)."""

    provider_id: UUID
    score_bps: int
    """0..BPS_MAX."""
    windows_decided_count: int
    windows_passed_count: int
    uptime_ppm_mean: int
    uptime_points_bps: int
    pass_points_bps: int
    latency_ms_p99_mean: int
    latency_points_bps: int
    age_days: int
    age_points_bps: int
    slashes_count: int
    slash_penalty_bps: int


def reputation(history: ProviderHistory, now: datetime, rules: VerdictRules) -> ReputationScore:
    """The provider's reputation at `now`: the module's formula, in integers."""
    provider_id = history.provider_id
    decided = [
        d
        for d in history.decisions
        if d.provider_id == provider_id and not isinstance(d, QuorumNotReached)
    ]
    windows = len(decided)
    passed = sum(1 for d in decided if isinstance(d, QuorumPassed))
    if windows:
        uptime_ppm_mean = sum(d.uptime_ppm_median for d in decided) // windows
        latency_ms_p99_mean = sum(d.latency_ms_p99_median for d in decided) // windows
        uptime_points = rules.uptime_weight_bps * uptime_ppm_mean // UPTIME_PPM_MAX
        pass_points = rules.pass_weight_bps * passed // windows
        if latency_ms_p99_mean <= rules.latency_ms_p99_target:
            latency_points = rules.latency_weight_bps
        else:
            latency_points = (
                rules.latency_weight_bps * rules.latency_ms_p99_target // latency_ms_p99_mean
            )
    else:
        uptime_ppm_mean = latency_ms_p99_mean = 0
        uptime_points = pass_points = latency_points = 0
    age_s = max(0, int((now - history.registered_at).total_seconds()))
    age_days = age_s // SECONDS_PER_DAY
    age_points = rules.age_weight_bps * min(age_days, rules.age_days_max) // rules.age_days_max
    slashes = [s for s in history.slashes if s.provider_id == provider_id]
    penalty = 0
    for slash in slashes:
        if rules.slash_penalty_decay_s == 0:
            penalty += rules.slash_penalty_bps
            continue
        slash_age_s = max(0, int((now - slash.slashed_at).total_seconds()))
        left_s = max(0, rules.slash_penalty_decay_s - slash_age_s)
        penalty += rules.slash_penalty_bps * left_s // rules.slash_penalty_decay_s
    positive = uptime_points + pass_points + latency_points + age_points
    assert 0 <= positive <= BPS_MAX, f"provider {provider_id}: points {positive} out of range"
    return ReputationScore(
        provider_id=provider_id,
        score_bps=max(0, positive - penalty),
        windows_decided_count=windows,
        windows_passed_count=passed,
        uptime_ppm_mean=uptime_ppm_mean,
        uptime_points_bps=uptime_points,
        pass_points_bps=pass_points,
        latency_ms_p99_mean=latency_ms_p99_mean,
        latency_points_bps=latency_points,
        age_days=age_days,
        age_points_bps=age_points,
        slashes_count=len(slashes),
        slash_penalty_bps=penalty,
    )


def reputations(
    histories: Iterable[ProviderHistory], now: datetime, rules: VerdictRules
) -> dict[UUID, ReputationScore]:
    """The reputation of each provider, by provider id (independent of the order given)."""
    scores = {h.provider_id: reputation(h, now, rules) for h in histories}
    return dict(sorted(scores.items()))


# -- appliers (shared by decisions and replay) --------------------------------------------


@dataclass(slots=True)
class _Builder:
    """The mutable twin of `VerdictState` that `apply` and `replay` fold facts into."""

    checkers: dict[UUID, CheckerRegistered]
    verdicts: dict[UUID, VerdictRecorded]
    windows: dict[WindowKey, tuple[UUID, ...]]
    decisions: dict[WindowKey, Decision]
    contradicted_counts: dict[UUID, int]
    agreed_counts: dict[UUID, int]

    @classmethod
    def of(cls, state: VerdictState) -> _Builder:
        return cls(
            dict(state.checkers),
            dict(state.verdicts),
            dict(state.windows),
            dict(state.decisions),
            dict(state.contradicted_counts),
            dict(state.agreed_counts),
        )

    def freeze(self) -> VerdictState:
        return VerdictState(
            MappingProxyType(self.checkers),
            MappingProxyType(self.verdicts),
            MappingProxyType(self.windows),
            MappingProxyType(self.decisions),
            MappingProxyType(self.contradicted_counts),
            MappingProxyType(self.agreed_counts),
        )

    def apply(self, fact: Fact) -> None:
        if isinstance(fact, CheckerRegistered):
            assert fact.checker_id not in self.checkers, f"checker {fact.checker_id} twice"
            assert fact.stake_amount > 0
            self.checkers[fact.checker_id] = fact
        elif isinstance(fact, VerdictRecorded):
            assert fact.verdict_id not in self.verdicts, f"verdict {fact.verdict_id} twice"
            assert fact.checker_id in self.checkers, (
                f"verdict {fact.verdict_id} from unregistered checker {fact.checker_id}"
            )
            key = (fact.node_id, fact.window_start)
            assert key not in self.decisions, f"verdict {fact.verdict_id} for a decided window"
            ids = self.windows.get(key, ())
            assert all(self.verdicts[v].checker_id != fact.checker_id for v in ids), (
                f"checker {fact.checker_id} voted twice on node {fact.node_id}"
            )
            assert len(ids) < VERDICTS_PER_WINDOW_MAX
            self.verdicts[fact.verdict_id] = fact
            self.windows[key] = (*ids, fact.verdict_id)
        elif isinstance(fact, CheckerContradicted):
            key = (fact.node_id, fact.window_start)
            assert key in self.decisions, f"contradiction on undecided window {key}"
            verdict = self.verdicts[fact.verdict_id]
            assert verdict.checker_id == fact.checker_id
            assert verdict.passed == fact.verdict_passed
            self.contradicted_counts[fact.checker_id] = (
                self.contradicted_counts.get(fact.checker_id, 0) + 1
            )
        else:
            key = (fact.node_id, fact.window_start)
            assert key not in self.decisions, f"window {key} decided twice"
            assert key in self.windows, f"decision on window {key} without verdicts"
            self.decisions[key] = fact
            if not isinstance(fact, QuorumNotReached):
                for checker_id in fact.agreeing_checker_ids:
                    self.agreed_counts[checker_id] = self.agreed_counts.get(checker_id, 0) + 1


def apply(state: VerdictState, fact: Fact) -> VerdictState:
    """The state after `fact` (a fact decided for this state, or read back from the log)."""
    builder = _Builder.of(state)
    builder.apply(fact)
    return builder.freeze()


def apply_all(state: VerdictState, facts: Iterable[Fact]) -> VerdictState:
    """The state after `facts`, in order (one copy of the state, not one per fact)."""
    builder = _Builder.of(state)
    for fact in facts:
        builder.apply(fact)
    return builder.freeze()


def replay(facts: Iterable[Fact]) -> VerdictState:
    """Rebuild the state from its facts in log order."""
    return apply_all(VerdictState(), facts)


__all__ = [
    "AGE_DAYS_MAX_MAX",
    "BPS_MAX",
    "DEMO_CHECKER_STAKE_MIN",
    "DEMO_QUORUM_FAIL_RATIO",
    "DEMO_VERDICT_GRACE_S",
    "DEMO_VERDICT_WINDOW_S",
    "EPOCH",
    "FAILURE_SEVERITY",
    "LATENCY_MS_P99_MAX",
    "NIL_ID",
    "QUORUM_CHECKERS_MIN_MAX",
    "SECONDS_PER_DAY",
    "SLASH_PENALTY_DECAY_S_MAX",
    "THROUGHPUT_MILLI_PER_S_MAX",
    "UPTIME_PPM_MAX",
    "VERDICTS_PER_WINDOW_MAX",
    "VERDICT_GRACE_S_MAX",
    "VERDICT_WINDOW_S_MAX",
    "CheckerContradicted",
    "CheckerRegistered",
    "DecideWindowResult",
    "Decision",
    "Fact",
    "FailureKind",
    "ProviderHistory",
    "QuorumFailed",
    "QuorumNotReached",
    "QuorumPassed",
    "RegisterChecker",
    "RegisterCheckerResult",
    "ReputationScore",
    "SubmitVerdictResult",
    "Verdict",
    "VerdictRecorded",
    "VerdictRules",
    "VerdictState",
    "WindowKey",
    "apply",
    "apply_all",
    "decide_window",
    "register_checker",
    "replay",
    "reputation",
    "reputations",
    "slash_kind_of",
    "submit_verdict",
    "window_containing",
    "window_end_of",
]
