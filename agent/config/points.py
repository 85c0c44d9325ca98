"""The point table: every configured point compiled once into flat, indexable facts for the hot path.

Stages refer to points by their index here, so no stage looks up a point by name per reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from agent.config.base import ChannelBase, DeviceBase, Limits, PointBase

if TYPE_CHECKING:  # the config module loads the drivers, which use this module
    from agent.config.models import AgentConfig


@dataclass(slots=True)
class PointInfo:
    index: int
    id: str
    unit: str
    domain: str
    channel: str
    device: str
    scale: float
    offset: float
    lo: float
    hi: float
    limits: Limits | None
    comm_loss: float
    is_bool: bool
    # the point id as JSON text, prefixed, so a reading is encoded without re-escaping the id (members in RFC 8785
    # order); made by the version 1 encoder when it first needs it (compact messages never do: 80 bytes a point)
    json_head: str = ""
    json_float: str = "%.12g"


_FINITE = 1.7976931348623157e308  # the largest double: a bound that infinity fails


@dataclass(slots=True)
class DeviceSlot:
    """The points of one device, in the device's own order, as global indices; for decode's fast path, whether
    every point is a plain number (no scale, offset or bool) and each point's range, as finite bounds."""

    channel: ChannelBase
    device: DeviceBase
    indices: list[int] = field(default_factory=list)
    plain: bool = True
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)

    def add(self, info: PointInfo) -> None:
        self.indices.append(info.index)
        self.plain = self.plain and not info.is_bool and info.scale == 1.0 and info.offset == 0.0
        self.lo.append(max(info.lo, -_FINITE))
        self.hi.append(min(info.hi, _FINITE))


class PointTable:
    def __init__(self, config: AgentConfig) -> None:
        self.points: list[PointInfo] = []
        self.by_id: dict[str, PointInfo] = {}
        self.devices: list[DeviceSlot] = []
        alarming: dict[int, bool] = {}  # points written alike share their limits: asked once each
        for channel in config.channels:
            for device in getattr(channel, "devices", []):
                slot = DeviceSlot(channel, device)
                for point in device.points:
                    limits = point.limits
                    if limits is not None:
                        some = alarming.get(id(limits))
                        if some is None:
                            some = alarming[id(limits)] = limits.any()
                        if not some:
                            limits = None
                    info = self._compile(len(self.points), channel, device, point, limits)
                    self.points.append(info)
                    self.by_id[info.id] = info
                    slot.add(info)
                self.devices.append(slot)

    @staticmethod
    def _compile(index: int, channel: ChannelBase, device: DeviceBase, point: PointBase,
                 limits: Limits | None) -> PointInfo:
        lo, hi = point.range if point.range is not None else (-math.inf, math.inf)
        ptype = getattr(point, "type", "float64")
        # a float32 carries about 7 significant digits; printing more shows only conversion noise
        return PointInfo(index, point.id, point.unit, point.domain, channel.id, device.id, point.scale, point.offset,
                         lo, hi, limits, point.comm_loss if point.comm_loss is not None else device.comm_loss,
                         ptype == "bool", "", "%.7g" if ptype == "float32" else "%.12g")

    def add_derived(self, point_id: str, unit: str, domain: str, device: str) -> PointInfo:
        """A point the agent computes itself (daily energy), published like a measured one."""
        info = PointInfo(index=len(self.points), id=point_id, unit=unit, domain=domain, channel="derived",
                         device=device, scale=1.0, offset=0.0, lo=-math.inf, hi=math.inf, limits=None,
                         comm_loss=3600.0, is_bool=False)
        self.points.append(info)
        self.by_id[point_id] = info
        return info

    @staticmethod
    def json_head(info: PointInfo) -> str:
        """`info.json_head`, made the first time."""
        if not info.json_head:
            info.json_head = '{"point":' + orjson.dumps(info.id).decode() + ',"quality":'
        return info.json_head

    def __len__(self) -> int:
        return len(self.points)
