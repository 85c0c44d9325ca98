"""RTU bus benchmark: the RTU simulator on a pseudo-terminal at a given speed, the agent's Modbus RTU driver polling
every slave back to back; prints the achieved poll cycle against the time the frames alone need on the wire.

    python -m bench.rtu [--baud 9600] [--slaves 4] [--points 20] [--duration 20] [--json]

The wire time of one transaction is (request bytes + reply bytes) x character time + two frame gaps (t3.5 after
the request, which the slave needs to see it ended, and t3.5 after the reply before the next request). A ratio
near 1 means the driver adds little to what the line itself costs. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.drivers.modbus.codec import plan_blocks
from agent.drivers.modbus.rtu import ModbusRtuChannel, ModbusRtuDriver
from simulators.modbus_rtu import RtuBusSimulator

_REQUEST_BYTES = 8  # address, function, start, count, CRC
_REPLY_OVERHEAD = 5  # address, function, byte count, CRC


def bus_config(*, baud: int, slaves: int, points: int, parity: str = "N") -> AgentConfig:
    """One RS-485 bus of `slaves` gas controllers (units 1..N), each `points` float32 detectors in %LEL."""
    if not 1 <= slaves <= 247 or points < 1:
        raise ValueError("slaves must be 1..247 and points at least 1")
    devices = [
        {"id": f"ctl{u}", "unit": u, "interval": 1, "timeout": 1, "retries": 0,
         "points": [{"id": f"GT-{u:03d}-{i:03d}", "address": 2 * i, "type": "float32", "domain": "gas",
                     "unit": "%LEL", "range": [0, 100]} for i in range(points)]}
        for u in range(1, slaves + 1)
    ]
    return validate_config_data({
        "agent": {"id": "bench-rtu", "enterprise": "000000000000"},
        "channels": [{"id": "rs485", "driver": "modbus_rtu", "port": "/dev/null", "baudrate": baud,
                      "parity": parity, "devices": devices}],
    }, source="<bench.rtu>", base_dir=None)


def wire_time(channel: ModbusRtuChannel) -> float:
    """Seconds one poll of every device needs on the line: its frames' characters and the gaps between them."""
    char, gap = channel.char_time(), channel.effective_frame_gap()
    total = 0.0
    for device in channel.devices:
        for block in plan_blocks(device):
            data = (block.count + 7) // 8 if block.function in (1, 2) else 2 * block.count
            total += (_REQUEST_BYTES + _REPLY_OVERHEAD + data) * char + 2 * gap
    return total


class _SimulatorThread:
    """The simulator on an event loop of its own, as a separate device would be."""

    def __init__(self, config: AgentConfig, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="rtu simulator")
        self.sim = RtuBusSimulator(config, folder=folder, seed=1)

    async def start(self) -> None:
        self.thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop))

    async def stop(self) -> None:
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


async def measure(*, baud: int = 9600, slaves: int = 4, points: int = 20, duration: float = 20.0,
                  parity: str = "N") -> dict[str, float]:
    """Poll every slave back to back for `duration` seconds; return the mean cycle, the wire time, their ratio."""
    config = bus_config(baud=baud, slaves=slaves, points=points, parity=parity)
    with tempfile.TemporaryDirectory(prefix="bench-rtu-") as folder:
        simulator = _SimulatorThread(config, Path(folder))
        await simulator.start()
        try:
            base = config.channels[0]
            channel = base.model_copy(update=simulator.sim.channel_overrides()[base.id])
            assert isinstance(channel, ModbusRtuChannel)
            driver = ModbusRtuDriver(channel)
            try:
                await _cycle(driver, channel)  # opens the port; not counted
                loop = asyncio.get_running_loop()
                began = loop.time()
                cycles = 0
                while cycles == 0 or loop.time() - began < duration:
                    await _cycle(driver, channel)
                    cycles += 1
                elapsed = loop.time() - began
            finally:
                await driver.close()
        finally:
            await simulator.stop()
    cycle = elapsed / cycles
    wire = wire_time(channel)
    return {"rtu_cycle_s": cycle, "rtu_wire_s": wire, "rtu_ratio": cycle / wire}


async def _cycle(driver: ModbusRtuDriver, channel: ModbusRtuChannel) -> None:
    for device in channel.devices:
        read = await driver.read(device)
        if read.errors:  # a cycle with failures would measure timeouts, not the bus
            raise RuntimeError(f"device {device.id}: {'; '.join(read.errors)}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baud", type=int, default=9600, help="line speed (bit/s)")
    parser.add_argument("--parity", choices=("N", "E", "O"), default="N", help="parity")
    parser.add_argument("--slaves", type=int, default=4, help="slaves on the bus")
    parser.add_argument("--points", type=int, default=20, help="float32 points per slave")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to poll")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        result: dict[str, Any] = asyncio.run(measure(baud=args.baud, slaves=args.slaves, points=args.points,
                                                     duration=args.duration, parity=args.parity))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"bench.rtu: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"RTU bus: {args.slaves} slaves x {args.points} float32 points at {args.baud} baud 8{args.parity}1, "
              f"polled back to back for {args.duration:g} s")
        print(f"  poll cycle achieved   {result['rtu_cycle_s'] * 1000:9.1f} ms")
        print(f"  time on the wire      {result['rtu_wire_s'] * 1000:9.1f} ms")
        print(f"  ratio                 {result['rtu_ratio']:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
