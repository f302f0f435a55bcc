// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title PayoutDistributor
/// @notice Each epoch an address with POSTER_ROLE posts a Merkle root over
///         (account, cumulativeAmount) leaves, hashed as OpenZeppelin's StandardMerkleTree does:
///         keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount)))).
///         A claim pays the difference between the proven cumulative amount and what the account
///         has already been paid, so later epochs supersede earlier ones and nothing is paid twice.
contract PayoutDistributor is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant POSTER_ROLE = keccak256("POSTER_ROLE");

    IERC20 public immutable token;
    /// @notice The highest epoch with a posted root (0 = none yet; epochs start at 1).
    uint256 public latestEpoch;

    mapping(uint256 epoch => bytes32) public rootOf;
    mapping(address account => uint256) public claimed;

    error ZeroAddress();
    error ZeroRoot();
    error EpochNotIncreasing(uint256 epoch, uint256 latestEpoch);
    error UnknownEpoch(uint256 epoch);
    error InvalidProof(uint256 epoch, address account, uint256 cumulativeAmount);
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    error InsufficientFunds(uint256 needed, uint256 available);

    event RootPosted(uint256 indexed epoch, bytes32 root, address indexed poster);
    event Claimed(uint256 indexed epoch, address indexed account, uint256 amount, uint256 cumulativeAmount);

    constructor(IERC20 token_, address admin) {
        if (address(token_) == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Post the root for `epoch`; epochs must strictly increase and roots are immutable.
    function postRoot(uint256 epoch, bytes32 root) external onlyRole(POSTER_ROLE) {
        if (root == bytes32(0)) revert ZeroRoot();
        if (epoch <= latestEpoch) revert EpochNotIncreasing(epoch, latestEpoch);
        latestEpoch = epoch;
        rootOf[epoch] = root;
        emit RootPosted(epoch, root, msg.sender);
    }

    /// @notice The leaf committed for (`account`, `cumulativeAmount`).
    function leaf(address account, uint256 cumulativeAmount) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
    }

    /// @notice Pay `account` (anyone may relay) up to its proven cumulative amount for `epoch`.
    function claim(uint256 epoch, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        nonReentrant
        returns (uint256 amount)
    {
        bytes32 root = rootOf[epoch];
        if (root == bytes32(0)) revert UnknownEpoch(epoch);
        if (!MerkleProof.verifyCalldata(proof, root, leaf(account, cumulativeAmount))) {
            revert InvalidProof(epoch, account, cumulativeAmount);
        }
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        amount = cumulativeAmount - already;
        uint256 balance = token.balanceOf(address(this));
        if (balance < amount) revert InsufficientFunds(amount, balance);
        claimed[account] = cumulativeAmount;
        token.safeTransfer(account, amount);
        emit Claimed(epoch, account, amount, cumulativeAmount);
    }
}
