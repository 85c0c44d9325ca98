"""`edge-agent support-bundle`: one tar.gz with what a vendor asks for — the configuration with its secrets
redacted, the agent's status, channels and buffer (when it runs), the doctor's checks, recent journal lines and
versions. No secret value is written into it.
"""

from __future__ import annotations

import asyncio
import io
import json
import platform
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import yaml

from agent import __version__
from agent.cli.base import _CONFIG_OPTION, _fail, main
from agent.cli.doctor import diagnose
from agent.config import yaml_stream

SECRET_WORDS = ("password", "secret", "token", "passphrase")
REDACTED = "** redacted **"
PACKAGES = ("edge-agent", "paho-mqtt", "asyncua", "pydantic", "orjson", "pyserial", "click", "rich", "psutil")


def redact(value: Any) -> Any:
    """The configuration with every value under a secret-sounding key replaced (a *_file path stays)."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and any(w in k.lower() for w in SECRET_WORDS)
                and not k.lower().endswith("_file") else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _config_text(config_path: Path) -> str:
    try:
        data = yaml_stream.load(config_path.read_text(encoding="utf-8"))
    except Exception as exc:
        return f"# {config_path} could not be read as YAML ({type(exc).__name__}); not included\n"
    return f"# {config_path}, secrets redacted\n" + yaml.safe_dump(redact(data), allow_unicode=True, sort_keys=False)


def _ask_agent(socket_path: Path, cmd: str) -> Any:
    from agent.control.socket import ask

    try:
        return asyncio.run(ask(socket_path, {"cmd": cmd}, timeout=5))
    except ConnectionError as exc:
        return {"ok": False, "error": str(exc)}


def _journal() -> str:
    try:
        done = subprocess.run(["journalctl", "-u", "edge-agent", "-n", "2000", "--no-pager", "-o", "short-iso"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"journalctl not available: {exc}\n"
    return done.stdout or done.stderr


def _versions() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"edge-agent": __version__, "python": sys.version, "platform": platform.platform(),
            "machine": platform.machine(), "host": socket.gethostname(), "packages": packages}


@main.command("support-bundle")
@_CONFIG_OPTION
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="The archive to write (default: edge-agent-support-HOST-TIME.tar.gz here).")
def support_bundle(config_path: Path, output: Path | None) -> None:
    """Write one tar.gz for the vendor: configuration (secrets redacted), status, channels, buffer, doctor,
    recent journal lines, versions.

    \b
    Example:
      sudo edge-agent support-bundle --config /etc/edge-agent/agent.yaml
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    output = output or Path(f"edge-agent-support-{socket.gethostname()}-{stamp}.tar.gz")
    checks, config = diagnose(config_path)
    files: dict[str, str] = {
        "config.yaml": _config_text(config_path),
        "doctor.json": json.dumps([asdict(c) for c in checks], ensure_ascii=False, indent=1),
        "versions.json": json.dumps(_versions(), indent=1),
        "journal.txt": _journal(),
    }
    if config is not None:
        for cmd in ("status", "channels", "buffer"):
            files[f"{cmd}.json"] = json.dumps(_ask_agent(config.control.socket, cmd), ensure_ascii=False, indent=1)
    try:
        with tarfile.open(output, "w:gz") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(f"edge-agent-support-{stamp}/{name}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o640
                tar.addfile(info, io.BytesIO(data))
    except OSError as exc:
        _fail(f"cannot write {output}: {exc}", 1)
    click.echo(f"{output}: {', '.join(files)}")
