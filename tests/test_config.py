"""Configuration files: valid ones load, broken ones give every error with its path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SHIPPED_CONFIGS
from pydantic import ValidationError

from agent.config.base import read_secret
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


# --- a crafted configuration: a clear error naming the field, exit 2, never a traceback, never unbounded work ---


def check(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edge-agent config check` of `text`."""
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "agent", "config", "check", str(path)], capture_output=True,
                          text=True, timeout=60, env=env)


def check_and_run(tmp_path: Path, text: str) -> list[subprocess.CompletedProcess[str]]:
    """`config check` and `run` of a file both must refuse (ExecStartPre, then ExecStart)."""
    path = tmp_path / "crafted.yaml"
    # should it pass by mistake, the agent started must not touch /var/lib/edge-agent or /run/edge-agent
    path.write_text(f"{text}\nstore: {{path: {tmp_path}/s.db}}\ncontrol: {{socket: {tmp_path}/c.sock}}\n",
                    encoding="utf-8")
    return [subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=20)
            for args in (("config", "check", str(path)), ("run", "--config", str(path)))]


def alias_bomb(width: int) -> str:
    """About 400 bytes aliasing one point `width` times per device, devices per channel, and channels."""
    return ("agent: {id: a, enterprise: b}\n"
            "channels: [&c {id: c, driver: modbus_tcp, host: h, devices: [&d {id: d, points: [&p {id: x, address: 0}"
            + ", *p" * (width - 1) + "]}" + ", *d" * (width - 1) + "]}" + ", *c" * (width - 1) + "]\n")


def test_aliases_expanding_points_are_refused_at_the_yaml_with_their_line() -> None:
    text = alias_bomb(30)  # 27,000 points from 487 bytes; at width 90, 729,000 points, 1 GB
    errors = errors_of(text)
    assert len(errors) == 1, errors[:3]
    assert errors[0].startswith("line 2, column ") and "aliases" in errors[0]


def test_a_shared_limits_block_on_ten_thousand_points_still_loads() -> None:
    points = "".join(f"          - {{id: P{n}, address: {n % 60000}, limits: *l}}\n" for n in range(1, 10_000))
    text = BASE.replace("type: float32}", "type: float32, limits: &l {high: 8, high_high: 9, deadband: 0.1}}")
    config = parse_config(text + points)
    assert len(config.points()) == 10_000
    assert all(p.limits is not None and p.limits.high == 8 for _, _, p in config.points())


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ("limits: {high: .nan}", "channels[0].devices[0].points[0].limits.high"),
        ("limits: {high: 5, rate_rise: .inf}", "channels[0].devices[0].points[0].limits.rate_rise"),
        ("limits: {deadband: .inf}", "channels[0].devices[0].points[0].limits.deadband"),
        ("limits: {delay: .nan}", "channels[0].devices[0].points[0].limits.delay"),
        ("scale: .nan", "channels[0].devices[0].points[0].scale"),
        ("offset: -.inf", "channels[0].devices[0].points[0].offset"),
        ("range: [.nan, 10]", "channels[0].devices[0].points[0].range[0]"),
        ("range: [0, .inf]", "channels[0].devices[0].points[0].range[1]"),
        ("comm_loss: .inf", "channels[0].devices[0].points[0].comm_loss"),
        ("comm_loss: '" + "9" * 400 + "'", "channels[0].devices[0].points[0].comm_loss"),  # a float of inf
        ("comm_loss: " + "9" * 400, "channels[0].devices[0].points[0].comm_loss"),  # an int no float holds
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(change: str, where: str) -> None:
    errors = errors_of(BASE.replace("type: float32}", f"type: float32, {change}}}"))
    assert len(errors) == 1 and errors[0].startswith(f"{where}: "), errors
    assert "9" * 40 not in errors[0]


@pytest.mark.parametrize(
    "text",
    [
        BASE.replace("- id: plc1", "- id: plc1\n        backoff_max: .inf"),
        BASE + "store: {max_mb: .inf}\n",
        BASE + "store: {min_free_mb: .nan}\n",
        BASE + "uplink: {keepalive: .nan}\n",
        BASE + "power: {meters: [{id: m, active_power: LT-101, idle_kw: .inf}]}\n",
    ],
)
def test_non_finite_numbers_are_refused_everywhere(text: str) -> None:
    errors = errors_of(text)
    assert any("finite" in e for e in errors), errors


