"""What the national standards say about gas detectors: default alarm set points, OELs and the checks config must pass.

This module only computes and checks numbers (GB/T 50493-2019, GBZ 2.1-2019, GB 16808); it never evaluates readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OelBasis = Literal["MAC", "PC-STEL", "PC-TWA"]

# Where the set-point rules live. The wording of its items 1-4 is confirmed by several public copies; none of them
# shows the clause number, which comes from our requirements and still has to be checked against the printed
# standard.
SET_POINT_CLAUSE = "GB/T 50493-2019 5.5.3"
# GB 16808-2008 4.1.3.3 is the controller's alarm-delay clause (GB 16808-2025 names it when moving it to 5.5.1.3).
DELAY_CLAUSE = "GB 16808-2008 4.1.3.3"

COMBUSTIBLE_FIRST_MAX = 25.0  # %LEL: GB/T 50493-2019 5.5.3 item 1, first-level set point ≤ 25 %LEL
COMBUSTIBLE_SECOND_MAX = 50.0  # %LEL: GB/T 50493-2019 5.5.3 item 2, second-level set point ≤ 50 %LEL
TOXIC_FIRST_OEL = 1.0  # fraction of OEL: GB/T 50493-2019 5.5.3 item 3, first-level set point ≤ 100 % OEL
TOXIC_SECOND_OEL = 2.0  # fraction of OEL: GB/T 50493-2019 5.5.3 item 3, second-level set point ≤ 200 % OEL
OXYGEN_LOW = 19.5  # %VOL: GB/T 50493-2019 5.5.3 item 4, deficiency (欠氧) set point "should be" (宜为) 19.5 %VOL
OXYGEN_HIGH = 23.5  # %VOL: GB/T 50493-2019 5.5.3 item 4, enrichment (过氧) set point "should be" (宜为) 23.5 %VOL
# s: GB 16808-2008 4.1.3.3, the longest alarm delay a controller may be set to; not to be confused with its
# response time (it must signal a detector's alarm within 10 s). Both figures are the 2008 text as our design
# and requirements quote it; no public copy found confirms the numbers, nor that the 2025 edition (in force
# since 2026-08-01) keeps them.
MAX_ALARM_DELAY_S = 60.0

# L/mol at 20 °C and 101.3 kPa; 24.04 is the conventional 22.4 × 293/273, the exact ideal-gas value 24.06 (0.1 %
# apart). GB/T 50493-2019's gas table uses it: its mg/m³ IDLH figures are NIOSH's ppm figures converted at
# 24.04 (H2S 300 ppm → 430, Cl2 30 ppm → 88 mg/m³). GBZ 2.1's own statement of the state was not found.
MOLAR_VOLUME_L = 24.04

_UNITS = {"mg/m³": "mg/m³", "mg/m3": "mg/m³", "ppm": "ppm", "%oel": "%OEL"}
TOXIC_UNITS = ("mg/m³", "mg/m3", "ppm", "%OEL")
_TOLERANCE = 1e-9  # relative: only float noise from unit conversion passes a limit


@dataclass(frozen=True)
class Gas:
    """A toxic gas and the occupational exposure limit (OEL) its alarm set points derive from."""

    key: str  # formula-like key used in config, e.g. "H2S"
    name: str  # Chinese name, e.g. 硫化氢
    formula: str
    molar_mass: float  # g/mol
    oel_mg_m3: float  # the OEL GB/T 50493-2019 uses, mg/m³ at 20 °C, 101.3 kPa
    oel_basis: OelBasis
    idlh_mg_m3: float | None  # as tabulated in GB/T 50493-2019; None when not known
    source: str


def _gas(key: str, name: str, formula: str, molar_mass: float, *, mac: float | None = None,
         twa: float | None = None, stel: float | None = None, idlh: float | None, source: str) -> Gas:
    # The OEL is the MAC when the gas has one, otherwise the PC-TWA, otherwise the PC-STEL: that is the choice
    # every row of GB/T 50493-2019's gas table makes (CO: TWA 20, STEL 30, first alarm 20 mg/m³).
    candidates: tuple[tuple[float | None, OelBasis], ...] = ((mac, "MAC"), (twa, "PC-TWA"), (stel, "PC-STEL"))
    for value, basis in candidates:
        if value is not None:
            return Gas(key, name, formula, molar_mass, value, basis, idlh, source)
    raise ValueError(f"{key}: no occupational exposure limit given")


_GBZ = "GBZ 2.1-2019 表1; GB/T 50493-2019 附录B"

# Limits in mg/m³ from GBZ 2.1-2019 as GB/T 50493-2019's gas table repeats them; IDLH from the same table.
# Molar masses from IUPAC standard atomic weights (H 1.008, C 12.011, N 14.007, O 15.999, S 32.06, Cl 35.45).
GASES: dict[str, Gas] = {g.key: g for g in (
    _gas("H2S", "硫化氢", "H2S", 34.08, mac=10.0, idlh=430.0, source=_GBZ),
    # CO: the non-plateau values; GBZ 2.1 sets other CO limits for sites above 2000 m.
    _gas("CO", "一氧化碳", "CO", 28.01, twa=20.0, stel=30.0, idlh=1700.0, source=_GBZ),
    _gas("NH3", "氨", "NH3", 17.03, twa=20.0, stel=30.0, idlh=360.0, source=_GBZ),
    _gas("Cl2", "氯气", "Cl2", 70.90, mac=1.0, idlh=88.0, source=_GBZ),
    # Benzene: GBZ 2.1-2019 amendment No. 1 (2022) lowered PC-TWA 6 → 3 and PC-STEL 10 → 6 mg/m³; GB/T 50493-2019
    # predates it and still shows 6/10. Seen only in public repositories' copies of the amendment, not its text.
    _gas("C6H6", "苯", "C6H6", 78.11, twa=3.0, stel=6.0, idlh=9800.0,
         source="GBZ 2.1-2019 第1号修改单 (2022); GB/T 50493-2019 附录B (IDLH)"),
    _gas("SO2", "二氧化硫", "SO2", 64.06, twa=5.0, stel=10.0, idlh=270.0, source=_GBZ),
    _gas("NO2", "二氧化氮", "NO2", 46.01, twa=5.0, stel=10.0, idlh=96.0, source=_GBZ),
    # HCN: converted with HCN's own molar mass; were the limit counted as CN (按CN计), its ppm would be 4 % higher.
    _gas("HCN", "氰化氢", "HCN", 27.03, mac=1.0, idlh=56.0, source=_GBZ),
    _gas("HCl", "氯化氢", "HCl", 36.46, mac=7.5, idlh=150.0, source=_GBZ),
    _gas("CH3OH", "甲醇", "CH3OH", 32.04, twa=25.0, stel=50.0, idlh=33000.0, source=_GBZ),
    _gas("C7H8", "甲苯", "C7H8", 92.14, twa=50.0, stel=100.0, idlh=7700.0, source=_GBZ),
    _gas("C8H10", "二甲苯", "C8H10", 106.17, twa=50.0, stel=100.0, idlh=4400.0, source=_GBZ),
)}


def gas_by_key(key: str) -> Gas:
    """The gas with this key, ignoring case (h2s, Cl2, CL2 ...); ValueError naming the known ones otherwise."""
    found = GASES.get(key) or next((g for k, g in GASES.items() if k.casefold() == key.casefold()), None)
    if found is None:
        raise ValueError(f"unknown gas {key!r}; known gases: {', '.join(GASES)}")
    return found


def ppm_to_mg_m3(gas: Gas, ppm: float) -> float:
    """Convert a volume fraction (ppm) to mass concentration (mg/m³) at 20 °C and 101.3 kPa."""
    return ppm * gas.molar_mass / MOLAR_VOLUME_L


def mg_m3_to_ppm(gas: Gas, mg_m3: float) -> float:
    """Convert a mass concentration (mg/m³) to a volume fraction (ppm) at 20 °C and 101.3 kPa."""
    return mg_m3 * MOLAR_VOLUME_L / gas.molar_mass


def _toxic_unit(gas: Gas, unit: str) -> str:
    canonical = _UNITS.get(unit.strip().casefold())
    if canonical is None:
        raise ValueError(f"{gas.key} ({gas.name}) detector unit {unit!r} is not supported; "
                         f"use one of {', '.join(TOXIC_UNITS)}")
    return canonical


def toxic_set_points(key: str, unit: str) -> tuple[float, float]:
    """Default (first, second) set points of a toxic gas detector: 100 % and 200 % of the OEL, in its unit.

    `unit` is mg/m³ (or mg/m3), ppm or %OEL. ppm values are converted at 24.04 L/mol and rounded down to four
    significant digits. ValueError for an unknown gas or unit.
    """
    gas = gas_by_key(key)
    canonical = _toxic_unit(gas, unit)
    if canonical == "%OEL":
        return TOXIC_FIRST_OEL * 100.0, TOXIC_SECOND_OEL * 100.0
    first, second = TOXIC_FIRST_OEL * gas.oel_mg_m3, TOXIC_SECOND_OEL * gas.oel_mg_m3
    if canonical == "ppm":
        return _round_down(mg_m3_to_ppm(gas, first)), _round_down(mg_m3_to_ppm(gas, second))
    return first, second


def _round_down(x: float, digits: int = 4) -> float:
    """Round a positive set point down to `digits` significant digits, so a converted default never exceeds its OEL."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return round(math.floor(x / step + 1e-9) * step, 12)


