"""`aether demo`: a consumer rents GPU time from a provider, settled through the ledger.

Deterministic ids (uuid5 of a name): running the demo again retries the same transfers,
which the ledger recognises and answers with their original results; nothing moves twice.
"""

from __future__ import annotations

from uuid import NAMESPACE_URL, UUID, uuid5

from domain.codes import AccountCode, TransferCode
from ledger.config import Settings
from ledger.model import AccountFlags, NewAccount, NewTransfer, TransferFlags, TransferOutcome
from ledger.money import format_amount, units
from workers.bootstrap import open_ledger
from workers.report import print_accounts

ASSET = "AETH"
USER = AccountFlags.debits_must_not_exceed_credits


def _id(name: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"aether-demo:{name}")


def _say(outcome: TransferOutcome, what: str) -> None:
    status = "ok" if outcome.ok else f"rejected: {outcome.result.name}"
    print(f"  {what:<62} {status}")


def run_demo(settings: Settings) -> int:
    accounts = {
        "chain custody": (AccountCode.chain_custody, AccountFlags.none),
        "consumer alice": (AccountCode.consumer_available, USER),
        "lease-1 escrow": (AccountCode.lease_escrow, USER),
        "lease-2 escrow": (AccountCode.lease_escrow, USER),
        "provider gpu-farm": (AccountCode.provider_earnings, USER),
        "protocol treasury": (AccountCode.protocol_treasury, USER),
    }
    ids = {name: _id(name) for name in accounts}
    names = {v: k for k, v in ids.items()}
    with open_ledger(settings) as ledger:
        where = "embedded PostgreSQL" if ledger.embedded else "DATABASE_URL"
        print(f"aether demo: ledger on {where}, shard {ledger.writer.shard}\n")
        writer = ledger.writer
        results = writer.open_accounts(
            [NewAccount(ids[n], ASSET, code, flags) for n, (code, flags) in accounts.items()]
        )
        print(f"opened {len(results)} accounts: {', '.join(accounts)}\n")

        def transfer(
            name: str,
            debit: str,
            credit: str,
            amount: int,
            code: TransferCode,
            *,
            flags: TransferFlags = TransferFlags.none,
            pending: str | None = None,
            timeout_s: int = 0,
        ) -> NewTransfer:
            return NewTransfer(
                id=_id(name),
                debit_account_id=ids[debit] if debit else UUID(int=0),
                credit_account_id=ids[credit] if credit else UUID(int=0),
                amount=amount,
                asset=ASSET,
                code=code,
                flags=flags,
                pending_id=_id(pending) if pending else UUID(int=0),
                timeout_s=timeout_s,
                references=(("lease", "lease-1"),) if "lease-1" in name else (),
            )

        settle_lease_1 = [
            transfer(
                "lease-1 usage",
                "lease-1 escrow",
                "provider gpu-farm",
                units(285),
                TransferCode.usage_charge,
                flags=TransferFlags.linked,
            ),
            transfer(
                "lease-1 fee",
                "lease-1 escrow",
                "protocol treasury",
                units(15),
                TransferCode.protocol_fee,
            ),
        ]
        withdraw = [
            transfer(
                "withdraw-1",
                "consumer alice",
                "chain custody",
                units(600),
                TransferCode.withdrawal,
            )
        ]
        steps: list[tuple[str, list[NewTransfer]]] = [
            (
                "alice deposits 1,000 AETH on chain",
                [
                    transfer(
                        "deposit-1",
                        "chain custody",
                        "consumer alice",
                        units(1000),
                        TransferCode.deposit,
                    )
                ],
            ),
            (
                "lease-1 opens: hold 300 AETH in escrow (pending, 1 h timeout)",
                [
                    transfer(
                        "lease-1 hold",
                        "consumer alice",
                        "lease-1 escrow",
                        units(300),
                        TransferCode.escrow_hold,
                        flags=TransferFlags.pending,
                        timeout_s=3600,
                    )
                ],
            ),
            (
                "lease-2 opens: hold 150 AETH in escrow (pending)",
                [
                    transfer(
                        "lease-2 hold",
                        "consumer alice",
                        "lease-2 escrow",
                        units(150),
                        TransferCode.escrow_hold,
                        flags=TransferFlags.pending,
                        timeout_s=3600,
                    )
                ],
            ),
            (
                "alice tries to withdraw 600 AETH while 450 AETH are held",
                withdraw,
            ),
            (
                "lease-1 ends: post the hold in full",
                [
                    transfer(
                        "lease-1 post",
                        "",
                        "",
                        units(300),
                        TransferCode.escrow_hold,
                        flags=TransferFlags.post_pending_transfer,
                        pending="lease-1 hold",
                    )
                ],
            ),
            (
                "lease-1 settles, linked: 285 AETH to provider + 15 AETH fee",
                settle_lease_1,
            ),
            (
                "lease-2 is cancelled before it starts: void the hold",
                [
                    transfer(
                        "lease-2 void",
                        "",
                        "",
                        0,
                        TransferCode.escrow_hold,
                        flags=TransferFlags.void_pending_transfer,
                        pending="lease-2 hold",
                    )
                ],
            ),
            (
                "retry the lease-1 settlement (same ids, same fields)",
                settle_lease_1,
            ),
            (
                "retry the refused withdrawal, now that 700 AETH are free",
                withdraw,
            ),
        ]
        for what, transfers in steps:
            outcomes = writer.create_transfers(transfers)
            for outcome in outcomes:
                _say(outcome, what)
                what = ""
        print()
        balanced = print_accounts(writer.state, names)
        alice = writer.state.accounts[ids["consumer alice"]]
        print(
            f"\nalice: balance {format_amount(alice.balance)} AETH, available "
            f"{format_amount(alice.available)} AETH; log position {writer.position}"
        )
        return 0 if balanced else 3
