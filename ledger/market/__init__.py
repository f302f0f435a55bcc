"""The marketplace's bounded context on the event store: its events, its application and the
service that decides commands with `domain` and saves them with their ledger transfers."""
