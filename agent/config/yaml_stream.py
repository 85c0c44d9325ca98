"""A YAML loader that builds plain Python values straight from parser events (libyaml when present).

`yaml.safe_load` first builds a node tree of the whole document, which for a 10,000-point configuration costs
about 100 MB at its peak; this loader never holds more than the values themselves. Same safe types.
"""

from __future__ import annotations

from typing import Any

import yaml

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str) -> Any:
    """Parse one YAML document; raise yaml.YAMLError (with its mark) on bad input."""
    loader = _Loader(text)
    try:
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # document start
        value = _value(loader, {})
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            event: Any = loader.get_event()
            raise yaml.composer.ComposerError(
                "expected a single document in the stream", None, "but found another document", event.start_mark
            )
        return value
    finally:
        loader.dispose()


def _value(loader: Any, anchors: dict[str, Any]) -> Any:
    event: Any = loader.get_event()
    mark: Any = event.start_mark
    if isinstance(event, yaml.AliasEvent):
        if event.anchor not in anchors:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", mark)
        return anchors[event.anchor]
    if isinstance(event, yaml.ScalarEvent):
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == "tag:yaml.org,2002:merge":
            return "<<"
        node = yaml.ScalarNode(tag, event.value, mark, mark, style=event.style)
        construct = loader.yaml_constructors.get(tag) or loader.yaml_constructors.get(None)
        if construct is None:
            raise yaml.constructor.ConstructorError(None, None, f"unsupported tag {tag!r}", mark)
        value = construct(loader, node)
    elif isinstance(event, yaml.SequenceStartEvent):
        value = []
        if event.anchor:
            anchors[event.anchor] = value
        while not loader.check_event(yaml.SequenceEndEvent):
            value.append(_value(loader, anchors))
        loader.get_event()
        return value
    elif isinstance(event, yaml.MappingStartEvent):
        value = {}
        merged: list[dict[Any, Any]] = []
        if event.anchor:
            anchors[event.anchor] = value
        while not loader.check_event(yaml.MappingEndEvent):
            key_mark = loader.peek_event().start_mark
            key = _value(loader, anchors)
            item = _value(loader, anchors)
            if key == "<<" and isinstance(item, dict | list):
                # merged keys never override the mapping's own keys, wherever the merge stands
                merged.extend(item if isinstance(item, list) else [item])
                continue
            try:
                if key in value:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_mark)
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
    else:
        raise yaml.composer.ComposerError(None, None, f"unexpected {type(event).__name__}", event.start_mark)
    if event.anchor:
        anchors[event.anchor] = value
    return value
