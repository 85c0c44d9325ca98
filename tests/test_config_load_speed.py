"""The shortcuts that load a large configuration fast give what the long way gives: every relative path
resolved, the same errors at the same paths, hostile nesting refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import ROOT
from pydantic import BaseModel

from agent.config.base import CREDENTIALS
from agent.config.loader import load_config

OPCUA_SAMPLE = ROOT / "agent" / "drivers" / "opcua" / "sample.yaml"


def every_path(value: Any, where: str = "") -> list[tuple[str, Path]]:
    """Every Path anywhere in a configuration, found the long way: every field of every model and list."""
    if isinstance(value, Path):
        return [(where, value)]
    if isinstance(value, list | tuple):
        return [found for i, item in enumerate(value) for found in every_path(item, f"{where}[{i}]")]
    if isinstance(value, BaseModel):
        return [found for name in type(value).model_fields
                for found in every_path(getattr(value, name), f"{where}.{name}")]
    return []


def test_every_relative_path_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    text = OPCUA_SAMPLE.read_text(encoding="utf-8").replace("/etc/edge-agent/", "etc/").replace(
        "path: /var/lib/edge-agent/store.db", "path: data/store.db").replace(
        "password: CHANGE-ME", "password_file: secrets/dcs")
    text += "control: {socket: run/control.sock}\n"
    text = text.replace("tls: {ca: etc/ca.pem}", "tls: {ca: etc/ca.pem, cert: etc/me.pem, key: etc/me.key}\n"
                        "  username: u\n  password_file: '${CREDENTIALS_DIRECTORY}/mqtt'\n")
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    found = every_path(load_config(path))
    relative = {where for where, p in found if not str(p).startswith(CREDENTIALS)}
    # each kind of path field is in the file, relative
    assert {".store.path", ".control.socket", ".uplink.tls.ca", ".uplink.tls.cert", ".uplink.tls.key",
            ".channels[0].certificate", ".channels[0].private_key", ".channels[0].server_certificate",
            ".channels[0].password_file"} <= relative
    for where, p in found:
        if where == ".uplink.password_file":
            assert str(p) == f"{CREDENTIALS}/mqtt"  # systemd's folder: known only at connect time
        else:
            assert p.is_absolute() and p.is_relative_to(tmp_path.resolve()), (where, p)
