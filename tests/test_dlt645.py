"""DL/T 645-2007: the driver's codec against frames computed by hand from the standard, the simulator's separate
codec against the same frames, and the driver reading the simulated meters over real pseudo-terminals (every
data identifier, noisy and malformed replies, a dead meter on a shared bus, the adapter pulled and plugged back).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import tty
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config.loader import parse_config, validate_config_data
from agent.config.models import AgentConfig
from agent.core import BAD, GOOD, ReadingBatch
from agent.drivers.dlt645 import codec
from agent.drivers.dlt645.codec import DataFormat, ErrorReply, FrameError, NoReply, split_frame
from agent.drivers.dlt645.driver import Dlt645Bus, Dlt645Channel, Dlt645Driver
from agent.errors import ConfigError
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from simulators import dlt645 as sim_codec
from simulators.dlt645 import Dlt645BusSimulator

ROOT = Path(__file__).resolve().parent.parent

# Worked by hand from the standard (68 A0..A5 68 C L DATA+33H CS 16; A0 = the address's lowest two digits; the DI
# low byte first; CS = sum from the first 68 through DATA, mod 256):
# read DI 00010000 from meter 123456789012: address 12 90 78 56 34 12, DI 00 00 01 00 +33H = 33 33 34 33,
#   68+12+90+78+56+34+12+68 = 286H; +11+04+33+33+34+33 = 368H -> CS 68 (a checksum that is itself 68H)
READ_ENERGY = bytes.fromhex("68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16")
# its reply for 1234.56 kWh: BCD 00 12 34 56 low byte first 56 34 12 00, +33H 89 67 45 33;
#   286H + 91 + 08 + CDH + 150H = 554H -> CS 54
ENERGY_REPLY = bytes.fromhex("68 12 90 78 56 34 12 68 91 08 33 33 34 33 89 67 45 33 54 16")
# meter 681668166816 has 68H and 16H in its address bytes: 16 68 16 68 16 68; read phase A voltage 02010100
#   (DI 00 01 01 02 +33H = 33 34 34 35): 68 + 3 x (16+68) + 68 = 24AH; +11+04+D0H = 32FH -> CS 2F
READ_VOLTAGE_68 = bytes.fromhex("68 16 68 16 68 16 68 68 11 04 33 34 34 35 2F 16")
# its reply 220.5 V: BCD 22 05, low byte first 05 22, +33H 38 55: 24AH + 91 + 06 + D0H + 38 + 55 = 43EH -> CS 3E
VOLTAGE_68_REPLY = bytes.fromhex("68 16 68 16 68 16 68 68 91 06 33 34 34 35 38 55 3E 16")
# total active power -55.1234 kW: BCD 55 12 34, sign in the top bit: D5 12 34, low byte first 34 12 D5,
#   +33H mod 256: 67 45 08 (D5H + 33H = 108H wraps); 286H + 91 + 07 + D1H (DI 33 33 36 35) + 67+45+08 -> CS A3
POWER_REPLY = bytes.fromhex("68 12 90 78 56 34 12 68 91 07 33 33 36 35 67 45 08 A3 16")
# error reply, error byte 02H (no data requested) +33H = 35: 286H + D1 + 01 + 35 = 38DH -> CS 8D
ERROR_REPLY = bytes.fromhex("68 12 90 78 56 34 12 68 D1 01 35 8D 16")
# read address: all-AA address, 13H, no data (CS DF); the reply carries the address as data +33H
READ_ADDRESS = bytes.fromhex("68 AA AA AA AA AA AA 68 13 00 DF 16")
ADDRESS_REPLY = bytes.fromhex("68 12 90 78 56 34 12 68 93 06 45 C3 AB 89 67 45 07 16")

REQUIRED = {
    "00010000": 1234.56, "02010100": 220.5, "02010200": 219.8, "02010300": 221.1,
    "02020100": 12.345, "02020200": -0.5, "02020300": 100.001, "02030000": -3.5021, "02060000": 0.875,
}


def frames_in(data: bytes) -> list[Any]:
    """Every frame `split_frame` finds in `data`, with the problems it reported, in order."""
    buffer = bytearray(data)
    found: list[Any] = []
    while True:
        scan = split_frame(buffer)
        del buffer[: scan.skip]
        if scan.frame is not None:
            found.append(scan.frame)
        elif scan.problem is not None:
            found.append(scan.problem)
        elif scan.missing:
            return found


# --- the codec -----------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_read_request_is_the_hand_computed_frame_with_0_to_4_wake_up_bytes() -> None:
    for preamble in range(5):
        assert codec.read_request("123456789012", 0x00010000, preamble) == b"\xfe" * preamble + READ_ENERGY
    assert codec.read_request("681668166816", 0x02010100) == READ_VOLTAGE_68
    assert codec.read_address_request() == READ_ADDRESS


@pytest.mark.timeout(10)
def test_the_simulators_own_codec_builds_the_same_frames() -> None:
    # the simulator shares no code with the driver's codec: both must agree with the hand-computed bytes
    assert sim_codec.frame(sim_codec.wire_address("123456789012"), 0x11, bytes([0, 0, 1, 0])) == READ_ENERGY
    assert sim_codec.frame(sim_codec.wire_address("123456789012"), 0x91,
                           bytes([0, 0, 1, 0]) + sim_codec.bcd(1234.56, 4, 2, False)) == ENERGY_REPLY
    assert sim_codec.frame(sim_codec.wire_address("681668166816"), 0x91,
                           bytes([0, 1, 1, 2]) + sim_codec.bcd(220.5, 2, 1, False)) == VOLTAGE_68_REPLY
    assert sim_codec.frame(sim_codec.wire_address("123456789012"), 0x91,
                           bytes([0, 0, 3, 2]) + sim_codec.bcd(-55.1234, 3, 4, True)) == POWER_REPLY
    assert sim_codec.frame(sim_codec.wire_address("123456789012"), 0xD1, b"\x02") == ERROR_REPLY
    reader = sim_codec.RequestReader()
    assert reader.feed(b"\xfe\xfe" + READ_ENERGY[:5]) == []
    (request,) = reader.feed(READ_ENERGY[5:])
    assert (request.address, request.control, request.payload, request.size) == (
        bytes.fromhex("12 90 78 56 34 12"), 0x11, bytes([0, 0, 1, 0]), 18)


@pytest.mark.timeout(10)
def test_a_reply_is_parsed_by_length_whatever_wake_up_bytes_precede_it() -> None:
    for preamble in range(5):
        (frame,) = frames_in(b"\xfe" * preamble + ENERGY_REPLY)
        assert (frame.address, frame.control, frame.raw) == ("123456789012", 0x91, ENERGY_REPLY)
        assert frame.data == bytes.fromhex("00 00 01 00 56 34 12 00")
        assert codec.decode_value(frame.data[4:], codec.KNOWN_DIS[0x00010000]) == 1234.56


@pytest.mark.timeout(10)
def test_an_address_holding_68_and_16_bytes_does_not_end_or_restart_a_frame() -> None:
    assert codec.address_field("681668166816") == bytes.fromhex("16 68 16 68 16 68")
    assert codec.address_text(bytes.fromhex("16 68 16 68 16 68")) == "681668166816"
    # two frames back to back: a reader that hunted for 16H would cut the first one at its second byte
    first, second = frames_in(VOLTAGE_68_REPLY + ENERGY_REPLY)
    assert first.address == "681668166816" and first.raw == VOLTAGE_68_REPLY
    assert codec.decode_value(first.data[4:], codec.KNOWN_DIS[0x02010100]) == 220.5
    assert second.raw == ENERGY_REPLY
    # a frame that is still arriving waits for the length it announced, even with 16H already in hand
    scan = split_frame(VOLTAGE_68_REPLY[:12])
    assert scan.frame is None and scan.problem is None and scan.missing == len(VOLTAGE_68_REPLY) - 12


@pytest.mark.timeout(10)
def test_the_sign_bit_and_the_33h_shift_wrap_around_256() -> None:
    (frame,) = frames_in(POWER_REPLY)
    assert frame.data[4:] == bytes.fromhex("34 12 D5")
    assert codec.decode_value(frame.data[4:], codec.KNOWN_DIS[0x02030000]) == -55.1234
    current = codec.KNOWN_DIS[0x02020100]
    assert codec.decode_value(bytes.fromhex("34 12 80"), current) == -1.234
    assert codec.decode_value(bytes.fromhex("34 12 00"), current) == 1.234
    assert codec.decode_value(bytes.fromhex("00 85"), codec.KNOWN_DIS[0x02060000]) == -0.5
    # unsigned formats have no sign bit: 8 in the top digit is a digit
    assert codec.decode_value(bytes.fromhex("00 00 00 80"), codec.KNOWN_DIS[0x00010000]) == 800000.0
    assert sim_codec.bcd(-1.234, 3, 3, True) == bytes.fromhex("34 12 80")
    assert sim_codec.bcd(-0.5, 2, 3, True) == bytes.fromhex("00 85")
    with pytest.raises(ValueError, match="not BCD"):
        codec.decode_value(bytes.fromhex("3A 12 00 00"), codec.KNOWN_DIS[0x00010000])
    with pytest.raises(ValueError, match="3 data bytes"):
        codec.decode_value(bytes.fromhex("34 12 00"), codec.KNOWN_DIS[0x00010000])


@pytest.mark.timeout(10)
def test_checksum_and_end_byte_errors_are_reported_and_the_next_frame_is_still_found() -> None:
    bad_sum = ENERGY_REPLY[:-2] + b"\x55\x16"
    bad_end = ENERGY_REPLY[:-1] + b"\x17"
    problem, frame = frames_in(bad_sum + ENERGY_REPLY)
    assert "checksum 55 but the bytes sum to 54" in problem and frame.raw == ENERGY_REPLY
    problem, frame = frames_in(bad_end + ENERGY_REPLY)
    assert "not 16" in problem and frame.raw == ENERGY_REPLY


@pytest.mark.timeout(10)
def test_noise_with_68_and_16_before_the_preamble_is_skipped() -> None:
    # 68H at 1 and 8 make a frame head whose length byte (FEH) is impossible; 68H at 4 and 11 one that claims
    # 104 bytes: neither may swallow the real frame that follows
    noise = bytes.fromhex("00 68 16 ff 68 55 aa 16 68 e5 fe 68 16 68 16")
    (frame,) = frames_in(noise + b"\xfe\xfe" + ENERGY_REPLY)
    assert frame.raw == ENERGY_REPLY
    (frame,) = frames_in(sim_codec.NOISE + b"\xfe" + VOLTAGE_68_REPLY)
    assert frame.raw == VOLTAGE_68_REPLY


@pytest.mark.timeout(10)
def test_an_error_reply_names_its_error_bits() -> None:
    (frame,) = frames_in(ERROR_REPLY)
    assert frame.control == 0xD1 and frame.data == b"\x02"
    assert ErrorReply(0x02).reasons == ["no data requested"]
    assert ErrorReply(0x7F).reasons == [
        "other error", "no data requested", "password error or unauthorised", "communication rate cannot be changed",
        "year time zone count exceeded", "day time period count exceeded", "rate count exceeded"]
    assert "0x05: other error, password error or unauthorised" in str(ErrorReply(0x05))


@pytest.mark.timeout(10)
def test_a_read_address_reply_carries_the_address_as_data() -> None:
    (frame,) = frames_in(b"\xfe\xfe\xfe\xfe" + ADDRESS_REPLY)
    assert frame.control == 0x93 and codec.address_text(frame.data) == "123456789012"
    assert sim_codec.frame(sim_codec.wire_address("123456789012"), 0x93,
                           sim_codec.wire_address("123456789012")) == ADDRESS_REPLY


# --- configuration --------------------------------------------------------------------------------------


def site(*channels: dict[str, Any]) -> AgentConfig:
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": list(channels)},
                                source="test", base_dir=None)


def meter(device_id: str, address: str, dis: Any, **options: Any) -> dict[str, Any]:
    points = [{"id": f"{device_id}-{di}", "di": di} for di in dis]
    return {"id": device_id, "address": address, "timeout": 0.6, "points": points, **options}


def bus_channel(*devices: dict[str, Any], **options: Any) -> dict[str, Any]:
    # a higher speed and a short response delay keep tests fast where timing is not the point
    return {"id": "bus", "driver": "dlt645", "port": "/dev/null", "baudrate": 19200, "devices": list(devices),
            **options}


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.errors


@pytest.mark.timeout(10)
def test_configuration_checks_addresses_identifiers_and_formats() -> None:
    head = "agent: {id: t, enterprise: e}\nchannels:\n- {id: b, driver: dlt645, port: /dev/ttyS1, devices: [%s]}\n"
    ok = parse_config(head % "{id: m, address: 123456789012, points: [{id: E, di: '00010000'}, "
                              "{id: X, di: 0400040e, format: {bytes: 3, decimals: 1, signed: true}}]}")
    channel = ok.channels[0]
    assert isinstance(channel, Dlt645Channel)
    assert (channel.baudrate, channel.parity, channel.bytesize, channel.stopbits, channel.preamble,
            channel.response_timeout) == (2400, "E", 8, 1, 4, 0.5)
    device = channel.devices[0]
    assert device.address == "123456789012"
    assert device.points[0].unit == "kWh"  # a known DI brings its unit
    assert device.points[1].di == "0400040E"
    assert device.points[1].data_format() == DataFormat(3, 1, True, "")
    assert "quotes" in config_errors(head % "{id: m, address: 000000000012, points: [{id: E, di: '00010000'}]}")[0]
    assert "12 decimal digits" in config_errors(head % "{id: m, address: '1234', points: [{id: E, di: '00010000'}]}")[0]
    assert "broadcast" in config_errors(head % "{id: m, address: '999999999999', points: [{id: E, di: '00010000'}]}")[0]
    assert "quotes" in config_errors(head % "{id: m, address: '000000000001', points: [{id: E, di: 00010000}]}")[0]
    assert "give its `format`" in config_errors(head % "{id: m, address: '000000000001', "
                                                       "points: [{id: E, di: '04000401'}]}")[0]
    assert "shorter than the channel's response_timeout" in config_errors(
        head % "{id: m, address: '000000000001', timeout: 0.2, points: [{id: E, di: '00010000'}]}")[0]


# --- over the wire --------------------------------------------------------------------------------------


@asynccontextmanager
async def simulated(config: AgentConfig, folder: Path, **options: Any) -> AsyncIterator[
        tuple[Dlt645BusSimulator, Dlt645Driver, Dlt645Channel]]:
    """The simulator on ptys in `folder` and a driver for its first channel, closed afterwards."""
    options.setdefault("response_delay", 0.02)
    async with Dlt645BusSimulator(config, folder=folder, seed=7, **options) as sim:
        channel = config.channels[0].model_copy(update=sim.channel_overrides()[config.channels[0].id])
        assert isinstance(channel, Dlt645Channel)
        driver = Dlt645Driver(channel)
        try:
            yield sim, driver, channel
        finally:
            await driver.close()


@pytest.mark.timeout(30)
def test_every_data_identifier_reads_back_what_the_meter_holds(tmp_path: Path) -> None:
    extras = ["00020000", "02030100", "02030200", "02030300", "02040000", "02060100", "02800002"]
    points = [{"id": di, "di": di} for di in [*REQUIRED, *extras]]
    points.append({"id": "const", "di": "0400040E", "format": {"bytes": 3, "decimals": 1, "signed": True}})
    points.append({"id": "watts", "di": "02030000", "scale": 1000, "unit": "W"})
    config = site(bus_channel({"id": "m1", "address": "681668166816", "timeout": 0.6, "points": points}))

    async def main() -> tuple[list[Any], list[str], dict[str, float]]:
        async with simulated(config, tmp_path) as (sim, driver, channel):
            for di, value in REQUIRED.items():
                sim.set_value(di, value)
            sim.set_value("const", -4321.5)
            read = await driver.read(channel.devices[0])
            served = {p.id: sim.value(p.id) for p in channel.devices[0].points}
        return read.values, read.errors, served

    values, errors, served = asyncio.run(main())
    assert errors == []
    by_id = dict(zip([p["id"] for p in points], values, strict=True))
    for di, value in REQUIRED.items():
        # energy keeps counting from what was set, at most a few Wh in a test's time
        assert by_id[di] == (pytest.approx(value, abs=0.02) if di == "00010000" else value), di
    for pid, value in by_id.items():
        if pid != "watts":
            assert value == pytest.approx(served[pid], abs=0.02), pid
    assert by_id["02010100"] == 220.5 and by_id["02020200"] == -0.5 and by_id["02030000"] == -3.5021
    assert by_id["const"] == -4321.5
    assert by_id["watts"] == -3.5021  # raw kW: the driver reports raw values, decode applies the scale
    assert 49.5 < by_id["02800002"] < 50.5


@pytest.mark.timeout(30)
def test_noisy_and_malformed_replies_are_rejected_and_the_bus_keeps_working(tmp_path: Path) -> None:
    config = site(bus_channel(meter("m1", "123456789012", ["02010100"], retries=0),
                              meter("m2", "681668166816", ["02010100"], retries=0)))
    expected = {
        "bad_checksum": "checksum",
        "truncated": "truncated reply",
        "wrong_address": "ignored a reply from meter 123456789012, not 681668166816",
        "error_reply": "error reply 0x04: password error or unauthorised",
        "drop": "no reply within",
    }

    async def main() -> dict[str, tuple[Any, list[str], Any]]:
        outcome: dict[str, tuple[Any, list[str], Any]] = {}
        async with simulated(config, tmp_path) as (sim, driver, channel):
            sim.set_value("m2-02010100", 231.7)
            m2 = channel.devices[1]
            for fault in ("garbage", *expected):
                sim.inject("bus", fault, error=0x04)
                spoiled = await driver.read(m2)
                after = await driver.read(m2)  # the very next read on the same bus works
                outcome[fault] = (spoiled.values[0], spoiled.errors, after.values[0])
        return outcome

    outcome = asyncio.run(main())
    assert outcome["garbage"] == (231.7, [], 231.7)
    for fault, words in expected.items():
        value, errors, after = outcome[fault]
        assert value is None and len(errors) == 1 and words in errors[0], (fault, errors)
        assert after == 231.7, fault


@pytest.mark.timeout(30)
def test_one_retry_absorbs_a_single_spoiled_reply(tmp_path: Path) -> None:
    config = site(bus_channel(meter("m1", "123456789012", ["02010100"], retries=1)))

    async def main() -> list[tuple[Any, list[str]]]:
        async with simulated(config, tmp_path) as (sim, driver, channel):
            sim.set_value("m1-02010100", 225.0)
            results = []
            for fault in ("bad_checksum", "truncated", "wrong_address", "drop"):
                sim.inject("bus", fault)
                read = await driver.read(channel.devices[0])
                results.append((read.values[0], read.errors))
        return results

    assert asyncio.run(main()) == [(225.0, [])] * 4


class Recorder:
    """Every batch the pipeline ingests, by device; `until` wakes on each."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.by_device: dict[str, list[ReadingBatch]] = collections.defaultdict(list)
        self.ingested = asyncio.Event()
        ingest = pipeline.ingest

        def record(batch: ReadingBatch) -> None:
            self.by_device[pipeline.table.points[batch.indices[0]].device].append(batch)
            ingest(batch)
            self.ingested.set()

        self.poller = Poller(pipeline.table, record)

    def count(self, device: str, quality: int) -> int:
        return sum(1 for b in self.by_device[device] if all(q == quality for q in b.qualities))

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self.ingested.clear()
                    await self.ingested.wait()
        except TimeoutError:
            raise AssertionError(f"{what} did not happen within {timeout}s") from None


