"""Plain-text tables for the CLI."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple
from uuid import UUID

from domain.codes import AccountCode
from ledger.model import LedgerState
from ledger.money import format_amount
from projections.balances import AccountBalance


class AccountLine(NamedTuple):
    """One account's balances, whether read from the writer's state or from the view."""

    account_id: UUID
    asset: str
    code: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int

    @property
    def balance(self) -> int:
        return self.credits_posted - self.debits_posted


def lines_of_state(state: LedgerState) -> list[AccountLine]:
    return [AccountLine(a.id, a.asset, a.code, *a.balances()) for a in state.accounts.values()]


def lines_of_view(rows: Iterable[AccountBalance]) -> list[AccountLine]:
    return [AccountLine(r.account_id, r.asset, r.code, *r.balances()) for r in rows]


def print_accounts(state: LedgerState | list[AccountLine], names: dict[UUID, str]) -> bool:
    """Print every account's balances and the per-asset trial balance.

    Returns True when, for every asset, debits equal credits (posted and pending).
    """
    lines = lines_of_state(state) if isinstance(state, LedgerState) else state
    header = f"{'account':<24} {'code':<20} {'debits posted':>16} {'credits posted':>16} {'pending (dr/cr)':>18} {'balance':>12}"
    print(header)
    print("-" * len(header))
    for line in sorted(
        lines, key=lambda a: (a.asset, a.code, names.get(a.account_id, ""), str(a.account_id))
    ):
        try:
            code = AccountCode(line.code).name
        except ValueError:
            code = str(line.code)
        pending = f"{format_amount(line.debits_pending)}/{format_amount(line.credits_pending)}"
        print(
            f"{names.get(line.account_id, str(line.account_id)[:8]):<24} {code:<20} "
            f"{format_amount(line.debits_posted):>16} {format_amount(line.credits_posted):>16} "
            f"{pending:>18} {format_amount(line.balance):>12}"
        )
    print()
    balanced = True
    for asset in sorted({line.asset for line in lines}):
        of_asset = [line for line in lines if line.asset == asset]
        debits = sum(line.debits_posted for line in of_asset)
        credits = sum(line.credits_posted for line in of_asset)
        pending_debits = sum(line.debits_pending for line in of_asset)
        pending_credits = sum(line.credits_pending for line in of_asset)
        ok = debits == credits and pending_debits == pending_credits
        balanced = balanced and ok
        print(
            f"trial balance {asset}: debits {format_amount(debits)} = credits {format_amount(credits)}"
            f"  (pending {format_amount(pending_debits)} = {format_amount(pending_credits)})"
            f"  {'BALANCED' if ok else 'OUT OF BALANCE'}"
        )
    return balanced
