"""Plain-text tables for the CLI."""

from __future__ import annotations

from uuid import UUID

from domain.codes import AccountCode
from ledger.model import LedgerState
from ledger.money import format_amount


def print_accounts(state: LedgerState, names: dict[UUID, str]) -> bool:
    """Print every account's balances and the per-asset trial balance.

    Returns True when, for every asset, debits equal credits (posted and pending).
    """
    header = f"{'account':<24} {'code':<20} {'debits posted':>16} {'credits posted':>16} {'pending (dr/cr)':>18} {'balance':>12}"
    print(header)
    print("-" * len(header))
    for account in sorted(state.accounts.values(), key=lambda a: (a.asset, a.code, str(a.id))):
        try:
            code = AccountCode(account.code).name
        except ValueError:
            code = str(account.code)
        pending = (
            f"{format_amount(account.debits_pending)}/{format_amount(account.credits_pending)}"
        )
        print(
            f"{names.get(account.id, str(account.id)[:8]):<24} {code:<20} "
            f"{format_amount(account.debits_posted):>16} {format_amount(account.credits_posted):>16} "
            f"{pending:>18} {format_amount(account.balance):>12}"
        )
    print()
    balanced = True
    for asset, (debits, credits) in sorted(state.trial_balance().items()):
        pending_debits = sum(a.debits_pending for a in state.accounts.values() if a.asset == asset)
        pending_credits = sum(
            a.credits_pending for a in state.accounts.values() if a.asset == asset
        )
        ok = debits == credits and pending_debits == pending_credits
        balanced = balanced and ok
        print(
            f"trial balance {asset}: debits {format_amount(debits)} = credits {format_amount(credits)}"
            f"  (pending {format_amount(pending_debits)} = {format_amount(pending_credits)})"
            f"  {'BALANCED' if ok else 'OUT OF BALANCE'}"
        )
    return balanced
