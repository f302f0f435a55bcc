"""The audit chain's hashing and proof checking, without a database."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.audit import (
    GENESIS_HASH,
    AuditedLog,
    AuditError,
    Chainer,
    InclusionProof,
    ProofChainEntry,
    ProofCheckpoint,
    ProofEvent,
    chain_link,
    event_digest,
    leaf_of,
    verify_proof,
)
from ledger.merkle import MerkleTree
from workers.audit import read_proof

STREAM = "8d1f0f8e-8a1e-4b8f-9d52-3c0f3f0e2a11"
TOPIC = "ledger.events:TransferCreated"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


BASE = ("ledger", 7, STREAM, 3, TOPIC, sha(b'{"amount":"5"}'))


@pytest.mark.parametrize(
    "changed",
    [
        ("marketplace", 7, STREAM, 3, TOPIC, BASE[5]),
        ("ledger", 8, STREAM, 3, TOPIC, BASE[5]),
        ("ledger", 7, STREAM.replace("8d1f", "8d1e"), 3, TOPIC, BASE[5]),
        ("ledger", 7, STREAM, 4, TOPIC, BASE[5]),
        ("ledger", 7, STREAM, 3, TOPIC + "x", BASE[5]),
        ("ledger", 7, STREAM, 3, None, BASE[5]),
        ("ledger", 7, STREAM, 3, TOPIC, sha(b'{"amount":"6"}')),
        ("ledger", 7, STREAM, 3, TOPIC, None),
    ],
)
def test_every_field_of_an_event_changes_its_digest(
    changed: tuple[str, int, str, int, str | None, bytes | None],
) -> None:
    assert event_digest(*changed) != event_digest(*BASE)


def test_field_boundaries_cannot_be_shifted_between_fields() -> None:
    a = event_digest("ab", 1, "c", 1, "t", None)
    b = event_digest("a", 1, "bc", 1, "t", None)
    assert a != b
    assert event_digest("l", 1, "x", 1, "", None) != event_digest("l", 1, "x", 1, None, None)


def test_the_chain_depends_on_the_order_of_its_entries() -> None:
    d1, d2 = sha(b"one"), sha(b"two")
    forward = chain_link(chain_link(GENESIS_HASH, d1), d2)
    backward = chain_link(chain_link(GENESIS_HASH, d2), d1)
    assert forward != backward
    assert chain_link(GENESIS_HASH, d1) == sha(GENESIS_HASH + d1)


def test_a_leaf_binds_its_position() -> None:
    h = sha(b"entry")
    assert leaf_of(1, h) != leaf_of(2, h)


def build_proof(n: int, k: int) -> tuple[InclusionProof, bytes]:
    """A checkpoint over a chain of `n` events and the proof of the `k`-th (0-based)."""
    previous, hashes, previous_of, digests = GENESIS_HASH, [], [], []
    for i in range(n):
        d = event_digest("ledger", i + 1, STREAM, i + 1, TOPIC, sha(str(i).encode()))
        previous_of.append(previous)
        previous = chain_link(previous, d)
        hashes.append(previous)
        digests.append(d)
    leaves = [leaf_of(i + 1, h) for i, h in enumerate(hashes)]
    tree = MerkleTree.build(leaves, sort_leaves=False)
    proof = InclusionProof(
        event=ProofEvent(
            log="ledger",
            notification_id=k + 1,
            originator_id=STREAM,
            originator_version=k + 1,
            topic=TOPIC,
            state_sha256="0x" + sha(str(k).encode()).hex(),
            event_digest="0x" + digests[k].hex(),
        ),
        chain=ProofChainEntry(
            position=k + 1,
            previous_hash="0x" + previous_of[k].hex(),
            chain_hash="0x" + hashes[k].hex(),
        ),
        checkpoint=ProofCheckpoint(
            index=0,
            first_position=1,
            last_position=n,
            merkle_root=tree.root_hex,
            leaf="0x" + leaves[k].hex(),
            merkle_path=["0x" + p.hex() for p in tree.proof(k)],
        ),
        anchor=None,
    )
    return proof, tree.root


@given(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n - 1))
    )
)
def test_a_proof_of_any_entry_of_any_checkpoint_verifies(n_k: tuple[int, int]) -> None:
    proof, root = build_proof(*n_k)
    check = verify_proof(proof, root)
    assert check.ok and len(check.steps) == 5


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("event", "notification_id", 99, "event digest"),
        ("event", "topic", "other", "event digest"),
        ("event", "state_sha256", "0x" + "ab" * 32, "event digest"),
        ("chain", "previous_hash", "0x" + "cd" * 32, "chain hash"),
        ("chain", "position", 9, "leaf"),
        ("checkpoint", "merkle_root", "0x" + "ef" * 32, "proof's root"),
        ("checkpoint", "last_position", 4, "outside checkpoint"),
    ],
)
def test_an_altered_proof_is_rejected_with_the_step_that_fails(
    section: str, key: str, value: object, reason: str
) -> None:
    proof, root = build_proof(12, 5)
    data = proof.model_dump()
    data[section][key] = value
    check = verify_proof(InclusionProof.model_validate(data), root)
    assert not check.ok and reason in check.reason


def test_an_altered_merkle_path_or_another_root_is_rejected() -> None:
    proof, root = build_proof(12, 5)
    data = proof.model_dump()
    data["checkpoint"]["merkle_path"] = list(reversed(data["checkpoint"]["merkle_path"]))
    assert not verify_proof(InclusionProof.model_validate(data), root).ok
    check = verify_proof(proof, sha(b"another root"))
    assert not check.ok and "trusted root" in check.reason


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["chain"].update(chain_hash="0x1234"),
        lambda d: d["chain"].update(chain_hash="0x" + "zz" * 32),
        lambda d: d["chain"].update(position=0),
        lambda d: d["event"].update(extra="field"),
        lambda d: d["event"].update(notification_id="7"),
        lambda d: d["checkpoint"].update(merkle_path=["0x" + "00" * 32] * 65),
        lambda d: d.pop("checkpoint"),
    ],
)
def test_a_malformed_proof_file_is_a_clear_error(mutate: object) -> None:
    import json

    proof, _ = build_proof(4, 1)
    data = json.loads(proof.model_dump_json())
    assert callable(mutate)
    mutate(data)
    with pytest.raises(AuditError, match="not a valid inclusion proof"):
        read_proof(json.dumps(data))


def test_a_proof_survives_its_json_round_trip() -> None:
    proof, root = build_proof(9, 8)
    assert verify_proof(read_proof(proof.model_dump_json()), root).ok


@pytest.mark.parametrize(
    ("name", "table"), [("", "t_events"), ("bad name", "t_events"), ("ok", "x;drop")]
)
def test_a_log_needs_identifier_names(name: str, table: str) -> None:
    with pytest.raises(AuditError, match="identifier"):
        AuditedLog(name, table)


def test_chainer_settings_are_bounded_and_logs_unique() -> None:
    with pytest.raises(AuditError, match="batch_size"):
        Chainer("postgresql:///x", "public", batch_size=0)
    with pytest.raises(AuditError, match="checkpoint_size"):
        Chainer("postgresql:///x", "public", checkpoint_size=10**7)
    with pytest.raises(AuditError, match="unique"):
        Chainer("postgresql:///x", "public", logs=[AuditedLog("a", "t1"), AuditedLog("a", "t2")])
    with pytest.raises(AuditError, match="at least one"):
        Chainer("postgresql:///x", "public", logs=[])
