"""The serial link over a real pseudo-terminal pair: bytes both ways, deadlines, and a port that vanishes."""

from __future__ import annotations

import asyncio
import os
import tty

import pytest

from agent.drivers.links import SerialLink


def pty_pair() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    os.close(slave)  # the link opens the path itself
    return master, path


@pytest.mark.timeout(20)
def test_bytes_cross_both_ways_and_reads_wait_for_their_count() -> None:
    async def main() -> None:
        master, path = pty_pair()
        link = SerialLink(path, baudrate=9600, parity="E")
        await link.open()
        loop = asyncio.get_running_loop()
        try:
            await link.write(b"\x01\x03\x00\x00\x00\x02")
            assert os.read(master, 100) == b"\x01\x03\x00\x00\x00\x02"
            loop.call_later(0.05, os.write, master, b"\x01\x03\x04")
            loop.call_later(0.10, os.write, master, b"\xaa\xbb\xcc\xdd")
            assert await link.read(7, loop.time() + 2) == b"\x01\x03\x04\xaa\xbb\xcc\xdd"
            with pytest.raises(TimeoutError):
                await link.read(1, loop.time() + 0.1)
            os.write(master, b"stale")
            for _ in range(200):  # until the stale bytes have reached the link, at most 2 s
                if link.peek() == b"stale":
                    break
                await asyncio.sleep(0.01)
            assert link.discard_input() == b"stale", "the stale bytes never reached the link"
            loop.call_later(0.02, os.write, master, b"ab")
            loop.call_later(0.04, os.write, master, b"cd")
            assert await link.read_quiet(0.1, loop.time() + 2) == b"abcd"
        finally:
            await link.close()
            os.close(master)

    asyncio.run(main())


def test_character_time_counts_start_parity_and_stop_bits() -> None:
    assert SerialLink("x", baudrate=9600, parity="N").char_time() == pytest.approx(10 / 9600)
    assert SerialLink("x", baudrate=2400, parity="E").char_time() == pytest.approx(11 / 2400)
    with pytest.raises(ValueError, match="parity"):
        SerialLink("x", parity="X")


@pytest.mark.timeout(20)
def test_a_vanished_port_is_a_connection_error_and_a_missing_one_says_which() -> None:
    async def main() -> None:
        master, path = pty_pair()
        link = SerialLink(path)
        await link.open()
        os.close(master)  # the adapter is pulled
        loop = asyncio.get_running_loop()
        with pytest.raises(ConnectionError, match="was lost"):
            await link.read(1, loop.time() + 2)
        await link.close()
        missing = SerialLink("/dev/ttyNOPE9")
        with pytest.raises(ConnectionError, match="cannot open serial port /dev/ttyNOPE9"):
            await missing.open()

    asyncio.run(main())
