"""Reconciliation of one settled epoch: ledger vs settlement log vs chain (`aether
reconcile --epoch N`).

Every line compares one quantity as two or three sides record it; a line whose sides differ
is flagged (status MISMATCH) and names what is off. Lines:

- ``payout root``: the root in the epoch's `EpochSettled` vs the root the PayoutDistributor
  holds for the epoch.
- ``earned <provider>``: the provider's earnings credited in the ledger as of the epoch's
  settlement vs its cumulative amount in the epoch's payout root.
- ``claimed <provider>``: payouts the ledger recorded (`PayoutClaimed`, provider_earnings
  debits) vs what the distributor paid the provider's address on chain (Claimed events);
  also flagged when the chain paid more than the latest root allows.
- ``deposits <consumer>``: deposits credited in the ledger (`DepositConfirmed`) vs deposits
  made into the DepositVault on chain for the consumer (past the confirmation depth).
- ``stake <provider>``: bonded + unbonding stake in the ledger vs stake on chain (Staking).
- ``epoch charged / withheld / fee / rewards``: the plan's priced totals, what the ledger
  moved for the epoch's transfers (found by their references to the epoch), and for
  rewards what `EpochSettled` says was paid.
- ``slashes``, ``refunds``: slashed stake and refunds in the ledger (insurance pool) vs
  slashes on chain.
- ``trial balance``: debits == credits in the ledger.

The report prints as a table or CSV; the exit code is 1 when any line is flagged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from uuid import UUID

from domain.codes import AccountCode, TransferCode
from domain.postings import account_id
from ledger.market import service as m
from ledger.model import LedgerState
from ledger.money import format_amount
from ledger.settlement import SettlementLog

if TYPE_CHECKING:
    from workers.chain import ChainReader

OK = "ok"
MISMATCH = "MISMATCH"


@dataclass(frozen=True, slots=True)
class Line:
    section: str
    item: str
    ledger: int | None
    log: int | None
    """The settlement log's figure (the posted root, the plan)."""
    chain: int | None
    status: str
    note: str = ""


