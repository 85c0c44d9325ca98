"""Loading a configuration: read the file, parse the YAML (agent.config.yaml_stream), validate it against the
models, and say every problem with its path (`channels[0].devices[1].points[3].type: ...`). Relative paths
are taken from the config file's folder. No message ever quotes a secret, and none quotes more than a few
dozen characters of what it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import pickle
import reprlib
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from agent.config import parse_cache, yaml_stream
from agent.config.base import CREDENTIALS, Model, Secret, SecretFile, read_secret
from agent.config.models import AgentConfig
from agent.config.packed import pack_points
from agent.config.sharing import share_equal_parts, validated_once
from agent.errors import ConfigError

T = TypeVar("T")
_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 80


def _quote(value: object) -> str:
    """A short repr of what the file gave: a 10 MB string shows as its first few dozen characters, a mapping or
    a list by its kind only (it may hold a secret, e.g. `log_level: *uplink`)."""
    if isinstance(value, dict | list | tuple):
        return "a mapping" if isinstance(value, dict) else "a list"
    return _QUOTE.repr(value)


def _holds(annotation: Any, kind: Any) -> bool:
    return annotation == kind or any(_holds(a, kind) for a in typing.get_args(annotation) if a is not annotation)


def secret_fields() -> frozenset[str]:
    """Names of the fields, in any model (the drivers' too), that hold a secret: their input is never quoted."""
    names: set[str] = set()
    todo: list[type[Model]] = [Model]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        names.update(name for name, field in cls.model_fields.items() if _holds(field.annotation, Secret))
    return frozenset(names)


MAX_ERRORS = 100
"""Error lines reported at most; a crafted file can have thousands, the first hundred say what is wrong."""
MAX_MESSAGE = 1000


def _render_loc(loc: tuple[int | str, ...], drivers: set[str]) -> str:
    out = ""
    prev: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in drivers:
            pass  # the discriminated-union tag pydantic inserts after channels[i]
        else:
            name = part if len(part) <= 80 else part[:77] + "..."  # an unknown key may be any length
            out += f".{name}" if out else name
        prev = part
    return out


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per error: `channels[0].devices[1].points[3].type: 'floa32' is not one of ...`."""
    from agent.drivers import registry

    drivers = {d.name for d in registry.all_drivers()}
    secrets = secret_fields()
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        where = _render_loc(tuple(err["loc"]), drivers) or "(top level)"
        kind = err["type"]
        ctx = err.get("ctx") or {}
        value = err.get("input")
        if any(part in secrets for part in err["loc"] if isinstance(part, str)):
            # the input is (or holds) the secret: say what is wrong, never what was given
            msg = str(ctx.get("error", err["msg"])) if kind == "value_error" else err["msg"]
        elif kind == "literal_error":
            msg = f"{_quote(value)} is not one of {ctx.get('expected')}"
        elif kind == "extra_forbidden":
            msg = "unknown field (check the spelling; `edge-agent config schema` lists the fields)"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "union_tag_invalid":  # pydantic's tag is str() of whatever `driver` holds: quote that, shortly
            tag = value.get("driver", ctx.get("tag")) if isinstance(value, dict) else ctx.get("tag")
            msg = f"driver {_quote(tag)} is not one of {ctx.get('expected_tags')}"
        elif kind == "union_tag_not_found":
            msg = f"field {ctx.get('discriminator')} is missing (one of {', '.join(sorted(drivers))})"
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", err["msg"]))
            # the cross-field check reports several located errors in one message
            if where == "(top level)" and msg.startswith(("channels[", "zones[", "power.")):
                lines.extend(msg.split("; "))
                continue
        else:
            msg = f"{err['msg']} (got {_quote(value)})" if not isinstance(value, dict | list) else err["msg"]
        if len(msg) > MAX_MESSAGE:  # a validator's message may quote a long value
            msg = msg[:MAX_MESSAGE] + "..."
        lines.append(f"{where}: {msg}")
    return lines


def load_config(path: Path | str, *, kept: bool = True) -> AgentConfig:
    """Read, parse and validate a configuration file; raise ConfigError naming every problem. `kept`: the parse of
    a large YAML file is read from and kept in the service's cache folder (agent.config.parse_cache); a child of a
    running daemon, which has threads, leaves it (it hashes, and a lock another thread held at the fork may never
    be let go)."""
    config, keep = _load_config(path, kept=kept)
    keep()
    return config


def _load_config(path: Path | str, *, kept: bool = True) -> tuple[AgentConfig, Callable[[], None]]:
    """`load_config`, and what keeps the parse for the next start, to be called once the configuration is on its
    way (a large YAML file that validated and was not found kept)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    yaml_text = text.lstrip()[:1] != "{"  # JSON is read fast enough as it is
    data = parse_cache.recall(text) if kept and yaml_text else None
    if type(data) is dict and _depth(data) <= yaml_stream.MAX_DEPTH:
        return validate_config_data(data, source=source, base_dir=path.parent), _nothing
    data = parse_document(text, source=source)
    config = validate_config_data(data, source=source, base_dir=path.parent)
    if not kept:
        return config, _nothing
    return config, (functools.partial(parse_cache.keep, text, data) if yaml_text else parse_cache.forget)


def _nothing() -> None:
    pass


def load_config_apart(path: Path | str) -> AgentConfig:
    """`load_config` in a child process, for the daemon: parsing a large file leaves its memory scattered (a
    10,000-point file: about 40 MB the parsed configuration keeps pinned), so the child parses and validates and
    the daemon only builds the result, in fresh memory. Where there is no fork, as `load_config`."""
    if not hasattr(os, "fork"):
        return load_config(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        then: list[Callable[[], None]] = []

        def work() -> AgentConfig:
            config, keep = _load_config(path)
            then.append(keep)  # after the answer: the daemon goes on meanwhile
            return config

        _answer_and_exit(work, read_end, write_end, then)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    try:
        with gc_paused():  # a collection every few thousand objects rebuilt would cost as much as rebuilding them
            answer = pickle.loads(data)  # our own child's answer, through our own pipe
    except Exception:  # cut short: the child died (out of memory?)
        os.waitpid(pid, 0)
        return load_config(path)  # here, to report what there is to report
    # a whole answer: the child may still be keeping the parse for the next start; it is reaped when it ends
    threading.Thread(target=_reap, args=(pid,), name="config child", daemon=True).start()
    config = _answer(answer)
    assert isinstance(config, AgentConfig)
    return config


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


async def validate_apart(data: dict[str, Any], *, source: str, base_dir: Path | None,
                         check: Callable[[AgentConfig], list[str]] | None = None) -> AgentConfig:
    """`validate_config_data` (and `check`, whose lines are errors too) for a running daemon, apart (`run_apart`):
    a 10,000-point document takes about 0.2 s of validation that would hold the event loop in one piece. Raises
    ConfigError with every error's path."""
    def work() -> AgentConfig:
        config = validate_config_data(data, source=source, base_dir=base_dir)
        errors = check(config) if check is not None else []
        if errors:
            raise ConfigError(source, errors)
        return config

    return await run_apart(work)


async def run_apart(work: Callable[[], T]) -> T:
    """`work()` in a child process, its answer read and rebuilt in threads, so that the event loop never stalls
    for more than a few milliseconds however large the configuration; ConfigError passes through. `work` runs in
    a fork of this process: it must not log or take a lock another thread may hold. Where there is no fork, or
    the child dies, it runs in a thread here instead."""
    if not hasattr(os, "fork"):
        return await asyncio.to_thread(work)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _answer_and_exit(work, read_end, write_end)
    os.close(write_end)
    try:
        answer = await asyncio.to_thread(_read_all, read_end)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    except BaseException:  # cancelled (a stop): the child must not outlive the wait for it
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 (killed: it ends at once)
        raise
    if not answer or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return await asyncio.to_thread(work)  # the child died (out of memory?): here, to say what there is
    with gc_paused():  # as in load_config_apart
        value: T = _answer(await in_thread(functools.partial(pickle.loads, answer)))
    return value


async def in_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread, the interpreter switching threads every millisecond meanwhile (not every 5 ms): a thread
    that computes then holds the event loop up for about a millisecond each time the loop needs the interpreter
    (a loop turn that calls SQLite a few times needs it a few times)."""
    global _threads_working
    if _threads_working == 0:
        _switch_interval[0] = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
    _threads_working += 1
    try:
        return await asyncio.to_thread(work)
    finally:
        _threads_working -= 1
        if _threads_working == 0:
            sys.setswitchinterval(_switch_interval[0])


_threads_working = 0  # in_thread calls under way (the event loop's thread alone changes it)
_switch_interval = [0.005]  # the interpreter's own, given back when none is under way


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile: a whole collection of a 10,000-point agent's heap holds the
    interpreter some 40 ms, and work that allocates much (a configuration compiled in a thread) would set one off
    at any moment. Garbage without cycles is freed as always; the rest waits for the next collection."""
    global _gc_pauses
    if _gc_pauses == 0:
        _gc_was_enabled[0] = gc.isenabled()
        gc.disable()
    _gc_pauses += 1
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled[0]:
            gc.enable()


_gc_pauses = 0
_gc_was_enabled = [True]


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def _answer_and_exit(work: Callable[[], Any], read_end: int, write_end: int,
                     then: list[Callable[[], None]] | None = None) -> NoReturn:
    """In the child: answer through the pipe, then do `then` (what `work` left for later), never return into the
    caller's code."""
    code = 0
    try:
        # the heap the parent gave is never garbage here: collections leave it alone (and its pages unwritten),
        # and come every 50,000 new objects, not 700 (they cost a large configuration as much as validating it)
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        os.close(read_end)
        try:
            answer: tuple[str, Any] = ("ok", _packed(work()))
        except ConfigError as exc:
            answer = ("error", (exc.source, exc.errors))
        with os.fdopen(write_end, "wb") as out:
            pickle.dump(answer, out, protocol=pickle.HIGHEST_PROTOCOL)
        del answer  # the daemon has it: its memory is free for what is left to do
        for action in then or ():
            action()
    except BaseException:  # whatever happens here, the child must end here
        code = 1
    finally:
        os._exit(code)


def _packed(value: Any) -> Any:
    """A configuration in the answer, with its points packed: the daemon keeps it as long as it runs (about 120
    instead of 690 bytes a point), and it crosses the pipe ten times smaller."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, AgentConfig):
            pack_points(item)
    return value


def _answer(answer: tuple[str, Any]) -> Any:
    kind, value = answer
    if kind == "error":
        raise ConfigError(*value)
    return value


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """Validate YAML text; relative store paths are resolved against base_dir."""
    return validate_config_data(parse_document(text, source=source), source=source, base_dir=base_dir)


def parse_document(text: str, *, source: str = "<config>") -> dict[str, Any]:
    """The configuration document in YAML (or JSON) text, not yet validated; ConfigError when it is not one."""
    if text.lstrip()[:1] == "{":
        data = _load_json(text, source)  # JSON is YAML too; read as JSON, a 100,000-point file takes a tenth
    else:
        try:
            data = yaml_stream.load(text, secret_keys=secret_fields())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(source, [f"{where}YAML syntax error: {problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping with at least `agent:`"])
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_QUOTE.repr(key)}")
            seen.add(key)
    return out


def _load_json(text: str, source: str) -> Any:
    """A configuration written as JSON, with the YAML reader's rules: no key twice, nesting bounded."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, [f"line {exc.lineno}, column {exc.colno}: JSON syntax error: {exc.msg}"]) from None
    except ValueError as exc:
        raise ConfigError(source, [f"JSON: {exc}"]) from None
    except RecursionError:
        raise ConfigError(source, [f"JSON: mappings and lists nested deeper than {yaml_stream.MAX_DEPTH} "
                                   "levels"]) from None
    if _depth(data) > yaml_stream.MAX_DEPTH:
        raise ConfigError(source, [f"JSON: mappings and lists nested deeper than {yaml_stream.MAX_DEPTH} levels"])
    return data


def _depth(value: Any) -> int:
    """How deeply mappings and lists nest, counted up to MAX_DEPTH + 1 (without recursion: a crafted file may
    nest thousands deep). One level at a time, and only containers enter the next: the leaves of 100,000 points
    cost a type check each."""
    if type(value) is not dict and type(value) is not list:
        return 0
    depth, level = 0, [value]
    while level and depth <= yaml_stream.MAX_DEPTH:
        depth += 1
        level = [item for box in level for item in (box.values() if type(box) is dict else box)
                 if type(item) is dict or type(item) is list]
    return depth


def validate_config_data(data: dict[str, Any], *, source: str, base_dir: Path | None) -> AgentConfig:
    try:
        # equal limits of 100,000 points validated once: the same result; where it fails, the long way says why
        config = AgentConfig.model_validate(validated_once(AgentConfig, data))
    except ValidationError:
        config = _validate_each(data, source)
    if base_dir is not None:
        resolved = _resolve_paths(config, base_dir)
        assert isinstance(resolved, AgentConfig)
        config = resolved
    share_equal_parts(config)
    return config


def _validate_each(data: dict[str, Any], source: str) -> AgentConfig:
    """The document validated as written, every part where it stands; ConfigError naming each error's path."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        if len(lines) > MAX_ERRORS:
            lines[MAX_ERRORS:] = [f"... and {len(lines) - MAX_ERRORS:,} more error(s)"]
        raise ConfigError(source, lines) from None


def _resolve_paths(value: Any, base: Path) -> Any:
    """Relative file names anywhere in the configuration (store, socket, certificates) are taken from the
    config file's folder, so the daemon finds them whatever its working directory. Only fields whose annotation
    can hold a path somewhere below are walked: 100,000 points hold none."""
    if isinstance(value, Path):
        if str(value).startswith(CREDENTIALS + "/"):
            return value  # systemd's folder, known only when the connection reads the file
        return value if value.is_absolute() else (base / value).resolve()
    if isinstance(value, list):
        items = [_resolve_paths(v, base) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, Model):
        update = {}
        for name in _path_fields(type(value)):
            current = getattr(value, name)
            new = _resolve_paths(current, base)
            if new is not current:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


@functools.cache
def _path_fields(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of a model class whose values may hold a Path, themselves or in a model or list below."""
    return tuple(name for name, field in cls.model_fields.items() if _may_hold_path(field.annotation, frozenset()))


def _may_hold_path(annotation: Any, seen: frozenset[type]) -> bool:
    """Whether a value of this annotation may be or hold a Path: a model class counts by its fields and by its
    subclasses' (an instance of one may stand in its place); anything untyped counts."""
    if annotation is Any or annotation is object:
        return True
    if isinstance(annotation, type):
        if issubclass(annotation, PurePath):
            return True
        if issubclass(annotation, BaseModel):
            return annotation not in seen and any(
                _may_hold_path(field.annotation, seen | {annotation})
                for cls in _with_subclasses(annotation) for field in cls.model_fields.values())
    return any(_may_hold_path(a, seen) for a in typing.get_args(annotation) if a is not annotation)


def _with_subclasses(cls: type[BaseModel]) -> Iterator[type[BaseModel]]:
    todo = [cls]
    while todo:
        current = todo.pop()
        yield current
        todo.extend(current.__subclasses__())


def _secret_files(value: Any, where: str) -> Iterator[tuple[str, Path]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _secret_files(item, f"{where}[{i}]")
    elif isinstance(value, Model):
        for name, field in type(value).model_fields.items():
            current = getattr(value, name)
            here = f"{where}.{name}" if where else name
            if isinstance(current, Path) and _holds(field.annotation, SecretFile):
                yield here, current
            else:
                yield from _secret_files(current, here)


def secret_file_warnings(config: AgentConfig) -> list[str]:
    """One line per secret file this process cannot read now. Not an error: the agent reads them only when it
    connects, maybe as another user, and an engineer checking a configuration need not be able to."""
    lines = []
    for where, path in _secret_files(config, ""):
        try:
            read_secret(path)
        except OSError as exc:
            lines.append(f"{where}: {exc} (read when the agent connects)")
    return lines


def config_schema() -> dict[str, Any]:
    return AgentConfig.model_json_schema()
