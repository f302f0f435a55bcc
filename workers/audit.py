"""`aether audit`: chain the event log, verify it, prove an event, check a proof.

Exit codes: 0 clean (or done), 1 tampering found or a proof rejected, 2 bad usage (bad
arguments, an unknown event, a malformed proof file), 3 the database or the chain could not
be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ledger.audit import (
    CHAIN_BATCH_SIZE,
    CHAIN_BATCH_SIZE_MAX,
    CHECKPOINT_SIZE,
    CHECKPOINT_SIZE_MAX,
    DEFAULT_LOGS,
    AnchorClient,
    AuditedLog,
    AuditError,
    Chainer,
    InclusionProof,
    Web3Anchor,
    prove,
    verify,
    verify_proof,
)
from ledger.config import Settings
from ledger.errors import LedgerError

if TYPE_CHECKING:
    from argparse import _SubParsersAction

EXIT_CLEAN = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
PROOF_FILE_SIZE_MAX = 1_000_000
"""Largest proof file read (a proof is a few kilobytes)."""


def add_parser(commands: _SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `audit` and its subcommands to the `aether` parser."""
    audit = commands.add_parser(
        "audit",
        help="the tamper-evident log: chain, verify, prove, verify-proof",
        description="Hash-chain the event log, cut Merkle checkpoints, anchor their roots, "
        "verify everything from the event tables, and prove single events. Exit codes: 0 "
        "clean, 1 tampering found or proof rejected, 2 bad usage, 3 store or chain unreachable.",
    )
    audit.set_defaults(run=run)
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    chain = sub.add_parser("chain", help="chain every new event and cut the checkpoints due")
    _add_logs(chain)
    chain.add_argument(
        "--checkpoint-size",
        type=_bounded(1, CHECKPOINT_SIZE_MAX),
        default=CHECKPOINT_SIZE,
        metavar="N",
        help=f"chain entries per checkpoint (default {CHECKPOINT_SIZE})",
    )
    chain.add_argument(
        "--batch-size",
        type=_bounded(1, CHAIN_BATCH_SIZE_MAX),
        default=CHAIN_BATCH_SIZE,
        metavar="N",
        help=f"events chained per transaction (default {CHAIN_BATCH_SIZE})",
    )
    chain.add_argument(
        "--final", action="store_true", help="also cut a checkpoint over the entries left"
    )
    chain.add_argument(
        "--anchor", action="store_true", help="then anchor unanchored roots (needs --rpc-url)"
    )
    _add_chain_options(chain, sender=True)

    check = sub.add_parser("verify", help="recompute the chain and checkpoints from the events")
    _add_logs(check)
    _add_chain_options(check, sender=False)
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    proof = sub.add_parser("prove", help="print the inclusion proof of one event as JSON")
    _add_logs(proof)
    proof.add_argument("log", help="the log's name, e.g. ledger")
    proof.add_argument("notification_id", type=_bounded(1, 2**63 - 1), metavar="NOTIFICATION_ID")
    proof.add_argument("-o", "--output", type=Path, default=None, help="write to this file")

    check_proof = sub.add_parser(
        "verify-proof", help="check a proof against a given root or the anchored one"
    )
    check_proof.add_argument("proof", help="the proof file (JSON), or - for stdin")
    check_proof.add_argument(
        "--root", type=_root, default=None, help="the trusted root, 0x and 64 hex digits"
    )
    _add_chain_options(check_proof, sender=False)


def _add_logs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logs",
        type=_logs,
        default=DEFAULT_LOGS,
        metavar="NAME[=TABLE],...",
        help="the logs in chain order (default: "
        + ",".join(f"{log.name}={log.table}" for log in DEFAULT_LOGS)
        + "); a name alone means NAME_events",
    )


def _add_chain_options(parser: argparse.ArgumentParser, *, sender: bool) -> None:
    parser.add_argument("--rpc-url", default=None, help="JSON-RPC URL of the chain")
    parser.add_argument(
        "--anchor-address", default=None, help="address of the CheckpointAnchor contract"
    )
    if sender:
        parser.add_argument(
            "--anchorer", default=None, help="sender with ANCHOR_ROLE, unlocked on the node"
        )


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


def _logs(text: str) -> tuple[AuditedLog, ...]:
    logs = []
    for part in text.split(","):
        name, _, table = part.strip().partition("=")
        try:
            logs.append(AuditedLog(name, table or f"{name}_events"))
        except AuditError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(logs)


def _root(text: str) -> bytes:
    if len(text) != 66 or not text.startswith("0x"):
        raise argparse.ArgumentTypeError(f"a root is 0x and 64 hex digits, got {text!r}")
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        raise argparse.ArgumentTypeError(f"a root is 0x and 64 hex digits, got {text!r}") from None


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The configured PostgreSQL's URL, or the embedded one started for this command."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    from ledger.embedded import start_embedded_postgres

    url, server = start_embedded_postgres(settings.aether_data_dir)
    try:
        yield url
    finally:
        del server


