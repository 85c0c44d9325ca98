"""Remote configuration against a real mosquitto and the agent as a process: a signed push applied live on trial
(readings keep flowing, unchanged channels keep polling), confirmed; refusals of every kind, answered and counted,
changing nothing; a push that points the uplink at a dead broker rolled back within the trial, losing nothing."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import now_ms, wait_until
from remote_site import (
    AGENT,
    ENTERPRISE,
    INTERVAL,
    final_result,
    longest_gaps,
    plant_data,
    platform_for,
    points_of,
    push,
    seq_complete,
    show,
    site,
    start_plant,
    wait_online,
)

from agent.config.revisions import Revision, RevisionFiles
from agent.trust.keys import generate_private_key, key_id, parse_public_key
from agent.trust.signing import sign_payload


@pytest.fixture
def running(tmp_path: Path, broker: Any, plant: Any, agent_process: Any) -> Any:
    """A plant of three channels, a platform subscribed, an agent started on the first 15 points of each device."""
    data = plant_data()
    sim = start_plant(plant, data)
    platform = platform_for(broker.port)
    config = site(data, sim, broker.port, tmp_path / "store.db", platform.config_public_key())
    for channel in config["channels"]:
        for device in channel["devices"]:
            device["points"] = device["points"][:15]
    agent = agent_process(config)
    agent.start()
    wait_online(agent, platform)
    yield platform, agent, config
    platform.stop()


def test_a_signed_push_is_applied_live_on_trial_then_confirmed(running: Any) -> None:
    platform, agent, config = running
    wait_until(lambda: len(platform.readings()) > 200, 30, f"readings before the push\n{agent.log()[-2000:]}")
    new = copy.deepcopy(config)
    changed = new["channels"][2]["devices"][0]
    changed["points"] = changed["points"][:10] + [dict(p, id=f"N{p['id']}") for p in changed["points"][10:12]]
    new["channels"][0]["devices"][0]["points"][0]["limits"] = {"high": 80, "high_high": 95}
    new["version"] = "pushed-1"
    wait_until(lambda: polls(platform, "bench2") >= 4, 20, "a health report with a few polls")
    polls_before = {c: polls(platform, c) for c in ("bench1", "bench2")}
    before = now_ms()
    trial = push(platform, new, 7)
    assert trial["state"] == "trial" and trial["ok"] and trial["revision"] == 7 and trial["errors"] == []
    assert trial["hash"].startswith("sha256:")
    done = final_result(platform, trial["id"])
    assert done == {**trial, "state": "applied"}, agent.log()[-3000:]
    wait_until(lambda: any(r.point == "NP00050" for r in platform.readings()), 20, "readings of an added point")
    after = now_ms()
    wait_until(lambda: seq_complete(platform), 20, "every seq delivered")
    # channel bench1 is unchanged, bench0 changed only a limit (the channel restarts); neither misses a poll slot
    gaps = longest_gaps(platform, points_of(config, ["bench1"]), before - 2000, after)
    assert max(gaps.values()) < 1.5 * INTERVAL, sorted(gaps.items(), key=lambda kv: -kv[1])[:5]
    assert not any(r.point in ("P00050", "P00051") and r.ts > after + 2000 for r in platform.readings())
    status = [s for s in platform.statuses() if s.get("online") and s.get("config_revision") == 7]
    assert status and status[-1]["config_hash"] == trial["hash"] and status[-1]["config_version"] == "pushed-1"
    shown = show(agent.config_path)
    assert (shown["revision"], shown["source"], shown["hash"], shown["trial"]) == (7, "platform", trial["hash"], None)
    assert shown["kid"] == key_id(parse_public_key(platform.config_public_key()))
    assert shown["bootstrap"]["in_use"] is False and "not above the active revision 7" in shown["bootstrap"]["why"]
    # the unchanged channel's devices kept their state (their poll count goes on); the changed one started afresh
    wait_until(lambda: polls(platform, "bench1", since=after) > 0, 20, "a health report after the apply")
    grown = polls(platform, "bench1", since=after) - polls_before["bench1"]
    assert grown > 0 and polls_before["bench2"] >= 3
    assert polls(platform, "bench2", since=after) <= grown + 1 < polls_before["bench2"] + grown, \
        "the changed channel's devices counted from 0 again"
    assert platform.schema_errors() == []


def polls(platform: Any, channel: str, since: int = 0) -> int:
    """The channel's poll count in the latest health report made after `since` (ms); 0 without one."""
    for report in reversed(platform.health()):
        if report["ts"] > since:
            return next(int(c.get("polls", 0)) for c in report["channels"] if c["id"] == channel)
    return 0


