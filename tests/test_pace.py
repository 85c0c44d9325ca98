"""Pace: polls that complete in the same turn of the event loop share it out by a budget; the rest go on in later
turns, after the callbacks that came meanwhile, and not one reading is lost or re-timed."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import Any

import pytest

from agent.config.loader import parse_config
from agent.config.points import PointTable
from agent.core import GOOD, ReadingBatch
from agent.pipeline.pace import Pace
from agent.pipeline.poller import Poller
from simulators.modbus import PlantSimulator


async def _turns_of_polls(pace: Pace, polls: int, work: float = 0.0) -> tuple[list[tuple[int, int]], list[int]]:
    """Start `polls` polls ready in one turn; return (poll, turn) as each went past the pace, and the turns in
    which callbacks scheduled meanwhile ran."""
    loop = asyncio.get_running_loop()
    turn = 0
    ticking = True

    def tick() -> None:  # runs once in every turn of the loop: counts them
        nonlocal turn
        turn += 1
        if ticking:
            loop.call_soon(tick)

    go = asyncio.Event()
    seen: list[tuple[int, int]] = []
    others: list[int] = []

    async def poll(k: int) -> None:
        await go.wait()
        await pace.turn()
        seen.append((k, turn))
        if k == 0:
            loop.call_soon(lambda: others.append(turn))  # I/O or a timer that came while the first poll ran
        end = time.perf_counter() + work
        while time.perf_counter() < end:  # the poll's decode and rules, as CPU time
            pass

    tasks = [asyncio.create_task(poll(k)) for k in range(polls)]
    await asyncio.sleep(0)
    loop.call_soon(tick)
    go.set()
    await asyncio.gather(*tasks)
    ticking = False
    return seen, others


def test_polls_within_the_budget_share_one_turn() -> None:
    pace = Pace(budget=3600.0)
    seen, _ = asyncio.run(_turns_of_polls(pace, 5))
    assert [k for k, _ in seen] == [0, 1, 2, 3, 4]
    assert len({t for _, t in seen}) == 1
    assert pace.deferred == 0


def test_polls_past_the_budget_go_on_in_later_turns_in_their_order_after_what_came_meanwhile() -> None:
    pace = Pace(budget=0.0)  # only the first poll of a turn has budget left
    seen, others = asyncio.run(_turns_of_polls(pace, 5))
    assert [k for k, _ in seen] == [0, 1, 2, 3, 4]  # none overtakes another
    turns = [t for _, t in seen]
    assert turns == sorted(set(turns))  # one poll a turn
    assert others and others[0] <= turns[1]  # the callback that came meanwhile did not wait for the rest
    assert pace.deferred >= 4


def test_a_turn_holds_no_more_polls_than_its_budget_allows() -> None:
    # each poll works 2 ms at least: a 5 ms budget lets at most three start in one turn, however slow the machine
    pace = Pace(budget=0.005)
    seen, _ = asyncio.run(_turns_of_polls(pace, 12, work=0.002))
    per_turn: dict[int, int] = {}
    for _, t in seen:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert max(per_turn.values()) <= 3
    assert sum(per_turn.values()) == 12


CONFIG = """
agent: {id: a1, enterprise: "e1"}
channels:
""" + "".join(f"""
  - id: c{c}
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d{c}
        unit: 1
        interval: 0.2
        points:
