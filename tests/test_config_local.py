"""A field engineer's hands on the configuration: `edge-agent config apply FILE` (validated like a push, on trial,
through the control socket), `edge-agent config rollback [REV]`, `edge-agent config show`, and SIGHUP re-reading
the bootstrap file by the same rule as a start: a file with a revision not above the active one is not taken."""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_until
from remote_site import edge_agent, final_result, plant_data, platform_for, push, show, site, start_plant, wait_online


@pytest.fixture
def running(tmp_path: Path, broker: Any, plant: Any, agent_process: Any) -> Any:
    data = plant_data(points=40, channels=2)
    sim = start_plant(plant, data)
    platform = platform_for(broker.port)
    config = site(data, sim, broker.port, tmp_path / "store.db", platform.config_public_key())
    agent = agent_process(config)
    agent.start()
    wait_online(agent, platform)
    yield platform, agent, config
    platform.stop()


def cli(agent: Any, *args: str) -> Any:
    return edge_agent("config", *args, "--config", str(agent.config_path))


def test_a_local_file_is_applied_on_trial_and_rolled_back_on_request(running: Any, tmp_path: Path) -> None:
    platform, agent, config = running
    local = copy.deepcopy(config)
    local["version"] = "on-site"
    local["channels"][1]["devices"][0]["points"][0]["limits"] = {"high": 70}
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(local, sort_keys=False))
    done = cli(agent, "apply", str(path))
    assert done.returncode == 0 and "revision 1 applied, on trial" in done.stdout, done.stderr
    shown = show(agent.config_path)
    assert (shown["revision"], shown["source"], shown["kid"]) == (1, "local", None) and shown["trial"] is not None
    status = edge_agent("status", "--config", str(agent.config_path))
    assert f"revision 1 {shown['hash'][:19]}" in status.stdout, status.stdout
    assert "configuration revision 1 on trial" in status.stdout and "else back to revision 0" in status.stdout
    busy = cli(agent, "apply", str(path))
    assert busy.returncode == 1 and "revision 1 is on trial" in busy.stderr
    bad = copy.deepcopy(local)
    bad["channels"][0]["devices"][0]["points"][2]["address"] = -4
    bad["uplink"]["password_file"] = "/etc/shadow"
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad, sort_keys=False))
    back = cli(agent, "rollback")
    assert back.returncode == 0 and "back to revision 0" in back.stdout, back.stderr
    invalid = cli(agent, "apply", str(bad_path))
    assert invalid.returncode == 2, invalid.stderr
    assert "channels[0].devices[0].points[2].address: Input should be greater than or equal to 0" in invalid.stderr
    shown = show(agent.config_path)
    assert (shown["revision"], shown["source"], shown["previous"]["revision"]) == (0, "file", 1)
    assert shown["bootstrap"]["in_use"] is True
    again = cli(agent, "rollback", "1")
    assert again.returncode == 0 and "back to revision 1" in again.stdout, again.stderr
    assert show(agent.config_path)["source"] == "local"
    for wrong, message in (("99", "99 is not kept here (kept: 1)"), ("abc", "a kept revision's number or `file`")):
        answer = cli(agent, "rollback", wrong)
        assert answer.returncode == 2 and message in answer.stderr, answer.stderr
    stale = push(platform, config, 1)
    assert stale["state"] == "refused" and stale["errors"][0].startswith("revision: 1 is not above 1")
    missing = cli(agent, "apply", str(tmp_path / "nothing.yaml"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_sighup_takes_the_bootstrap_file_by_the_rule_of_a_start(running: Any) -> None:
    platform, agent, config = running

    def rewrite(**changes: Any) -> None:
        config.update(changes)
        agent.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        agent.proc.send_signal(signal.SIGHUP)

    before = show(agent.config_path)["hash"]
    rewrite(version="edited on site")
    wait_until(lambda: show(agent.config_path)["hash"] != before, 30, f"the edited file taken\n{agent.log()[-2000:]}")
    assert show(agent.config_path)["trial"] is not None, "taken on trial, as any new configuration"
    wait_until(lambda: show(agent.config_path)["trial"] is None, 30, "its trial confirmed")
    trial = push(platform, config, 5)
    assert trial["state"] == "trial"
    final_result(platform, trial["id"])
    rewrite(revision=3, version="older")
    wait_until(lambda: "SIGHUP: the bootstrap file's revision 3 is not above the active revision 5" in agent.log(),
               30, "the lower revision refused")
    shown = show(agent.config_path)
    assert (shown["revision"], shown["source"], shown["bootstrap"]["in_use"]) == (5, "platform", False)
    assert "is not above the active revision 5" in shown["bootstrap"]["why"]
    rewrite(revision=8, version="newer")
    wait_until(lambda: show(agent.config_path)["revision"] == 8, 30, "the higher revision taken")
    assert show(agent.config_path)["source"] == "file"
    wait_until(lambda: any(s.get("config_revision") == 8 and s.get("config_version") == "newer"
                           for s in platform.statuses()), 20, "the online status saying so")