def test_every_refused_push_is_answered_counted_and_changes_nothing(running: Any) -> None:
    platform, agent, config = running
    other_key = generate_private_key()
    now = now_ms()
    base = {"v": 1, "ts": now, "agent": AGENT, "enterprise": ENTERPRISE}

    def signed(key: Any, **members: Any) -> bytes:
        return sign_payload({**base, **members}, key)

    good = signed(other_key, id="x", revision=3, config=config)
    tampered = orjson.loads(good)
    tampered["sig"] = orjson.loads(push_payload(platform, id="t", revision=3, config=config))["sig"]
    bad_point = copy.deepcopy(config)
    bad_point["channels"][0]["devices"][0]["points"][1]["type"] = "floa32"
    secret = copy.deepcopy(config)
    secret["uplink"]["password"] = "hunter2-secret"  # without a username: refused, never quoted
    outside = copy.deepcopy(config)
    outside["uplink"].update(username="u", password_file="/etc/shadow")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("unknown_kid", {"payload": good, "push_id": "x"}),
        ("bad_signature", {"payload": orjson.dumps(tampered), "push_id": "x"}),
        ("unsigned", {"push_id": "u1", "revision": 3, "signed": False}),
        ("expired", {"push_id": "e1", "revision": 3, "not_after": now - 60_000}),
        ("wrong_target", {"payload": push_payload(platform, id="w1", revision=3, config=config, agent="ipc-99"),
                          "push_id": "w1"}),
        ("malformed", {"payload": b"not json at all"}),
        ("malformed", {"push_id": "m1", "revision": 3, "extra": 1}),
        ("invalid", {"push_id": "i1", "revision": 3, "config": bad_point}),
        ("invalid", {"push_id": "s1", "revision": 3, "config": secret}),
        ("invalid", {"push_id": "o1", "revision": 3, "config": outside}),
    ]
    answers = {}
    for kind, case in cases:
        answers[(kind, case.get("push_id"))] = send(platform, config, case)
    for (kind, push_id), answer in answers.items():
        assert answer["state"] == "refused" and answer["ok"] is False and answer["errors"], (kind, answer)
        assert answer["id"] == push_id
    assert answers[("malformed", None)]["id"] is None
    assert "sig.kid" in answers[("unknown_kid", "x")]["errors"][0]
    assert "signature does not match" in answers[("bad_signature", "x")]["errors"][0]
    assert answers[("unsigned", "u1")]["errors"][0].startswith("sig: missing")
    assert answers[("expired", "e1")]["errors"][0].startswith("not_after: the push expired")
    assert answers[("wrong_target", "w1")]["errors"][0].startswith("agent: the push is for 'ipc-99'")
    assert answers[("malformed", "m1")]["errors"][0].startswith("extra: unknown member")
    assert answers[("invalid", "i1")]["errors"][0].startswith("config.channels[0].devices[0].points[1].type: 'floa32'")
    assert all("hunter2" not in line for line in answers[("invalid", "s1")]["errors"])
    assert answers[("invalid", "s1")]["errors"] == ["config.uplink: a password is given but username is not"]
    assert answers[("invalid", "o1")]["errors"] == [
        f"config.uplink.password_file: '/etc/shadow' is outside the agent's folders ({agent.config_path.parent}, "
        "${CREDENTIALS_DIRECTORY}): put the file there"]
    assert "hunter2" not in agent.log()
    # a retained push, and old revisions: one taken (5), then a replay of it and a lower one
    retained = send(platform, config, {"push_id": "r1", "revision": 4, "retain": True})
    assert retained["state"] == "refused" and "retained" in retained["errors"][0]
    # deletes the retained one (its empty payload reaches the agent too: a third malformed push)
    platform.push_config(ENTERPRISE, AGENT, {}, 0, payload=b"", retain=True, timeout=5)
    taken = push(platform, config, 5, push_id="ok5")
    assert taken["state"] == "trial"
    replay = push(platform, config, 5, push_id="ok5")
    assert replay["state"] == "refused" and "a replay" in replay["errors"][0], replay
    lower = push(platform, config, 4, push_id="low4")
    assert lower["state"] == "refused" and lower["errors"][0].startswith("revision: 4 is not above 5")
    busy = push(platform, config, 9, push_id="b9")
    assert busy["state"] == "refused" and "revision 5 is on trial" in busy["errors"][0], busy
    wait_until(lambda: refused_counts(platform).get("busy") == 1, 20, "health counting the refusals")
    counts = refused_counts(platform)
    assert counts == {"unknown_kid": 1, "bad_signature": 1, "unsigned": 1, "expired": 1, "wrong_target": 1,
                      "malformed": 3, "invalid": 3, "retained": 1, "busy": 1, "old_revision": 2}, counts
    assert show(agent.config_path)["revision"] == 5
    # MQTT 3.1.1 (with 5 the broker never hands over more than the agent takes): an oversized push is answered.
    # The bootstrap file says so from revision 6 on: below the active revision 5 it would not be taken at start
    agent.stop()
    config["uplink"]["protocol"] = "3.1.1"
    config["uplink"]["max_incoming_bytes"] = 65_536
    agent.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.start()
    wait_online(agent, platform)
    assert show(agent.config_path)["revision"] == 5 and "is not used: the active revision is 5" in agent.log()
    agent.stop()
    config["revision"] = 6
    agent.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    agent.start()
    wait_online(agent, platform)
    shown = show(agent.config_path)
    assert (shown["revision"], shown["source"], shown["bootstrap"]["in_use"]) == (6, "file", True)
    oversized = send(platform, config, {"payload": b"{" + b" " * 70_000 + b"}", "push_id": None})
    assert oversized["state"] == "refused" and "more than the 65,536" in oversized["errors"][0], oversized
    wait_until(lambda: refused_counts(platform).get("oversized") == 1, 20, "health counting it")
    assert platform.schema_errors() == []


