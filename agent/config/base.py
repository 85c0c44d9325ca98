"""Base config models shared by every driver: durations, identifiers, limits, points, devices, channels.

Driver modules subclass these for their own options; this module imports no driver and opens nothing but a
secret file, when a connection asks for it (`read_secret`), never while a configuration is validated.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Accept 1.5, "500ms", "5s", "2m", "1h", "30d" and return seconds; other input goes to pydantic."""
    if type(value) is float:  # the usual case, first
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ValueError("a duration must be a finite number of seconds") from None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration (use a number of seconds or e.g. 500ms, 5s, 2m, 1h)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Identifier = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"),
]

Domain = Literal["hazard", "gas", "personnel", "power"]


def _secret_text(value: Any) -> Any:
    if not isinstance(value, str):  # never quoted: the value is the secret
        raise ValueError("a password is text: write it in quotes (unquoted, YAML may read it as a number or a "
                         "date, and 0123 as 83)")
    return value


class Secret(str):
    """A password from the configuration: its repr (a model printed in a log) never shows it, and validation
    errors never quote it (agent.config.loader)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'**********'"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(
            _secret_text, core_schema.no_info_after_validator_function(cls, core_schema.str_schema())
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        out.update(format="password", writeOnly=True)
        return out


CREDENTIALS = "${CREDENTIALS_DIRECTORY}"
"""The one variable a secret file's path may start with: the folder of systemd's LoadCredential= files."""

MAX_SECRET_BYTES = 65_536


def _credential_path(value: Path) -> Path:
    text = str(value)
    rest = text[len(CREDENTIALS):] if text.startswith(CREDENTIALS + "/") else text
    if "$" in rest:
        raise ValueError(f"the only variable a secret file's path may use is {CREDENTIALS}, at its start "
                         "(systemd's LoadCredential=)")
    return value


SecretFile = Annotated[Path, AfterValidator(_credential_path)]
"""A file holding a secret, read when a connection is made (`read_secret`); relative to the config's folder."""


def secret_path(path: Path) -> Path:
    """The file a secret file's path names in this process: ${CREDENTIALS_DIRECTORY} expanded, or OSError."""
    text = str(path)
    if not text.startswith(CREDENTIALS + "/"):
        return path
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise OSError(f"{text}: CREDENTIALS_DIRECTORY is not set (systemd sets it for a service with "
                      "LoadCredential=)")
    return Path(folder) / text[len(CREDENTIALS) + 1:]


