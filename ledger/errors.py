"""The ledger's errors. One base; driver errors are translated at the adapter boundary."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises."""


class ConfigurationError(LedgerError):
    """The settings are incomplete or contradictory."""


class StoreUnavailableError(LedgerError):
    """PostgreSQL could not be reached or refused the connection."""


class WriterRaceLostError(LedgerError):
    """A batch lost the race to other writers more often than COMMIT_RETRIES_MAX allows."""


class WriterStoppedError(LedgerError):
    """The writer was stopped; the request was not applied."""


class WriterStateError(LedgerError):
    """The log holds an event the writer's state does not know: a bug, never a race.
    Nothing was written; restart the writer to rebuild its state from the log."""