def _float_fields(annotation: Any) -> str | None:
    """'tuple' for a pair of floats, 'float' for any other annotation holding a float, else None."""
    if annotation is float:
        return "float"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and args and all(a is float for a in args):
        return "tuple"
    kinds = {_float_fields(a) for a in args if not isinstance(a, str | int)} - {None}
    return next(iter(sorted(kinds)), None)


def _models() -> list[type[Any]]:
    import agent.config.models  # noqa: F401  (the drivers' models register as it loads)
    from agent.config.base import Model

    out, todo = [], [Model]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_of_every_model_refuses_non_finite_numbers(bad: float) -> None:
    checked = 0
    for cls in _models():
        for name, field in cls.model_fields.items():
            kind = _float_fields(field.annotation)
            if kind is None:
                continue
            value: Any = [bad, bad] if kind == "tuple" else bad
            with pytest.raises(ValidationError) as info:
                cls.model_validate({name: value})
            mine = [e for e in info.value.errors() if e["loc"][:1] == (name,)]
            assert mine and all(e["type"] == "finite_number" for e in mine), (cls.__name__, name, mine)
            checked += 1
    assert checked >= 30  # every Duration and float of the agent's and the drivers' models


def test_deep_nesting_is_a_clean_error_with_its_line() -> None:
    errors = errors_of(BASE + "version: " + "[" * 995 + "]" * 995 + "\n")
    assert len(errors) == 1 and errors[0].startswith("line 11, column ") and "nested deeper than 64" in errors[0]


def test_numeric_password_is_refused_without_quoting_it() -> None:
    errors = errors_of(BASE + "uplink: {username: ipc-01, password: 20261128}\n")
    assert len(errors) == 1 and errors[0].startswith("uplink.password: ") and "quotes" in errors[0], errors
    assert "20261128" not in " ".join(errors)


@pytest.mark.parametrize(
    "value", ["20261128", "2026-11-28", "[hunter2]", "{p: hunter2}", "yes", "1.5e+3", "'" + "x" * 20 + "'"]
)
def test_no_validation_error_quotes_a_secret(value: str) -> None:
    text = BASE + f"uplink: {{username: ipc-01, password: {value}, password_file: /p}}\n"
    opcua = BASE.replace("driver: modbus_tcp\n    host: 127.0.0.1",
                         f"driver: opcua\n    endpoint: opc.tcp://h:4840\n    username: op\n    password: {value}")
    opcua = opcua.replace("address: 0, type: float32", "node: ns=2;i=1, type: x")
    for errors in (errors_of(text), errors_of(opcua)):
        shown = " ".join(errors)
        assert not any(secret in shown for secret in ("20261128", "2026", "hunter2", "1500", "xxxxx")), errors


def test_a_mapping_holding_a_password_is_never_quoted_where_it_does_not_belong() -> None:
    text = BASE + "uplink: &u {username: ipc-01, password: hunter2}\nlog_level: *u\nversion: *u\n"
    errors = errors_of(text)
    assert [e.split(":")[0] for e in errors] == ["version", "log_level"] and "hunter2" not in " ".join(errors)
    uplink_first = "uplink: &u {username: ipc-01, password: hunter2}\n" + BASE
    errors = errors_of(uplink_first.replace("driver: modbus_tcp", "driver: *u"))
    assert errors == ["channels[0]: driver a mapping is not one of 'dlt645', 'modbus_rtu', 'modbus_rtu_tcp', "
                      "'modbus_tcp', 'opcua'"]


def test_a_password_never_shows_in_the_configs_repr() -> None:
    config = parse_config(BASE + "uplink: {username: ipc-01, password: 's3cret-20261128'}\n")
    assert config.uplink.password == "s3cret-20261128"
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.uplink)


