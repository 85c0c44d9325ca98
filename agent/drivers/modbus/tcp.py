"""Modbus TCP driver: MBAP framing over one TCP connection per channel, one transaction at a time.

A reply is matched to its request by transaction id; a late reply to an abandoned request is dropped,
never taken for the answer to the next one. Any transport error closes the socket; the next poll reconnects.
The connection itself, its framing and its timeouts are `mbap.MbapConnection`.
"""

from __future__ import annotations

import asyncio
import logging
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
    read_request,
)
from agent.drivers.modbus.mbap import MbapConnection
from agent.errors import LinkError

log = logging.getLogger(__name__)


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
        self._plans = {}
        self._connection: MbapConnection | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.is_open

    async def open(self) -> None:
        if self.connected:
            return
        await self.close()
        ch = self.channel
        connection = MbapConnection(ch.id)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: connection, ch.host, ch.port), ch.connect_timeout)
        except TimeoutError:
            raise LinkError(f"connect to {ch.host}:{ch.port} timed out after {ch.connect_timeout:g}s") from None
        self._connection = connection
        log.info("channel %s: connected to %s:%d", ch.id, ch.host, ch.port)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def transact(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        """Send one request PDU and return the reply PDU of the same transaction id."""
        connection = self._connection
        if connection is None or not connection.is_open:
            await self.open()
            connection = self._connection
            assert connection is not None
        self._tid = tid = (self._tid + 1) & 0xFFFF
        try:
            return await connection.request(tid, unit, pdu, timeout)
        except (OSError, EOFError, FrameError):
            # a late reply would otherwise come on this connection; a fresh one keeps the link in step
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