@pytest.mark.timeout(60)
def test_meters_on_one_bus_are_polled_in_turn_and_a_dead_one_costs_the_others_nothing(tmp_path: Path) -> None:
    dis = ["00010000", "02010100", "02030000"]
    # short timeouts (the simulated meters answer in 20 ms) keep the dead meter's cost small
    config = site(bus_channel(*(meter(f"m{n}", f"00000000000{n}", dis, interval=0.3, backoff_max=0.6, timeout=0.3)
                                for n in (1, 2, 3, 4)), response_timeout=0.15))

    async def main() -> tuple[Recorder, list[Any]]:
        async with simulated(config, tmp_path) as (sim, _, channel):
            sim.set_meter_dead("bus", "m2", True)
            cfg = config.model_copy(update={"channels": [channel]})
            with Store(tmp_path / "store.db").open() as store:
                pipeline = Pipeline(cfg, store)
                recorder = Recorder(pipeline)
                task = asyncio.create_task(recorder.poller.run_channel(channel))
                asked_dead = lambda: sum(1 for r in sim.requests if r[2] == "000000000002")  # noqa: E731
                try:
                    await recorder.until(lambda: all(recorder.count(d, GOOD) >= 3 for d in ("m1", "m3", "m4"))
                                         and recorder.count("m2", BAD) >= 2 and asked_dead() >= 4,
                                         "three good polls of every live meter, the dead one asked twice")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            heard = list(sim.requests)
        return recorder, heard

    recorder, heard = asyncio.run(main())
    for device in ("m1", "m3", "m4"):
        assert all(q == GOOD for b in recorder.by_device[device] for q in b.qualities), device
    assert all(q == BAD for b in recorder.by_device["m2"] for q in b.qualities)
    slot = next(s for s in recorder.poller.devices if s.device.id == "m2")
    assert slot.state == "failing" and slot.last_error is not None and "no reply" in slot.last_error
    # the dead meter was asked its first DI only (the rest skipped), with one retry, and asked again later
    dead = [di for _, _, address, _, di in heard if address == "000000000002"]
    assert set(dead) == {"00010000"} and len(dead) >= 4
    # one transaction at a time: every live meter's three DIs follow each other in the order configured
    live = [(address, di) for _, _, address, _, di in heard if address != "000000000002"]
    for i in range(0, len(live) - 2, 3):
        window = live[i : i + 3]
        assert len({a for a, _ in window}) == 1 and [di for _, di in window] == dis, window


