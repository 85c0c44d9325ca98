"""Sharing equal parts of a validated configuration: 10,000 points written alike (the same limits, the same unit,
the same field set) are held once, not 10,000 times.

Configuration models are frozen, so an equal leaf model (limits, a gas detector), tuple or text may serve every
point that has it; each model's set of explicitly given fields is shared the same way. A point's model costs
about a quarter of its parsed size afterwards.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel


def _exact(value: Any) -> Any:
    """A key that keeps -0.0 and 0.0 apart (they compare equal)."""
    if type(value) is float and value == 0.0:
        return value, math.copysign(1.0, value)
    return value


class _Shared:
    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.leaves: dict[Any, Any] = {}
        self.field_sets: dict[frozenset[str], set[str]] = {}

    def model(self, model: BaseModel, alike: bool = True) -> BaseModel:
        """The model with its parts shared; with `alike`, an equal leaf model met before, if any (list items,
        e.g. points, differ by their ids anyway: never compared)."""
        fields = model.__dict__
        leaf = True
        for name, value in fields.items():
            kind = type(value)
            if kind is float or kind is int or kind is bool or value is None:
                continue
            if kind is str:
                fields[name] = self.texts.setdefault(value, value)
            elif kind is list:
                leaf = False
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        value[i] = self.model(item, alike=False)
            elif kind is tuple:
                fields[name] = self.leaves.setdefault((tuple, *map(_exact, value)), value)
            elif isinstance(value, BaseModel):
                fields[name] = self.model(value)
            elif kind is dict:
                leaf = False
        given = frozenset(model.__pydantic_fields_set__)
        object.__setattr__(model, "__pydantic_fields_set__", self.field_sets.setdefault(given, set(given)))
        if not alike or not leaf or model.__pydantic_extra__ or model.__pydantic_private__:
            return model
        try:
            return self.leaves.setdefault((type(model), *map(_exact, fields.values())), model)  # type: ignore[no-any-return]
        except TypeError:  # holds something unhashable: kept as it is
            return model


def share_equal_parts(config: BaseModel) -> None:
    """Make equal parts of a frozen configuration one object (in place)."""
    _Shared().model(config)
