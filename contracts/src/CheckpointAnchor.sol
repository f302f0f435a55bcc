// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title CheckpointAnchor
/// @notice Append-only store of log checkpoint roots; an address with ANCHOR_ROLE appends the
///         root for the next index (0, 1, 2, ...); anyone reads a root by index.
contract CheckpointAnchor is AccessControl {
    bytes32 public constant ANCHOR_ROLE = keccak256("ANCHOR_ROLE");

    bytes32[] private _roots;

    error ZeroAddress();
    error ZeroRoot();
    error IndexMismatch(uint256 expected, uint256 given);
    error UnknownIndex(uint256 index, uint256 count);

    event CheckpointAnchored(uint256 indexed index, bytes32 root, address indexed anchorer);

    constructor(address admin) {
        if (admin == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Append `root` as checkpoint `index`, which must equal the current count.
    function anchor(uint256 index, bytes32 root) external onlyRole(ANCHOR_ROLE) {
        if (root == bytes32(0)) revert ZeroRoot();
        uint256 expected = _roots.length;
        if (index != expected) revert IndexMismatch(expected, index);
        _roots.push(root);
        emit CheckpointAnchored(index, root, msg.sender);
    }

    /// @notice Number of anchored checkpoints.
    function count() external view returns (uint256) {
        return _roots.length;
    }

    /// @notice Root of checkpoint `index`.
    function rootAt(uint256 index) external view returns (bytes32) {
        uint256 n = _roots.length;
        if (index >= n) revert UnknownIndex(index, n);
        return _roots[index];
    }
}