@pytest.mark.timeout(60)
def test_readings_resume_after_the_adapter_is_pulled_and_plugged_back(tmp_path: Path) -> None:
    config = site(bus_channel(meter("m1", "123456789012", ["02010100", "02030000"], interval=0.2,
                                    backoff_max=0.4)))

    async def main() -> tuple[Recorder, str, bool, bool]:
        async with simulated(config, tmp_path) as (sim, _, channel):
            sim.set_value("m1-02010100", 222.2)
            cfg = config.model_copy(update={"channels": [channel]})
            with Store(tmp_path / "store.db").open() as store:
                pipeline = Pipeline(cfg, store)
                recorder = Recorder(pipeline)
                task = asyncio.create_task(recorder.poller.run_channel(channel))
                try:
                    await recorder.until(lambda: recorder.count("m1", GOOD) >= 3, "first readings")
                    sim.set_channel_down("bus", True)
                    await recorder.until(lambda: recorder.count("m1", BAD) >= 3, "bad readings while unplugged")
                    error = recorder.poller.devices[0].last_error or ""
                    down = not recorder.poller.drivers["bus"].connected
                    sim.set_value("m1-02010100", 233.3)
                    sim.set_channel_down("bus", False)
                    await recorder.until(lambda: any(b.values[0] == 233.3 for b in recorder.by_device["m1"]),
                                "readings after re-plugging")
                    up = recorder.poller.drivers["bus"].connected
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        return recorder, error, down, up

    recorder, error, down, up = asyncio.run(main())
    assert down and up
    assert "serial port" in error, error
    assert recorder.by_device["m1"][-1].qualities == [GOOD, GOOD]


