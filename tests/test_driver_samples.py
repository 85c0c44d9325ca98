"""Each driver package ships its README and a sample configuration that uses exactly the drivers it registers."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from conftest import ROOT
from pydantic import BaseModel

from agent.config.loader import load_config
from agent.drivers import registry

DRIVERS = ROOT / "agent" / "drivers"
PACKAGES = sorted(p.name for p in DRIVERS.iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_"))


def package_of(module: str) -> str:
    """`agent.drivers.modbus.rtu` -> `modbus`."""
    parts = module.split(".")
    assert parts[:2] == ["agent", "drivers"] and len(parts) > 3, f"{module} is not inside a driver package"
    return parts[2]


def registered_by_package() -> dict[str, set[str]]:
    """Driver names each package registers, told by the modules of their factories and channel models."""
    found: dict[str, set[str]] = {}
    for info in registry.all_drivers():
        owners = {package_of(info.factory.__module__), package_of(info.channel_model.__module__)}
        assert len(owners) == 1, f"driver {info.name}: factory and channel model live in different packages {owners}"
        found.setdefault(owners.pop(), set()).add(info.name)
    return found


def sample_drivers(path: Path) -> set[str]:
    return {channel.driver for channel in load_config(path).channels}


def mismatch(package: str, sample: Path, registered: dict[str, set[str]]) -> list[str]:
    """What is wrong with the drivers a package's sample uses; empty when it uses exactly its own."""
    own = registered.get(package, set())
    used = sample_drivers(sample)
    problems = []
    if used - own:
        problems.append(f"{sample} uses {sorted(used - own)}, which package {package} does not register")
    if own - used:
        problems.append(f"{sample} leaves out {sorted(own - used)}, which package {package} registers")
    return problems


def model_fields(model: type[BaseModel], field: str) -> type[BaseModel]:
    """The item model of a list field, e.g. the device model of `channel.devices`."""
    annotation = model.model_fields[field].annotation
    (item,) = typing.get_args(annotation)
    assert isinstance(item, type) and issubclass(item, BaseModel)
    return item


def test_the_driver_packages_are_found_and_each_registers_a_driver() -> None:
    registered = registered_by_package()
    assert {"modbus", "dlt645", "opcua"} <= set(PACKAGES)
    assert set(registered) == set(PACKAGES), "a driver package that registers nothing, or a driver outside one"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_driver_package_has_a_readme_and_a_sample(package: str) -> None:
    assert (DRIVERS / package / "README.md").is_file()
    assert (DRIVERS / package / "sample.yaml").is_file()


@pytest.mark.parametrize("package", PACKAGES)
def test_each_sample_uses_all_and_only_the_drivers_its_package_registers(package: str) -> None:
    assert mismatch(package, DRIVERS / package / "sample.yaml", registered_by_package()) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_each_readme_names_every_option_of_its_channel_device_and_point_models(package: str) -> None:
    readme = (DRIVERS / package / "README.md").read_text(encoding="utf-8")
    missing: list[str] = []
    for info in registry.all_drivers():
        if package_of(info.factory.__module__) != package:
            continue
        device = model_fields(info.channel_model, "devices")
        point = model_fields(device, "points")
        for model in (info.channel_model, device, point):
            missing += [f"{model.__name__}.{name}" for name in model.model_fields if f"`{name}`" not in readme]
    assert missing == []


def test_a_sample_using_another_packages_driver_or_leaving_one_out_is_caught(tmp_path: Path) -> None:
    registered = {"modbus": {"modbus_tcp", "modbus_rtu"}, "dlt645": {"dlt645"}}
    sample = tmp_path / "sample.yaml"
    sample.write_text(
        'agent: {id: ipc-01, enterprise: "150625000123"}\n'
        "channels:\n"
        "  - {id: plc, driver: modbus_tcp, host: 10.0.0.1, devices: [{id: d, points: [{id: P1, address: 0}]}]}\n"
        '  - {id: m, driver: dlt645, port: /dev/ttyUSB0, devices: [{id: M1, address: "000000000001",\n'
        '     points: [{id: P2, di: "00010000"}]}]}\n',
        encoding="utf-8",
    )
    problems = mismatch("modbus", sample, registered)
    assert any("uses ['dlt645']" in p for p in problems), problems
    assert any("leaves out ['modbus_rtu']" in p for p in problems), problems
    assert mismatch("dlt645", sample, registered) != []

