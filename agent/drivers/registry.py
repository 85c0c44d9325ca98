"""The driver registry: each protocol module registers its name, channel config model and factory here.

The pipeline and the config models look drivers up by name; they never import a protocol module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config.base import ChannelBase, DeviceBase
from agent.core import DeviceRead


class Driver(Protocol):
    """The small contract every protocol implements; one instance serves one channel."""

    async def open(self) -> None:
        """Connect; raise OSError (or a subclass) when the link cannot be opened."""

    async def read(self, device: DeviceBase) -> DeviceRead:
        """Read every point of `device`; a failed block gives None for its points and an error line."""

    async def close(self) -> None:
        """Release the link; never raises."""

    @property
    def connected(self) -> bool:
        """Whether the link is up now."""


@dataclass(frozen=True)
class DriverInfo:
    name: str
    channel_model: type[ChannelBase]
    factory: Callable[[Any], Driver]


_drivers: dict[str, DriverInfo] = {}
_loaded = False


def register(name: str, channel_model: type[ChannelBase], factory: Callable[[Any], Driver]) -> None:
    _drivers[name] = DriverInfo(name, channel_model, factory)


def _load() -> None:
    """Import every protocol package once; a protocol's modules register themselves on import."""
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module("agent.drivers")
        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg and not info.name.startswith("_"):
                importlib.import_module(f"agent.drivers.{info.name}")


def all_drivers() -> list[DriverInfo]:
    _load()
    return [_drivers[name] for name in sorted(_drivers)]


def get(name: str) -> DriverInfo:
    _load()
    return _drivers[name]