@pytest.mark.timeout(30)
def test_a_meter_answering_at_the_standards_500_ms_limit_is_read_and_a_later_one_times_out(
        tmp_path: Path) -> None:
    slow = site(bus_channel(meter("m1", "123456789012", ["02010100"], retries=0)))
    impatient = site(bus_channel(meter("m1", "123456789012", ["02010100"], retries=0),
                                 response_timeout=0.1, latency=0))

    async def read(config: AgentConfig, folder: Path) -> tuple[Any, list[str]]:
        async with simulated(config, folder) as (sim, driver, channel):
            sim.set_response_delay("bus", "m1", 0.5)
            sim.set_value("m1-02010100", 230.0)
            result = await driver.read(channel.devices[0])
        return result.values[0], result.errors

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert asyncio.run(read(slow, tmp_path / "a")) == (230.0, [])
    value, errors = asyncio.run(read(impatient, tmp_path / "b"))
    assert value is None and "no reply" in errors[0]
    with pytest.raises(ValueError, match="20-500 ms"):
        Dlt645BusSimulator(slow, folder=tmp_path, response_delay=0.6)


@pytest.mark.timeout(30)
def test_read_address_finds_the_only_meter_and_two_meters_garble_each_other(tmp_path: Path) -> None:
    one = site(bus_channel(meter("m1", "681668166816", ["00010000"])))
    two = site(bus_channel(meter("m1", "681668166816", ["00010000"]), meter("m2", "000000000001", ["00010000"])))

    async def discover(config: AgentConfig, folder: Path) -> Any:
        async with simulated(config, folder) as (_, _, channel):
            bus = Dlt645Bus(channel.port, baudrate=channel.baudrate)
            try:
                return codec.address_text((await bus.read_address(1.0)).payload)
            except (FrameError, NoReply) as exc:
                return exc
            finally:
                await bus.close()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert asyncio.run(discover(one, tmp_path / "a")) == "681668166816"
    assert isinstance(asyncio.run(discover(two, tmp_path / "b")), FrameError)


