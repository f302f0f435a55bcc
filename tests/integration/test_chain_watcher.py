"""The chain integration against real PostgreSQL, the real marketplace service and the
in-process EVM: the watcher's confirmation depth, idempotent re-reads and restarts, unknown
addresses, the slash mirror, and payout roots posted, funded and claimed on chain."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

pytest.importorskip("web3", reason="needs the `chain` extra: pip install -e '.[chain]'")
pytest.importorskip("eth_tester", reason="needs the `chain` extra: pip install -e '.[chain]'")

from eth_utils.address import to_checksum_address
from psycopg import sql
from pydantic import SecretStr, ValidationError

from domain.codes import AccountCode
from domain.postings import account_id
from domain.verdicts import FailureKind
from ledger.config import Settings
from ledger.errors import ConfigurationError
from ledger.market import service as m
from ledger.merkle import PayoutTree
from ledger.money import units
from ledger.store import LedgerApplication
from tests.market import Market, build_market, uid
from workers.chain import (
    MIRROR_CURSOR,
    WATCHER_CURSOR,
    Chain,
    ChainError,
    ChainStore,
    ChainWatcher,
    MirroredSlash,
    PayoutConflictError,
    PayoutGateway,
    SlashMirror,
    deposit_id_of,
    embedded_chain,
    log_ref,
    mine_blocks,
    open_chain,
    payout_memo,
    slash_of_reason,
    slash_reason,
)

CONFIRMATIONS = 2
PRICE = units(2)


@pytest.fixture
def chain() -> Chain:
    return embedded_chain()


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Market:
    return build_market(ledger_app, ledger_env)


@pytest.fixture
def store(market: Market, chain: Chain) -> ChainStore:
    return ChainStore(market.app.app_recorder.datastore, chain.key)


@pytest.fixture
def watcher(chain: Chain, market: Market, store: ChainStore) -> ChainWatcher:
    return ChainWatcher(chain, market.service, store, confirmations=CONFIRMATIONS)


@pytest.fixture
def accounts(chain: Chain) -> dict[str, str]:
    """Free accounts of the in-process chain (0..4 act for the protocol)."""
    names = ["payer", "op1", "op2", "stranger"]
    free = [str(a) for a in list(chain.w3.eth.accounts)[5:9]]
    return dict(zip(names, free, strict=True))


def fund(chain: Chain, account: str, amount: int) -> None:
    chain.deployment.mint(account, amount)


def register(market: Market, name: str, operator: str, gpu_count: int = 1) -> UUID:
    pid = uid(name)
    node = market.node(f"{name}-n1", gpu_count=gpu_count)
    market.send(m.RegisterProvider(uuid4(), pid, operator, (node,)))
    return pid


def earnings(market: Market, provider: str) -> int:
    account = market.writer.account(account_id(AccountCode.provider_earnings, uid(provider)))
    return 0 if account is None else account.balance


def forget_cursor(store: ChainStore, name: str) -> None:
    """As if the watcher crashed after its commands and before its cursor moved."""
    with store.datastore.transaction(commit=True) as curs:
        curs.execute(
            sql.SQL("DELETE FROM {}.chain_cursor WHERE name = %s").format(
                sql.Identifier(store.datastore.schema)
            ),
            (name,),
        )


def market_events(market: Market) -> int:
    return market.app.recorder.max_notification_id() or 0


# -- deposits ---------------------------------------------------------------------------------


def test_a_deposit_is_credited_only_after_the_confirmation_depth(
    chain: Chain, market: Market, watcher: ChainWatcher, accounts: dict[str, str]
) -> None:
    fund(chain, accounts["payer"], units(1_000))
    receipt = chain.deployment.deposit(accounts["payer"], uid("c1"), units(250))
    block = receipt["blockNumber"]
    assert watcher.poll().handled == 0
    assert market.service.available(uid("c1")) == 0
    mine_blocks(chain, CONFIRMATIONS - 1)
    polled = watcher.poll()
    assert polled.handled == 0 and polled.to_block < block
    assert market.service.available(uid("c1")) == 0
    mine_blocks(chain, 1)  # now CONFIRMATIONS blocks on top of the deposit's
    polled = watcher.poll()
    assert polled.handled == 1 and polled.to_block == block
    assert market.service.available(uid("c1")) == units(250)
    [event] = chain.deployment.vault.events.Deposited().get_logs(from_block=block, to_block=block)
    ref = log_ref(event)
    confirmed = market.service.state.deposits[deposit_id_of(ref)]
    assert (confirmed.consumer_id, confirmed.amount, confirmed.reference) == (
        uid("c1"),
        units(250),
        ref,
    )
    assert watcher.cursor == block


def test_re_reading_the_same_blocks_credits_nothing_twice(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    store: ChainStore,
    accounts: dict[str, str],
) -> None:
    fund(chain, accounts["payer"], units(1_000))
    for consumer, amount in (("c1", units(10)), ("c2", units(20)), ("c1", units(30))):
        chain.deployment.deposit(accounts["payer"], uid(consumer), amount)
    mine_blocks(chain, CONFIRMATIONS)
    assert watcher.poll().handled == 3
    events_before = market_events(market)
    forget_cursor(store, WATCHER_CURSOR)
    again = watcher.poll()
    assert (again.handled, again.retried, again.skipped) == (0, 3, [])
    assert market_events(market) == events_before
    assert market.service.available(uid("c1")) == units(40)
    assert market.service.available(uid("c2")) == units(20)


def test_a_restarted_watcher_resumes_from_its_cursor(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    accounts: dict[str, str],
    ledger_app: LedgerApplication,
    ledger_env: dict[str, str],
) -> None:
    fund(chain, accounts["payer"], units(1_000))
    chain.deployment.deposit(accounts["payer"], uid("c1"), units(5))
    mine_blocks(chain, CONFIRMATIONS)
    first = watcher.poll()
    assert first.handled == 1
    chain.deployment.deposit(accounts["payer"], uid("c1"), units(7))
    mine_blocks(chain, CONFIRMATIONS)
    # a new process: a new marketplace service rebuilt from the log, a new store and watcher
    restarted = build_market(ledger_app, ledger_env)
    store = ChainStore(restarted.app.app_recorder.datastore, chain.key)
    again = ChainWatcher(chain, restarted.service, store, confirmations=CONFIRMATIONS)
    assert again.cursor == first.to_block
    polled = again.poll()
    assert polled.from_block == first.to_block + 1
    assert (polled.handled, polled.retried) == (1, 0)
    assert restarted.service.available(uid("c1")) == units(12)


# -- stake ------------------------------------------------------------------------------------


def test_a_bond_from_an_unknown_address_is_skipped_with_a_record(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    store: ChainStore,
    accounts: dict[str, str],
) -> None:
    d = chain.deployment
    register(market, "p1", accounts["op1"].lower())  # the address matches in any case
    for who in ("op1", "stranger"):
        fund(chain, accounts[who], units(500))
    d.bond(accounts["stranger"], units(50))
    d.bond(accounts["op1"], units(200))
    mine_blocks(chain, CONFIRMATIONS)
    polled = watcher.poll()
    assert polled.handled == 1
    [skipped] = polled.skipped
    assert (skipped.kind, skipped.reason) == ("Bonded", "provider_not_found")
    assert accounts["stranger"] in skipped.detail
    assert market.service.stake_of(uid("p1")).bonded == units(200)
    # a re-read keeps one record and bonds nothing twice
    forget_cursor(store, WATCHER_CURSOR)
    assert watcher.poll().retried == 1
    assert [(s.ref, s.reason) for s in store.skipped()] == [(skipped.ref, "provider_not_found")]
    assert market.service.stake_of(uid("p1")).bonded == units(200)


def slash_p1(market: Market) -> None:
    """Three checkers fail p1's node for fraud in one window; a tick decides it."""
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window = market.window()
    market.clock.advance(900)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "p1-n1", "p1", window, passed=False, kind=FailureKind.fraud)
    market.clock.advance(market.service.rules.verdicts.verdict_grace_s + 900)
    market.tick()


