// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title TestToken
/// @notice ERC-20 used by tests and the demo; only the owner can mint.
contract TestToken is ERC20, Ownable {
    constructor(string memory name_, string memory symbol_, address owner_)
        ERC20(name_, symbol_)
        Ownable(owner_)
    {}

    /// @notice Mint `amount` to `to`. Reverts with OwnableUnauthorizedAccount for non-owners.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
