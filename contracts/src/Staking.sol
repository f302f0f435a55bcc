// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Staking
/// @notice Providers bond tokens; unbonding waits `unbondDelay` seconds; an address holding
///         SLASHER_ROLE can slash bonded and pending-unbond stake to `slashPool`.
contract Staking is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");

    struct PendingUnbond {
        uint256 amount;
        uint64 releaseAt;
    }

    IERC20 public immutable token;
    uint64 public immutable unbondDelay;
    address public slashPool;

    mapping(address account => uint256) public bonded;
    mapping(address account => PendingUnbond) public pendingUnbond;

    error ZeroAmount();
    error ZeroAddress();
    error InsufficientBond(address account, uint256 requested, uint256 available);
    error NoPendingUnbond(address account);
    error UnbondNotReady(address account, uint64 releaseAt, uint64 nowTs);
    error SlashExceedsStake(address account, uint256 requested, uint256 available);

    event Bonded(address indexed account, uint256 amount, uint256 totalBonded);
    event UnbondRequested(address indexed account, uint256 amount, uint256 totalPending, uint64 releaseAt);
    event UnbondCompleted(address indexed account, uint256 amount);
    event Slashed(
        address indexed account,
        uint256 amount,
        bytes32 indexed reason,
        address indexed pool,
        address slasher
    );
    event SlashPoolChanged(address indexed previousPool, address indexed newPool);

    constructor(IERC20 token_, uint64 unbondDelay_, address slashPool_, address admin) {
        if (address(token_) == address(0) || slashPool_ == address(0) || admin == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        unbondDelay = unbondDelay_;
        slashPool = slashPool_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        emit SlashPoolChanged(address(0), slashPool_);
    }

    /// @notice Total stake of `account` that can still be slashed (bonded + pending unbond).
    function stakeOf(address account) public view returns (uint256) {
        return bonded[account] + pendingUnbond[account].amount;
    }

    /// @notice Bond `amount` tokens (caller must have approved this contract).
    function bond(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        bonded[msg.sender] += amount;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Bonded(msg.sender, amount, bonded[msg.sender]);
    }

    /// @notice Move `amount` from bonded to pending; a new request restarts the delay for the whole
    ///         pending amount.
    function requestUnbond(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 available = bonded[msg.sender];
        if (amount > available) revert InsufficientBond(msg.sender, amount, available);
        bonded[msg.sender] = available - amount;
        PendingUnbond storage p = pendingUnbond[msg.sender];
        p.amount += amount;
        p.releaseAt = uint64(block.timestamp) + unbondDelay;
        emit UnbondRequested(msg.sender, amount, p.amount, p.releaseAt);
    }

    /// @notice Withdraw the pending unbond once its delay has passed.
    function completeUnbond() external nonReentrant {
        PendingUnbond memory p = pendingUnbond[msg.sender];
        if (p.amount == 0) revert NoPendingUnbond(msg.sender);
        if (block.timestamp < p.releaseAt) {
            revert UnbondNotReady(msg.sender, p.releaseAt, uint64(block.timestamp));
        }
        delete pendingUnbond[msg.sender];
        token.safeTransfer(msg.sender, p.amount);
        emit UnbondCompleted(msg.sender, p.amount);
    }

    /// @notice Slash `amount` of `account`'s stake (bonded first, then pending unbond) to the pool.
    function slash(address account, uint256 amount, bytes32 reason)
        external
        onlyRole(SLASHER_ROLE)
        nonReentrant
    {
        if (amount == 0) revert ZeroAmount();
        uint256 fromBonded = bonded[account];
        uint256 available = fromBonded + pendingUnbond[account].amount;
        if (amount > available) revert SlashExceedsStake(account, amount, available);
        if (amount <= fromBonded) {
            bonded[account] = fromBonded - amount;
        } else {
            bonded[account] = 0;
            pendingUnbond[account].amount -= amount - fromBonded;
        }
        address pool = slashPool;
        token.safeTransfer(pool, amount);
        emit Slashed(account, amount, reason, pool, msg.sender);
    }

    /// @notice Change where slashed funds go.
    function setSlashPool(address newPool) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (newPool == address(0)) revert ZeroAddress();
        emit SlashPoolChanged(slashPool, newPool);
        slashPool = newPool;
    }
}
