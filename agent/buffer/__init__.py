"""The durable store every outgoing message passes through (see `agent.buffer.store`)."""

from agent.buffer.store import BacklogStats, Row, Store

__all__ = ["BacklogStats", "Row", "Store"]
