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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_LIMIT = 16 * 1_048_576 + 4096  # a line: a configuration file's text (`config apply`) at most
MAX_CLIENTS = 4  # at once; a client beyond is closed unanswered


class ControlServer:
    def __init__(self, path: Path, handle: Callable[[bytes, str], dict[str, Any]],
                 queries: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
                 actions: dict[str, Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]] | None = None) -> None:
        """`handle(request, caller)`: caller names the local user ("uid 1000 pid 4242"), for the log. `queries`:
        read-only questions only local users may ask (`points`, `channels`, `buffer`), answered here. `actions`:
        requests of local users that take a while (`config_apply`, `config_rollback`), awaited here; each answers
        with a dict that says `ok`."""
        self.path = path
        self.handle = handle
        self.queries = queries or {}
        self.actions = actions or {}
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

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
        if self._clients.locked():  # each client may send up to _LIMIT bytes: their number bounds the memory
            writer.close()
            return
        async with self._clients:
            try:
                line = await asyncio.wait_for(reader.readline(), 30)
                result = self._query(line) or await self._act(line, writer) or \
                    self.handle(line.strip(), _caller(writer))
                writer.write(orjson.dumps(result) + b"\n")
                await writer.drain()
            except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
                log.debug("control socket client dropped: %s", exc)
            finally:
                writer.close()

    async def _act(self, line: bytes, writer: asyncio.StreamWriter) -> dict[str, Any] | None:
        """The answer to a local action (`config_apply`...), or None when the line is not one."""
        if not any(name.encode() in line for name in self.actions):
            return None  # not worth parsing: the commands are small
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(request, dict) or request.get("cmd") not in self.actions:
            return None
        name = request["cmd"]
        cmd_id = request.get("id") if isinstance(request.get("id"), str) and len(request["id"]) <= 128 else None
        caller = _caller(writer)
        try:
            answer = await self.actions[name](request, caller)
        except Exception as exc:  # an action must never take the socket down
            log.exception("control socket: %s failed", name)
            answer = {"ok": False, "errors": [f"internal error: {type(exc).__name__}"]}
        log.info("local %s from %s: %s", name, caller, "ok" if answer.get("ok") else answer.get("errors"))
        return {"v": 1, "id": cmd_id, "cmd": name, **answer}


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
