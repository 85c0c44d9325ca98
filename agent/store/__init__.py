"""The store: one SQLite file with the outbox (every message before it is published), the archive (30 days of
readings), and its upkeep (sync, bounds, retention). The store never talks to the network.
"""

from agent.store.archive import Archive


class Store(Archive):
    """The whole store: database (agent.store.db), outbox (agent.store.outbox), the point maps of compact
    messages (agent.store.maps) and archive (agent.store.archive)."""


__all__ = ["Store"]
