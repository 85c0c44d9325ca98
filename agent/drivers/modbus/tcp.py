"""Modbus TCP driver: MBAP framing over one TCP connection per channel, one transaction at a time.

A reply is matched to its request by transaction id; a late reply to an abandoned request is dropped,
never taken for the answer to the next one. Any transport error closes the socket; the next poll reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Literal

from pydantic import Field

from agent.config.base import ChannelBase, Duration
from agent.drivers import registry
from agent.drivers.modbus.codec import (
    Block,
    BlockReader,
    FrameError,
    ModbusDevice,
    ModbusError,
    parse_read_reply,
    plan_blocks,
    read_request,
)
from agent.errors import LinkError, NoReply

log = logging.getLogger(__name__)

_MBAP = struct.Struct(">HHHB")


class ModbusTcpChannel(ChannelBase):
    """A Modbus TCP server (a PLC, a controller, or a gateway in front of several units)."""

    driver: Literal["modbus_tcp"]
    host: str = Field(min_length=1, description="IP address or host name of the Modbus TCP server.")
    port: int = Field(502, ge=1, le=65535, description="TCP port.")
    connect_timeout: Duration = Field(3.0, gt=0, le=60, description="Longest wait to open the connection.")
    devices: list[ModbusDevice] = Field(min_length=1, description="Units polled through this connection.")


class ModbusTcpDriver(BlockReader):
    """One TCP connection; requests are serialised, so a slow unit delays only its own poll."""

    def __init__(self, channel: ModbusTcpChannel) -> None:
        self.channel = channel
        self._plans = {d.id: plan_blocks(d) for d in channel.devices}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def open(self) -> None:
        if self.connected:
            return
        ch = self.channel
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(ch.host, ch.port), ch.connect_timeout
            )
        except TimeoutError:
            raise LinkError(f"connect to {ch.host}:{ch.port} timed out after {ch.connect_timeout:g}s") from None
        log.info("channel %s: connected to %s:%d", ch.id, ch.host, ch.port)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def transact(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        """Send one request PDU and return the reply PDU of the same transaction id."""
        if not self.connected:
            await self.open()
        assert self._reader is not None and self._writer is not None
        self._tid = (self._tid + 1) & 0xFFFF
        tid = self._tid
        self._writer.write(_MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._writer.drain()
                while True:
                    head = await self._reader.readexactly(7)
                    rtid, proto, length, runit = _MBAP.unpack(head)
                    if proto != 0 or not 2 <= length <= 254:
                        raise FrameError(f"bad MBAP header {head.hex()} (protocol {proto}, length {length})")
                    body = await self._reader.readexactly(length - 1)
                    if rtid != tid:
                        log.debug("channel %s: dropped late reply tid %d (waiting for %d)", self.channel.id, rtid, tid)
                        continue
                    if runit != unit:
                        raise FrameError(f"reply from unit {runit} to a request for unit {unit}")
                    return body
        except TimeoutError:
            # a late reply would otherwise sit in the stream; a fresh connection keeps the link in step
            await self.close()
            raise NoReply(f"no reply within {timeout:g}s") from None
        except asyncio.IncompleteReadError as exc:
            await self.close()
            read = len(exc.partial)
            raise LinkError(f"connection closed by the server ({read} bytes of a reply read)") from None
        except (OSError, EOFError, FrameError):
            await self.close()
            raise

    async def read_block(self, device: ModbusDevice, block: Block) -> bytes:
        pdu = read_request(block.function, block.start, block.count)
        attempts = device.retries + 1
        for attempt in range(attempts):
            try:
                reply = await self.transact(device.unit, pdu, device.timeout)
                return parse_read_reply(reply, block.function, block.count)
            except ModbusError as exc:
                if exc.code not in (5, 6) or attempt == attempts - 1:  # only "busy" is worth asking again
                    raise
            except (TimeoutError, OSError, EOFError, FrameError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")


registry.register("modbus_tcp", ModbusTcpChannel, ModbusTcpDriver)