def _anchor_client(args: argparse.Namespace, *, sender: bool) -> AnchorClient | None:
    if args.rpc_url is None and args.anchor_address is None:
        return None
    if args.rpc_url is None or args.anchor_address is None:
        raise AuditError("give both --rpc-url and --anchor-address")
    try:
        from web3 import HTTPProvider, Web3
    except ImportError as e:
        raise AuditError("anchoring needs the `chain` extra: pip install -e '.[chain]'") from e
    w3 = Web3(HTTPProvider(args.rpc_url))
    try:
        return Web3Anchor(w3, args.anchor_address, sender=args.anchorer if sender else None)
    except ValueError as e:
        raise AuditError(f"--anchor-address: {e}") from e


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `aether audit` subcommand; returns the exit code."""
    try:
        command = args.audit_command
        if command == "chain":
            return _chain(settings, args)
        if command == "verify":
            return _verify(settings, args)
        if command == "prove":
            return _prove(settings, args)
        return _verify_proof(args)
    except AuditError as e:
        print(f"aether audit: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as e:
        print(f"aether audit: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (OSError, ConnectionError) as e:
        print(f"aether audit: cannot reach the chain or a file: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _chain(settings: Settings, args: argparse.Namespace) -> int:
    client = _anchor_client(args, sender=True) if args.anchor else None
    if args.anchor and client is None:
        raise AuditError("--anchor needs --rpc-url and --anchor-address")
    with _database(settings) as url:
        chainer = Chainer(
            url,
            settings.postgres_schema,
            logs=args.logs,
            batch_size=args.batch_size,
            checkpoint_size=args.checkpoint_size,
        )
        report = chainer.run(final_checkpoint=args.final)
        per_log = ", ".join(f"{k} {v:,}" for k, v in report.chained_per_log.items())
        print(f"chained {report.chained:,} events ({per_log}) in {report.elapsed_s:.2f} s")
        print(f"  head: position {report.head_position:,}, hash 0x{report.head_hash.hex()}")
        for cp in report.checkpoints:
            print(
                f"  checkpoint {cp.index}: positions {cp.first_position:,}..{cp.last_position:,}"
                f" root 0x{cp.merkle_root.hex()}"
            )
        if client is not None:
            for done in chainer.anchor(client):
                how = "already on chain" if done.already_on_chain else "anchored"
                print(f"  checkpoint {done.index}: {how}, tx {done.tx_hash}")
    return EXIT_CLEAN


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    client = _anchor_client(args, sender=False)
    with _database(settings) as url:
        report = verify(url, settings.postgres_schema, logs=args.logs, anchor=client)
    if args.json:
        print(
            json.dumps(
                {
                    "clean": report.clean,
                    "finding": None
                    if report.finding is None
                    else {
                        "kind": report.finding.kind.value,
                        "log": report.finding.log,
                        "notification_id": report.finding.notification_id,
                        "position": report.finding.position,
                        "checkpoint_index": report.finding.checkpoint_index,
                        "detail": report.finding.detail,
                    },
                    "events_checked": report.events_checked,
                    "checkpoints_checked": report.checkpoints_checked,
                    "anchors_checked": report.anchors_checked,
                    "unchained": dict(report.unchained),
                    "unanchored_entries": report.unanchored_entries,
                    "elapsed_s": round(report.elapsed_s, 3),
                    "events_per_s": round(report.events_per_s),
                },
                indent=2,
            )
        )
    else:
        print(f"events checked      {report.events_checked:,}")
        anchors = f", {report.anchors_checked} against the anchor" if client else ""
        print(f"checkpoints checked {report.checkpoints_checked:,}{anchors}")
        waiting = {k: v for k, v in report.unchained.items() if v}
        if waiting:
            print("not yet chained     " + ", ".join(f"{k} {v:,}" for k, v in waiting.items()))
        if report.unanchored_entries:
            print(f"not yet anchored    {report.unanchored_entries:,} chain entries")
        print(f"throughput          {report.events_per_s:,.0f} events/s ({report.elapsed_s:.2f} s)")
        if report.finding is None:
            print("CLEAN: every chained event matches the chain and its checkpoint")
        else:
            print(f"TAMPERED: {report.finding.describe()}")
    return EXIT_CLEAN if report.clean else EXIT_TAMPERED


def _prove(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as url:
        proof = prove(url, settings.postgres_schema, args.log, args.notification_id, logs=args.logs)
    text = proof.model_dump_json(indent=2)
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n")
        print(f"proof of {args.log} event {args.notification_id} written to {args.output}")
    return EXIT_CLEAN


def read_proof(text: str) -> InclusionProof:
    """Parse and validate a proof; a malformed one raises AuditError saying what is wrong."""
    try:
        return InclusionProof.model_validate_json(text)
    except ValidationError as e:
        raise AuditError(f"not a valid inclusion proof:\n{e}") from None


def _verify_proof(args: argparse.Namespace) -> int:
    if args.proof == "-":
        text = sys.stdin.read(PROOF_FILE_SIZE_MAX + 1)
    else:
        path = Path(args.proof)
        if not path.is_file():
            raise AuditError(f"no proof file at {path}")
        text = path.read_text()
    if len(text) > PROOF_FILE_SIZE_MAX:
        raise AuditError(f"the proof file is larger than {PROOF_FILE_SIZE_MAX} bytes")
    proof = read_proof(text)
    client = _anchor_client(args, sender=False)
    if (args.root is None) == (client is None):
        raise AuditError("give the trusted root: --root, or --rpc-url and --anchor-address")
    if args.root is not None:
        root, source = args.root, "the given root"
    else:
        assert client is not None
        index = proof.checkpoint.index
        if index >= client.count():
            print(f"REJECTED: checkpoint {index} is not anchored at {client.address}")
            return EXIT_TAMPERED
        root, source = client.root_at(index), f"the root anchored at {client.address}"
    check = verify_proof(proof, root)
    for step in check.steps:
        print(f"  ok  {step}")
    e = proof.event
    if check.ok:
        print(
            f"VALID: {e.log} event {e.notification_id} is in checkpoint "
            f"{proof.checkpoint.index}, under {source}"
        )
        return EXIT_CLEAN
    print(f"REJECTED: {check.reason}")
    return EXIT_TAMPERED


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.audit ...`: the same as `aether audit ...`."""
    parser = argparse.ArgumentParser(prog="aether")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *(argv if argv is not None else sys.argv[1:])])
    return run(Settings(), args)


if __name__ == "__main__":
    sys.exit(main())
