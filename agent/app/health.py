"""The agent's reports: `health` (published periodically to the platform) and `status` (answered to the
platform's `status` command and to the local CLI). Reading them changes nothing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from agent import __version__
from agent.app.stall import LoopWatch
from agent.config.models import AgentConfig
from agent.control.actions import Actions
from agent.control.commands import CommandHandler
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.store.upkeep import Upkeep
from agent.uplink.uplink import Uplink


@dataclass
class Reports:
    config: AgentConfig
    store: Store
    pipeline: Pipeline
    poller: Poller
    uplink: Uplink
    upkeep: Upkeep
    actions: Actions
    watch: LoopWatch = field(default_factory=LoopWatch)
    commands: CommandHandler | None = None
    config_info: Callable[[], dict[str, Any]] | None = None  # the active revision, the trial, refused pushes
    started: float = field(default_factory=time.time)
    _process: psutil.Process = field(default_factory=psutil.Process)

    def __post_init__(self) -> None:
        self._process.cpu_percent()  # the first call only starts the measurement

    def _field(self) -> dict[str, Any]:
        return {"channels": self.poller.health(self.config.channels), "points": self.pipeline.point_counts()}

    def health(self) -> dict[str, Any]:
        backlog = self.store.backlog()
        oldest = None if backlog.oldest_created is None else max(0.0, time.time() - backlog.oldest_created / 1000)
        history, history_oldest = self.store.archive_stats()
        try:
            disk_free = shutil.disk_usage(self.config.store.path.parent).free / 1e6
        except OSError:
            disk_free = None
        with self._process.oneshot():
            cpu = self._process.cpu_percent()
            rss = self._process.memory_info().rss / 1e6
        return {
            "ts": int(time.time() * 1000),
            "agent": self.config.agent.id,
            "enterprise": self.config.agent.enterprise,
            "uptime_s": round(time.time() - self.started),
            "backlog": {
                "messages": backlog.messages,
                "readings": backlog.readings,
                "oldest_age_s": None if oldest is None else round(oldest, 1),
            },
            "evicted_readings": self.upkeep.evicted + self.pipeline.lost_readings,
            "store": {
                "used_mb": round(self.store.used_bytes() / 1e6, 1),
                "history_readings": history,
                "history_oldest_age_s": None if history_oldest is None
                else round(max(0.0, time.time() - history_oldest / 1000), 1),
                "pruned_readings": self.upkeep.pruned,
                "recovered": self.store.recovered,
                "memory_only": self.store.fallback_reason,
                "damaged_messages": int(self.store.meta("damaged_messages", 0) or 0),
            },
            **self._field(),
            "counters": {"readings_in": self.pipeline.readings_in, "alarm_events": self.pipeline.events_out,
                         **self.uplink.counters(),
                         "commands_refused": self.commands.refused if self.commands is not None else 0,
                         "signatures_refused": sum(self.commands.signature_refused.values())
                         if self.commands is not None else 0},
            "cpu_percent": round(cpu, 1),
            "rss_mb": round(rss, 1),
            "max_loop_stall_ms": self.watch.take(),
            "online": self.pipeline.judge.online_rates(),
            "disk_free_mb": None if disk_free is None else round(disk_free, 1),
            **({"config": self.config_info()} if self.config_info is not None else {}),
            "chain": self.chain(),
        }

    def chain(self) -> dict[str, Any]:
        """Whether the stored messages are signed (with which key, or why not) and the chain's last seq."""
        sealer, head = self.store.sealer, self.store.chain_head()
        out: dict[str, Any] = {"signed": sealer.key is not None, "kid": sealer.kid, "head": head.seq if head else None}
        if sealer.unsigned_reason is not None:
            out["unsigned_reason"] = sealer.unsigned_reason
        return out

    def status(self) -> dict[str, Any]:
        """What `status` answers, to the platform and to the local CLI."""
        backlog = self.store.backlog()
        states = self.pipeline.alarm_states()
        return {
            "agent": self.config.agent.id,
            "enterprise": self.config.agent.enterprise,
            "version": __version__,
            "config_version": self.config.version,
            **self._revision(),
            "uptime_s": round(time.time() - self.started),
            "production_state": self.actions.production_state,
            "alarms": [{"id": alarm_id, "state": state} for alarm_id, state in sorted(states.items())],
            "backlog": {"messages": backlog.messages, "readings": backlog.readings},
            "uplink": {"connected": self.uplink.connected, "last_error": self.uplink.last_error},
            **self._field(),
        }

    def _revision(self) -> dict[str, Any]:
        """The active configuration revision and its hash (and where it came from, the trial), for `status`."""
        if self.config_info is None:
            return {}
        info = self.config_info()
        return {"config_revision": info["revision"], "config_hash": info["hash"],
                "config": {k: info[k] for k in ("revision", "source", "hash", "kid", "trial")}}

    # --- what the field CLI asks over the control socket (read-only) -----------------------------------------

    def points(self, request: dict[str, Any]) -> dict[str, Any]:
        """Every point's last value, quality, age, unit and raised alarms; `device`, `bad` narrow the list."""
        device = request.get("device") if isinstance(request.get("device"), str) else None
        only_bad = request.get("bad") is True
        raised: dict[str, list[str]] = {}
        for alarm_id, state in self.pipeline.alarm_states().items():
            raised.setdefault(alarm_id.rsplit("/", 1)[0], []).append(f"{alarm_id.rsplit('/', 1)[1]} ({state})")
        now = time.time() * 1000
        pipeline = self.pipeline
        names = ("good", "uncertain", "bad")
        hour, day = pipeline.judge.point_rates(int(now))
        out = []
        for info in pipeline.table.points:
            i = info.index
            code = pipeline.quality[i]
            quality = names[code] if code < len(names) else "never read"
            if device is not None and info.device != device:
                continue
            if only_bad and quality == "good":
                continue
            ts = pipeline.last_ts[i]
            out.append({"point": info.id, "channel": info.channel, "device": info.device, "unit": info.unit,
                        "value": pipeline.last_value[i], "quality": quality, "ts": ts or None,
                        "age_s": round((now - ts) / 1000, 1) if ts else None, "alarms": raised.get(info.id, []),
                        "online_hour": hour[i], "online_day": day[i]})
        return {"points": out, "count": len(out)}

    def channels(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"channels": self.poller.details(self.config.channels)}

    def buffer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The store seen from the field: backlog, size against its bounds, what was dropped, the archive."""
        backlog = self.store.backlog()
        history, oldest_end = self.store.archive_stats()
        newest_end = self.store.db.execute("SELECT max(end) FROM archive").fetchone()[0]
        try:
            disk_free = shutil.disk_usage(self.config.store.path.parent).free / 1e6
        except OSError:
            disk_free = None
        now = time.time()
        cfg = self.config.store
        return {
            "backlog": {"messages": backlog.messages, "readings": backlog.readings,
                        "oldest_age_s": None if backlog.oldest_created is None
                        else round(max(0.0, now - backlog.oldest_created / 1000), 1)},
            "store": {"path": str(cfg.path), "used_mb": round(self.store.used_bytes() / 1e6, 1), "cap_mb": cfg.max_mb,
                      "min_free_mb": cfg.min_free_mb, "disk_free_mb": None if disk_free is None
                      else round(disk_free, 1), "memory_only": self.store.fallback_reason},
            "dropped": {"evicted_readings": self.upkeep.evicted + self.pipeline.lost_readings,
                        "pruned_readings": self.upkeep.pruned,
                        "damaged_messages": int(self.store.meta("damaged_messages", 0) or 0)},
            "archive": {"readings": history, "oldest_ts": oldest_end, "newest_ts": newest_end,
                        "retention_s": cfg.retention},
            "last_sync_age_s": None if self.upkeep.last_sync is None else round(now - self.upkeep.last_sync, 1),
        }
