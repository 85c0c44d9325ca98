"""A peer that floods a link cannot grow the agent's memory: every link keeps a few frames of unread input at
most, drops the oldest excess and counts it. A real flooding process on a loopback socket and a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import psutil
import pytest
from conftest import free_port
from test_modbus_rtu import gas_device, site

from agent.drivers.links import MAX_UNREAD, SerialLink, TcpLink
from agent.drivers.modbus.rtu import ModbusRtuTcpDriver

FLOOD = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1)
conn, _ = srv.accept()
junk = bytes(range(256)) * 256
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    conn.sendall(junk)
"""

FLOOD_SECONDS = 3.0


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 1e6


@pytest.mark.timeout(60)
def test_a_flooding_rtu_over_tcp_peer_keeps_memory_flat_and_is_counted() -> None:
    port = free_port()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(FLOOD_SECONDS)])
    try:
        wait_port_listening(port)

        async def main() -> tuple[float, float, int, int, list[str]]:
            link = TcpLink("127.0.0.1", port, 2.0)
            await link.open()
            before = rss_mb()
            peak = before
            deadline = time.monotonic() + FLOOD_SECONDS + 1
            while time.monotonic() < deadline:  # the agent does not read: the worst case for its buffer
                await asyncio.sleep(0.05)
                peak = max(peak, rss_mb())
            kept = len(link.peek())
            await link.close()
            return before, peak, kept, link.overflowed, []

        before, peak, kept, overflowed, _ = asyncio.run(main())
    finally:
        flood.kill()
        flood.wait(5)
    assert peak - before < 20, f"RSS grew from {before:.0f} to {peak:.0f} MB under a flood"
    assert kept <= MAX_UNREAD
    assert overflowed > 50_000_000, f"the peer sent {overflowed} bytes: not a flood, the test proves nothing"


@pytest.mark.timeout(60)
def test_a_flooding_peer_does_not_stop_the_driver_or_the_loop(tmp_path: Any) -> None:
    port = free_port()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(FLOOD_SECONDS)])
    config = site({"id": "nport", "driver": "modbus_rtu_tcp", "host": "127.0.0.1", "port": port,
                   "devices": [gas_device(1, timeout=0.3)]})
    try:
        wait_port_listening(port)

        async def main() -> tuple[int, list[str], float]:
            channel = config.channels[0]
            driver = ModbusRtuTcpDriver(channel)  # type: ignore[arg-type]
            errors: list[str] = []
            polls = 0
            before = rss_mb()
            peak = before
            try:
                end = time.monotonic() + FLOOD_SECONDS
                while time.monotonic() < end:
                    read = await driver.read(channel.devices[0])  # type: ignore[attr-defined]
                    errors.extend(read.errors)
                    polls += 1
                    peak = max(peak, rss_mb())
            finally:
                await driver.close()
            return polls, errors, peak - before

        polls, errors, growth = asyncio.run(main())
    finally:
        flood.kill()
        flood.wait(5)
    assert polls >= 3, "each poll ends (bad readings), none hangs"
    assert errors, "garbage is never taken for a reply"
    assert growth < 20, f"RSS grew {growth:.0f} MB"


def unread(fd: int) -> int:
    """Bytes waiting in a terminal's input queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def wait_port_listening(port: int) -> None:
    """Wait for the flooder's socket without connecting to it (it accepts one connection only)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.timeout(30)
def test_a_serial_line_full_of_noise_keeps_a_bounded_buffer() -> None:
    master, slave = pty.openpty()
    name = os.ttyname(slave)

    async def main() -> tuple[int, int]:
        link = SerialLink(name, baudrate=115200)
        await link.open()
        junk = bytes(range(256)) * 16
        try:
            os.set_blocking(master, False)  # a full pty must not block the loop the link reads on
            written = 0
            while written < 1_600_000:  # the agent reads nothing meanwhile; its reader callback takes it all in
                with contextlib.suppress(BlockingIOError):
                    written += os.write(master, junk)
                await asyncio.sleep(0)
            for _ in range(500):  # until the link has taken in all the noise the pty holds, at most 5 s
                if unread(slave) == 0:
                    break
                await asyncio.sleep(0.01)
            assert unread(slave) == 0, f"the link left {unread(slave)} bytes of noise in the pty"
            return len(link.peek()), link.overflowed
        finally:
            await link.close()

    try:
        kept, overflowed = asyncio.run(main())
    finally:
        os.close(master)
        os.close(slave)
    assert kept <= MAX_UNREAD
    assert overflowed > 0