@pytest.mark.parametrize(
    "text",
    [
        alias_bomb(30),
        BASE + "version: " + "[" * 995 + "]" * 995 + "\n",
        BASE + "version: 2026-13-45\n",
        BASE + "version: " + "7" * 5000 + "\n",
        BASE.replace("type: float32}", "type: float32, scale: .nan}"),
        BASE + "uplink: {username: ipc-01, password: 20261128}\n",
        BASE + "uplink: {username: ipc-01, password: x, password_file: /p}\n",
        "\ufeff\x00agent: 1",
        "agent: &a [*a]\n",
    ],
    ids=["aliases", "nesting", "date", "digits", "nan", "numeric-password", "two-passwords", "nul", "recursive"],
)
def test_config_check_and_run_exit_2_naming_the_problem_without_a_traceback(tmp_path: Path, text: str) -> None:
    for result in check_and_run(tmp_path, text):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "error(s)" in result.stderr and "Traceback" not in result.stderr
        assert "20261128" not in result.stderr + result.stdout


# --- secrets out of the configuration: password_file, read when a connection is made ---

UPLINK_FILE = BASE + "uplink:\n  username: ipc-01\n  password_file: PATH\n"  # ${...} unquoted: block style


def test_password_and_password_file_together_are_refused() -> None:
    errors = errors_of(BASE + "uplink: {username: u, password: 'x', password_file: /run/p}\n")
    assert errors == ["uplink: give password or password_file, not both"]
    errors = errors_of(BASE + "uplink: {password_file: /run/p}\n")
    assert errors == ["uplink: a password is given but username is not"]


