"""The store: one SQLite file with the outbox (every message before it is published), the archive (30 days of
readings), and its upkeep (sync, bounds, retention). The store never talks to the network."""
