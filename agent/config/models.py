"""Typed configuration of the agent: the YAML file is validated here and nowhere else.

Field descriptions are the documentation (`edge-agent config schema` prints them). Driver-specific
channel models live beside their drivers and are joined into `AgentConfig` through the driver registry.
This module never opens a device or a socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator

from agent.config.base import ChannelBase, DeviceBase, Duration, Identifier, Model, PointBase, Secret, SecretFile
from agent.trust.keys import parse_public_key


class AgentIdentity(Model):
    id: Identifier = Field(description="This agent's id; the last level of every MQTT topic root.")
    enterprise: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")] = Field(
        description="The platform's enterprise code (统一社会信用代码 or the county's code)."
    )
    name: str = Field("", description="Human-readable site name, shown in the CLI only.")


class TlsConfig(Model):
    ca: Path | None = Field(None, description="CA certificate file (PEM); the system store when omitted.")
    cert: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    insecure: bool = Field(False, description="Skip server hostname verification (testing only).")


class BatchConfig(Model):
    max_readings: int = Field(
        500, ge=1, le=5000, description="Readings per `data` message; a full batch is stored at once."
    )
    max_delay: Duration = Field(
        1.0, le=60, description="Longest a reading waits in memory for its batch to fill before it is stored."
    )


class UplinkConfig(Model):
    host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host of the county platform.")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port (8883 is usual with TLS).")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")] = Field(
        "edge", description="First topic level(s): topics are {prefix}/{enterprise}/{agent}/..."
    )
    client_id: str | None = Field(None, description="MQTT client id; default {enterprise}-{agent}.")
    username: str | None = Field(None, description="MQTT user name.")
    password: Secret | None = Field(None, description="MQTT password (better: `password_file`).")
    password_file: SecretFile | None = Field(
        None,
        description="File holding the MQTT password (its final line break dropped), read at each connection, so "
        "the configuration needs no secret; e.g. ${CREDENTIALS_DIRECTORY}/mqtt-password with systemd's "
        "LoadCredential=. Not with `password`.",
    )
    tls: TlsConfig | None = Field(None, description="TLS settings; plain TCP when omitted.")
    max_incoming_bytes: int = Field(
        1_048_576, ge=65_536, le=64 * 1_048_576,
        description="Largest message the agent takes from the broker; larger ones are dropped before they are read "
        "as JSON. With MQTT 5 the broker is told (Maximum Packet Size) and never sends more; with 3.1.1 set the "
        "broker's own limit (mosquitto: message_size_limit) to the same value.",
    )
    keepalive: Duration = Field(30.0, ge=5, le=3600, description="MQTT keepalive interval.")
    inflight: int = Field(
        100,
        ge=1,
        le=10000,
        description="Messages published but not yet acknowledged (PUBACK). When full the uplink stops "
        "reading from the store until acknowledgements arrive (backpressure).",
    )
    reconnect_min: Duration = Field(1.0, gt=0, description="First reconnect delay; doubles on each failure.")
    reconnect_max: Duration = Field(60.0, gt=0, description="Cap of the reconnect delay.")
    connect_timeout: Duration = Field(10.0, gt=0, description="Longest wait for CONNACK.")
    health_interval: Duration = Field(60.0, ge=1, description="Period of `health` messages.")
    backlog_rate: int = Field(
        50000,
        ge=100,
        description="Most readings per second replayed from the backlog (hist) beside live data.",
    )
    batch: BatchConfig = Field(default_factory=BatchConfig)
    encoding: Literal["json", "compact"] = Field(
        "json",
        description="Encoding of `data` messages, chosen by the platform: `json` (contract version 1, readings by "
        "point id, about 70 bytes a reading) or `compact` (version 2, values by position in a point map published "
        "retained on `map/{id}`, about 10 bytes a reading; docs/protocol.md). Messages stored before a change are "
        "sent as they were stored.",
    )
    compress: bool = Field(
        False,
        description="With `encoding: compact`: zlib-compress each published `data` and `map` payload (the platform "
        "tells it from JSON by its first byte, never `{`). About a third of the bytes again, for some CPU.",
    )

    @model_validator(mode="after")
    def _compress_compact(self) -> UplinkConfig:
        if self.compress and self.encoding != "compact":
            raise ValueError("compress goes with encoding: compact (a version 1 platform reads JSON only)")
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> UplinkConfig:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be below reconnect_min")
        return self

    @model_validator(mode="after")
    def _one_password(self) -> UplinkConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password is given but username is not")
        return self


class StoreConfig(Model):
    """Where messages wait for the platform and readings are kept; every bound says what happens when full."""

    path: Path = Field(
        Path("/var/lib/edge-agent/store.db"),
        description="SQLite file of the store; relative paths are taken from the config file's folder.",
    )
    max_mb: float = Field(
        20480, gt=0,
        description="Disk cap of the store. When reached, the oldest delivered history is dropped first, then "
        "the oldest undelivered telemetry (evicted: counted in `health`); alarm events never are.",
    )
    min_free_mb: float = Field(
        512, ge=0, description="Free disk to leave on the store's file system; below it, dropping as for max_mb."
    )
    retention: Duration = Field(
        30 * 86400.0, ge=3600,
        description="How long readings and alarm events are kept on site (national rule: at least 30 days).",
    )
    sync_interval: Duration = Field(
        1.0, gt=0, le=60,
        description="Telemetry is synced to disk at least this often: a power loss costs at most this much of it. "
        "Alarm events are synced as they are stored.",
    )
    archive_interval: Duration = Field(
        60.0, ge=1, le=3600,
        description="Readings are written to the history archive in chunks this long (longer: smaller on disk).",
    )
    memory_fallback: bool = Field(
        False,
        description="When the store's file cannot be opened or created at start (a folder the service user cannot "
        "write, a read-only disk): false (the default) stops the start with the reason; true runs on with the "
        "store in memory, reported in `health.store.memory_only`, losing what is not delivered at the next stop.",
    )
    shutdown_drain: Duration = Field(
        3.0, le=60, description="On a clean stop, how long to keep publishing what is stored before exit."
    )


class ZoneConfig(Model):
    """A hazardous zone watched for crowding (人员聚集)."""

    id: Identifier = Field(description="Zone id, carried in `crowding` events.")
    name: str = Field("", description="Zone name, e.g. 罐区.")
    head_count: Identifier = Field(description="Point giving the number of people in the zone.")
    limit: int = Field(ge=0, description="Most people allowed in the zone at once.")
    color: Literal["red", "orange", "yellow", "blue"] = Field(description="Risk colour of the zone (红橙黄蓝).")
    duration: Duration = Field(
        60.0, ge=0, le=3600,
        description="Head count above the limit this long raises `crowding` (the ministry's guide: over one minute).",
    )


class MeterConfig(Model):
    """An electricity meter watched for production during an ordered shutdown, and for daily energy."""

    id: Identifier = Field(description="Meter id.")
    active_power: Identifier = Field(description="Point of total active power, kW.")
    total_energy: Identifier | None = Field(None, description="Point of the total forward active energy, kWh.")
    idle_kw: float = Field(ge=0, description="Idle baseline: while halted, more than this is production.")
    delay: Duration = Field(900.0, ge=0, le=86400, description="Power above idle this long while halted raises "
                            "`halt_violation`.")
    daily_energy: Identifier | None = Field(
        None, description="Id of the derived point that carries today's energy (kWh), computed from total_energy."
    )
    rollover: float = Field(1_000_000.0, gt=0, description="Where the energy register wraps (XXXXXX.XX: 1,000,000).")


class PowerConfig(Model):
    meters: list[MeterConfig] = Field(default_factory=list)


class ControlConfig(Model):
    socket: Path = Field(
        Path("/run/edge-agent/control.sock"),
        description="Unix socket of the local CLI (`edge-agent alarms ...`); relative to the config file's folder.",
    )
    command_max_age: Duration = Field(
        600.0, ge=10, le=86400,
        description="A platform command whose `ts` is older than this, or this far ahead of the agent's clock, "
        "is refused (answered with an error, not executed): a replay or a command stuck in a queue.",
    )


def _platform_key(text: str) -> str:
    try:
        parse_public_key(text)
    except ValueError as exc:
        raise ValueError(f"{exc}: a platform key is its raw 32 bytes in base64url, unpadded (43 characters, "
                         "as `edge-agent keys show` prints the agent's)") from None
    return text


PlatformKey = Annotated[
    str,
    AfterValidator(_platform_key),
    WithJsonSchema({"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$",
                    "description": "An Ed25519 public key: base64url of its raw 32 bytes, unpadded."}),
]


def _distinct_keys(keys: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise ValueError(f"keys[{i}] is the same key as keys[{seen[key]}]")
        seen[key] = i
    return keys


class RemoteConfig(Model):
    """What the platform may send from afar (signed commands, signed configurations) and the keys it signs with
    (docs/protocol.md, Signatures)."""

    keys: Annotated[list[PlatformKey], AfterValidator(_distinct_keys)] = Field(
        default_factory=list, max_length=16,
        description="The platform's Ed25519 public keys the agent trusts (base64url of the raw 32 bytes). A signature "
        "names its key by id (the first 16 hex digits of SHA-256 over the 32 bytes), so during a key change list "
        "the old and the new key, and remove the old one once the platform signs with the new.",
    )
    allow_unsigned: bool = Field(
        False,
        description="Take a configuration from the platform (config/set) that carries no signature. A signature "
        "that is present is checked all the same. For a test bench only: anyone who can publish on the broker "
        "could then reconfigure the agent.",
    )
    require_signed_cmd: bool = Field(
        False,
        description="Refuse a platform command (`cmd`) that carries no signature. A signature that is present is "
        "always checked, this or not. Commands from the local control socket never need one.",
    )
    confirm_within: Duration = Field(
        120.0, ge=10, le=3600,
        description="A configuration applied from the platform runs on trial: unless the agent reaches the "
        "platform again within this time, it rolls back to the previous revision.",
    )
    keep_revisions: int = Field(
        10, ge=1, le=100, description="Configuration revisions from the platform kept on disk, to roll back to."
    )

    @model_validator(mode="after")
    def _keys_for_signed_commands(self) -> RemoteConfig:
        if self.require_signed_cmd and not self.keys:
            raise ValueError("require_signed_cmd needs at least one key in keys: no command could be taken")
        return self


if TYPE_CHECKING:
    ChannelConfig = ChannelBase
else:
    from agent.drivers import registry as _registry

    _models = tuple(d.channel_model for d in _registry.all_drivers())
    ChannelConfig = Annotated[
        Union[_models] if len(_models) > 1 else _models[0],  # noqa: UP007
        Field(discriminator="driver"),
    ]


class AgentConfig(Model):
    """The whole configuration file."""

    agent: AgentIdentity
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    channels: list[ChannelConfig] = Field(default_factory=list, description="Field connections.")
    zones: list[ZoneConfig] = Field(default_factory=list, description="Zones watched for crowding.")
    power: PowerConfig = Field(default_factory=PowerConfig, description="Meters watched during an ordered shutdown.")
    control: ControlConfig = Field(default_factory=ControlConfig, description="The local control socket.")
    remote_config: RemoteConfig = Field(
        default_factory=RemoteConfig, description="Signed commands and configurations from the platform: its keys."
    )
    version: str = Field("local", max_length=64, description="Configuration version, a free label reported in "
                         "`status` (`config_version`); the order of configurations is `revision`'s.")
    revision: int = Field(
        0, ge=0, le=2**53 - 1,
        description="The configuration's revision: an integer that grows with every change. A push from the platform "
        "(`config/set`) carries it and must be above the active one. The bootstrap file's own revision decides, at "
        "start and on SIGHUP, whether the file replaces a revision taken from the platform: only a higher one does "
        "(`edge-agent config show` tells which is active and why).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")

    @model_validator(mode="after")
    def _unique_ids(self) -> AgentConfig:
        errors: list[str] = []
        seen_channels: set[str] = set()
        seen_points: dict[str, tuple[int, int, int]] = {}  # where each id is first, said only for a duplicate
        for ci, channel in enumerate(self.channels):
            if channel.id in seen_channels:
                errors.append(f"channels[{ci}].id: duplicate channel id {channel.id!r}")
            seen_channels.add(channel.id)
            seen_devices: set[str] = set()
            for di, device in enumerate(getattr(channel, "devices", [])):
                if device.id in seen_devices:
                    errors.append(f"channels[{ci}].devices[{di}].id: duplicate device id {device.id!r}")
                seen_devices.add(device.id)
                for pi, point in enumerate(device.points):
                    here = (ci, di, pi)
                    first = seen_points.setdefault(point.id, here)
                    if first is not here:
                        c0, d0, p0 = first
                        errors.append(f"channels[{ci}].devices[{di}].points[{pi}].id: duplicate point id {point.id!r} "
                                      f"(also at channels[{c0}].devices[{d0}].points[{p0}].id)")
        for ci, channel in enumerate(self.channels):
            for di, device in enumerate(getattr(channel, "devices", [])):
                for pi, point in enumerate(device.points):
                    if point.fault_of is not None and point.fault_of not in seen_points:
                        errors.append(f"channels[{ci}].devices[{di}].points[{pi}].fault_of: no point "
                                      f"{point.fault_of!r} in the configuration")
        for zi, zone in enumerate(self.zones):
            if zone.head_count not in seen_points:
                errors.append(f"zones[{zi}].head_count: no point {zone.head_count!r} in the configuration")
        for mi, meter in enumerate(self.power.meters):
            for field in ("active_power", "total_energy"):
                ref = getattr(meter, field)
                if ref is not None and ref not in seen_points:
                    errors.append(f"power.meters[{mi}].{field}: no point {ref!r} in the configuration")
            if meter.daily_energy is not None:
                if meter.daily_energy in seen_points:
                    errors.append(f"power.meters[{mi}].daily_energy: {meter.daily_energy!r} is already a point")
                if meter.total_energy is None:
                    errors.append(f"power.meters[{mi}].daily_energy: needs total_energy to compute from")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def each_point(self) -> Iterator[PointBase]:
        """Every point, in file order, one at a time: a running agent's points are packed (agent.config.packed)
        and each is rebuilt when asked for, so a walk over all of them must not hold them all at once."""
        for channel in self.channels:
            for device in getattr(channel, "devices", []):
                yield from device.points

    def points(self) -> list[tuple[ChannelBase, DeviceBase, PointBase]]:
        """Every point with its channel and device, in file order."""
        out: list[tuple[ChannelBase, DeviceBase, PointBase]] = []
        for channel in self.channels:
            for device in getattr(channel, "devices", []):
                for point in device.points:
                    out.append((channel, device, point))
        return out
