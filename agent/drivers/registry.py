"""The driver registry: each protocol module registers its name, channel config model and factory here.

The pipeline and the config models look drivers up by name; they never import a protocol module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.schema import ChannelBase, DeviceBase

# Protocol modules loaded on first use; adding a protocol adds one name here and one file beside this.
BUILTIN = ("modbus_tcp",)


class DeviceRead:
    """One poll of one device: a value per point (None where the point could not be read) and why."""

    __slots__ = ("errors", "values")

    def __init__(self, values: list[Any], errors: list[str] | None = None) -> None:
        self.values = values
        self.errors = errors or []


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
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(f"agent.drivers.{module}")


def all_drivers() -> list[DriverInfo]:
    _load()
    return list(_drivers.values())


def get(name: str) -> DriverInfo:
    _load()
    return _drivers[name]