def bonded_on_chain(
    chain: Chain, market: Market, watcher: ChainWatcher, operator: str, amount: int
) -> UUID:
    pid = register(market, "p1", operator)
    fund(chain, operator, amount)
    chain.deployment.bond(operator, amount)
    mine_blocks(chain, CONFIRMATIONS)
    assert watcher.poll().handled == 1
    return pid


def ledger_stake(market: Market, pid: UUID) -> int:
    held = market.service.stake_of(pid)
    return held.bonded + held.unbonding_total


def test_a_ledger_slash_is_mirrored_on_chain_once(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    store: ChainStore,
    accounts: dict[str, str],
) -> None:
    op = accounts["op1"]
    pid = bonded_on_chain(chain, market, watcher, op, units(300))
    market.send(m.RequestUnbond(uuid4(), pid, units(150)))  # still slashable in the ledger
    slash_p1(market)
    held = market.service.stake_of(pid)
    assert held.slashed > 0
    mirror = SlashMirror(chain, market.service, market.app, store)
    result = mirror.mirror()
    assert (result.sent, result.found, result.skipped) == (1, 0, [])
    assert chain.deployment.stake_of(op) == ledger_stake(market, pid) == units(300) - held.slashed
    [slash] = PayoutGateway(chain).reader.slashes()
    assert (slash.account, slash.amount) == (op, held.slashed)
    assert slash_of_reason(slash.reason)[0] == pid
    [mirrored] = store.slashes()
    assert mirrored.status == "sent" and mirrored.reason == slash.reason
    # again, and after a restart: nothing is sent twice
    assert mirror.mirror().sent == 0
    restarted = SlashMirror(chain, market.service, market.app, store)
    assert restarted.position == mirror.position > 0
    assert (restarted.mirror().sent, len(PayoutGateway(chain).reader.slashes())) == (0, 1)
    pool = str(list(chain.w3.eth.accounts)[1])
    assert chain.deployment.balance(pool) == held.slashed


