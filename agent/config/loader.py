"""Loading a configuration: read the file, parse the YAML (agent.config.yaml_stream), validate it against the
models, and say every problem with its path (`channels[0].devices[1].points[3].type: ...`). Relative paths
are taken from the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.config import yaml_stream
from agent.config.base import Model
from agent.config.models import AgentConfig
from agent.errors import ConfigError


def _render_loc(loc: tuple[int | str, ...], drivers: set[str]) -> str:
    out = ""
    prev: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in drivers:
            pass  # the discriminated-union tag pydantic inserts after channels[i]
        else:
            out += f".{part}" if out else part
        prev = part
    return out


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per error: `channels[0].devices[1].points[3].type: 'floa32' is not one of ...`."""
    from agent.drivers import registry

    drivers = {d.name for d in registry.all_drivers()}
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        where = _render_loc(tuple(err["loc"]), drivers) or "(top level)"
        kind = err["type"]
        ctx = err.get("ctx") or {}
        value = err.get("input")
        if kind == "literal_error":
            msg = f"{value!r} is not one of {ctx.get('expected')}"
        elif kind == "extra_forbidden":
            msg = "unknown field (check the spelling; `edge-agent config schema` lists the fields)"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "union_tag_invalid":
            msg = f"driver {ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
        elif kind == "union_tag_not_found":
            msg = f"field {ctx.get('discriminator')} is missing (one of {', '.join(sorted(drivers))})"
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", err["msg"]))
            # the cross-field check reports several located errors in one message
            if where == "(top level)" and msg.startswith(("channels[", "zones[", "power.")):
                lines.extend(msg.split("; "))
                continue
        else:
            msg = f"{err['msg']} (got {value!r})" if not isinstance(value, dict | list) else err["msg"]
        lines.append(f"{where}: {msg}")
    return lines


def load_config(path: Path | str) -> AgentConfig:
    """Read, parse and validate a configuration file; raise ConfigError naming every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    return parse_config(text, source=source, base_dir=path.parent)


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """Validate YAML text; relative store paths are resolved against base_dir."""
    try:
        data = yaml_stream.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}YAML syntax error: {problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping with at least `agent:`"])
    return validate_config_data(data, source=source, base_dir=base_dir)


def validate_config_data(data: dict[str, Any], *, source: str, base_dir: Path | None) -> AgentConfig:
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None
    if base_dir is not None:
        resolved = _resolve_paths(config, base_dir)
        assert isinstance(resolved, AgentConfig)
        config = resolved
    return config


def _resolve_paths(value: Any, base: Path) -> Any:
    """Relative file names anywhere in the configuration (store, socket, certificates) are taken from the
    config file's folder, so the daemon finds them whatever its working directory."""
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value).resolve()
    if isinstance(value, list):
        items = [_resolve_paths(v, base) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, Model):
        update = {}
        for name in type(value).model_fields:
            current = getattr(value, name)
            new = _resolve_paths(current, base)
            if new is not current:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


def config_schema() -> dict[str, Any]:
    return AgentConfig.model_json_schema()
