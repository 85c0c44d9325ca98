"""The shortcuts that load a large configuration fast give what the long way gives: every relative path
resolved, the same errors at the same paths, hostile nesting refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from pydantic import BaseModel

from agent.config.base import CREDENTIALS
from agent.config.loader import load_config, parse_config
from agent.config.yaml_stream import MAX_DEPTH
from agent.errors import ConfigError

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


TOO_DEEP = f"JSON: mappings and lists nested deeper than {MAX_DEPTH} levels"


def nested(levels: int) -> Any:
    """`levels` containers one in another, mappings and lists in turn; the outermost is a mapping."""
    value: Any = 1
    for n in range(levels - 1):
        value = [value] if n % 2 == 0 else {"k": value}
    return {"x": value}


def json_errors(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps(document))
    return caught.value.errors


def test_json_nesting_is_refused_one_level_past_the_bound_and_not_at_it() -> None:
    assert json_errors(nested(MAX_DEPTH + 1)) == [TOO_DEEP]
    assert TOO_DEEP not in json_errors(nested(MAX_DEPTH))  # read, then refused by validation


def test_a_deep_branch_among_many_shallow_ones_is_found() -> None:
    wide: dict[str, Any] = {"p": [{"id": f"P{i}", "limits": {"high": 1}} for i in range(20_000)]}
    wide["p"][-1]["limits"] = nested(MAX_DEPTH - 2)
    assert json_errors(wide) == [TOO_DEEP]
    wide["p"][-1]["limits"] = nested(MAX_DEPTH - 3)
    assert TOO_DEEP not in json_errors(wide)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 900, 100_000])
def test_hostile_json_nesting_gets_the_same_clear_error(levels: int) -> None:
    text = '{"x": ' + '[{"k": ' * (levels // 2) + "1" + "}]" * (levels // 2) + "}"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [TOO_DEEP]