def test_a_crash_after_sending_a_slash_is_resolved_from_the_chain(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    store: ChainStore,
    accounts: dict[str, str],
) -> None:
    op = accounts["op1"]
    pid = bonded_on_chain(chain, market, watcher, op, units(300))
    slash_p1(market)
    [(position, event)] = [
        (n, e) for n, e in market.app.read() if type(e.fact).__name__ == "StakeSlashed"
    ]
    reason = slash_reason(pid, event.originator_version)
    slasher = to_checksum_address(chain.role("slasher"))
    # the mirror wrote its intent and sent the slash, then died before marking it sent
    store.slash_intent(
        MirroredSlash(
            reason,
            pid,
            op,
            event.fact.amount,
            position,
            "sending",
            None,
            chain.w3.eth.block_number,
            chain.w3.eth.get_transaction_count(slasher, "pending"),
        )
    )
    chain.deployment.slash(slasher, op, event.fact.amount, reason)
    result = SlashMirror(chain, market.service, market.app, store).mirror()
    assert (result.sent, result.found) == (0, 1)
    assert len(PayoutGateway(chain).reader.slashes()) == 1
    assert chain.deployment.stake_of(op) == ledger_stake(market, pid)
    assert store.cursor(MIRROR_CURSOR) is not None


def test_a_slash_the_chain_cannot_take_is_recorded_and_not_retried(
    chain: Chain, market: Market, store: ChainStore, accounts: dict[str, str]
) -> None:
    pid = register(market, "p1", accounts["op2"])
    market.send(m.BondStake(uuid4(), pid, units(300)))  # in the ledger only, not on chain
    slash_p1(market)
    mirror = SlashMirror(chain, market.service, market.app, store)
    result = mirror.mirror()
    assert result.sent == 0
    [skipped] = result.skipped
    assert (skipped.kind, skipped.reason) == ("StakeSlashed", "SlashExceedsStake")
    assert [s.status for s in store.slashes()] == ["refused"]
    assert mirror.mirror().skipped == [] and len(store.skipped()) == 1


# -- payouts ----------------------------------------------------------------------------------


def test_a_posted_root_claimed_on_chain_becomes_a_payout_claim(
    chain: Chain,
    market: Market,
    watcher: ChainWatcher,
    store: ChainStore,
    accounts: dict[str, str],
) -> None:
    d = chain.deployment
    op = accounts["op1"]
    gateway = PayoutGateway(chain)
    # a consumer pays in on chain; the provider bonds on chain; both are confirmed
    fund(chain, accounts["payer"], units(1_000))
    d.deposit(accounts["payer"], uid("c1"), units(1_000))
    pid = register(market, "p1", op)
    fund(chain, op, units(200))
    d.bond(op, units(200))
    mine_blocks(chain, CONFIRMATIONS)
    assert watcher.poll().handled == 2
    # a lease, usage charged: the provider earns
    market.ask("a1", "p1", "p1-n1", PRICE)
    (lease_id,) = market.bid("b1", "c1", units(3)).lease_ids
    market.send(m.ChargeUsage(uuid4(), lease_id, units(10), "usage-1"))
    earned = earnings(market, "p1")
    assert earned > 0
    # settlement puts the epoch on chain: funded from the vault, root posted
    tree = PayoutTree.build([(op, earned)])
    posted = gateway.post_payout_root(1, tree.root, earned)
    assert posted.fund_tx is not None and posted.post_tx is not None
    assert not posted.already_funded and not posted.already_posted
    assert d.balance(d.distributor.address) == earned
    assert d.balance(d.vault.address) == units(1_000) - earned
    again = gateway.post_payout_root(1, tree.root, earned)  # a re-run of settlement
    assert (again.fund_tx, again.post_tx) == (posted.fund_tx, None)
    assert again.already_funded and again.already_posted
    assert d.balance(d.distributor.address) == earned
    with pytest.raises(PayoutConflictError, match="holds root"):
        gateway.post_payout_root(1, PayoutTree.build([(op, earned + 1)]).root, earned)
    # the provider claims on chain; the watcher records the claim once it is deep enough
    receipt = d.claim(1, op, earned, tree.proof(op))
    mine_blocks(chain, CONFIRMATIONS)
    polled = watcher.poll()
    assert (polled.handled, polled.skipped) == (1, [])
    assert earnings(market, "p1") == 0
    forget_cursor(store, WATCHER_CURSOR)
    assert watcher.poll().retried == 3
    assert earnings(market, "p1") == 0
    # what the reconciliation reads
    reader = gateway.reader
    assert reader.posted_root(1) == tree.root and reader.posted_root(2) is None
    assert reader.posted_roots() == {1: tree.root}
    assert reader.claimed_total(op) == earned == reader.claimed_by_account()[op]
    [claim] = reader.claims()
    assert (claim.epoch, claim.amount, claim.cumulative) == (1, earned, earned)
    assert claim.block == receipt["blockNumber"]
    assert reader.deposits_by_consumer() == {uid("c1"): units(1_000)}
    assert reader.deposits_by_consumer(to_block=0) == {}
    assert reader.stake_of(op) == reader.bonded(op) == units(200)
    assert reader.funding(1) == (earned, posted.fund_tx)
    assert pid == uid("p1")


