"""A device's points packed as columns once the configuration is validated.

A running agent holds its configuration for as long as it runs, but after start it reads a point's model rarely
(a driver's read plan, a comparison with a configuration pushed from afar). As pydantic models, 10,000 points
written alike cost about 690 bytes each; as columns, a field every point of the device has alike is held once and
only the fields that differ (the id, the address) a point each: about 120 bytes. `PackedPoints` is a read-only
sequence of the same models, each rebuilt when asked for (about 2 µs), equal to the list it was made from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, overload

from pydantic import BaseModel


class PackedPoints(Sequence[Any]):
    """The models of one device's points, all of one class, kept as columns."""

    __slots__ = ("_cls", "_count", "_sets", "_template", "_varying")

    def __init__(self, cls: type[BaseModel], template: dict[str, Any], varying: tuple[tuple[str, list[Any]], ...],
                 sets: tuple[Any] | list[Any], count: int) -> None:
        self._cls = cls
        self._template = template  # every field in order, with the value all points have (or the first point's)
        self._varying = varying  # the fields that differ: (name, a value a point)
        self._sets = sets  # the fields given explicitly: a 1-tuple when all points have one set, else a set a point
        self._count = count

    @classmethod
    def pack(cls, points: list[Any]) -> PackedPoints | list[Any]:
        """The points packed, or the list itself when it cannot be (empty, models of several classes or with
        extra or private parts)."""
        if not points:
            return points
        kind = type(points[0])
        names = tuple(points[0].__dict__)
        for point in points:
            if type(point) is not kind or point.__pydantic_extra__ or point.__pydantic_private__ or \
                    tuple(point.__dict__) != names:
                return points
        template = dict(points[0].__dict__)
        varying: list[tuple[str, list[Any]]] = []
        for name in names:
            column = _column([p.__dict__[name] for p in points])
            if isinstance(column, tuple):
                template[name] = column[0]
            else:
                varying.append((name, column))
        return cls(kind, template, tuple(varying), _column([p.__pydantic_fields_set__ for p in points]), len(points))

    def _model(self, i: int) -> Any:
        values = self._template.copy()
        for name, column in self._varying:
            values[name] = column[i]
        model = self._cls.__new__(self._cls)
        object.__setattr__(model, "__dict__", values)
        sets = self._sets
        object.__setattr__(model, "__pydantic_fields_set__", sets[0] if type(sets) is tuple else sets[i])
        object.__setattr__(model, "__pydantic_extra__", None)
        object.__setattr__(model, "__pydantic_private__", None)
        return model

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._model(i) for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("point index out of range")
        return self._model(index)

    def __iter__(self) -> Iterator[Any]:
        return (self._model(i) for i in range(self._count))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedPoints):
            if self._cls is not other._cls or self._count != other._count:
                return False
            if [n for n, _ in self._varying] == [n for n, _ in other._varying]:  # the usual case: columns compared
                return self._template == other._template and self._varying == other._varying and \
                    _expand(self._sets, self._count) == _expand(other._sets, other._count)
        if isinstance(other, PackedPoints | list | tuple):
            return len(other) == self._count and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like the list it stands for

    def __repr__(self) -> str:
        return f"PackedPoints({self._count} {self._cls.__name__})"

    def __reduce__(self) -> tuple[Any, ...]:
        return PackedPoints, (self._cls, self._template, self._varying, self._sets, self._count)


def _column(values: list[Any]) -> tuple[Any] | list[Any]:
    first = values[0]
    if all(v is first or _alike(v, first) for v in values):
        return (first,)
    return values


def _alike(value: Any, first: Any) -> bool:
    """Numbers and texts equal in value and type are one (a validated 1.0 is a new object a point); -0.0 stays
    apart from 0.0. Other values are one only as one object (the configuration shares equal parts already)."""
    kind = type(value)
    if kind is not type(first) or kind not in _SCALARS or value != first:
        return False
    return kind is not float or math.copysign(1.0, value) == math.copysign(1.0, first)


_SCALARS = (int, float, str, bool)


def _expand(column: tuple[Any] | list[Any], count: int) -> list[Any]:
    return [column[0]] * count if type(column) is tuple else column  # type: ignore[return-value]


def pack_points(config: Any) -> None:
    """Pack the points of every device of a validated configuration (in place: its models are frozen)."""
    for channel in config.channels:
        for device in getattr(channel, "devices", []):
            points = device.points
            if isinstance(points, list):
                object.__setattr__(device, "points", PackedPoints.pack(points))
