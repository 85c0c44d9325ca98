"""The parsed form of a large YAML configuration file, kept as JSON in the service's cache folder (systemd's
`CacheDirectory=`, given as $CACHE_DIRECTORY), so that a start with an unchanged file reads JSON instead of
parsing YAML again: 0.3 s instead of 3.6 s for 100,000 points.

It holds only what the YAML parse gave, never a validated configuration: every start validates it as before. An
entry names the SHA-256 of the file's text, the agent's version and the YAML reader's own code; anything else
(another file, a newer agent, a damaged or missing entry, a folder it cannot write) means a parse, never an
error. A document JSON cannot give back exactly (a NaN, a date) is not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import orjson
import yaml

from agent import __version__
from agent.config import yaml_stream

CACHE_ENV = "CACHE_DIRECTORY"
"""Where systemd names the unit's cache folder (several are separated by colons; the first is used)."""
MIN_CHARS = 1_000_000
"""Smaller files parse in a fraction of a second: no entry for them."""
FILE_NAME = "config-parsed.json"
_FORMAT = 1
_MODE = 0o600  # the document holds whatever the file holds, passwords written in it too


def cache_file() -> Path | None:
    """The entry's file, or None when the service has no cache folder."""
    folder = os.environ.get(CACHE_ENV, "").split(":")[0]
    return Path(folder) / FILE_NAME if folder else None


def recall(text: str) -> Any:
    """The document `text` parsed to when it was last kept, or None (no entry for this text, or a damaged one).
    Silent: it runs in the loader's child process, which must not log."""
    path = cache_file()
    if path is None or len(text) < MIN_CHARS or _READER is None:
        return None
    try:
        with open(path, "rb") as entry:
            head = entry.readline(4096)
            header = orjson.loads(head)
            digest = header.pop("body", None) if type(header) is dict else None
            if digest is None or header != _header(text):
                return None  # another file's: not read further
            body = entry.read()
        return orjson.loads(body) if _digest(body) == digest else None
    except (OSError, MemoryError, orjson.JSONDecodeError):  # JSONDecodeError: damaged, or nested beyond 1,024
        return None


def keep(text: str, document: Any) -> None:
    """Keep the document a YAML `text` parsed to, when it is large and JSON gives it back exactly; else make
    sure no entry is left (it may hold an older file's passwords). Silent, as `recall`: a folder it cannot write
    only means the next start parses the file."""
    path = cache_file()
    if path is None or _READER is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if len(text) < MIN_CHARS or not _exact(document):
            path.unlink(missing_ok=True)
            return
        body = orjson.dumps(document)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE), "wb") as out:
            out.write(orjson.dumps({**_header(text), "body": _digest(body)}) + b"\n")
            out.write(body)
        os.replace(tmp, path)  # whole or not at all
    except (OSError, MemoryError, TypeError, orjson.JSONEncodeError):  # a lone surrogate, a full disk
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def forget() -> None:
    """No entry: the file is JSON (read fast as it is), whatever the last one kept."""
    path = cache_file()
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _exact(document: Any) -> bool:
    """Whether JSON gives the document back exactly: mappings with text keys, lists, text, booleans, None,
    integers orjson writes and finite floats; not a NaN, a date or bytes. Walked without a copy (a second
    document of 100,000 points would cost a few hundred MB)."""
    todo = [document]
    while todo:
        value = todo.pop()
        kind = type(value)
        if kind is dict:
            if not all(type(key) is str for key in value):
                return False
            todo.extend(value.values())
        elif kind is list:
            todo.extend(value)
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is int:
            if not -(1 << 63) <= value < 1 << 64:
                return False
        elif kind is not str and kind is not bool and value is not None:
            return False
    return True


def _header(text: str) -> dict[str, Any]:
    return {"format": _FORMAT, "agent": __version__, "reader": _READER,
            "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _reader() -> str | None:
    """What the parse depends on besides the text: our YAML reader's code (as this process loaded it), PyYAML's
    version, libyaml or not; None when the code cannot be read (no entry is trusted then)."""
    try:
        code = Path(yaml_stream.__file__).read_bytes()
    except OSError:
        return None
    return f"{hashlib.sha256(code).hexdigest()[:16]} pyyaml {yaml.__version__} {yaml_stream._Loader.__name__}"


_READER = _reader()