def test_post_payout_root_refuses_what_it_cannot_do(chain: Chain, accounts: dict[str, str]) -> None:
    gateway = PayoutGateway(chain)
    d = chain.deployment
    fund(chain, accounts["payer"], units(100))
    d.deposit(accounts["payer"], uid("c1"), units(100))
    root = PayoutTree.build([(accounts["op1"], units(5))]).root
    for bad, message in (
        ((0, root, 1), "epoch must be"),
        ((1, bytes(32), 1), "root must be"),
        ((1, root[:31], 1), "root must be"),
        ((1, root, -1), "fund_amount must be"),
    ):
        with pytest.raises(ValueError, match=message):
            gateway.post_payout_root(*bad)
    with pytest.raises(ChainError, match="InsufficientVaultBalance"):
        gateway.post_payout_root(1, root, units(101))
    assert gateway.reader.posted_root(1) is None  # nothing posted without its funding
    gateway.post_payout_root(2, root, units(5))
    with pytest.raises(PayoutConflictError, match="funded with"):
        gateway.post_payout_root(2, root, units(6))
    with pytest.raises(PayoutConflictError, match="roots only go forward"):
        gateway.post_payout_root(1, root, 0)
    gateway.post_payout_root(3, root, 0)  # nothing new to fund
    assert gateway.reader.funding(3) is None
    assert payout_memo(2) != payout_memo(3)


# -- configuration ----------------------------------------------------------------------------


def test_the_rpc_url_and_addresses_are_validated() -> None:
    with pytest.raises(ValidationError, match="ETH_RPC_URL"):
        Settings(eth_rpc_url="ftp://node:8545")
    with pytest.raises(ValidationError, match="20-byte hex address"):
        Settings(chain_vault_address="0x1234")
    settings = Settings(eth_rpc_url="http://127.0.0.1:1", chain_vault_address="0x" + "ab" * 20)
    with pytest.raises(ConfigurationError, match="CHAIN_TOKEN_ADDRESS"):
        open_chain(settings)
    assert Settings().eth_rpc_url is None and Settings().chain_confirmations == 12


def test_a_node_that_does_not_answer_is_a_clear_error() -> None:
    names = ("token", "staking", "distributor", "anchor", "vault")
    settings = Settings.model_validate(
        {
            "eth_rpc_url": "http://127.0.0.1:1",
            "chain_poster_key": "0x" + "11" * 32,
            **{f"chain_{n}_address": "0x" + f"{i:02x}" * 20 for i, n in enumerate(names, 1)},
        }
    )
    with pytest.raises(ChainError, match="cannot reach the node at ETH_RPC_URL"):
        open_chain(settings)
    with pytest.raises(ConfigurationError, match="not a valid private key"):
        open_chain(settings.model_copy(update={"chain_poster_key": SecretStr("0x12")}))


def test_an_unset_rpc_url_is_the_in_process_chain_with_roles_granted() -> None:
    chain = open_chain(Settings(eth_rpc_url=""))
    assert chain.embedded and chain.start_block == 0
    d = chain.deployment
    assert d.staking.functions.unbondDelay().call() == m.MarketRules().stake.unbond_delay_s
    for contract, role_name, role in (
        (d.staking, "SLASHER_ROLE", chain.roles.slasher),
        (d.distributor, "POSTER_ROLE", chain.roles.poster),
        (d.vault, "WITHDRAWER_ROLE", chain.roles.withdrawer),
    ):
        role_id = getattr(contract.functions, role_name)().call()
        assert contract.functions.hasRole(role_id, role).call()
    assert d.vault.address in chain.key
    assert open_chain(Settings()).key != chain.key  # a fresh chain gets a fresh cursor
