"""Sharing equal parts of a validated configuration: 10,000 points written alike (the same limits, the same unit,
the same field set) are held once, not 10,000 times.

Configuration models are frozen, so an equal leaf model (limits, a gas detector), tuple or text may serve every
point that has it; each model's set of explicitly given fields is shared the same way. A point's model costs
about a quarter of its parsed size afterwards. Before validation, `validated_once` lets equal mappings of the
points (their limits) be validated once, giving one instance from the start; it never changes what validation
gives, nor the document.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from typing import Any

from pydantic import BaseModel, BeforeValidator, PlainValidator, ValidationError, WrapValidator
from pydantic.fields import FieldInfo


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
        self.done: dict[int, tuple[BaseModel, BaseModel]] = {}  # by id: a model held by many points (validated_once)

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
                done = self.done.get(id(value))
                if done is None or done[0] is not value:
                    done = self.done[id(value)] = value, self.model(value)
                fields[name] = done[1]
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



# --- validating equal parts once --------------------------------------------------------------------------

_SCALARS = (str, int, float, bool, type(None))
_PLAIN = frozenset(_SCALARS)
_Kinds = tuple[str | None, dict[str | None, type[BaseModel]]]
"""What a list's items validate as: the tag field and a model by tag, or None and one model."""


def validated_once(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """The document with the nested mappings of its list items (a point's `limits`, `gas`, `quality`) written
    alike validated once: in their place one model instance, which validation keeps as it is (a field that holds a
    model takes an instance of it unchanged). 100,000 points with the same limits validate one `Limits`.

    Validating the result gives what validating `data` gives: only mappings that validate are replaced, keyed by
    their keys and their values' exact types and values, and only in fields and models no validator reads before
    pydantic does. A mapping that does not validate is left as written, for the validation of the whole to report
    at its own path. `data` itself is never changed: what holds a replacement is a copy."""
    return _Once().mapping(data, model, parts=False)


class _Once:
    def __init__(self) -> None:
        self.models: dict[tuple[Any, ...], BaseModel | None] = {}

    def mapping(self, raw: dict[str, Any], model: type[BaseModel], parts: bool = True) -> dict[str, Any]:
        """`raw`, or a copy with its list items' parts (and with `parts`, its own) replaced, as it validates as
        `model`."""
        lists, models = _plan(model)
        copied: dict[str, Any] | None = None
        for name, kinds in lists.items():
            items = raw.get(name)
            if type(items) is list:
                new = self.items(items, kinds)
                if new is not items:
                    copied = copied if copied is not None else dict(raw)
                    copied[name] = new
        for name, part in models.items() if parts else ():
            value = raw.get(name)
            if type(value) is dict:
                instance = self.validated(part, value)
                if instance is not None:
                    copied = copied if copied is not None else dict(raw)
                    copied[name] = instance
        return copied if copied is not None else raw

    def items(self, items: list[Any], kinds: _Kinds) -> list[Any]:
        tag_field, by_tag = kinds
        if tag_field is None:
            lists, parts = _plan(by_tag[None])
            if not lists:
                return self.leaves(items, tuple(parts.items())) if parts else items
        out: list[Any] | None = None
        for i, item in enumerate(items):
            if type(item) is not dict:
                continue
            tag = item.get(tag_field) if tag_field is not None else None
            model = by_tag.get(tag) if tag is None or type(tag) is str else None
            if model is None:
                continue  # no tag, or one validation refuses: left to it
            new = self.mapping(item, model)
            if new is not item:
                out = out if out is not None else list(items)
                out[i] = new
        return out if out is not None else items

    def leaves(self, items: list[Any], parts: tuple[tuple[str, type[BaseModel]], ...]) -> list[Any]:
        """`mapping` of each item of a list of models that hold no lists of models (points), in one loop."""
        out: list[Any] | None = None
        for i, item in enumerate(items):
            if type(item) is not dict:
                continue
            copied: dict[str, Any] | None = None
            for name, part in parts:
                value = item.get(name)
                if type(value) is dict and (instance := self.validated(part, value)) is not None:
                    copied = copied if copied is not None else dict(item)
                    copied[name] = instance
            if copied is not None:
                out = out if out is not None else list(items)
                out[i] = copied
        return out if out is not None else items

    def validated(self, model: type[BaseModel], raw: dict[str, Any]) -> BaseModel | None:
        """The model `raw` validates as, validated once for all equal mappings; None when it does not validate or
        holds what is not compared here."""
        kinds = tuple(map(type, raw.values()))
        key: tuple[Any, ...]
        if _PLAIN.issuperset(kinds):  # the usual mapping of numbers and text, keyed fast
            key = (model, tuple(raw.items()), kinds, tuple(map(type, raw)))
            if 0.0 in raw.values():  # -0.0 equals 0.0, but a model keeps its sign
                key += (tuple(math.copysign(1.0, v) if type(v) is float else 0.0 for v in raw.values()),)
        elif (slow := _key(model, raw)) is not None:
            key = slow
        else:
            return None
        try:
            return self.models[key]
        except KeyError:
            pass
        try:
            instance: BaseModel | None = model.model_validate(raw)
        except ValidationError:
            instance = None  # reported where it stands, by the validation of the whole
        self.models[key] = instance
        return instance


def _key(model: type[BaseModel], raw: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a mapping's validation depends on, where a value is a list: its keys in order, each key's and value's
    exact type (1, 1.0 and True are equal in Python, not to a model) and each value, -0.0 apart from 0.0; None for
    anything but plain values and lists of them."""
    kinds = tuple(map(type, raw.values()))
    if not _PLAIN.issuperset(k for k in kinds if k is not list):
        return None
    if not all(_PLAIN.issuperset(map(type, v)) for v in raw.values() if type(v) is list):
        return None
    values = tuple(_typed_list(v) if type(v) is list else v for v in raw.values())
    signs = tuple(math.copysign(1.0, v) if type(v) is float else 0.0 for v in values)
    return model, tuple(raw), kinds, tuple(map(type, raw)), values, signs


def _typed_list(items: list[Any]) -> tuple[Any, ...]:
    signs = tuple(math.copysign(1.0, v) if type(v) is float else 0.0 for v in items)
    return tuple(map(type, items)), tuple(items), signs




@functools.cache
def _plan(model: type[BaseModel]) -> tuple[dict[str, _Kinds], dict[str, type[BaseModel]]]:
    """Which fields of a model hold lists of models to walk into, and which hold one model (or None) whose
    mapping may be validated alone; nothing in a model a validator reads before pydantic does."""
    decorators = model.__pydantic_decorators__
    if any(d.info.mode != "after" for d in decorators.model_validators.values()):
        return {}, {}
    early = {name for d in decorators.field_validators.values() if d.info.mode != "after" for name in d.info.fields}
    if "*" in early:
        return {}, {}
    lists: dict[str, _Kinds] = {}
    models: dict[str, type[BaseModel]] = {}
    for name, field in model.model_fields.items():
        if name in early or any(isinstance(m, _EARLY) for m in field.metadata):
            continue
        annotation = field.annotation
        if typing.get_origin(annotation) is list:
            kinds = _item_kinds(typing.get_args(annotation)[0])
            if kinds is not None:
                lists[name] = kinds
        elif (part := _optional_model(annotation)) is not None:
            models[name] = part
    return lists, models


_EARLY = (BeforeValidator, WrapValidator, PlainValidator)


def _item_kinds(annotation: Any) -> _Kinds | None:
    """A list item's model, or the models of a union told apart by a tag field of string literals."""
    if _is_model(annotation):
        return None, {None: annotation}
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    union, *extra = typing.get_args(annotation)
    if len(extra) != 1 or not isinstance(extra[0], FieldInfo) or not isinstance(extra[0].discriminator, str):
        return None
    tag_field = extra[0].discriminator
    if extra[0].metadata or typing.get_origin(union) not in (typing.Union, types.UnionType):
        return None
    by_tag: dict[str | None, type[BaseModel]] = {}
    for member in typing.get_args(union):
        if not _is_model(member) or tag_field not in member.model_fields:
            return None
        tag = member.model_fields[tag_field].annotation
        if typing.get_origin(tag) is not typing.Literal or not all(type(t) is str for t in typing.get_args(tag)):
            return None
        by_tag.update((t, member) for t in typing.get_args(tag))
    return tag_field, by_tag


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """M for a field of type M or M | None (a model), else None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    found = [o for o in options if o is not type(None)]
    return found[0] if len(found) == 1 and _is_model(found[0]) else None


def _is_model(annotation: Any) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and typing.get_origin(annotation) is None and issubclass(annotation, BaseModel)