@pytest.mark.timeout(30)
def test_a_port_that_cannot_be_opened_is_a_connection_error_naming_it(tmp_path: Path) -> None:
    config = site(bus_channel(meter("m1", "123456789012", ["00010000"]), port=str(tmp_path / "ttyGone")))
    channel = config.channels[0]
    assert isinstance(channel, Dlt645Channel)

    async def main() -> None:
        driver = Dlt645Driver(channel)
        with pytest.raises(ConnectionError, match="ttyGone"):
            await driver.read(channel.devices[0])
        assert not driver.connected
        await driver.close()

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_echoes_late_replies_and_other_meters_are_skipped_until_the_matching_reply(tmp_path: Path) -> None:
    """A scripted far end (the hand-computed frames written to a raw pty) checks how a reply is matched."""
    energy_of_other_meter = bytes.fromhex("68 16 68 16 68 16 68 68 91 08 33 33 34 33 89 67 45 33") + b"\x00\x16"
    energy_of_other_meter = energy_of_other_meter[:-2] + bytes([sum(energy_of_other_meter[:-2]) % 256, 0x16])

    async def exchange(script: bytes) -> Any:
        master, slave = os.openpty()
        tty.setraw(slave)
        bus = Dlt645Bus(os.ttyname(slave), baudrate=19200, response_timeout=0.2, latency=0.0)
        loop = asyncio.get_running_loop()
        try:
            def answer() -> None:
                os.read(master, 100)
                # a two-wire adapter echoes the request; the reply follows after the meter's delay
                os.write(master, READ_ENERGY)
                loop.call_later(0.03, os.write, master, script)

            loop.add_reader(master, answer)
            try:
                return (await bus.read("123456789012", 0x00010000, 0.4)).payload
            except (NoReply, FrameError, ErrorReply) as exc:
                return exc
            finally:
                loop.remove_reader(master)
        finally:
            await bus.close()
            os.close(master)
            os.close(slave)

    async def main() -> list[Any]:
        return [
            await exchange(POWER_REPLY + ENERGY_REPLY),  # a late reply for another DI, then ours
            await exchange(energy_of_other_meter + b"\xfe\xfe" + ENERGY_REPLY),  # another meter first
            await exchange(POWER_REPLY),  # only the wrong DI
            await exchange(ERROR_REPLY),
            # the energy reply with D5 set (B1H: more frames follow): its checksum is 54H + 20H = 74H
            await exchange(bytes.fromhex("68 12 90 78 56 34 12 68 B1 08 33 33 34 33 89 67 45 33 74 16")),
        ]

    late, other, wrong_di, error, follow_up = asyncio.run(main())
    assert late == other == bytes.fromhex("56 34 12 00")
    assert isinstance(wrong_di, NoReply) and "ignored a reply for DI 02030000, not 00010000" in str(wrong_di)
    assert isinstance(error, ErrorReply) and error.reasons == ["no data requested"] and error.frame == ERROR_REPLY
    assert isinstance(follow_up, FrameError) and follow_up.kind == "follow_up"