""" + "".join(f"          - {{id: P{c}-{k}, table: holding, address: {2 * k}, type: float32}}\n" for k in range(20))
    for c in range(3))


def test_every_poll_put_off_still_reaches_ingest_whole_with_its_own_sample_time() -> None:
    config = parse_config(CONFIG)
    batches: list[ReadingBatch] = []

    async def scenario() -> Any:
        async with PlantSimulator(config, ports={c.id: 0 for c in config.channels}) as sim:
            for c in range(3):
                for k in range(20):
                    sim.set_value(f"P{c}-{k}", 100.0 * c + k)
            channels = [ch.model_copy(update={"port": sim.ports[ch.id]}) for ch in config.channels]
            live = config.model_copy(update={"channels": channels})
            table = PointTable(live)
            enough = asyncio.Event()
            firsts = [slot.indices[0] for slot in table.devices]

            def ingest(batch: ReadingBatch) -> None:
                batches.append(batch)
                if all(sum(1 for b in batches if b.indices[0] == f) >= 4 for f in firsts):
                    enough.set()

            poller = Poller(table, ingest, pace=Pace(budget=0.0))
            tasks = [asyncio.create_task(poller.run_channel(ch)) for ch in channels]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), 10)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return table

    table = asyncio.run(scenario())
    ids = [p.id for p in table.points]
    for slot in table.devices:
        mine = [b for b in batches if b.indices[0] == slot.indices[0]]
        assert len(mine) >= 4, slot.device.id
        times = [b.ts for b in mine]
        assert times == sorted(times) and len(set(times)) == len(times)  # each poll's own time, in order
        for b in mine:
            assert b.indices == slot.indices and b.qualities == [GOOD] * 20
            assert b.values == [100.0 * int(ids[i][1]) + int(ids[i].split("-")[1]) for i in b.indices]


async def _gated_relay(target_port: int, held: list[tuple[asyncio.StreamWriter, bytes]],
                       three: asyncio.Event) -> asyncio.Server:
    """A TCP relay to a device server that holds every answer in `held` until the test lets them go together;
    `three` is set once three are held."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def up() -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    server_w.write(await client_r.readexactly(12))  # a read request is 12 bytes

        async def down() -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await server_r.readexactly(7)
                    held.append((client_w, head + await server_r.readexactly(struct.unpack(">H", head[4:6])[0] - 1)))
                    if len(held) >= 3:
                        three.set()

        await asyncio.gather(up(), down())

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class _StopWhenPutOff(Pace):
    """A pace whose first poll put off is stopped while it waits (as a stop of the agent would)."""

    async def turn(self) -> None:
        task = asyncio.current_task()
        if self._began is not None and task is not None:
            task.cancel()
        await super().turn()


@pytest.mark.parametrize("stop", [False, True])
def test_answers_that_come_together_are_put_off_and_a_stop_keeps_the_reads_done(stop: bool) -> None:
    config = parse_config(CONFIG)
    batches: list[ReadingBatch] = []

    async def scenario() -> Pace:
        async with PlantSimulator(config, ports={c.id: 0 for c in config.channels}) as sim:
            held: list[tuple[asyncio.StreamWriter, bytes]] = []
            three = asyncio.Event()
            relays = [await _gated_relay(sim.ports[ch.id], held, three) for ch in config.channels]
            channels = [ch.model_copy(update={"port": r.sockets[0].getsockname()[1]})
                        for ch, r in zip(config.channels, relays, strict=True)]
            table = PointTable(config.model_copy(update={"channels": channels}))
            pace = _StopWhenPutOff(budget=0.0) if stop else Pace(budget=0.0)
            poller = Poller(table, batches.append, pace=pace)
            tasks = [asyncio.create_task(poller.run_channel(ch)) for ch in channels]
            await asyncio.wait_for(three.wait(), 10)  # each device's first poll, answered and held
            assert len(held) == 3
            for writer, answer in held:  # the three answers leave in one turn of the loop
                writer.write(answer)
            await asyncio.wait(tasks, timeout=0.5 if stop else 0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for relay in relays:
                relay.close()
            return pace

    pace = asyncio.run(scenario())
    assert pace.deferred >= 1  # the answers came in one turn: the polls after the first waited for another
    firsts = sorted(b.indices[0] for b in batches[:3])
    assert firsts == [0, 20, 40]  # every device's first poll reached ingest, the ones put off (and stopped) too
    assert all(b.qualities == [GOOD] * 20 for b in batches)
