"""Which channels a new configuration changes: an unchanged channel (the same settings, devices and points) keeps
its task, its connection and its devices' states; any other one restarts. The unit of restart is the channel: its
driver holds the connection and the read plans of all its devices.
"""

from __future__ import annotations

from agent.config.base import ChannelBase
from agent.config.models import AgentConfig


def changed_channels(old: AgentConfig, new: AgentConfig) -> tuple[set[str], list[ChannelBase]]:
    """(ids of the channels that go on as they are, the channels of `new` to start)."""
    before = {c.id: c for c in old.channels if c.enabled}
    keep = {c.id for c in new.channels if c.enabled and before.get(c.id) == c}
    return keep, [c for c in new.channels if c.enabled and c.id not in keep]