# --- the simulator --------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_meter_values_are_plausible_and_energy_counts_the_power(tmp_path: Path) -> None:
    dis = ["00010000", "02010100", "02010200", "02010300", "02020100", "02030000", "02060000"]
    config = site(bus_channel(meter("m1", "123456789012", dis)))
    sim = Dlt645BusSimulator(config, folder=tmp_path, seed=3)
    for _ in range(50):
        sim.walk()
    for phase in ("02010100", "02010200", "02010300"):
        assert 210 < sim.value(f"m1-{phase}") < 230
    assert 0.85 < sim.value("m1-02060000") < 0.95
    sim.set_value("m1-02030000", 36.0)
    start = sim.value("m1-00010000")
    sim.walk(elapsed=3600.0)  # an hour at 36 kW
    assert sim.value("m1-00010000") == pytest.approx(start + 36.0, abs=0.02)
    # a phase current follows the power: a third of 36 kW at ~220 V and power factor ~0.9 is about 60 A
    assert 50 < sim.value("m1-02020100") < 70
    sim.release("m1-02030000")
    with pytest.raises(ValueError, match="no fault"):
        sim.inject("bus", "lightning")
    with pytest.raises(ValueError, match="no dlt645 channel"):
        sim.set_meter_dead("nope", "m1", True)


