"""`edge-agent probe opcua ENDPOINT`: read one node (`--node`) or list a node's children (`--browse`) on an OPC UA
server, through the agent's own connection code, and say plainly what failed.

It only reads and browses; it never writes a value or calls a method.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from agent.cli.probe import emit, fail
from agent.drivers.opcua.driver import NODE_ID_PATTERN, STATUS_HINTS, OpcUaError, connect, describe, disconnect

OBJECTS = "i=85"


class _Command(click.Command):
    """With --json, even a usage error (an unknown option, a bad choice) is reported as one JSON object."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if "--json" in args:
                fail(exc.format_message(), True, 2, failure="argument")
            raise


class _NodeFailure(Exception):
    """The server answered, but not with a usable value: a bad status for the node."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _ms(stamp: datetime | None) -> int | None:
    if stamp is None:
        return None
    return int((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp() * 1000)


def _when(ms: int | None) -> str:
    if ms is None:
        return "—"
    text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"{text} ({ms})"


def _quality(status: Any) -> str:
    if status is None or status.is_good():
        return "good"
    return "uncertain" if status.is_uncertain() else "bad"


def _type_name(dtype: Any, variant: Any) -> str | None:
    """The node's DataType by name (Int32, Double, ...), else the type the value arrived as."""
    from asyncua import ua
    from asyncua.ua.object_ids import ObjectIdNames

    if isinstance(dtype, ua.NodeId):
        if dtype.NamespaceIndex == 0 and isinstance(dtype.Identifier, int):
            return str(ObjectIdNames.get(dtype.Identifier, dtype.to_string()))
        return str(dtype.to_string())
    if variant is not None and variant.Value is not None:
        return str(variant.VariantType.name)
    return None


def _read_request(nodes: list[tuple[str, int]]) -> Any:
    from asyncua import ua

    params = ua.ReadParameters()
    params.TimestampsToReturn = ua.TimestampsToReturn.Both
    for node, attribute in nodes:
        rv = ua.ReadValueId()
        rv.NodeId = ua.NodeId.from_string(node)
        rv.AttributeId = attribute
        params.NodesToRead.append(rv)
    return params


async def _read(client: Any, node: str, endpoint: str) -> tuple[dict[str, Any], str]:
    from asyncua.ua.attribute_ids import AttributeIds

    value_dv, type_dv = await client.uaclient.read(
        _read_request([(node, AttributeIds.Value), (node, AttributeIds.DataType)]))
    status = value_dv.StatusCode
    name = str(status.name) if status is not None else "Good"
    dtype = type_dv.Value.Value if type_dv.StatusCode is None or type_dv.StatusCode.is_good() else None
    result: dict[str, Any] = {
        "endpoint": endpoint,
        "node": node,
        "value": None,
        "quality": _quality(status),
        "status": name,
        "source_ts": _ms(value_dv.SourceTimestamp),
        "server_ts": _ms(value_dv.ServerTimestamp),
        "data_type": _type_name(dtype, value_dv.Value),
    }
    if result["quality"] == "bad":
        hint = STATUS_HINTS.get(name)
        raise _NodeFailure(f"node {node}: {name}" + (f" ({hint})" if hint else ""), result)
    value = value_dv.Value.Value if value_dv.Value is not None else None
    result["value"] = _jsonable(value)
    shown = repr(value) if isinstance(value, str) else str(result["value"])
    lines = [
        f"{node} = {shown}",
        f"  data type  {result['data_type'] or '—'}",
        f"  status     {name} ({result['quality']})",
        f"  source ts  {_when(result['source_ts'])}",
        f"  server ts  {_when(result['server_ts'])}",
    ]
    return result, "\n".join(lines)


async def _browse(client: Any, node: str, endpoint: str) -> tuple[dict[str, Any], str]:
    from asyncua import ua
    from asyncua.ua.attribute_ids import AttributeIds

    # the browse service answers an unknown node with no children; reading its name first says it is unknown
    (name_dv,) = await client.uaclient.read(_read_request([(node, AttributeIds.BrowseName)]))
    status = name_dv.StatusCode
    if status is not None and status.is_bad():
        name = str(status.name)
        hint = STATUS_HINTS.get(name)
        raise _NodeFailure(f"node {node}: {name}" + (f" ({hint})" if hint else ""),
                           {"endpoint": endpoint, "node": node, "status": name})
    qname = name_dv.Value.Value
    title = f"{node} ({qname.Name})" if qname is not None else node
    refs = await client.get_node(node).get_children_descriptions()
    children: list[dict[str, Any]] = []
    variables: list[tuple[int, str]] = []
    for ref in refs:
        nodeid = ref.NodeId.to_string()
        qname = ref.BrowseName
        child: dict[str, Any] = {
            "node": nodeid,
            "browse_name": f"{qname.NamespaceIndex}:{qname.Name}" if qname.NamespaceIndex else str(qname.Name),
            "node_class": ref.NodeClass.name,
        }
        if ref.NodeClass == ua.NodeClass.Variable:
            variables.append((len(children), nodeid))
        children.append(child)
    if variables:  # every value in one request
        results = await client.uaclient.read(_read_request([(n, AttributeIds.Value) for _, n in variables]))
        for (index, _), dv in zip(variables, results, strict=True):
            child = children[index]
            status = dv.StatusCode
            child["status"] = str(status.name) if status is not None else "Good"
            child["value"] = _jsonable(dv.Value.Value) if _quality(status) != "bad" and dv.Value is not None else None
            child["data_type"] = _type_name(None, dv.Value)
    result = {"endpoint": endpoint, "node": node, "browse_name": qname.Name if qname is not None else None,
              "children": children}
    lines = [f"{len(children)} children of {title} on {endpoint}"]
    if children:
        width = max(len(c["node"]) for c in children)
        bwidth = max(len(c["browse_name"]) for c in children)
        for c in children:
            line = f"  {c['node']:<{width}}  {c['browse_name']:<{bwidth}}  {c['node_class']:<8}"
            if "value" in c:
                value = c["value"]
                shown = repr(value) if isinstance(value, str) else ("—" if value is None else str(value))
                line += f"  {shown}"
                if c.get("data_type"):
                    line += f" ({c['data_type']})"
                if c["status"] != "Good":
                    line += f" [{c['status']}]"
            lines.append(line.rstrip())
    return result, "\n".join(lines)


