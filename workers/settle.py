"""The settle worker: one run per epoch, safe to re-run (`aether worker settle`).

For epoch n (``[n * epoch_s, (n + 1) * epoch_s)`` seconds after 1970-01-01T00:00Z):

1. Plan (once): `domain.settlement.settle_epoch` over every recorded usage record received
   before the epoch's end that no earlier plan settled, the marketplace's leases, its failed
   windows and quorum decisions; plus the closed leases whose escrow was kept for settlement
   and closed at least `release_delay_s` before the epoch's end (their last usage is in).
   Recorded as `EpochPlanned` before any money moves (`ledger.settlement`).
2. Execute the plan through the marketplace service, each command with an id derived from
   (epoch, what it does), so a re-run after a crash is a retry that changes nothing:
   `ChargeUsage` per lease (withheld: the part inside failed windows), `RewardChecker` per
   checker, then `ReleaseEscrow` per released lease. A charge on a lease whose escrow is
   exhausted draws what is left (the rest is recorded as uncovered and, per the lease
   rules, the lease pauses or closes).
3. Record the outcome and the payout batch (`EpochSettled`): per provider its cumulative
   earnings credited in the ledger, the Merkle root over (operator address, cumulative).
4. Post the root on chain when a payout gateway is configured (`PayoutRootPosted`).

Epochs are settled in order: an epoch before the last planned one is refused (its usage
was swept into the later plan). `due(now)` lists the epochs ready to settle: those whose
end is at least `settle_delay_s` in the past (ingest lag and verdict windows decided).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID, uuid4, uuid5

from eventsourcing.persistence import IntegrityError

from domain import settlement as rules_of
from domain.codes import AccountCode
from domain.lease import LeaseStatus, UsageCharged
from domain.postings import BPS_MAX, account_id
from domain.settlement import EPOCH, SettlementRules, settle_epoch
from domain.verdicts import QuorumFailed
from ledger.market import service as m
from ledger.merkle import PayoutTree, normalize_account
from ledger.settlement import (
    SETTLEMENT_NAMESPACE,
    ChargeOutcome,
    EpochPlanned,
    EpochRecord,
    EpochSettled,
    PayoutEntry,
    PayoutRootPosted,
    PlannedCharge,
    PlannedReward,
    SettlementLog,
)
from ledger.usage import UsageApplication

log = logging.getLogger("aether.settle")

DEFAULT_RELEASE_DELAY_S = 60
"""A closed lease's escrow is released by the first settlement ending this long after the
close: usage of its last interval reaches the log within it."""
DEFAULT_SETTLE_DELAY_S = 120


class PostedRoot(Protocol):
    @property
    def post_tx(self) -> str | None:
        """The posting transaction (None: posted before this call)."""
        ...


class PayoutGateway(Protocol):
    """What puts a payout root on chain (`workers.chain.PayoutGateway`)."""

    def post_payout_root(self, epoch: int, root: bytes, fund_amount: int) -> PostedRoot:
        """Fund the distributor with `fund_amount` and post `root` for `epoch`; idempotent."""
        ...


class SettlementError(Exception):
    """An epoch cannot be settled as asked."""


def epoch_start_of(epoch: int, rules: SettlementRules) -> datetime:
    return EPOCH + timedelta(seconds=epoch * rules.epoch_s)


def epoch_of(moment: datetime, rules: SettlementRules) -> int:
    """The number of the epoch `moment` falls in."""
    return int((moment - EPOCH) // timedelta(seconds=rules.epoch_s))


def command_id(epoch: int, what: str) -> UUID:
    return uuid5(SETTLEMENT_NAMESPACE, f"epoch:{epoch}:{what}")


@dataclass(frozen=True, slots=True)
class SettleReport:
    record: EpochRecord
    commands: int
    """Commands handled by this run (retries included)."""
    retried: int


class Settler:
    """Settles epochs on one marketplace shard (see the module docstring)."""

    def __init__(
        self,
        service: m.Marketplace,
        usage: UsageApplication,
        settlements: SettlementLog,
        *,
        rules: SettlementRules | None = None,
        gateway: PayoutGateway | None = None,
        release_delay_s: int = DEFAULT_RELEASE_DELAY_S,
        settle_delay_s: int = DEFAULT_SETTLE_DELAY_S,
        clock: Callable[[], datetime] = m.utc_now,
    ) -> None:
        self.service = service
        self.usage = usage
        self.log = settlements
        self.rules = rules or SettlementRules(posting=service.rules.postings)
        if self.rules.posting != service.rules.postings:
            raise ValueError("settlement and the marketplace must use the same posting rules")
        self.gateway = gateway
        self.release_delay = timedelta(seconds=release_delay_s)
        self.settle_delay = timedelta(seconds=settle_delay_s)
        self.clock = clock

    # -- which epochs ----------------------------------------------------------------------

    def due(self, now: datetime | None = None) -> list[int]:
        """Epochs ready to settle, oldest first: after the last planned one (or from the
        epoch of the first usage record) to the last that ended `settle_delay_s` ago."""
        now = now or self.clock()
        self.log.refresh()
        last = epoch_of(now - self.settle_delay, self.rules) - 1
        if self.log.epochs:
            latest = max(self.log.epochs)
            pending = [n for n, r in self.log.epochs.items() if r.settled is None]
            first = min([*pending, latest + 1])
        else:
            received = [u.received_at for _, u in self.usage.read()]
            if not received:
                return []
            first = epoch_of(min(received), self.rules)
        return list(range(first, last + 1))

    def settle_due(self, now: datetime | None = None) -> list[SettleReport]:
        return [self.settle(n) for n in self.due(now)]

    # -- one epoch -------------------------------------------------------------------------

    def settle(self, epoch: int) -> SettleReport:
        """Plan (once), execute, record the outcome and post the root of `epoch`."""
        self.log.refresh()
        self.service.refresh()
        record = self.log.epochs.get(epoch)
        if record is None:
            record = self._plan(epoch)
        plan = record.plan
        counts = [0, 0]
        self._handle(epoch, self._charges(plan), counts)
        drawn = {c.lease_id: self._drawn(epoch, c) for c in plan.charges}
        rewards = self._rewards(plan, drawn)
        self._handle(epoch, self._reward_commands(plan, rewards), counts)
        self._handle(epoch, self._releases(plan), counts)
        if record.settled is None:
            self._record_outcome(record, drawn, rewards)
        if self.gateway is not None and record.posted is None:
            self._post(record)
        return SettleReport(self.log.epochs[epoch], counts[0], counts[1])

    def _handle(self, epoch: int, commands: Sequence[m.Command], counts: list[int]) -> None:
        for command in commands:
            try:
                handled = self.service.handle(command)
            except (m.LeaseClosedError, m.RuleRefusedError) as e:
                # e.g. a lease whose escrow went back before settlement kept it (a close
                # under release_escrow_at_close): the usage stays uncovered.
                log.warning("epoch %d: %s refused: %s", epoch, type(command).__name__, e)
                continue
            counts[0] += 1
            counts[1] += handled.retried

    def _rewards(self, plan: EpochPlanned, drawn: Mapping[UUID, int]) -> tuple[PlannedReward, ...]:
        """The checkers' shares of the pool of the fees actually drawn (an exhausted escrow
        draws less than the plan priced): pool * agreed // all agreed, rounded down."""
        posting = self.rules.posting
        fee = sum(
            posting.fee_of(drawn[c.lease_id] - min(c.withheld, drawn[c.lease_id]))
            for c in plan.charges
        )
        pool = fee * self.rules.checker_reward_bps // BPS_MAX
        agreed = sum(r.agreed_verdicts for r in plan.rewards)
        return tuple(
            PlannedReward(r.checker_id, r.agreed_verdicts, pool * r.agreed_verdicts // agreed)
            for r in plan.rewards
        )

    def _plan(self, epoch: int) -> EpochRecord:
        later = [n for n in self.log.epochs if n > epoch]
        if later:
            raise SettlementError(
                f"epoch {epoch} comes before epoch {max(later)}, which is planned already: "
                "its usage was settled there"
            )
        epoch_start = epoch_start_of(epoch, self.rules)
        state = self.service.state
        decisions = list(state.verdicts.decisions.values())
        result = settle_epoch(
            epoch_start,
            (u for _, u in self.usage.read()),
            state.leases,
            self.log.settled_keys(),
            [d for d in decisions if isinstance(d, QuorumFailed)],
            decisions,
            self.rules,
        )
        releases = tuple(
            sorted(
                (
                    lease.id
                    for lease in state.leases.values()
                    if lease.status is LeaseStatus.closed
                    and not lease.escrow_final
                    and lease.closed_at is not None
                    and lease.closed_at + self.release_delay <= result.epoch_end
                ),
                key=str,
            )
        )
        plan = EpochPlanned(
            epoch=epoch,
            epoch_start=result.epoch_start,
            epoch_end=result.epoch_end,
            charges=tuple(
                PlannedCharge(
                    c.lease_id,
                    c.provider_id,
                    c.consumer_id,
                    c.amount,
                    c.withheld,
                    c.fee,
                    c.provider_share,
                    c.sequences,
                    c.billable_s,
                    tuple(sorted({x.window_start for x in c.exclusions})),
                )
                for c in result.charges
            ),
            rewards=tuple(
                PlannedReward(r.checker_id, r.agreed_verdicts, r.amount)
                for r in result.checker_rewards
            ),
            releases=releases,
            unknown_lease_usage=len(result.unknown_lease_usage),
            charged=result.charged,
            withheld=result.withheld,
            fee=result.fee,
            provider_share=result.provider_share,
            reward_pool=result.reward_pool,
            checker_rewards_total=result.checker_rewards_total,
            treasury_net=result.treasury_net,
            planned_at=self.clock(),
        )
        if result.unknown_lease_usage:
            log.warning(
                "epoch %d: %d usage records of unknown leases left unsettled",
                epoch,
                len(result.unknown_lease_usage),
            )
        self._append(plan, 1)
        return self.log.epochs[epoch]

    def _charges(self, plan: EpochPlanned) -> list[m.Command]:
        n = plan.epoch
        commands: list[m.Command] = []
        for c in plan.charges:
            if c.amount == 0:
                continue
            first, last = c.sequences[0], c.sequences[-1]
            ref = f"epoch {n}: usage {first}..{last} ({len(c.sequences)} reports)"
            if c.failed_windows:
                ref += (
                    f"; withheld: {len(c.failed_windows)} failed window(s) from "
                    f"{c.failed_windows[0]:%Y-%m-%dT%H:%M:%SZ}"
                )
            commands.append(
                m.ChargeUsage(
                    command_id(n, f"charge:{c.lease_id}"), c.lease_id, c.amount, ref, c.withheld
                )
            )
        return commands

    def _reward_commands(
        self, plan: EpochPlanned, rewards: Sequence[PlannedReward]
    ) -> list[m.Command]:
        return [
            m.RewardChecker(
                command_id(plan.epoch, f"reward:{r.checker_id}"),
                r.checker_id,
                plan.epoch_start,
                r.agreed_verdicts,
                r.amount,
            )
            for r in rewards
            if r.amount > 0
        ]

    def _releases(self, plan: EpochPlanned) -> list[m.Command]:
        return [
            m.ReleaseEscrow(command_id(plan.epoch, f"release:{lease_id}"), lease_id)
            for lease_id in plan.releases
        ]

    def _record_outcome(
        self, record: EpochRecord, drawn: Mapping[UUID, int], rewards: Sequence[PlannedReward]
    ) -> None:
        plan = record.plan
        outcomes = tuple(
            ChargeOutcome(c.lease_id, drawn[c.lease_id], c.amount - drawn[c.lease_id])
            for c in plan.charges
        )
        self.service.refresh()
        payouts: list[PayoutEntry] = []
        for provider in sorted(self.service.state.providers.values(), key=lambda p: p.provider_id):
            account = self.service.writer.account(
                account_id(AccountCode.provider_earnings, provider.provider_id)
            )
            if account is None or account.credits_posted == 0:
                continue
            address = normalize_account(provider.operator_address)
            payouts.append(PayoutEntry(provider.provider_id, address, account.credits_posted))
        total = sum(p.cumulative for p in payouts)
        previous = self.log.last_settled(before=plan.epoch)
        root = PayoutTree.build([(p.address, p.cumulative) for p in payouts]) if payouts else None
        settled = EpochSettled(
            epoch=plan.epoch,
            outcomes=outcomes,
            drawn=sum(o.drawn for o in outcomes),
            uncovered=sum(o.uncovered for o in outcomes),
            payouts=tuple(payouts),
            payout_root=root.root_hex if root is not None else "",
            payout_total=total,
            payout_new=total - (previous.payout_total if previous else 0),
            settled_at=self.clock(),
            rewards=tuple(rewards),
            ledger_position=self.service.writer.app.recorder.max_notification_id() or 0,
        )
        self._append(settled, 2)

    def _drawn(self, epoch: int, charge: PlannedCharge) -> int:
        """What the plan's charge of a lease drew, read from the lease's stream."""
        if charge.amount == 0:
            return 0
        prefix = f"epoch {epoch}: "
        app = self.service.app
        for stored in app.recorder.select_events(charge.lease_id):
            fact = app.market_mapper.to_domain_event(stored).fact
            if isinstance(fact, UsageCharged) and fact.usage_ref.startswith(prefix):
                return fact.amount
        return 0

    def _post(self, record: EpochRecord) -> None:
        settled = record.settled
        assert settled is not None and self.gateway is not None
        if not settled.payout_root:
            return
        root = bytes.fromhex(settled.payout_root.removeprefix("0x"))
        posted = self.gateway.post_payout_root(settled.epoch, root, settled.payout_new)
        tx = posted.post_tx or "posted before"
        self._append(
            PayoutRootPosted(
                settled.epoch, settled.payout_root, settled.payout_new, tx, self.clock()
            ),
            3,
        )

    def _append(self, fact: EpochPlanned | EpochSettled | PayoutRootPosted, version: int) -> None:
        try:
            self.log.append(fact, version, self.clock())
        except IntegrityError:
            # Another settler wrote this step first: take what it recorded.
            log.info("epoch %d step %d was recorded by another run", fact.epoch, version)
            self.log.refresh()


def run(
    settler: Settler,
    *,
    follow: bool,
    poll_s: float,
    epochs: Sequence[int] = (),
    tick: bool = True,
) -> int:
    """Settle `epochs` (or every due one); with `follow`, keep settling as epochs end. With
    `tick`, each round first runs the marketplace's time-driven rules (`Tick`: downtime,
    quorum decisions and their slashes, expiries), so the failed windows an epoch withholds
    are decided before it is planned."""
    while True:
        if tick:
            settler.service.handle(m.Tick(uuid4()))
        reports = [settler.settle(n) for n in epochs] if epochs else settler.settle_due()
        for report in reports:
            plan, settled = report.record.plan, report.record.settled
            assert settled is not None
            log.info(
                "epoch %d settled: %d charges, charged %d (withheld %d, fee %d), drawn %d, "
                "root %s, commands %d (%d retries)",
                plan.epoch,
                len(plan.charges),
                plan.charged,
                plan.withheld,
                plan.fee,
                settled.drawn,
                settled.payout_root or "-",
                report.commands,
                report.retried,
            )
        if not follow:
            return 0
        time.sleep(poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epoch", type=int, action="append", default=[], help="epoch number")
    parser.add_argument("--follow", action="store_true", help="keep settling as epochs end")
    parser.add_argument("--poll-s", type=float, default=5.0)
    parser.add_argument("--epoch-s", type=int, default=rules_of.DEFAULT_EPOCH_S)
    parser.add_argument(
        "--no-tick",
        action="store_true",
        help="do not run the marketplace's time-driven rules before settling",
    )
