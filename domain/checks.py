"""Type guards shared by the domain's commands: a caller's bug never reaches the log."""

from __future__ import annotations

from uuid import UUID


def require_int(name: str, value: object) -> None:
    """An amount, count or duration must be an int: a float or a bool is a caller's bug."""
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {value!r}")


def require_uuid(name: str, value: object) -> None:
    """An id must be a UUID."""
    if not isinstance(value, UUID):
        raise TypeError(f"{name} must be a UUID, got {value!r}")
