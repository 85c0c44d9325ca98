"""Configuration files: valid ones load, broken ones give every error with its path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHIPPED_CONFIGS

from agent.config.loader import load_config, parse_config
from agent.errors import ConfigError

BASE = """
agent: {id: ipc-01, enterprise: "150625000123"}
channels:
  - id: tankfarm
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: plc1
        points:
          - {id: LT-101, address: 0, type: float32}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.channels


def test_durations_accept_units() -> None:
    config = parse_config(BASE.replace("- id: plc1", "- id: plc1\n        interval: 500ms\n        comm_loss: 2m"))
    device = config.channels[0].devices[0]  # type: ignore[attr-defined]
    assert device.interval == 0.5
    assert device.comm_loss == 120.0


def test_misspelled_type_names_the_point_and_the_choices() -> None:
    errors = errors_of(BASE.replace("type: float32", "type: floa32"))
    assert len(errors) == 1
    assert errors[0].startswith("channels[0].devices[0].points[0].type: 'floa32' is not one of 'bool', 'int16'")


def test_every_error_is_reported_with_its_path() -> None:
    text = BASE.replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: 70000") + (
        "          - {id: LT-102, address: 9, table: coil, type: float32}\n"
        "          - {id: LT-103, address: 4, limits: {high: 5, high_high: 3}}\n"
        "          - {id: LT-104, address: 5, speed: 3}\n"
    )
    errors = errors_of(text)
    assert any(e.startswith("channels[0].port:") for e in errors), errors
    assert any(e.startswith("channels[0].devices[0].points[1]:") and "type must be bool" in e for e in errors)
    assert any(e.startswith("channels[0].devices[0].points[2].limits:") and "high_high" in e for e in errors)
    assert any(e.startswith("channels[0].devices[0].points[3].speed: unknown field") for e in errors)


def test_duplicate_point_ids_are_refused() -> None:
    text = BASE + "          - {id: LT-101, address: 2, type: float32}\n"
    errors = errors_of(text)
    assert errors == [
        "channels[0].devices[0].points[1].id: duplicate point id 'LT-101' (also at channels[0].devices[0].points[0].id)"
    ]


def test_unknown_driver_lists_the_known_ones() -> None:
    errors = errors_of(BASE.replace("driver: modbus_tcp", "driver: modbus_xyz"))
    assert len(errors) == 1
    assert errors[0].startswith("channels[0]: driver 'modbus_xyz' is not one of ")
    assert "'modbus_tcp'" in errors[0]


def test_yaml_syntax_error_gives_line_and_column() -> None:
    errors = errors_of("agent: {id: a1\nchannels: [1,\n  2")
    assert errors[0].startswith("line ") and ", column " in errors[0] and "YAML syntax error" in errors[0]


def test_config_check_exits_2_and_prints_each_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("type: float32", "type: floa32").replace("address: 0", "address: -1"))
    result = cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "channels[0].devices[0].points[0].type: 'floa32' is not one of" in result.stderr
    assert "channels[0].devices[0].points[0].address:" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_of_missing_file_says_so(tmp_path: Path) -> None:
    result = cli("config", "check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_config_check_accepts_the_example() -> None:
    result = cli("config", "check", str(ROOT / "config" / "example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_config_schema_is_json_schema_with_driver_options() -> None:
    result = cli("config", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    text = json.dumps(schema)
    assert "modbus_tcp" in text and "max_registers" in text
    assert schema["required"] == ["agent"]