async def _probe(endpoint: str, node: str, browse: bool, options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from asyncua.ua.uaerrors import UaError

    timeout = float(options["timeout"])
    client = await connect(endpoint, **options)
    try:
        async with asyncio.timeout(timeout):
            if browse:
                return await _browse(client, node, endpoint)
            return await _read(client, node, endpoint)
    except _NodeFailure:
        raise
    except (OSError, TimeoutError, UaError) as exc:
        error = describe(exc, endpoint, timeout)
        if error.kind == "node":  # a node the server does not know is not a link failure: say which node
            raise _NodeFailure(f"node {node}: {str(error).split(': ', 1)[-1]}",
                               {"endpoint": endpoint, "node": node, "status": error.status}) from None
        raise error from None
    finally:
        await disconnect(client)


@click.command(name="opcua", cls=_Command)
@click.argument("endpoint")
@click.option("--node", help="NodeId to read, e.g. ns=2;s=Zone.1.HeadCount or ns=2;i=1001.")
@click.option("--browse", is_flag=False, flag_value=OBJECTS, default=None, metavar="[NODEID]",
              help="List the children of NODEID (the Objects folder when none is given).")
@click.option("--security", type=click.Choice(["None", "Basic256Sha256"]), default="None", show_default=True,
              help="Security policy.")
@click.option("--mode", type=click.Choice(["Sign", "SignAndEncrypt"]), default=None,
              help="Message security with Basic256Sha256 (default SignAndEncrypt).")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="Client certificate (PEM or DER).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="Private key of --cert (PEM or DER).")
@click.option("--server-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Pin the server's certificate (PEM or DER).")
@click.option("--username", help="Log in as this user (anonymous when omitted).")
@click.option("--password", help="Password of --username.")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the connection and for each answer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(endpoint: str, node: str | None, browse: str | None, security: str, mode: str | None,
            cert: Path | None, key: Path | None, server_cert: Path | None, username: str | None,
            password: str | None, timeout: float, as_json: bool) -> None:
    """Read one node of an OPC UA server, or list a node's children."""
    if not re.match(r"^opc\.tcp://[^/\s]+(/\S*)?$", endpoint):
        fail(f"bad endpoint {endpoint!r}: write opc.tcp://HOST:PORT[/PATH]", as_json, 2, failure="argument")
    if (node is None) == (browse is None):
        fail("give either --node NODEID or --browse [NODEID]", as_json, 2, failure="argument")
    target = node if node is not None else browse
    assert target is not None
    if not re.match(NODE_ID_PATTERN, target):
        fail(f"bad node id {target!r}: write e.g. ns=2;s=Zone.1.HeadCount or ns=2;i=1001", as_json, 2,
             failure="argument")
    if not 0 < timeout <= 60:
        fail(f"--timeout must be above 0 and at most 60 seconds, not {timeout:g}", as_json, 2, failure="argument")
    if security == "None":
        extra = [n for n, v in (("--mode", mode), ("--cert", cert), ("--key", key), ("--server-cert", server_cert))
                 if v is not None]
        if extra:
            fail(f"{', '.join(extra)} only apply with --security Basic256Sha256", as_json, 2, failure="argument")
    elif cert is None or key is None:
        fail("--security Basic256Sha256 needs --cert and --key (the client's certificate and key)", as_json, 2,
             failure="argument")
    if password is not None and username is None:
        fail("--password needs --username", as_json, 2, failure="argument")
    options: dict[str, Any] = {
        "security": security, "mode": mode, "certificate": cert, "private_key": key,
        "server_certificate": server_cert, "username": username, "password": password, "timeout": timeout,
    }
    try:
        result, readable = asyncio.run(_probe(endpoint, target, browse is not None, options))
    except _NodeFailure as exc:
        fail(str(exc), as_json, 1, failure="node", **{k: v for k, v in exc.details.items() if k != "quality"})
        return
    except OpcUaError as exc:
        fail(str(exc), as_json, 1, failure=exc.kind, endpoint=endpoint, status=exc.status)
        return
    emit(result, as_json, readable)
