"""The running configuration and its revisions: which one is active and why, taking a new one (a platform push
on `config/set`, `edge-agent config apply`, the bootstrap file on SIGHUP), applying it to the running stages
without losing a reading, keeping it on trial, and going back (by itself when the trial fails, or on request).

Where a configuration lives: the bootstrap file (/etc) stays; revisions taken from the platform or a local user
are kept in the state folder (agent.config.revisions); the store records which one is active, with its hash, in
the same synced commit that makes it active, so a kill at any moment leaves the agent on the old or the new one
after a restart, never a mix. At start (and on SIGHUP) the bootstrap file is taken when it is what was active,
or when its own `revision` is above the active one; a file with a lower or equal revision never silently
overrides a revision from the platform (`edge-agent config show` says which is active and why).

A new revision is on trial for `remote_config.confirm_within`: unless the uplink reaches the broker within it,
and most devices that answered before still answer at its end, the agent goes back to the previous revision by
itself and says so on `config/result` (`rolled_back`, with the reason) once connected. Nothing here raises out
of a callback; every refusal is answered, counted by kind, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import orjson

from agent.app.channels import changed_channels
from agent.config.base import ChannelBase
from agent.config.confine import confinement_errors, fixed_field_errors, own_folders, with_local_fields
from agent.config.loader import gc_paused, in_thread, load_config, parse_document, run_apart, validate_apart
from agent.config.models import AgentConfig
from agent.config.revisions import SOURCES, Revision, RevisionError, RevisionFiles, Source, config_hash, file_hash
from agent.control.actions import Actions
from agent.control.commands import CommandHandler, CommandTrust, quote
from agent.control.pushes import REFUSAL_KINDS, Push, PushRefused, RefusalKind, read_push, refusal, result
from agent.errors import ConfigError
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.uplink import Uplink

log = logging.getLogger(__name__)

META_ACTIVE = "config_active"
META_HIGHEST = "config_highest"
PUSH_QUEUE = 2  # pushes waiting for their turn (each up to uplink.max_incoming_bytes); more are refused, answered
MAX_TRIAL_STARTS = 3  # starts on a revision still on trial before the agent takes it for the cause and goes back
MAX_LOCAL_BYTES = 16 * 1_048_576  # the largest file `edge-agent config apply` sends


@dataclass
class Active:
    """The active revision as the store records it: what it is, where it came from, and while on trial, until
    when and what it goes back to."""

    revision: int
    source: Source
    hash: str
    kid: str | None = None
    id: str | None = None
    since: int = 0  # ms since the epoch, when it became active
    previous: dict[str, Any] | None = None  # the Active before it (without its own previous): what rollback takes
    trial_until: int | None = None  # ms since the epoch, while on trial
    starts: int = 0  # starts of the agent while this revision was on trial

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: object) -> Active | None:
        """The record read back; None when it is missing or damaged (a member missing or of the wrong type)."""
        try:
            raw = orjson.loads(text) if isinstance(text, str | bytes) else None
        except orjson.JSONDecodeError:
            return None
        if not isinstance(raw, dict) or set(raw) != set(_ACTIVE_TYPES) or raw.get("source") not in SOURCES:
            return None
        for name, types in _ACTIVE_TYPES.items():
            if not isinstance(raw[name], types) or isinstance(raw[name], bool):
                return None
        if raw["previous"] is not None and cls.from_summary(raw["previous"]) is None:
            return None
        return cls(**raw)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Active | None:
        """An Active from its `summary()` (what `previous` holds); None when it is not one."""
        if set(summary) != _SUMMARY or summary.get("source") not in SOURCES:
            return None
        for name in _SUMMARY:
            types = _ACTIVE_TYPES[name]
            if not isinstance(summary[name], types) or isinstance(summary[name], bool):
                return None
        return cls(**summary)

    def summary(self) -> dict[str, Any]:
        return {"revision": self.revision, "source": self.source, "hash": self.hash, "kid": self.kid,
                "id": self.id, "since": self.since}


_ACTIVE_TYPES: dict[str, type | tuple[type, ...]] = {
    "revision": int, "source": str, "hash": str, "kid": (str, type(None)), "id": (str, type(None)), "since": int,
    "previous": (dict, type(None)), "trial_until": (int, type(None)), "starts": int}
_SUMMARY = frozenset({"revision", "source", "hash", "kid", "id", "since"})


def read_active(store: Store) -> tuple[Active | None, int]:
    """The active revision the store records (None: none yet), and the highest revision ever taken."""
    active = Active.from_json(store.meta(META_ACTIVE))
    highest = store.meta(META_HIGHEST, 0)
    return active, highest if isinstance(highest, int) else 0


class Stages(Protocol):
    """What of the running daemon a new configuration is applied to (agent.app.daemon.Agent)."""

    config: AgentConfig
    store: Store
    pipeline: Pipeline
    poller: Poller
    uplink: Uplink
    upkeep: Upkeep
    actions: Actions
    commands: CommandHandler

    def retire_channels(self, ids: list[str]) -> list[asyncio.Task[None]]: ...

    def start_channels(self, retired: list[asyncio.Task[None]], channels: list[ChannelBase]) -> Awaitable[None]: ...

    def configured(self, config: AgentConfig) -> None: ...


@dataclass
class Trial:
    """A revision on trial: until when, the devices that answered before it, whether the uplink reached the broker."""

    until: float  # loop time
    answering: set[tuple[str, str]]
    reached: bool = False
    push_id: str | None = None
    revision: int = 0
    hash: str = ""
    source: Source = "platform"


@dataclass
class Checked:
    """A new configuration, validated, with what its revision file keeps."""

    config: AgentConfig
    revision: int
    hash: str
    payload: bytes
    source: Source
    kid: str | None = None
    id: str | None = None


class LiveConfig:
    def __init__(self, stages: Stages, bootstrap: Path, clock: Callable[[], float] = time.time) -> None:
        self.stages = stages
        self.bootstrap = bootstrap.resolve()
        self.clock = clock
        state_dir = stages.store.path.resolve().parent
        self.files = RevisionFiles(state_dir, stages.config.remote_config.keep_revisions)
        self.active = Active(stages.config.revision, "file", "")
        self.highest = 0
        self.trial: Trial | None = None
        self.refused: dict[RefusalKind, int] = dict.fromkeys(REFUSAL_KINDS, 0)
        self.bootstrap_note = ""  # why the bootstrap file is or is not in use, for `config show` and the log
        self._queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue(PUSH_QUEUE)
        self._lock = asyncio.Lock()
        self._rolled_back_at_start: tuple[str | None, int, str] | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        self._uplink_changed = False

    @contextlib.asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        """One change of configuration at a time; no collection of the whole heap in the middle of one."""
        async with self._lock:
            with gc_paused():
                yield

    # --- at start --------------------------------------------------------------------------------------------

    async def choose(self, bootstrap_config: AgentConfig) -> AgentConfig:
        """The configuration to start with (the bootstrap file's or a kept revision, by the rule above), recorded
        as active. A kept revision that cannot be read or used is logged and the bootstrap file taken instead."""
        store = self.stages.store
        recorded, self.highest = store.attempt("reading the active configuration", lambda: read_active(store)) \
            or (None, 0)
        try:
            boot_hash = file_hash(self.bootstrap.read_bytes())
        except OSError:
            boot_hash = ""
        from_file = Active(bootstrap_config.revision, "file", boot_hash, since=self._now())
        if recorded is None or recorded.source == "file" or bootstrap_config.revision > recorded.revision:
            if recorded is not None and recorded.source != "file":
                log.warning("config: the bootstrap file's revision %d is above the active revision %d (%s): the "
                            "file is taken", bootstrap_config.revision, recorded.revision, recorded.source)
            from_file.previous = recorded.summary() if recorded is not None and recorded.hash != boot_hash else \
                (recorded.previous if recorded is not None else None)
            self.bootstrap_note = "in use"
            self._record(from_file)
            return bootstrap_config
        self.bootstrap_note = (f"not in use: its revision {bootstrap_config.revision} is not above the active "
                               f"revision {recorded.revision} from the {_source_words(recorded.source)}")
        log.warning("config: the bootstrap file %s (revision %d) is not used: the active revision is %d from the %s; "
                    "raise the file's `revision` above %d, or `edge-agent config apply` it", self.bootstrap,
                    bootstrap_config.revision, recorded.revision, _source_words(recorded.source),
                    recorded.revision)
        target = recorded
        if recorded.trial_until is not None:
            recorded.starts += 1
            back = Active.from_summary(recorded.previous) if recorded.previous is not None else None
            if recorded.starts > MAX_TRIAL_STARTS and back is not None:
                log.error("config: revision %d was on trial for %d starts without being confirmed; going back to "
                          "revision %d", recorded.revision, recorded.starts - 1, back.revision)
                self._rolled_back_at_start = (recorded.id, recorded.revision,
                                              f"the agent started {recorded.starts - 1} times on revision "
                                              f"{recorded.revision} without confirming it")
                target = back
        try:
            config = await self._load(target, bootstrap_config)
        except (RevisionError, ConfigError) as exc:
            log.error("config: the active revision %d cannot be used (%s); starting on the bootstrap file",
                      target.revision, exc)
            self.bootstrap_note = "in use (the active revision could not be read)"
            from_file.previous = target.summary()
            self._record(from_file)
            return bootstrap_config
        if target is not recorded:
            target.previous = None
            target.since = self._now()
        self._record(target)
        return config

    def resume(self) -> None:
        """Once the stages run: a trial under way before the restart goes on for a whole confirm_within again;
        a rollback decided at start is reported."""
        cfg = self.stages.config
        uplink = self.stages.uplink
        uplink.config_revision, uplink.config_hash = self.active.revision, self.active.hash
        if self._rolled_back_at_start is not None:
            push_id, revision, why = self._rolled_back_at_start
            uplink.send_result("config/result", result(push_id, "rolled_back", revision, [why]))
        elif self.active.trial_until is not None:
            loop = asyncio.get_running_loop()
            self.trial = Trial(loop.time() + cfg.remote_config.confirm_within, set(), push_id=self.active.id,
                               revision=self.active.revision, hash=self.active.hash, source=self.active.source)
            self.active.trial_until = int(self._now() + cfg.remote_config.confirm_within * 1000)
            self._record(self.active)
            log.info("config: revision %d is on trial again after the restart, for %.0fs", self.active.revision,
                     cfg.remote_config.confirm_within)

    async def _load(self, target: Active, running: AgentConfig) -> AgentConfig:
        """The configuration of a recorded revision: the bootstrap file, or a kept revision (checked as a push)."""
        if target.source == "file":
            path = self.bootstrap
            config = await run_apart(lambda: load_config(path, kept=False))
            errors = fixed_field_errors(config, running)
            if errors:
                raise ConfigError(str(path), errors)
            return config
        kept = await in_thread(functools.partial(self.files.load, target.revision))
        try:
            data = await in_thread(functools.partial(orjson.loads, kept.payload))
        except orjson.JSONDecodeError:
            raise RevisionError(f"revision {target.revision}: its message is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise RevisionError(f"revision {target.revision}: its message holds no configuration")
        return await self._validate(data["config"], f"revision {target.revision}", target.revision, running)

    # --- the checks ------------------------------------------------------------------------------------------

    async def _validate(self, data: dict[str, Any], source: str, revision: int,
                        running: AgentConfig) -> AgentConfig:
        """A configuration document from afar, validated like a file and confined to the agent's folders."""
        folders = own_folders(self.bootstrap, running)
        document = with_local_fields(data, running)

        def check(config: AgentConfig) -> list[str]:
            errors = confinement_errors(config, running, folders)
            if "revision" in data and config.revision != revision:
                errors.append(f"revision: {config.revision} differs from the push's revision {revision}")
            return errors

        config = await validate_apart(document, source=source, base_dir=self.bootstrap.parent, check=check)
        return config.model_copy(update={"revision": revision})

    def _floor(self) -> int:
        """A new revision must be above this: the active one and every one ever taken (a revision rolled back
        cannot come back by a replay)."""
        return max(self.active.revision, self.highest)

    def _old_revision(self, revision: int, push_id: str | None) -> str:
        again = " (a replay of the push that made it active)" if push_id is not None and push_id == self.active.id \
            else ""
        return (f"revision: {revision} is not above {self._floor()}, the highest revision this agent has taken "
                f"(active: {self.active.revision}){again}")

    # --- pushes from the platform ----------------------------------------------------------------------------

    def on_push(self, payload: bytes, retained: bool) -> None:
        """From the uplink (paho's read callback): answered at once when oversized or when too many wait, else
        queued for `run`. Never raises."""
        try:
            limit = self.stages.config.uplink.max_incoming_bytes
            if len(payload) > limit:
                self._refuse(PushRefused("oversized", [f"(top level): {len(payload):,} bytes, more than the "
                                                       f"{limit:,} the agent takes (uplink.max_incoming_bytes)"]))
                return
            try:
                self._queue.put_nowait((payload, retained))
            except asyncio.QueueFull:
                self._refuse(PushRefused("busy", [f"{PUSH_QUEUE} pushes are already waiting: send it again once "
                                                  "they are answered"]))
        except Exception:  # a bug here must cost one answer, never the uplink
            log.exception("config: a push could not be queued")

    async def run(self) -> None:
        """Take queued pushes one at a time, and watch the trial: confirmed or rolled back at its end."""
        loop = asyncio.get_running_loop()
        while True:
            trial = self.trial
            timeout = None if trial is None else max(0.0, min(1.0, trial.until - loop.time()))
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                item = None
            try:
                with gc_paused():  # no collection of the whole heap in the middle of an apply
                    if item is not None:
                        await self._take_push(*item)
                    await self._watch_trial()
            except Exception:  # one push or check failing on a bug must not end the configuration's task
                log.exception("config: handling a push or the trial failed")

    async def _take_push(self, payload: bytes, retained: bool) -> None:
        cfg = self.stages.config
        trust = CommandTrust.of(cfg)
        try:
            push: Push = await in_thread(functools.partial(
                read_push, payload, retained=retained, trust=trust, allow_unsigned=cfg.remote_config.allow_unsigned,
                max_bytes=cfg.uplink.max_incoming_bytes, now_ms=self._now(),
                max_age_ms=cfg.control.command_max_age * 1000))
        except PushRefused as exc:
            self._refuse(exc)
            return
        async with self._busy():
            try:
                checked = await self._check_push(push)
            except PushRefused as exc:
                self._refuse(exc)
                return
            await self._take(checked, trial=True, who="the platform")

    async def _check_push(self, push: Push) -> Checked:
        if push.revision <= self._floor():
            raise PushRefused("old_revision", [self._old_revision(push.revision, push.id)], push.id, push.revision)
        if self.trial is not None:
            raise PushRefused("busy", [f"revision {self.trial.revision} is on trial; send again once its result "
                                       "(applied or rolled_back) has come"], push.id, push.revision)
        try:
            config = await self._validate(push.config, "config", push.revision, self.stages.config)
        except ConfigError as exc:
            raise PushRefused("invalid", [_in_config(line) for line in exc.errors], push.id, push.revision) from None
        return Checked(config, push.revision, push.hash, push.payload, "platform", push.kid, push.id)

    def _refuse(self, exc: PushRefused) -> None:
        self.refused[exc.kind] += 1
        # the kind first: the log folds repeats of one kind and id (a flood of one hostile push is one line)
        log.warning("config: a push refused, %s: id %s, revision %s: %s", exc.kind, quote(exc.id), exc.revision,
                    "; ".join(exc.errors[:5]))
        self.stages.uplink.send_result("config/result", refusal(exc))

    # --- local requests (the control socket) -----------------------------------------------------------------

    async def apply_local(self, request: dict[str, Any], caller: str) -> dict[str, Any]:
        """`edge-agent config apply FILE`: the file's text, validated as a push is, kept and applied on trial."""
        text, name = request.get("text"), request.get("name")
        if not isinstance(text, str) or len(text) > MAX_LOCAL_BYTES:
            return {"ok": False, "state": "refused", "errors": [f"text: the configuration file's text, at most "
                                                                f"{MAX_LOCAL_BYTES:,} bytes"]}
        source = name if isinstance(name, str) and name else "<config apply>"
        async with self._busy():
            if self.trial is not None:
                return _local_refusal("busy", [f"revision {self.trial.revision} is on trial: wait for its end, or "
                                               "`edge-agent config rollback`"])
            running = self.stages.config
            folders = own_folders(self.bootstrap, running)

            def work() -> tuple[AgentConfig, bytes, str, bool]:
                data = parse_document(text, source=source)
                config = validate_config_data_confined(data, source, running, folders, self.bootstrap.parent)
                return config, orjson.dumps(data), config_hash(data), "revision" in data

            try:
                config, document, digest, numbered = await run_apart(work)
            except ConfigError as exc:
                return _local_refusal("invalid", exc.errors)
            revision = config.revision if numbered else self._floor() + 1
            if revision <= self._floor():
                return _local_refusal("old_revision", [self._old_revision(revision, None)])
            push_id = f"local-{uuid.uuid4().hex[:12]}"
            payload = b'{"v":1,"id":' + orjson.dumps(push_id) + b',"revision":' + str(revision).encode() + \
                b',"config":' + document + b"}"
            checked = Checked(config.model_copy(update={"revision": revision}), revision, digest, payload, "local",
                              None, push_id)
            outcome = await self._take(checked, trial=True, who=caller or "a local user")
        return outcome

    async def rollback_local(self, request: dict[str, Any], caller: str) -> dict[str, Any]:
        """`edge-agent config rollback [REV]`: back to the previous revision, or to a kept one, or to the bootstrap
        file (`file`); applied at once, without a trial."""
        target = request.get("revision")
        async with self._busy():
            if target is None:
                earlier = Active.from_summary(self.active.previous) if self.active.previous is not None else None
                if earlier is None:
                    return _local_refusal("invalid", ["revision: no earlier revision is recorded; name one "
                                                      "(`edge-agent config show` lists those kept) or `file`"])
                goal = earlier
            elif target == "file":
                goal = Active(0, "file", "")
            elif isinstance(target, int) and not isinstance(target, bool):
                if target not in self.files.numbers():
                    return _local_refusal("invalid", [f"revision: {target} is not kept here (kept: "
                                                      f"{', '.join(map(str, self.files.numbers())) or 'none'})"])
                try:
                    kept = await asyncio.to_thread(self.files.load, target)
                except RevisionError as exc:
                    return _local_refusal("invalid", [str(exc)])
                goal = Active(kept.revision, kept.source, kept.hash, kept.kid, kept.id)
            else:
                return _local_refusal("malformed", [f"revision: a kept revision's number or `file`, not "
                                                    f"{quote(target)}"])
            why = f"rolled back on site by {caller or 'a local user'}"
            return await self._go_back(goal, why)

    def reload_soon(self) -> None:
        """SIGHUP: read the bootstrap file again, in a task of its own (the signal handler must not wait)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="config reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """The bootstrap file again: applied on trial when it differs from what is active and its revision allows
        (above the active one, or equal when the active one is the file itself); else logged and let be."""
        path = self.bootstrap
        async with self._busy():
            try:
                data = await asyncio.to_thread(path.read_bytes)
                config = await run_apart(lambda: load_config(path, kept=False))
            except (OSError, ConfigError) as exc:
                lines = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
                log.error("config: SIGHUP: the bootstrap file %s is not used: %s", path, "; ".join(lines[:20]))
                return
            digest = file_hash(data)
            active = self.active
            if active.source == "file" and digest == active.hash:
                log.info("config: SIGHUP: the bootstrap file is unchanged (revision %d)", config.revision)
                return
            allowed = config.revision >= active.revision if active.source == "file" else \
                config.revision > active.revision
            if not allowed:
                log.warning("config: SIGHUP: the bootstrap file's revision %d is not above the active revision %d "
                            "from the %s: not used (raise its `revision`)", config.revision, active.revision,
                            _source_words(active.source))
                self.bootstrap_note = (f"not in use: its revision {config.revision} is not above the active "
                                       f"revision {active.revision} from the {_source_words(active.source)}")
                return
            fixed = fixed_field_errors(config, self.stages.config)
            if fixed:
                log.error("config: SIGHUP: the bootstrap file is not used: %s (restart the agent to take it)",
                          "; ".join(fixed))
                return
            checked = Checked(config, config.revision, digest, b"", "file")
            outcome = await self._take(checked, trial=True, who="SIGHUP")
            if outcome.get("ok"):
                self.bootstrap_note = "in use"

    # --- applying --------------------------------------------------------------------------------------------

    async def _take(self, checked: Checked, *, trial: bool, who: str) -> dict[str, Any]:
        """Keep a new revision, make it active (recorded) and apply it, on trial; its `config/result` (`trial`)
        and the answer to a local request."""
        if checked.source != "file":
            kept = Revision(checked.revision, checked.source, checked.hash, checked.payload, checked.kid,
                            checked.id, self._now())
            try:
                await in_thread(functools.partial(self.files.save, kept))
            except OSError as exc:
                refused = PushRefused("storage", [f"cannot keep revision {checked.revision} in {self.files.folder}: "
                                                  f"{exc.strerror or exc}"], checked.id, checked.revision)
                if checked.source == "platform":
                    self._refuse(refused)
                return {**refusal(refused), "kind": refused.kind}
        active = Active(checked.revision, checked.source, checked.hash, checked.kid, checked.id, self._now(),
                        previous=self.active.summary())
        confirm = checked.config.remote_config.confirm_within
        if trial:
            active.trial_until = int(self._now() + confirm * 1000)
        answering = self._answering()
        self.highest = max(self.highest, checked.revision)
        await self._apply(checked.config, active, why=f"revision {checked.revision} from {who}")
        if trial:
            self.trial = Trial(asyncio.get_running_loop().time() + confirm, answering,
                               reached=self.stages.uplink.connected and not self._uplink_changed,
                               push_id=checked.id, revision=checked.revision, hash=checked.hash,
                               source=checked.source)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)  # wakes `run`, which watches the trial from now on
        outcome = result(checked.id, "trial" if trial else "applied", checked.revision, hash=checked.hash)
        if checked.source == "platform":
            self.stages.uplink.send_result("config/result", outcome)
        log.warning("config: revision %d (%s, hash %s) from %s applied%s", checked.revision, checked.source,
                    checked.hash[:19], who, f", on trial for {confirm:.0f}s" if trial else "")
        self._prune()
        return outcome

    async def _apply(self, config: AgentConfig, active: Active, *, why: str) -> None:
        """Apply `config` to the running stages between two polls, and record `active` in the same step."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        stages = self.stages
        old = stages.config
        parts, (keep, restart) = await in_thread(lambda: (Pipeline.prepare(config), changed_channels(old, config)))
        prepared = loop.time()
        # one step, no await: no poll, no reading, no command comes between the record and the stages
        self._record(active)
        map_before = stages.pipeline.encoder.map_id
        now = self._now()
        stages.pipeline.reconfigure(parts, now, f"removed from the configuration ({why})")
        retired = stages.retire_channels(sorted({c.id for c in old.channels if c.enabled} - keep))
        stages.poller.reconfigure(parts.table, keep)
        stages.configured(config)
        stages.commands.reconfigure(CommandTrust.of(config), config.control.command_max_age)
        stages.upkeep.config = UpkeepConfig(
            max_bytes=int(config.store.max_mb * 1e6), min_free_bytes=int(config.store.min_free_mb * 1e6),
            retention_s=config.store.retention, sync_interval=config.store.sync_interval)
        halt_events = stages.pipeline.alarms.set_halted(stages.actions.production_state == "halted", now)
        if halt_events:
            stages.pipeline.store_events(halt_events)
        logging.getLogger().setLevel(config.log_level.upper())
        uplink = stages.uplink
        uplink.config_version = config.version
        uplink.config_revision, uplink.config_hash = active.revision, active.hash
        self._uplink_changed = uplink.reconfigure(config.uplink)
        if stages.pipeline.encoder.map_id != map_before:
            uplink.maps_changed()
        uplink.republish_status()
        self.files.keep = config.remote_config.keep_revisions
        log.info("config: applied in %.0f ms on the event loop, after %.0f ms compiling apart; channels kept %s, "
                 "restarted %s", (loop.time() - prepared) * 1000, (prepared - began) * 1000,
                 ", ".join(sorted(keep)) or "none", ", ".join(c.id for c in restart) or "none")
        await stages.start_channels(retired, restart)

    def _answering(self) -> set[tuple[str, str]]:
        """The devices answering now: those the trial watches."""
        return {(d.slot.channel.id, d.slot.device.id) for d in self.stages.poller.devices
                if d.polls and d.state != "failing"}

    async def _watch_trial(self) -> None:
        trial = self.trial
        if trial is None:
            return
        uplink = self.stages.uplink
        if uplink.connected:
            trial.reached = True
        if asyncio.get_running_loop().time() < trial.until:
            return
        async with self._busy():
            if self.trial is not trial:
                return
            reasons = []
            if not trial.reached:
                reasons.append(f"the uplink did not reach {uplink.cfg.host}:{uplink.cfg.port} within "
                               f"{self.stages.config.remote_config.confirm_within:.0f}s"
                               + (f" ({uplink.last_error})" if uplink.last_error else ""))
            states = {(d.slot.channel.id, d.slot.device.id): d.state for d in self.stages.poller.devices}
            watched = [key for key in trial.answering if key in states]
            silent = sorted(key for key in watched if states[key] == "failing")
            if watched and len(silent) * 2 > len(watched):
                reasons.append(f"{len(silent)} of {len(watched)} devices that answered before stopped answering: "
                               + ", ".join(f"{c}/{d}" for c, d in silent[:10]) + (" ..." if len(silent) > 10 else ""))
            if reasons:
                previous = Active.from_summary(self.active.previous) if self.active.previous is not None else None
                if previous is None:
                    log.error("config: revision %d failed its trial (%s) and there is nothing to go back to",
                              trial.revision, "; ".join(reasons))
                    self._confirm(trial)
                    return
                await self._go_back(previous, "; ".join(reasons))
                return
            self._confirm(trial)

    def _confirm(self, trial: Trial) -> None:
        self.trial = None
        self.active.trial_until = None
        self.active.starts = 0
        self._record(self.active)
        if trial.source == "platform":
            self.stages.uplink.send_result("config/result", result(trial.push_id, "applied", trial.revision,
                                                                   hash=trial.hash))
        log.warning("config: revision %d confirmed", trial.revision)

    async def _go_back(self, goal: Active, why: str) -> dict[str, Any]:
        """Back to `goal` (the previous revision, a kept one, the bootstrap file), at once and without a trial;
        a revision on trial is reported `rolled_back` with `why`. Call with the lock held."""
        trial = self.trial
        try:
            config = await self._load(goal, self.stages.config)
        except (RevisionError, ConfigError, OSError) as exc:
            lines = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
            log.error("config: cannot go back to revision %d (%s): %s", goal.revision, goal.source, "; ".join(lines))
            return _local_refusal("invalid", [f"revision {goal.revision} cannot be used: " + "; ".join(lines[:5])])
        if goal.source == "file":
            try:
                goal.hash = file_hash(await asyncio.to_thread(self.bootstrap.read_bytes))
            except OSError:
                goal.hash = ""
            goal.revision = config.revision
        goal = replace(goal, since=self._now(), previous=self.active.summary(), trial_until=None, starts=0)
        self.trial = None
        await self._apply(config, goal, why=f"back to revision {goal.revision}: {why}")
        if trial is not None and trial.source == "platform":
            uplink = self.stages.uplink
            # the trial's own result, if still waiting for the broker, is overtaken by this one
            uplink.drop_results(lambda payload: not _is_trial_result(payload, trial.push_id))
            uplink.send_result("config/result", result(trial.push_id, "rolled_back", trial.revision, [why]))
        log.error("config: back to revision %d (%s): %s", goal.revision, goal.source, why)
        return result(None, "applied", goal.revision, hash=goal.hash)

    # --- the record ------------------------------------------------------------------------------------------

    def _record(self, active: Active) -> None:
        """The active revision (and the highest ever taken) in the store, synced: after a kill, this decides."""
        store = self.stages.store
        self.active = active

        def write() -> None:
            with store.transaction(durable=True):
                store.set_meta(META_ACTIVE, active.to_json())
                store.set_meta(META_HIGHEST, max(self.highest, active.revision))

        store.attempt("recording the active configuration", write)

    def _prune(self) -> None:
        protect = {self.active.revision}
        if self.active.previous is not None:
            protect.add(int(self.active.previous.get("revision", -1)))
        self.files.prune(protect)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    # --- reports ---------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The active revision, the trial and the refused pushes, for `health` and `status`."""
        trial = None
        if self.trial is not None:
            left = max(0.0, self.trial.until - asyncio.get_running_loop().time())
            trial = {"revision": self.trial.revision, "ends_in_s": round(left, 1),
                     "previous": (self.active.previous or {}).get("revision"), "uplink_reached": self.trial.reached}
        return {"revision": self.active.revision, "source": self.active.source, "hash": self.active.hash,
                "kid": self.active.kid, "trial": trial, "highest": self._floor(),
                "refused": {k: v for k, v in self.refused.items() if v}}


def validate_config_data_confined(data: dict[str, Any], source: str, running: AgentConfig, folders: list[Path],
                                  base_dir: Path) -> AgentConfig:
    """A document from a local user (`config apply`): validated like a file, confined like a push."""
    from agent.config.loader import validate_config_data

    config = validate_config_data(with_local_fields(data, running), source=source, base_dir=base_dir)
    errors = confinement_errors(config, running, folders)
    if errors:
        raise ConfigError(source, errors)
    return config


def _in_config(line: str) -> str:
    """An error of the pushed document, with its path inside the push (`config.channels[0]...`)."""
    if line.startswith("(top level): "):
        return "config: " + line.removeprefix("(top level): ")
    return "config." + line


def _is_trial_result(payload: bytes, push_id: str | None) -> bool:
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("state") == "trial" and message.get("id") == push_id


def _local_refusal(kind: str, errors: list[str]) -> dict[str, Any]:
    return {"ok": False, "state": "refused", "kind": kind, "errors": errors}


def _source_words(source: str) -> str:
    return {"platform": "platform", "local": "local `config apply`", "file": "bootstrap file"}.get(source, source)

