"""A YAML loader that builds plain Python values straight from parser events (libyaml when present).

`yaml.safe_load` first builds a node tree of the whole document, which for a 10,000-point configuration costs
about 100 MB at its peak; this loader never holds more than the values themselves. Same safe types. It never
lets a document cost more than its size: aliases may add only so much, nesting is bounded (both errors with
their line), and no input raises anything but yaml.YAMLError.
"""

from __future__ import annotations

import reprlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import yaml

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists; a configuration needs about 8."""

ALIAS_ALLOWANCE = 100_000
"""Values that aliases (and the merge keys using them) may add to a document beyond what it writes itself: a
limits block of 7 values shared by 10,000 points adds 70,000, a billion laughs adds 10^9."""

_MERGE = "tag:yaml.org,2002:merge"
_MISSING = object()
_SEEN_MAX = 100_000
_KEY = reprlib.Repr()
_KEY.maxstring = _KEY.maxother = 80
_COLLECTION_TAGS = {yaml.SequenceStartEvent: "tag:yaml.org,2002:seq", yaml.MappingStartEvent: "tag:yaml.org,2002:map"}


@dataclass
class _Document:
    """What the loader knows while it reads one document."""

    secret_keys: Collection[str] = ()  # errors in their values quote nothing of the text
    anchors: dict[str, tuple[Any, int]] = field(default_factory=dict)  # name -> value, its size in values
    open: set[str] = field(default_factory=set)  # anchors of collections not yet closed
    seen: dict[Any, Any] = field(default_factory=dict)  # scalars already constructed, by their text and style
    written: int = 0  # values the text itself holds
    added: int = 0  # values aliases stand for

    @property
    def size(self) -> int:
        return self.written + self.added


def load(text: str, secret_keys: Collection[str] = ()) -> Any:
    """Parse one YAML document; raise yaml.YAMLError (with its mark, when it has a place) on bad input. An error
    in the value of a key in `secret_keys` (e.g. an unquoted `password: !x` read as a tag) never quotes it."""
    try:
        loader = _Loader(text)
    except UnicodeError:  # a str holding a lone surrogate: nothing a file read as UTF-8 can give
        raise yaml.YAMLError("the text is not valid Unicode") from None
    try:
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # document start
        value, _ = _value(loader, _Document(secret_keys), 0, False)
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            event: Any = loader.get_event()
            raise yaml.composer.ComposerError(
                "expected a single document in the stream", None, "but found another document", event.start_mark
            )
        return value
    except UnicodeError:
        raise yaml.YAMLError("the text is not valid Unicode") from None
    finally:
        loader.dispose()


def _scalar(loader: Any, event: Any, quiet: bool, seen: dict[Any, Any]) -> Any:
    # a file of 10,000 points repeats the same few words thousands of times: each is resolved once (every safe
    # scalar constructs an immutable value, so one object may serve every place it appears)
    key = (event.value, event.tag, event.implicit, event.style)
    value = seen.get(key, _MISSING)
    if value is not _MISSING:
        return value
    value = _construct(loader, event, quiet)
    if len(seen) < _SEEN_MAX:
        seen[key] = value
    return value


def _construct(loader: Any, event: Any, quiet: bool) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _MERGE:
        return "<<"
    mark = event.start_mark
    shown = "" if quiet else f" as {tag.replace('tag:yaml.org,2002:', '!!')}"
    construct = loader.yaml_constructors.get(tag)
    if construct is None:
        raise yaml.constructor.ConstructorError(None, None, f"unsupported tag{'' if quiet else f' {tag!r}'} (quote "
                                                "the value if it is text)", mark)
    try:
        return construct(loader, yaml.ScalarNode(tag, event.value, mark, mark, style=event.style))
    except yaml.YAMLError:
        if not quiet:
            raise
    except Exception:  # e.g. a 13th month, 5,000 digits, `!!int abc`; never quoted: it may be a password
        pass
    raise yaml.constructor.ConstructorError(None, None, f"this value cannot be read{shown} (quote it if it is "
                                            "text)", mark)


def _value(loader: Any, doc: _Document, depth: int, quiet: bool) -> tuple[Any, int]:
    """The next value and its size in values, aliases expanded; `quiet`: a secret's, whose errors quote nothing."""
    return _value_of(loader, loader.get_event(), doc, depth, quiet)