def read_secret(path: Path) -> Secret:
    """The secret a file holds, less its final line break; OSError naming the file and what is wrong with it,
    never its content. Never blocks (a FIFO is refused) and reads at most MAX_SECRET_BYTES."""
    where = secret_path(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(f"{where}: {exc.strerror or type(exc).__name__}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        data = b""
        while regular and len(data) <= MAX_SECRET_BYTES and (chunk := os.read(fd, MAX_SECRET_BYTES + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise OSError(f"{where}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    if not regular:
        raise OSError(f"{where}: not a regular file")
    if len(data) > MAX_SECRET_BYTES:
        raise OSError(f"{where}: larger than {MAX_SECRET_BYTES} bytes, not a password")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(f"{where}: not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise OSError(f"{where}: empty")
    return Secret(text)


class Model(BaseModel):
    """Base of every config model: unknown keys are errors, so typos never pass silently; NaN and infinities
    are refused in every float (a limit of NaN never raises, a duration of inf never comes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)


class Limits(Model):
    """Four-level limits with hysteresis and an on-delay, all in the point's engineering unit."""

    high_high: float | None = Field(None, description="高高报: second-level high limit (raised at value >= limit).")
    high: float | None = Field(None, description="高报: first-level high limit (raised at value >= limit).")
    low: float | None = Field(None, description="低报: first-level low limit (raised at value <= limit).")
    low_low: float | None = Field(None, description="低低报: second-level low limit (raised at value <= limit).")
    deadband: float = Field(0.0, ge=0, description="Hysteresis: a high clears below limit - deadband.")
    delay: Duration = Field(0.0, le=3600, description="On-delay: the condition must hold this long to raise.")
    rate_rise: float | None = Field(
        None, gt=0, description="Raise `rate` when the value rises faster than this, in the point's unit per minute."
    )
    rate_fall: float | None = Field(
        None, gt=0, description="Raise `rate` when the value falls faster than this, in the point's unit per minute."
    )
    rate_window: Duration = Field(60.0, ge=1, le=3600, description="Time over which the rate of change is measured.")

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        below_name, below = "", None  # the highest level given so far, going up
        for name, value in (("low_low", self.low_low), ("low", self.low), ("high", self.high),
                            ("high_high", self.high_high)):
            if value is not None:
                if below is not None and below >= value:
                    raise ValueError(f"limits must rise low_low < low < high < high_high, but {below_name}={below} "
                                     f">= {name}={value}")
                below_name, below = name, value
        return self

    def any(self) -> bool:
        return not (self.high_high is None and self.high is None and self.low is None and self.low_low is None
                    and self.rate_rise is None and self.rate_fall is None)


def _kept(limits: Limits | None) -> dict[str, float]:
    """What a gas point's own `limits` say besides the set points: kept beside the standard's defaults."""
    if limits is None:
        return {}
    return {"deadband": limits.deadband, "delay": limits.delay, "rate_window": limits.rate_window}


class GasDetector(Model):
    """What a gas detector measures; it sets default limits and the checks of GB/T 50493-2019."""

    kind: Literal["combustible", "toxic", "oxygen"] = Field(
        description="combustible (%LEL), toxic (by its occupational exposure limit) or oxygen (%VOL)."
    )
    gas: str | None = Field(None, description="For toxic gas: which one (H2S, CO, NH3, Cl2, C6H6, ...).")


QualityRule = Literal["frozen", "spike", "range_end", "at_rest"]


class DataQuality(Model):
    """Data-quality rules of one point (docs/alarms.md, Data quality); a field left out takes its domain's default."""

    frozen_after: Duration | None = Field(
        None, gt=0, le=30 * 86400,
        description="僵值: the value not moving by more than `epsilon` this long makes its readings `uncertain` "
        "(reason `frozen`) and raises `data_quality` until it moves. Default 30 min (hazard, power), 1 h (gas); "
        "none for head counts, on/off points, energy counters and fault status points unless set here.",
    )
    epsilon: float | None = Field(
        None, ge=0,
        description="Resolution, in the point's unit: a change of at most this much is no movement. Default 0 "
        "(0.1 for an oxygen detector).",
    )
    at_rest: float | None = Field(
        None,
        description="The point's normal resting reading (a gas detector's 0 in clean air, an idle feeder's 0 kW): "
        "held within `epsilon` of it, the value is neither frozen nor stuck at a range end. Default 0 for gas and "
        "power points (20.9 for oxygen), none otherwise.",
    )
    max_step: float | None = Field(
        None, gt=0,
        description="A change larger than this (the point's unit) from one sample to the next that the next sample "
        "does not confirm is a spike: delivered `uncertain` (reason `spike`) and ignored by the alarm rules. "
        "Default: max_step_percent of the range.",
    )
    max_step_percent: float | None = Field(
        None, gt=0, le=100,
        description="max_step as a percent of the measuring range (needs `range`). Default 50 when the point has a "
        "range; no spike rule without a range unless max_step is set.",
    )
    range_end_delay: Duration | None = Field(
        None, le=86400,
        description="At or beyond an end of the measuring range this long: readings `uncertain` (reason "
        "`range_end`) and `data_quality` raised until the value leaves the end. Default 60 s; needs `range`.",
    )
    disable: list[QualityRule] = Field(
        default_factory=list, max_length=4,
        description="Rules switched off for this point: frozen, spike, range_end; at_rest makes the resting value "
        "count like any other.",
    )

    @model_validator(mode="after")
    def _one_step(self) -> DataQuality:
        if self.max_step is not None and self.max_step_percent is not None:
            raise ValueError("give max_step or max_step_percent, not both")
        return self


class PointBase(Model):
    """What every point has, whatever the protocol."""

    id: Identifier = Field(description="Point id (位号), unique in the whole configuration.")
    name: str = Field("", description="Point name, e.g. 1#储罐液位.")
    unit: str = Field("", max_length=32, description="Engineering unit, e.g. m, °C, MPa, %LEL.")
    domain: Domain = Field("hazard", description="Which monitoring domain the point belongs to.")
    scale: float = Field(1.0, description="Engineering value = raw * scale + offset.")
    offset: float = Field(0.0, description="Engineering value = raw * scale + offset.")
    range: tuple[float, float] | None = Field(
        None, description="Measuring range [min, max]; a value outside it is reported `uncertain`."
    )
    limits: Limits | None = Field(None, description="Alarm limits; no alarms when omitted.")
    comm_loss: Duration | None = Field(
        None, description="Raise `comm_loss` after the point is bad this long; the device's value when omitted."
    )
    gas: GasDetector | None = Field(None, description="The point is a gas detector's concentration.")
    latch: bool | None = Field(
        None, description="Alarms stay raised until reset by hand (default: yes for gas detectors, no otherwise)."
    )
    fault_of: str | None = Field(
        None, description="This point is the fault status of that detector point: non-zero raises `fault` on it."
    )
    quality: DataQuality | None = Field(
        None, description="Data-quality rules (frozen value, spike, stuck at a range end); domain defaults if omitted."
    )

    @model_validator(mode="after")
    def _range_ordered(self) -> PointBase:
        if self.range is not None and self.range[0] >= self.range[1]:
            raise ValueError(f"range must be [min, max] with min < max, got {list(self.range)}")
        return self

    @model_validator(mode="after")
    def _quality_fits(self) -> PointBase:
        quality = self.quality
        if quality is None:
            return self
        if quality.max_step_percent is not None and self.range is None:
            raise ValueError("quality.max_step_percent is a share of the measuring range: the point needs `range`")
        if quality.range_end_delay is not None and self.range is None:
            raise ValueError("quality.range_end_delay: the point has no `range` to reach the end of")
        if getattr(self, "type", None) == "bool" and (quality.max_step is not None or
                                                      quality.max_step_percent is not None):
            raise ValueError("quality.max_step: an on/off point has no jumps to judge")
        step = quality.max_step
        if step is None and quality.max_step_percent is not None and self.range is not None:
            step = (self.range[1] - self.range[0]) * quality.max_step_percent / 100
        if step is not None and quality.epsilon is not None and quality.epsilon >= step:
            raise ValueError(f"quality.epsilon {quality.epsilon:g} must be below the largest step {step:g}: a "
                             "movement cannot be larger than a jump")
        return self

    @model_validator(mode="after")
    def _gas_rules(self) -> PointBase:
        if self.gas is None:
            return self
        import agent.rules.gas as standards

        limits = self.limits
        if limits is None or not limits.any():
            kind = self.gas.kind
            if kind == "combustible":
                first, second = standards.combustible_set_points()
                limits = Limits(high=first, high_high=second, **_kept(limits))
            elif kind == "toxic":
                if self.gas.gas is None:
                    raise ValueError("a toxic gas detector needs `gas` (e.g. H2S) to take its default limits")
                first, second = standards.toxic_set_points(self.gas.gas, self.unit)
                limits = Limits(high=first, high_high=second, **_kept(limits))
            else:
                low, high = standards.oxygen_set_points()
                limits = Limits(low=low, high=high, **_kept(limits))
        if self.gas.kind == "oxygen":
            problems = standards.check_gas_limits("oxygen", limits.low, limits.high, self.unit, limits.delay)
        else:
            problems = standards.check_gas_limits(self.gas.kind, limits.high, limits.high_high, self.unit,
                                                  limits.delay, self.gas.gas)
        if problems:
            raise ValueError("; ".join(problems))
        return self.model_copy(update={"limits": limits}) if limits is not self.limits else self

    def latches(self) -> bool:
        return self.latch if self.latch is not None else self.gas is not None


class DeviceBase(Model):
    """What every device has: its id, poll interval and failure handling."""

    id: Identifier = Field(description="Device id, unique within its channel.")
    interval: Duration = Field(1.0, ge=0.05, le=86400, description="Poll interval.")
    timeout: Duration = Field(1.0, gt=0, le=60, description="Longest wait for one reply.")
    retries: int = Field(1, ge=0, le=10, description="Extra attempts of a failed request within one poll.")
    backoff_max: Duration = Field(
        30.0, gt=0, description="A failing device is polled less often, doubling up to this interval."
    )
    comm_loss: Duration = Field(30.0, ge=0, description="Raise `comm_loss` after a point is bad this long.")
    max_clock_skew: Duration = Field(
        300.0, ge=1, le=86400,
        description="A sample time the device gives (e.g. an OPC UA source timestamp) further than this from the "
        "agent's clock, ahead or behind, is not trusted: the reading takes the agent's time and is `uncertain`, "
        "the device's count of untrusted timestamps rises (health report) and the device is logged once, and "
        "again when its timestamps are trusted again. No effect on devices that give no timestamps.",
    )


class ChannelBase(Model):
    """What every channel has: an id and the driver that speaks its protocol."""

    id: Identifier = Field(description="Channel id, unique in the configuration.")
    driver: str = Field(description="Protocol driver name.")
    enabled: bool = Field(True, description="A disabled channel is not opened.")
