"""The agent's errors, one short hierarchy: what failed (configuration, a device link, the store) decides what
the caller does, and every message says what to do. A leaf like `agent.core`.

A driver error is an OSError, so code that guards a link (`except OSError`) also covers a device that answers
nonsense; the read path catches `DriverError`, never a bare `Exception`.
"""

from __future__ import annotations


class AgentError(Exception):
    """Anything the agent reports on purpose, as opposed to a bug."""


class ConfigError(AgentError):
    """A configuration that cannot be used; `errors` holds one line per problem, each with its path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


class DriverError(AgentError, OSError):
    """A device or its link failed; the poll yields `bad` readings and the device is backed off."""


class LinkError(DriverError, ConnectionError):
    """The link to the device (socket, serial port, session) could not be opened or broke."""


class NoReply(DriverError, TimeoutError):
    """The device did not answer in time."""


class ProtocolError(DriverError):
    """The device answered, but with a frame that breaks the protocol (checksum, length, wrong function)."""


class StoreError(AgentError):
    """The store could not do what was asked (and could not recover by itself)."""


class ResetRefused(AgentError):
    """A reset that cannot be done: unknown alarm, not latched, or its condition still present."""