def _value_of(loader: Any, event: Any, doc: _Document, depth: int, quiet: bool) -> tuple[Any, int]:
    """The value that starts with `event` (taken from the loader) and its size in values."""
    mark: Any = event.start_mark
    if isinstance(event, yaml.AliasEvent):
        name = "" if quiet else f" {event.anchor!r}"
        if event.anchor in doc.open:
            raise yaml.composer.ComposerError(None, None, f"found recursive alias{name} (an alias inside the "
                                              "collection it names)", mark)
        if event.anchor not in doc.anchors:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias{name}", mark)
        value, size = doc.anchors[event.anchor]
        doc.added += size
        if doc.added > ALIAS_ALLOWANCE + doc.written:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand the document to {doc.size:,} values from {doc.written:,} written (they "
                f"may add at most {ALIAS_ALLOWANCE:,} more than are written)", mark)
        return value, size
    if isinstance(event, yaml.ScalarEvent):
        doc.written += 1
        value = _scalar(loader, event, quiet, doc.seen)
        if event.anchor:
            doc.anchors[event.anchor] = (value, 1)
        return value, 1
    if not isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
        raise yaml.composer.ComposerError(None, None, f"unexpected {type(event).__name__}", mark)
    if depth >= MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"mappings and lists nested deeper than {MAX_DEPTH} levels",
                                          mark)
    if event.tag not in (None, "!", _COLLECTION_TAGS[type(event)]):
        raise yaml.constructor.ConstructorError(None, None, f"unsupported tag{'' if quiet else f' {event.tag!r}'}",
                                                mark)
    before = doc.size
    doc.written += 1
    if event.anchor:
        doc.open.add(event.anchor)
    value = _sequence(loader, doc, depth, quiet) if isinstance(event, yaml.SequenceStartEvent) else \
        _mapping(loader, doc, depth, quiet)
    size = doc.size - before
    if event.anchor:
        doc.open.discard(event.anchor)
        doc.anchors[event.anchor] = (value, size)
    return value, size


def _sequence(loader: Any, doc: _Document, depth: int, quiet: bool) -> list[Any]:
    items = []
    seen = doc.seen
    while not loader.check_event(yaml.SequenceEndEvent):
        event = loader.get_event()
        if type(event) is yaml.ScalarEvent and not event.anchor:  # as in _mapping
            doc.written += 1
            item = seen.get((event.value, event.tag, event.implicit, event.style), _MISSING)
            items.append(item if item is not _MISSING else _scalar(loader, event, quiet, seen))
        else:
            items.append(_value_of(loader, event, doc, depth + 1, quiet)[0])
    loader.get_event()
    return items


def _mapping(loader: Any, doc: _Document, depth: int, quiet: bool) -> dict[Any, Any]:
    value: dict[Any, Any] = {}
    merged: list[dict[Any, Any]] = []
    seen = doc.seen
    while not loader.check_event(yaml.MappingEndEvent):
        # most keys and values are plain scalars read before: as _value_of and _scalar read them, in line
        event = loader.get_event()
        key_mark = event.start_mark
        key = _MISSING
        if type(event) is yaml.ScalarEvent and not event.anchor:
            doc.written += 1
            key = seen.get((event.value, event.tag, event.implicit, event.style), _MISSING)
            if key is _MISSING:
                key = _scalar(loader, event, quiet, seen)
        else:
            key, _ = _value_of(loader, event, doc, depth + 1, quiet)
        secret = quiet or (isinstance(key, str) and key in doc.secret_keys)
        event = loader.get_event()
        if type(event) is yaml.ScalarEvent and not event.anchor:
            doc.written += 1
            item = seen.get((event.value, event.tag, event.implicit, event.style), _MISSING)
            if item is _MISSING:
                item = _scalar(loader, event, secret, seen)
        else:
            item, _ = _value_of(loader, event, doc, depth + 1, secret)
        if key == "<<" and isinstance(item, dict | list):
            # merged keys never override the mapping's own keys, wherever the merge stands
            merged.extend(item if isinstance(item, list) else [item])
            continue
        try:
            if key in value:
                shown = "" if quiet else f" {_KEY.repr(key)}"
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key{shown}", key_mark)
            value[key] = item
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key (a mapping or list used as a key)", key_mark
            ) from None
    loader.get_event()
    for source in merged:
        if isinstance(source, dict):
            for k, v in source.items():
                value.setdefault(k, v)
    return value