def combustible_set_points() -> tuple[float, float]:
    """Default (first, second) set points of a combustible gas detector, %LEL: the largest the standard allows."""
    return COMBUSTIBLE_FIRST_MAX, COMBUSTIBLE_SECOND_MAX


def oxygen_set_points() -> tuple[float, float]:
    """Default (low, high) set points of an oxygen detector, %VOL: deficiency and enrichment."""
    return OXYGEN_LOW, OXYGEN_HIGH


def _num(x: float) -> str:
    """A number for a message: four significant digits, no trailing zeros (25, 7.053, 33000)."""
    text = f"{float(f'{x:.4g}'):f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _above(value: float, limit: float) -> bool:
    return value > limit + abs(limit) * _TOLERANCE


def _not_numbers(values: dict[str, float | None]) -> list[str]:
    return [f"{name} {value} is not a finite number" for name, value in values.items()
            if value is not None and not math.isfinite(value)]


def check_gas_limits(kind: str, first: float | None, second: float | None, unit: str, delay_s: float,
                     gas: str | None = None) -> list[str]:
    """Violations of the standards by a gas detector's alarm settings; empty when they comply.

    `first`/`second` are the first- and second-level set points (combustible, toxic) or the low and high set
    points (oxygen), in the detector's `unit`; None when not set. `gas` is the toxic gas key.
    """
    if kind not in ("combustible", "toxic", "oxygen"):
        raise ValueError(f"unknown gas detector kind {kind!r}; use combustible, toxic or oxygen")
    problems = _not_numbers({"alarm delay": delay_s})
    if not problems and _above(delay_s, MAX_ALARM_DELAY_S):
        problems.append(f"alarm delay {_num(delay_s)} s is above the {_num(MAX_ALARM_DELAY_S)} s allowed by "
                        f"{DELAY_CLAUSE}")
    if kind == "oxygen":
        return problems + _check_oxygen(first, second, unit)
    bad = _not_numbers({"first alarm": first, "second alarm": second})
    if bad:
        return problems + bad
    if kind == "combustible":
        if unit.strip().casefold() not in ("%lel", "% lel"):
            return [*problems, f"combustible gas set points are in %LEL ({SET_POINT_CLAUSE}), not {unit!r}"]
        shown_unit = "%LEL"
        levels = [("first alarm", first, COMBUSTIBLE_FIRST_MAX, ""),
                  ("second alarm", second, COMBUSTIBLE_SECOND_MAX, "")]
    else:
        if gas is None:
            return [*problems, f"a toxic gas detector needs its gas (one of {', '.join(GASES)}) to be checked "
                               f"against {SET_POINT_CLAUSE}"]
        try:
            known = gas_by_key(gas)
            top_first, top_second = toxic_set_points(gas, unit)
        except ValueError as exc:
            return [*problems, str(exc)]
        shown_unit = _toxic_unit(known, unit)
        oel = f"of {known.key} {known.name}, {known.oel_basis} {_num(known.oel_mg_m3)} mg/m³"
        levels = [("first alarm", first, top_first, f" ({_num(TOXIC_FIRST_OEL * 100)} % OEL {oel})"),
                  ("second alarm", second, top_second, f" ({_num(TOXIC_SECOND_OEL * 100)} % OEL {oel})")]
    for name, value, limit, why in levels:
        if value is not None and _above(value, limit):
            problems.append(f"{name} {_num(value)} {shown_unit} is above {_num(limit)} {shown_unit}{why} "
                            f"allowed by {SET_POINT_CLAUSE}")
    if first is not None and second is not None and first > second:
        problems.append(f"first alarm {_num(first)} {shown_unit} is above the second alarm {_num(second)} "
                        f"{shown_unit}; {SET_POINT_CLAUSE} has the first level below the second")
    return problems


def _check_oxygen(low: float | None, high: float | None, unit: str) -> list[str]:
    # Item 4 recommends (宜) the two set points rather than bounding them, so what can be refused is an alarm
    # that would let a deficient or enriched atmosphere pass: a low set below 19.5 or a high above 23.5 %VOL.
    bad = _not_numbers({"low alarm": low, "high alarm": high})
    if bad:
        return bad
    if unit.strip().casefold() not in ("%vol", "% vol", "%"):
        return [f"oxygen set points are in %VOL ({SET_POINT_CLAUSE}), not {unit!r}"]
    problems = []
    if low is not None and low < OXYGEN_LOW - OXYGEN_LOW * _TOLERANCE:
        problems.append(f"low alarm {_num(low)} %VOL is below {_num(OXYGEN_LOW)} %VOL, the oxygen deficiency set "
                        f"point of {SET_POINT_CLAUSE}")
    if high is not None and _above(high, OXYGEN_HIGH):
        problems.append(f"high alarm {_num(high)} %VOL is above {_num(OXYGEN_HIGH)} %VOL, the oxygen enrichment "
                        f"set point of {SET_POINT_CLAUSE}")
    return problems
