"""What a configuration that comes from afar (a platform push, a local `config apply`, a revision kept from one)
may name on this machine: files only inside the agent's own folders (the bootstrap file's folder, the state
folder, systemd's credentials folder), serial ports only as devices under /dev or network URLs. It never moves the
store or the control socket and never changes the agent's identity: those stay as the bootstrap file has them,
and a document that leaves them out gets them from the running configuration.

Nothing here opens a file: paths are judged by name, after resolving links and `..`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.config.base import CREDENTIALS, Model
from agent.config.models import AgentConfig

SERIAL_URLS = ("socket://", "rfc2217://", "loop://")
"""pyserial URLs a configuration from afar may use for a serial port (others, e.g. spy://, can write files)."""
_FIXED = (("store", "path"), ("control", "socket"))


def with_local_fields(data: dict[str, Any], running: AgentConfig) -> dict[str, Any]:
    """`data` (a configuration document) with the store's path and the control socket of the running
    configuration wherever it leaves them out; `data` itself is not changed."""
    out = dict(data)
    for section, name in _FIXED:
        part = out.get(section, {})
        if isinstance(part, dict) and name not in part:
            out[section] = {**part, name: str(getattr(getattr(running, section), name))}
    return out


def own_folders(bootstrap: Path, running: AgentConfig) -> list[Path]:
    """The folders a configuration from afar may name files in: the bootstrap file's and the state folder."""
    folders = [bootstrap.resolve().parent, running.store.path.resolve().parent]
    return list(dict.fromkeys(folders))


def fixed_field_errors(config: AgentConfig, running: AgentConfig) -> list[str]:
    """What a new configuration may not change while the agent runs: its identity, the store, the socket."""
    errors: list[str] = []
    for where, ours, theirs in (("agent.id", running.agent.id, config.agent.id),
                                ("agent.enterprise", running.agent.enterprise, config.agent.enterprise),
                                ("store.path", running.store.path, config.store.path),
                                ("control.socket", running.control.socket, config.control.socket)):
        if ours != theirs:
            errors.append(f"{where}: cannot be changed while the agent runs (it stays {str(ours)!r}; change it in "
                          "the bootstrap file and restart)")
    return errors


def confinement_errors(config: AgentConfig, running: AgentConfig, folders: list[Path]) -> list[str]:
    """One line per thing `config` may not do here, each with its path; empty when it may be used."""
    errors = fixed_field_errors(config, running)
    roots = [os.path.realpath(f) for f in folders]
    for where, path in _paths(config, ""):
        if where in ("store.path", "control.socket"):
            continue
        text = str(path)
        if text.startswith(CREDENTIALS + "/"):
            if ".." in Path(text).parts:
                errors.append(f"{where}: must not leave {CREDENTIALS} (no `..`)")
            continue
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
            errors.append(f"{where}: {text!r} is outside the agent's folders ({', '.join(roots)}, {CREDENTIALS}): "
                          "put the file there")
    for ci, channel in enumerate(config.channels):
        port = getattr(channel, "port", None)
        if not isinstance(port, str):
            continue
        if port.startswith(SERIAL_URLS):
            continue
        real = os.path.realpath(port) if port.startswith("/") else ""
        if not real.startswith("/dev/"):
            errors.append(f"channels[{ci}].port: {port[:80]!r} is neither a device under /dev nor one of "
                          f"{', '.join(SERIAL_URLS)}")
    return errors


def _paths(value: Any, where: str) -> Iterator[tuple[str, Path]]:
    if isinstance(value, Path):
        yield where, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, f"{where}[{i}]")
    elif isinstance(value, Model):
        for name in type(value).model_fields:
            yield from _paths(getattr(value, name), f"{where}.{name}" if where else name)