def test_password_file_relative_to_the_config_and_credentials_directory_kept_for_connect_time(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(UPLINK_FILE.replace("PATH", "secrets/mqtt"))
    assert load_config(path).uplink.password_file == tmp_path / "secrets" / "mqtt"
    path.write_text(UPLINK_FILE.replace("PATH", "${CREDENTIALS_DIRECTORY}/mqtt"))
    assert str(load_config(path).uplink.password_file) == "${CREDENTIALS_DIRECTORY}/mqtt"


@pytest.mark.parametrize("path", ["${HOME}/mqtt", "$CREDENTIALS_DIRECTORY/mqtt", "/etc/${CREDENTIALS_DIRECTORY}/m",
                                  "${CREDENTIALS_DIRECTORY}"])
def test_no_other_variable_is_expanded_in_a_password_file(path: str) -> None:
    errors = errors_of(UPLINK_FILE.replace("PATH", f"'{path}'"))
    assert len(errors) == 1 and errors[0].startswith("uplink.password_file: the only variable"), errors


def test_read_secret_expands_the_credentials_directory_and_drops_the_final_line_break(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mqtt").write_text("s3cret \n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(Path("${CREDENTIALS_DIRECTORY}/mqtt")) == "s3cret "
    (tmp_path / "crlf").write_bytes(b"s3cret\r\n")
    assert read_secret(tmp_path / "crlf") == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(OSError, match="CREDENTIALS_DIRECTORY is not set"):
        read_secret(Path("${CREDENTIALS_DIRECTORY}/mqtt"))


@pytest.mark.timeout(10)
def test_read_secret_says_what_is_wrong_never_what_the_file_holds(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "huge").write_bytes(b"hunter2" * 20_000)
    (tmp_path / "binary").write_bytes(b"hunter2\xff")
    os.mkfifo(tmp_path / "fifo")  # nobody writes: opening it must not wait
    cases = {"missing": "No such file", "empty": "empty", "huge": "larger than", "binary": "not UTF-8",
             "fifo": "not a regular file", ".": "not a regular file"}
    for name, problem in cases.items():
        with pytest.raises(OSError) as info:
            read_secret(tmp_path / name)
        assert problem in str(info.value) and "hunter2" not in str(info.value)


def test_config_check_warns_of_a_secret_file_it_cannot_read_and_still_passes(tmp_path: Path) -> None:
    missing, present = tmp_path / "missing", tmp_path / "present"
    present.write_text("s3cret\n")
    for path, warned in ((missing, True), (present, False)):
        result = check(tmp_path, UPLINK_FILE.replace("PATH", str(path)))
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout
        assert ("warning: uplink.password_file: " in result.stderr) is warned, result.stderr
        assert "No such file" in result.stderr if warned else result.stderr == ""
        assert "s3cret" not in result.stdout + result.stderr


def test_config_check_outside_systemd_says_the_credential_is_checked_when_the_agent_starts(tmp_path: Path) -> None:
    text = UPLINK_FILE.replace("PATH", "${CREDENTIALS_DIRECTORY}/mqtt-password")
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    result = check(tmp_path, text, env)
    assert result.returncode == 0 and "CREDENTIALS_DIRECTORY is not set" in result.stderr, result.stderr
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    result = check(tmp_path, text, {**env, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_config_check_warns_of_a_secret_file_this_user_may_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt"
    secret.write_text("s3cret\n")
    secret.chmod(0)
    result = check(tmp_path, UPLINK_FILE.replace("PATH", str(secret)))
    assert result.returncode == 0 and "Permission denied" in result.stderr


def _opcua(**fields: Any) -> Any:
    from agent.drivers.opcua.driver import OpcUaChannel

    return OpcUaChannel.model_validate({"id": "c1", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:1/x",
                                        "username": "operator", **fields,
                                        "devices": [{"id": "d", "points": [{"id": "P", "node": "ns=2;i=1"}]}]})


def test_opcua_password_file_is_read_when_the_session_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from agent.drivers.opcua import driver as opcua

    with pytest.raises(ValidationError, match="not both"):
        _opcua(password="x", password_file=str(tmp_path / "p"))
    channel = _opcua(password_file=str(tmp_path / "p"))
    given: list[Any] = []

    async def connect(endpoint: str, **kwargs: Any) -> Any:
        given.append(kwargs["password"])
        raise opcua.OpcUaError("stop here")

    monkeypatch.setattr(opcua, "connect", connect)
    with pytest.raises(opcua.OpcUaError) as info:  # missing: an error of the link (the poll backs off), no trace
        asyncio.run(opcua.OpcUaDriver(channel).open())
    assert info.value.kind == "file" and "password_file" in str(info.value) and str(tmp_path / "p") in str(info.value)
    assert given == []
    (tmp_path / "p").write_text("s3cret\n")
    with pytest.raises(opcua.OpcUaError, match="stop here"):
        asyncio.run(opcua.OpcUaDriver(channel).open())
    assert given == ["s3cret"]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_the_daemon_loads_a_file_apart_and_gets_the_same_configuration(path: Path) -> None:
    from agent.config.loader import load_config_apart

    assert load_config_apart(path) == load_config(path)


def test_errors_of_a_file_loaded_apart_keep_their_paths(tmp_path: Path) -> None:
    from agent.config.loader import load_config_apart

    bad = tmp_path / "bad.yaml"
    bad.write_text('agent: {id: a1, enterprise: "e1"}\nchannels:\n  - id: c1\n    driver: modbus_tcp\n'
                   '    host: 127.0.0.1\n    devices: [{id: d1, points: [{id: P1, address: -3}]}]\n')
    with pytest.raises(ConfigError) as caught:
        load_config_apart(bad)
    assert caught.value.source == str(bad)
    assert any(e.startswith("channels[0].devices[0].points[0].address:") for e in caught.value.errors)
    with pytest.raises(ConfigError, match="file not found"):
        load_config_apart(tmp_path / "missing.yaml")


def test_a_configuration_written_as_json_reads_as_its_yaml_does(tmp_path: Path) -> None:
    for path in SHIPPED_CONFIGS:
        as_json = tmp_path / f"{path.stem}.json"
        as_json.write_text(json.dumps(load_config(path).model_dump(mode="json", exclude_unset=True)))
        assert load_config(as_json).model_dump() == load_config(path).model_dump(), path.name


@pytest.mark.parametrize(("text", "error"), [
    ('{"agent": {"id": "a", "enterprise": "e"}, "agent": {}}', "JSON: duplicate key 'agent'"),
    ('{"agent": {"id": "a",\n "enterprise": }}', "line 2, column 16: JSON syntax error: Expecting value"),
    ('{"x": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 64 levels"),
    ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
])
def test_a_json_configuration_gets_the_same_clear_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert any(error in line for line in caught.value.errors), caught.value.errors
