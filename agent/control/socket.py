"""The control socket: a Unix socket where the local CLI asks the running daemon (status, alarms, reset).

One JSON object per line each way, handled by the same command handler as the platform's `cmd` topic. A
socket that cannot be opened is logged and skipped; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_LIMIT = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, handle: Callable[[bytes, str], dict[str, Any]],
                 queries: dict[str, Callable[[dict[str, Any]], Any]] | None = None) -> None:
        """`handle(request, caller)`: caller names the local user ("uid 1000 pid 4242"), for the log. `queries`:
        read-only questions only local users may ask (`points`, `channels`, `buffer`), answered here."""
        self.path = path
        self.handle = handle
        self.queries = queries or {}

    async def run(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # left by a killed daemon
            server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=_LIMIT)
            os.chmod(self.path, 0o660)
            _hand_to_cli_group(self.path)
        except OSError as exc:
            log.warning("control socket %s unavailable (%s): `edge-agent alarms` will not reach this daemon",
                        self.path, exc)
            return
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            result = self._query(line) or self.handle(line.strip(), _caller(writer))
            writer.write(orjson.dumps(result) + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            log.debug("control socket client dropped: %s", exc)
        finally:
            writer.close()


    def _query(self, line: bytes) -> dict[str, Any] | None:
        """The answer to a read-only query, or None when the line is not one (the command handler answers)."""
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(request, dict) or request.get("cmd") not in self.queries:
            return None
        name = request["cmd"]
        cmd_id = request.get("id") if isinstance(request.get("id"), str) and len(request["id"]) <= 128 else None
        try:
            return {"v": 1, "id": cmd_id, "cmd": name, "ok": True, "result": self.queries[name](request)}
        except Exception as exc:  # a query must never take the socket down; it changes nothing
            log.exception("control socket: query %s failed", name)
            return {"v": 1, "id": cmd_id, "cmd": name, "ok": False, "error": f"internal error: {type(exc).__name__}"}


CLI_GROUP = "edge-agent-cli"  # the field engineers' group: may use the socket, may not read the secrets


def _hand_to_cli_group(path: Path) -> None:
    """Give the socket to the CLI users' group when it exists and the daemon is in it (install.sh sets it up)."""
    try:
        gid = grp.getgrnam(CLI_GROUP).gr_gid
    except KeyError:
        return
    if gid in os.getgroups() or os.geteuid() == 0:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            log.warning("control socket %s: cannot hand it to group %s: %s", path, CLI_GROUP, exc)


def _caller(writer: asyncio.StreamWriter) -> str:
    """Who is on the other end of the socket, as the kernel says (SO_PEERCRED), never as the client says."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except (OSError, AttributeError, struct.error):
        return "an unknown local user"
    return f"uid {uid} gid {gid} pid {pid}"


async def ask(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon and return its result; ConnectionError when no daemon answers."""
    request = {"v": 1, "id": f"local-{uuid.uuid4().hex[:12]}", **request}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=_LIMIT), timeout)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"no agent answers on {path} ({exc}); is it running, and is this its config?") from None
    try:
        writer.write(orjson.dumps(request) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise ConnectionError(f"the agent on {path} closed the connection without an answer")
    result: dict[str, Any] = orjson.loads(line)
    return result
