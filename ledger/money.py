"""Amounts are integers in the asset's smallest unit; decimals appear only when printing."""

from __future__ import annotations

AETH_SCALE = 18
"""Decimals of the marketplace token (like an ERC-20 with 18 decimals)."""


def units(whole: int, scale: int = AETH_SCALE) -> int:
    """Whole tokens to the smallest unit: units(3) == 3 * 10**18."""
    amount: int = whole * 10**scale
    return amount


def format_amount(amount: int, scale: int = AETH_SCALE) -> str:
    """Exact decimal text of an amount: format_amount(1_500_000_000_000_000_000) == '1.5'."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**scale)
    text = f"{whole:,}"
    if fraction:
        text += "." + f"{fraction:0{scale}d}".rstrip("0")
    return sign + text