def push_payload(platform: Any, **message: Any) -> bytes:
    """A push signed with the platform's own key (to take its signature for another message)."""
    platform.config_public_key()
    return sign_payload({"v": 1, "ts": now_ms(), "agent": AGENT, "enterprise": ENTERPRISE, **message},
                        platform._config_key)


def send(platform: Any, config: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    case = dict(case)
    payload = case.pop("payload", None)
    body = case.pop("config", config)
    revision = case.pop("revision", 1)
    answer = platform.push_config(ENTERPRISE, AGENT, body, revision, payload=payload, timeout=30, **case)
    assert answer is not None, case
    return dict(answer)


def refused_counts(platform: Any) -> dict[str, int]:
    reports = [h for h in platform.health() if "config" in h]
    return dict(reports[-1]["config"]["refused"]) if reports else {}


def test_a_push_to_a_dead_broker_rolls_back_within_the_trial_and_loses_nothing(running: Any) -> None:
    platform, agent, config = running
    from conftest import free_port

    new = copy.deepcopy(config)
    new["uplink"]["port"] = free_port()  # nothing listens there
    began = now_ms()
    # the agent applies it (its `trial` result cannot reach this broker), then goes back: that is its answer
    done = push(platform, new, 2, push_id="dead-2", timeout=60)
    assert done["state"] == "rolled_back" and done["ok"] is False and done["revision"] == 2, done
    assert platform.config_results("dead-2") == [done], "the trial result was overtaken by the rollback"
    assert done["errors"][0].startswith("the uplink did not reach 127.0.0.1:"), done
    wait_until(lambda: any(r.ts > began + 12_000 for r in platform.readings()) and seq_complete(platform), 30,
               f"readings from after the rollback, every seq\n{agent.log()[-3000:]}")
    gaps = longest_gaps(platform, points_of(config, ["bench0", "bench1", "bench2"]), began - 1000, began + 11_000)
    assert max(gaps.values()) < 1.5 * INTERVAL, "readings of the trial are delivered"
    shown = show(agent.config_path)
    assert shown["revision"] == 0 and shown["source"] == "file" and shown["highest"] == 2
    again = push(platform, new, 2)
    assert again["state"] == "refused", "a rolled back revision cannot be pushed again"


def variant(config: dict[str, Any], n: int) -> dict[str, Any]:
    """The configuration with channel bench2's device reading points of its own for revision `n`: odd revisions
    read N-points (renamed), even ones the plain ones, so the readings tell which revision runs."""
    new = copy.deepcopy(config)
    device = new["channels"][2]["devices"][0]
    if n % 2:
        device["points"] = [dict(p, id=f"N{p['id']}") for p in device["points"]]
    new["version"] = f"variant-{n}"
    return new


def running_revision(platform: Any, agent: Any, config: dict[str, Any], since: int) -> int:
    """The revision the restarted agent runs, as its readings show it (N-points or not), checked against what it
    says (status) and what the store records (config show): never a mix."""
    plain, renamed = "P00040", "NP00040"
    wait_until(lambda: any(r.point in (plain, renamed) and r.ts > since + 1500 for r in platform.readings()), 30,
               f"readings of bench2 after the restart\n{agent.log()[-2000:]}")
    seen = {r.point for r in platform.readings() if r.ts > since + 1000 and r.point in (plain, renamed)}
    assert len(seen) == 1, f"both revisions' points read after the restart: {seen}"
    shown = show(agent.config_path)
    statuses = [s for s in platform.statuses() if s.get("online") and s.get("started", 0) >= agent.started_ms]
    assert statuses and statuses[-1]["config_revision"] == shown["revision"], (statuses[-1:], shown)
    assert statuses[-1]["config_hash"] == shown["hash"]
    assert (renamed in seen) == bool(shown["revision"] % 2), (seen, shown["revision"])
    return int(shown["revision"])


def test_kill_9_at_any_moment_of_an_apply_leaves_the_old_or_the_new_revision(running: Any) -> None:
    platform, agent, config = running
    state_dir = agent.config_path.parent / "config-revisions"
    kill_when = [
        ("as soon as it is published", lambda revision, push_id: True),
        ("once the revision file is written", lambda revision, push_id: (state_dir / f"r{revision:010d}.json")
         .exists()),
        ("once its trial result came", lambda revision, push_id: bool(platform.config_results(push_id))),
    ]
    active = 0
    for revision, (moment, ready) in enumerate(kill_when, start=1):
        push_id = f"kill-{revision}"
        platform.push_config(ENTERPRISE, AGENT, variant(config, revision), revision, push_id=push_id, timeout=0)
        wait_until(lambda ready=ready, revision=revision, push_id=push_id: ready(revision, push_id), 30,
                   f"revision {revision}: {moment}")
        agent.kill9()
        restarted = now_ms()
        agent.start()
        wait_online(agent, platform)
        now_running = running_revision(platform, agent, config, restarted)
        assert now_running in (active, revision), (moment, now_running)
        if moment.startswith("once its trial"):
            assert now_running == revision
            assert final_result(platform, push_id)["state"] == "applied", "the trial went on after the restart"
        elif now_running == revision:
            final_result(platform, push_id)
        active = now_running
    # the narrowest moment, between the revision file written and the store recording it active: made by hand
    files = RevisionFiles(state_dir.parent)
    kept = files.load(active)
    files.save(Revision(active + 1, "platform", kept.hash, kept.payload.replace(
        f'"revision":{active}'.encode(), f'"revision":{active + 1}'.encode()), kept.kid, "orphan", kept.received))
    agent.kill9()
    restarted = now_ms()
    agent.start()
    wait_online(agent, platform)
    assert running_revision(platform, agent, config, restarted) == active, "a revision never recorded is not run"
    wait_until(lambda: seq_complete(platform), 30, "every seq delivered")


def test_a_10000_point_push_is_applied_with_no_seq_gap_and_no_reading_gap_on_unchanged_channels(
        tmp_path: Path, broker: Any, plant: Any, agent_process: Any) -> None:
    interval = 1.0
    # 13 devices on 10 channels: a second's polls leave readings pending (a message is 5000), as in a real plant
    data = plant_data(points=10_000, channels=10, per_device=800, interval=interval)
    sim = start_plant(plant, data)
    platform = platform_for(broker.port)
    try:
        config = site(data, sim, broker.port, tmp_path / "store.db", platform.config_public_key())
        config["uplink"]["max_incoming_bytes"] = 4 * 1_048_576  # a 10,000-point push is about 1.2 MB
        config["uplink"]["batch"] = {"max_readings": 5000, "max_delay": 0.9}
        agent = agent_process(config)
        agent.start()
        wait_online(agent, platform, timeout=60)
        wait_until(lambda: len(platform.readings()) > 30_000, 60, f"readings flowing\n{agent.log()[-2000:]}")
        new = copy.deepcopy(config)
        for point in new["channels"][9]["devices"][-1]["points"]:
            point["limits"] = {"high": 92, "high_high": 97}
        before = now_ms()
        trial = push(platform, new, 1, timeout=60)
        assert trial["state"] == "trial", trial
        answered = now_ms()
        wait_until(lambda: any(r.ts > answered + 3000 for r in platform.readings()) and seq_complete(platform), 60,
                   f"readings after the apply, every seq\n{agent.log()[-2000:]}")
        unchanged = points_of(config, [f"bench{c}" for c in range(9)])
        gaps = longest_gaps(platform, unchanged, before - 3000, answered + 3000)
        worst = sorted(gaps.items(), key=lambda kv: -kv[1])[:5]
        assert max(gaps.values()) < 1.5 * interval, worst
        assert platform.schema_errors() == []
    finally:
        platform.stop()


def test_a_push_that_silences_most_devices_rolls_back_and_they_answer_again(running: Any) -> None:
    platform, agent, config = running
    from conftest import free_port

    wait_until(lambda: {r.point for r in platform.readings() if r.quality == "good"} >= {"P00000", "P00020", "P00040"},
               30, "every device answering before the push")
    new = copy.deepcopy(config)
    for channel in new["channels"][:2]:
        channel["port"] = free_port()  # two of the three devices' servers are not there
    done = final_result(platform, push(platform, new, 4)["id"], timeout=60)
    assert done["state"] == "rolled_back", done
    assert done["errors"] == ["2 of 3 devices that answered before stopped answering: bench0/dev1, bench1/dev2"]
    back = now_ms()
    wait_until(lambda: {r.point for r in platform.readings() if r.ts > back + 1000 and r.quality == "good"}
               >= {"P00000", "P00020", "P00040"}, 30, "good readings of every device again")
    assert show(agent.config_path)["revision"] == 0


def test_with_compact_data_a_new_point_map_reaches_the_platform_before_data_written_with_it(
        tmp_path: Path, broker: Any, plant: Any, agent_process: Any) -> None:
    data = plant_data()
    sim = start_plant(plant, data)
    platform = platform_for(broker.port)
    try:
        config = site(data, sim, broker.port, tmp_path / "store.db", platform.config_public_key())
        config["uplink"]["encoding"] = "compact"
        for channel in config["channels"]:
            channel["devices"][0]["points"] = channel["devices"][0]["points"][:15]
        agent = agent_process(config)
        agent.start()
        wait_online(agent, platform)
        wait_until(lambda: len(platform.readings()) > 100, 30, "compact readings decoded")
        maps_before = len(platform.maps())
        new = copy.deepcopy(config)
        new["channels"][1]["devices"][0]["points"] = [dict(p, id=f"N{p['id']}") for p in
                                                      data["channels"][1]["devices"][0]["points"]]
        trial = push(platform, new, 3)
        assert trial["state"] == "trial", trial
        wait_until(lambda: any(r.point == "NP00039" for r in platform.readings()), 30,
                   f"a new point decoded with the new map\n{agent.log()[-2000:]}")
        assert len(platform.maps()) == maps_before + 1 and platform.waiting_for_maps() == 0
        status = [s for s in platform.statuses() if s.get("config_revision") == 3]
        assert status, "the online status again, with the new revision, on the same connection"
        assert platform.report().agent(AGENT, ENTERPRISE).duplicates == 0 and platform.schema_errors() == []
    finally:
        platform.stop()
