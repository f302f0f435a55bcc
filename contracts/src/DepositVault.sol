// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title DepositVault
/// @notice Consumers pay into the protocol here: `deposit(consumer, amount)` pulls the token from
///         the sender and emits `Deposited`, which the ledger's chain watcher credits to the
///         consumer (`consumer` is the consumer's 16-byte UUID) once it is deep enough.
///         The vault's funds leave only by `withdraw`, called by an address with WITHDRAWER_ROLE,
///         and only to a recipient the admin allowed (the PayoutDistributor, a treasury).
contract DepositVault is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant WITHDRAWER_ROLE = keccak256("WITHDRAWER_ROLE");

    IERC20 public immutable token;

    mapping(address recipient => bool) public allowedRecipient;

    error ZeroAddress();
    error ZeroAmount();
    error ZeroConsumer();
    error RecipientNotAllowed(address recipient);
    error InsufficientVaultBalance(uint256 requested, uint256 available);

    event Deposited(bytes16 indexed consumer, address indexed from, uint256 amount);
    event Withdrawn(address indexed to, uint256 amount, bytes32 indexed memo, address withdrawer);
    event RecipientAllowed(address indexed recipient, bool allowed);

    constructor(IERC20 token_, address admin) {
        if (address(token_) == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Pay `amount` tokens (approved to this contract) into the account of `consumer`.
    ///         The event carries what the vault received.
    function deposit(bytes16 consumer, uint256 amount) external nonReentrant {
        if (consumer == bytes16(0)) revert ZeroConsumer();
        if (amount == 0) revert ZeroAmount();
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = token.balanceOf(address(this)) - before;
        emit Deposited(consumer, msg.sender, received);
    }

    /// @notice Allow or disallow `recipient` as a destination of withdrawals.
    function setRecipient(address recipient, bool allowed) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (recipient == address(0)) revert ZeroAddress();
        allowedRecipient[recipient] = allowed;
        emit RecipientAllowed(recipient, allowed);
    }

    /// @notice Move `amount` to an allowed `recipient`; `memo` names why (e.g. an epoch).
    function withdraw(address to, uint256 amount, bytes32 memo)
        external
        onlyRole(WITHDRAWER_ROLE)
        nonReentrant
    {
        if (amount == 0) revert ZeroAmount();
        if (!allowedRecipient[to]) revert RecipientNotAllowed(to);
        uint256 available = token.balanceOf(address(this));
        if (amount > available) revert InsufficientVaultBalance(amount, available);
        token.safeTransfer(to, amount);
        emit Withdrawn(to, amount, memo, msg.sender);
    }
}