@dataclass
class Report:
    epoch: int
    lines: list[Line]

    @property
    def flagged(self) -> list[Line]:
        return [line for line in self.lines if line.status != OK]

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["epoch", "section", "item", "ledger", "log", "chain", "status", "note"])
        for line in self.lines:
            writer.writerow(
                [
                    self.epoch,
                    line.section,
                    line.item,
                    "" if line.ledger is None else line.ledger,
                    "" if line.log is None else line.log,
                    "" if line.chain is None else line.chain,
                    line.status,
                    line.note,
                ]
            )
        return out.getvalue()

    def table(self) -> str:
        def amount(value: int | None) -> str:
            return "-" if value is None else format_amount(value)

        rows = [("section", "item", "ledger", "settlement log", "chain", "status")]
        for line in self.lines:
            status = line.status + (f" ({line.note})" if line.note else "")
            rows.append(
                (
                    line.section,
                    line.item,
                    amount(line.ledger),
                    amount(line.log),
                    amount(line.chain),
                    status,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        text = []
        for i, row in enumerate(rows):
            cells = [
                row[k].ljust(widths[k]) if k < 2 or k == 5 else row[k].rjust(widths[k])
                for k in range(6)
            ]
            text.append("  ".join(cells).rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        flagged = len(self.flagged)
        text.append(
            f"epoch {self.epoch}: {len(self.lines)} lines, "
            + ("all tie out" if not flagged else f"{flagged} flagged")
        )
        return "\n".join(text)


def _line(
    section: str,
    item: str,
    ledger: int | None,
    log: int | None,
    chain: int | None,
    note_if_off: str,
) -> Line:
    sides = [v for v in (ledger, log, chain) if v is not None]
    same = len(set(sides)) <= 1
    return Line(
        section, item, ledger, log, chain, OK if same else MISMATCH, "" if same else note_if_off
    )


def _epoch_transfers(state: LedgerState, epoch: int) -> list[tuple[int, int]]:
    """(code, amount) of the ledger transfers of the epoch's settlement commands."""
    prefix = f"epoch {epoch}: "
    found: list[tuple[int, int]] = []
    for transfer in state.transfers.values():
        refs = dict(transfer.references)
        usage = refs.get("usage", "")
        if usage.startswith(prefix):
            found.append((transfer.code, transfer.amount))
    return found


def reconcile(
    epoch: int,
    service: m.Marketplace,
    settlements: SettlementLog,
    ledger_at_settlement: LedgerState,
    ledger_now: LedgerState,
    reader: ChainReader | None,
) -> Report:
    """The report of `epoch` (see the module docstring). `reader`: a
    `workers.chain.ChainReader`, or None to leave the chain column out."""
    settlements.refresh()
    service.refresh()
    record = settlements.epochs.get(epoch)
    if record is None or record.settled is None:
        raise LookupError(f"epoch {epoch} is not settled")
    plan, settled = record.plan, record.settled
    chain = reader
    lines: list[Line] = []

    # The root.
    if chain is not None:
        posted = chain.posted_root(epoch)
        posted_hex = "0x" + posted.hex() if posted is not None else "(none)"
        ok = posted_hex == (settled.payout_root or "(none)")
        lines.append(
            Line(
                "payout",
                "root",
                None,
                None,
                None,
                OK if ok else MISMATCH,
                f"log {settled.payout_root or '(none)'}" + ("" if ok else f", chain {posted_hex}"),
            )
        )

    # Providers: earned, claimed, stake.
    state = service.state
    claimed_chain: dict[str, int] = (
        {a.lower(): v for a, v in chain.claimed_by_account().items()} if chain is not None else {}
    )
    in_root = {p.provider_id: p.cumulative for p in settled.payouts}
    latest = settlements.last_settled()
    latest_root = {p.provider_id: p.cumulative for p in latest.payouts} if latest else {}
    for provider in sorted(state.providers.values(), key=lambda p: p.operator_address.lower()):
        pid = provider.provider_id
        name = provider.operator_address
        earnings = ledger_at_settlement.accounts.get(account_id(AccountCode.provider_earnings, pid))
        earned = earnings.credits_posted if earnings is not None else 0
        if earned or pid in in_root:
            lines.append(_line("earned", name, earned, in_root.get(pid, 0), None, "ledger != root"))
        ledger_claimed = state.claimed.get(pid, 0)
        on_chain = claimed_chain.get(name.lower(), 0) if chain is not None else None
        if ledger_claimed or on_chain:
            line = _line("claimed", name, ledger_claimed, None, on_chain, "ledger != chain")
            if on_chain is not None and on_chain > latest_root.get(pid, 0):
                line = replace(line, status=MISMATCH, note="chain paid more than the latest root")
            lines.append(line)
        stake = service.stake_of(pid)
        ledger_stake = stake.slashable
        chain_stake = chain.stake_of(name) if chain is not None else None
        if ledger_stake or chain_stake:
            lines.append(_line("stake", name, ledger_stake, None, chain_stake, "ledger != chain"))

    # Consumers: deposits.
    credited: dict[UUID, int] = {}
    for deposit in state.deposits.values():
        credited[deposit.consumer_id] = credited.get(deposit.consumer_id, 0) + deposit.amount
    deposited: dict[UUID, int] = dict(chain.deposits_by_consumer()) if chain is not None else {}
    consumers: Iterable[UUID] = sorted(set(credited) | set(deposited), key=str)
    for consumer in consumers:
        lines.append(
            _line(
                "deposits",
                str(consumer),
                credited.get(consumer, 0),
                None,
                deposited.get(consumer, 0) if chain is not None else None,
                "ledger != chain",
            )
        )

    # The epoch's money, plan vs ledger.
    moved = _epoch_transfers(ledger_now, epoch)
    fee_moved = sum(a for code, a in moved if code == TransferCode.protocol_fee)
    charged_moved = sum(
        a for code, a in moved if code in (TransferCode.usage_charge, TransferCode.protocol_fee)
    )
    lines.append(
        _line("epoch", "charged (drawn)", charged_moved, settled.drawn, None, "ledger != log")
    )
    lines.append(
        Line(
            "epoch",
            "uncovered",
            None,
            settled.uncovered,
            None,
            OK,
            "exhausted escrow" if settled.uncovered else "",
        )
    )
    adds_up = plan.charged == settled.drawn + settled.uncovered
    lines.append(
        Line(
            "epoch",
            "priced (plan)",
            None,
            plan.charged,
            None,
            OK if adds_up else MISMATCH,
            "= drawn + uncovered" if adds_up else "!= drawn + uncovered",
        )
    )
    rewards_paid = sum(
        r.amount for r in state.rewards.values() if r.epoch_start == plan.epoch_start
    )
    lines.append(
        _line(
            "epoch",
            "checker rewards",
            rewards_paid,
            sum(r.amount for r in settled.rewards),
            None,
            "ledger != log",
        )
    )
    drawn = {o.lease_id: o.drawn for o in settled.outcomes}
    fee_due = sum(
        service.rules.postings.fee_of(drawn[c.lease_id] - min(c.withheld, drawn[c.lease_id]))
        for c in plan.charges
    )
    lines.append(_line("epoch", "protocol fee", fee_moved, fee_due, None, "ledger != log"))

    # Slashes and refunds.
    slashed = sum(service.stake_of(p).slashed for p in state.providers)
    chain_slashed = sum(s.amount for s in chain.slashes()) if chain is not None else None
    lines.append(_line("slashes", "stake slashed", slashed, None, chain_slashed, "ledger != chain"))
    refunds = sum(r.amount for r in state.refunds)
    lines.append(Line("slashes", "refunded to consumers", refunds, None, None, OK, ""))

    # The ledger balances.
    debits = sum(a.debits_posted for a in ledger_now.accounts.values())
    credits = sum(a.credits_posted for a in ledger_now.accounts.values())
    lines.append(
        Line(
            "ledger",
            "debits = credits",
            debits,
            None,
            None,
            OK if debits == credits else MISMATCH,
            "" if debits == credits else f"credits {credits}",
        )
    )
    return Report(epoch, lines)