@pytest.mark.timeout(30)
def test_production_during_shutdown_rises_from_idle_to_production_and_falls_back(tmp_path: Path) -> None:
    config = site(bus_channel(meter("m1", "123456789012", ["02030000"])))

    async def main() -> list[float]:
        async with Dlt645BusSimulator(config, folder=tmp_path, speed=200.0, idle_kw=1.5,
                                      production_kw=60.0) as sim:
            assert sim.scenarios() == ["production_during_shutdown"]
            await sim.start_scenario("production_during_shutdown")
            return [value for _, _, value in sim.changes]

    powers = asyncio.run(main())
    peak = powers.index(max(powers))
    assert max(powers) == pytest.approx(60.0)
    assert min(powers[:peak]) == pytest.approx(1.5) and powers[-1] == pytest.approx(1.5)
    rising = powers[powers.index(1.5, 0, peak):peak + 1]
    assert rising == sorted(rising)


@pytest.mark.timeout(30)
def test_the_simulator_command_prints_one_path_per_channel_and_cleans_up(tmp_path: Path) -> None:
    config_file = tmp_path / "site.yaml"
    config_file.write_text(
        "agent: {id: t, enterprise: e}\nchannels:\n"
        "- {id: east, driver: dlt645, port: x, devices: [{id: m, address: '000000000001', "
        "points: [{id: E1, di: '00010000'}]}]}\n"
        "- {id: west, driver: dlt645, port: x, devices: [{id: m, address: '000000000002', "
        "points: [{id: E2, di: '00010000'}]}]}\n")
    folder = tmp_path / "ports"
    proc = subprocess.Popen([sys.executable, "-m", "simulators.dlt645", "--config", str(config_file),
                             "--folder", str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(2)]
        assert lines == [["serving", "east", str(folder / "ttyMeter-east")],
                         ["serving", "west", str(folder / "ttyMeter-west")]]
        assert (folder / "ttyMeter-east").resolve().exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not (folder / "ttyMeter-east").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# --- found by tests/test_fuzz_frames.py ------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", ["0000000 ", "-1234567", "+0000001", "0x123456", "1_234567", "١٢٣٤٥٦٧٨"])
def test_a_data_identifier_is_exactly_eight_hex_digits(text: str) -> None:
    # int(text, 16) takes spaces, signs, 0x, underscores and any script's digits; "-1234567" became a negative DI
    # that crashed the probe with OverflowError when the request was built
    with pytest.raises(ValueError, match="8 hex digits"):
        codec.parse_di(text)
    assert codec.parse_di("0400040e") == 0x0400040E


@pytest.mark.timeout(10)
def test_value_bytes_that_are_not_the_formats_bcd_are_a_protocol_error() -> None:
    # was a bare ValueError: now the codec's FrameError, and still a ValueError for the callers that catch that
    for data, fmt in ((b"", DataFormat(1, 0)), (b"\x0a", DataFormat(1, 0))):
        with pytest.raises(FrameError) as caught:
            codec.decode_value(data, fmt)
        assert isinstance(caught.value, ValueError) and caught.value.kind == "bad_value"
