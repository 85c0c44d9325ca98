"""Gas-detector knowledge: default set points, unit conversion and the checks of GB/T 50493-2019 / GB 16808."""

from __future__ import annotations

import math
import re

import pytest

from agent.rules import gas
from agent.rules.gas import GASES, check_gas_limits, gas_by_key, mg_m3_to_ppm, ppm_to_mg_m3, toxic_set_points

ATOMIC_WEIGHTS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06, "Cl": 35.45}


def molar_mass_of(formula: str) -> float:
    return sum(ATOMIC_WEIGHTS[element] * int(count or 1)
               for element, count in re.findall(r"([A-Z][a-z]?)(\d*)", formula))


# --- defaults -------------------------------------------------------------------------------------------------

def test_combustible_defaults_are_the_largest_set_points_the_standard_allows() -> None:
    assert gas.combustible_set_points() == (25.0, 50.0)
    assert (gas.COMBUSTIBLE_FIRST_MAX, gas.COMBUSTIBLE_SECOND_MAX) == (25.0, 50.0)


def test_oxygen_defaults_are_deficiency_then_enrichment() -> None:
    assert gas.oxygen_set_points() == (19.5, 23.5)


def test_toxic_defaults_are_one_and_two_oels_in_mg_per_cubic_metre() -> None:
    assert toxic_set_points("H2S", "mg/m³") == (10.0, 20.0)
    assert toxic_set_points("H2S", "mg/m3") == (10.0, 20.0)
    assert toxic_set_points("Cl2", "mg/m³") == (1.0, 2.0)
    assert toxic_set_points("HCl", "mg/m³") == (7.5, 15.0)


def test_toxic_defaults_in_percent_oel_are_100_and_200() -> None:
    assert toxic_set_points("NH3", "%OEL") == (100.0, 200.0)


def test_toxic_defaults_in_ppm_are_converted_and_rounded_down() -> None:
    # H2S: 10 mg/m³ × 24.04 / 34.08 = 7.0540 ppm, 20 mg/m³ → 14.108 ppm; rounded down to 4 significant digits.
    assert toxic_set_points("H2S", "ppm") == (7.053, 14.1)
    # CO: PC-TWA 20 mg/m³ × 24.04 / 28.01 = 17.165 ppm.
    assert toxic_set_points("CO", "ppm") == (17.16, 34.33)


def test_ppm_defaults_never_exceed_the_oel() -> None:
    for key, known in GASES.items():
        first, second = toxic_set_points(key, "ppm")
        assert ppm_to_mg_m3(known, first) <= known.oel_mg_m3
        assert ppm_to_mg_m3(known, second) <= 2 * known.oel_mg_m3
        assert ppm_to_mg_m3(known, first) > 0.999 * known.oel_mg_m3


def test_gas_keys_are_matched_ignoring_case() -> None:
    assert toxic_set_points("h2s", "MG/M3") == (10.0, 20.0)
    assert gas_by_key("CL2") is GASES["Cl2"]


# --- the table ------------------------------------------------------------------------------------------------

def test_table_holds_at_least_the_gases_the_issue_names() -> None:
    assert {"H2S", "CO", "NH3", "Cl2", "C6H6"} <= set(GASES)
    for key, known in GASES.items():
        assert known.key == key
        assert known.name and known.source
        assert known.oel_mg_m3 > 0


def test_molar_masses_agree_with_standard_atomic_weights() -> None:
    for known in GASES.values():
        assert known.molar_mass == pytest.approx(molar_mass_of(known.formula), abs=0.01), known.key


def test_oel_is_the_mac_where_there_is_one_otherwise_the_pc_twa() -> None:
    assert (GASES["H2S"].oel_basis, GASES["H2S"].oel_mg_m3) == ("MAC", 10.0)
    assert (GASES["Cl2"].oel_basis, GASES["Cl2"].oel_mg_m3) == ("MAC", 1.0)
    # CO has PC-TWA 20 and PC-STEL 30: GB/T 50493-2019's table sets its first alarm at 20 mg/m³.
    assert (GASES["CO"].oel_basis, GASES["CO"].oel_mg_m3) == ("PC-TWA", 20.0)
    assert (GASES["NH3"].oel_basis, GASES["NH3"].oel_mg_m3) == ("PC-TWA", 20.0)
    assert (GASES["C6H6"].oel_basis, GASES["C6H6"].oel_mg_m3) == ("PC-TWA", 3.0)


# --- conversions ----------------------------------------------------------------------------------------------

def test_h2s_10_mg_per_cubic_metre_is_about_7_05_ppm() -> None:
    h2s = GASES["H2S"]
    assert mg_m3_to_ppm(h2s, 10.0) == pytest.approx(10.0 * 24.04 / 34.08)
    assert mg_m3_to_ppm(h2s, 10.0) == pytest.approx(7.054, abs=0.001)


def test_ppm_to_mg_per_cubic_metre_uses_20_degrees_and_101_3_kpa() -> None:
    assert gas.MOLAR_VOLUME_L == 24.04
    assert ppm_to_mg_m3(GASES["CO"], 1.0) == pytest.approx(28.01 / 24.04)


def test_conversions_are_inverse() -> None:
    for known in GASES.values():
        assert ppm_to_mg_m3(known, mg_m3_to_ppm(known, 12.5)) == pytest.approx(12.5)


# --- errors ---------------------------------------------------------------------------------------------------

def test_unknown_gas_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(ValueError, match="unknown gas 'CH4'") as caught:
        toxic_set_points("CH4", "ppm")
    for key in ("H2S", "CO", "NH3", "Cl2", "C6H6"):
        assert key in str(caught.value)


@pytest.mark.parametrize("unit", ["%LEL", "ppb", "", "mg/L"])
def test_unknown_unit_is_refused_naming_the_gas_and_the_accepted_units(unit: str) -> None:
    with pytest.raises(ValueError) as caught:
        toxic_set_points("H2S", unit)
    text = str(caught.value)
    assert "H2S" in text and "硫化氢" in text
    for accepted in ("mg/m³", "mg/m3", "ppm", "%OEL"):
        assert accepted in text


def test_unknown_detector_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="combustible, toxic or oxygen"):
        check_gas_limits("smoke", 1.0, 2.0, "%", 0.0)


# --- checks: what passes --------------------------------------------------------------------------------------

def test_settings_at_the_limits_pass() -> None:
    assert check_gas_limits("combustible", 25.0, 50.0, "%LEL", 60.0) == []
    assert check_gas_limits("combustible", 10.0, 20.0, "%lel", 0.0) == []
    assert check_gas_limits("toxic", 10.0, 20.0, "mg/m³", 60.0, "H2S") == []
    assert check_gas_limits("toxic", 100.0, 200.0, "%OEL", 5.0, "Cl2") == []
    assert check_gas_limits("oxygen", 19.5, 23.5, "%VOL", 60.0) == []
    assert check_gas_limits("oxygen", 20.0, 22.0, "%", 0.0) == []


def test_unset_levels_are_not_checked() -> None:
    assert check_gas_limits("combustible", None, None, "%LEL", 0.0) == []
    assert check_gas_limits("oxygen", None, 23.5, "%VOL", 0.0) == []


@pytest.mark.parametrize("unit", ["mg/m³", "mg/m3", "ppm", "%OEL"])
def test_every_default_passes_its_own_check(unit: str) -> None:
    for key in GASES:
        first, second = toxic_set_points(key, unit)
        assert check_gas_limits("toxic", first, second, unit, 0.0, key) == [], key


# --- checks: each violation -----------------------------------------------------------------------------------

def test_combustible_first_alarm_above_25_lel_is_refused() -> None:
    assert check_gas_limits("combustible", 30.0, 50.0, "%LEL", 0.0) == [
        "first alarm 30 %LEL is above 25 %LEL allowed by GB/T 50493-2019 5.5.3"]


def test_combustible_second_alarm_above_50_lel_is_refused() -> None:
    assert check_gas_limits("combustible", 25.0, 60.0, "%LEL", 0.0) == [
        "second alarm 60 %LEL is above 50 %LEL allowed by GB/T 50493-2019 5.5.3"]


def test_combustible_set_points_must_be_in_lel() -> None:
    assert check_gas_limits("combustible", 20.0, 40.0, "ppm", 0.0) == [
        "combustible gas set points are in %LEL (GB/T 50493-2019 5.5.3), not 'ppm'"]


def test_toxic_alarms_above_100_and_200_percent_oel_are_refused_in_mg() -> None:
    assert check_gas_limits("toxic", 12.0, 25.0, "mg/m³", 0.0, "H2S") == [
        "first alarm 12 mg/m³ is above 10 mg/m³ (100 % OEL of H2S 硫化氢, MAC 10 mg/m³) "
        "allowed by GB/T 50493-2019 5.5.3",
        "second alarm 25 mg/m³ is above 20 mg/m³ (200 % OEL of H2S 硫化氢, MAC 10 mg/m³) "
        "allowed by GB/T 50493-2019 5.5.3",
    ]


def test_toxic_alarm_in_ppm_is_checked_through_the_conversion() -> None:
    # CO PC-TWA 20 mg/m³ = 17.16 ppm: a first alarm at the common 24 ppm is too high under GB/T 50493-2019.
    assert check_gas_limits("toxic", 24.0, 30.0, "ppm", 0.0, "CO") == [
        "first alarm 24 ppm is above 17.16 ppm (100 % OEL of CO 一氧化碳, PC-TWA 20 mg/m³) "
        "allowed by GB/T 50493-2019 5.5.3"]


def test_toxic_alarm_in_percent_oel_is_refused_above_200() -> None:
    assert check_gas_limits("toxic", 100.0, 250.0, "%OEL", 0.0, "NH3") == [
        "second alarm 250 %OEL is above 200 %OEL (200 % OEL of NH3 氨, PC-TWA 20 mg/m³) "
        "allowed by GB/T 50493-2019 5.5.3"]


def test_toxic_check_reports_an_unknown_gas_or_unit_instead_of_raising() -> None:
    assert check_gas_limits("toxic", 1.0, 2.0, "ppm", 0.0, "CH4") == [
        "unknown gas 'CH4'; known gases: " + ", ".join(GASES)]
    assert check_gas_limits("toxic", 1.0, 2.0, "ppb", 0.0, "H2S") == [
        "H2S (硫化氢) detector unit 'ppb' is not supported; use one of mg/m³, mg/m3, ppm, %OEL"]


def test_toxic_check_needs_the_gas() -> None:
    (problem,) = check_gas_limits("toxic", 1.0, 2.0, "ppm", 0.0)
    assert problem.startswith("a toxic gas detector needs its gas (one of H2S, CO")
    assert problem.endswith("to be checked against GB/T 50493-2019 5.5.3")


def test_oxygen_low_below_19_5_and_high_above_23_5_are_refused() -> None:
    assert check_gas_limits("oxygen", 18.0, 25.0, "%VOL", 0.0) == [
        "low alarm 18 %VOL is below 19.5 %VOL, the oxygen deficiency set point of GB/T 50493-2019 5.5.3",
        "high alarm 25 %VOL is above 23.5 %VOL, the oxygen enrichment set point of GB/T 50493-2019 5.5.3",
    ]


def test_oxygen_set_points_must_be_in_percent_volume() -> None:
    assert check_gas_limits("oxygen", 19.5, 23.5, "ppm", 0.0) == [
        "oxygen set points are in %VOL (GB/T 50493-2019 5.5.3), not 'ppm'"]


@pytest.mark.parametrize("kind, first, second, unit, key", [
    ("combustible", 20.0, 40.0, "%LEL", None),
    ("toxic", 10.0, 20.0, "mg/m³", "H2S"),
    ("oxygen", 19.5, 23.5, "%VOL", None),
])
def test_delay_above_60_s_is_refused_for_every_kind(kind: str, first: float, second: float, unit: str,
                                                   key: str | None) -> None:
    assert check_gas_limits(kind, first, second, unit, 60.0, key) == []
    assert check_gas_limits(kind, first, second, unit, 61.0, key) == [
        "alarm delay 61 s is above the 60 s allowed by GB 16808-2008 4.1.3.3"]


def test_first_level_above_the_second_is_refused() -> None:
    assert check_gas_limits("combustible", 20.0, 15.0, "%LEL", 0.0) == [
        "first alarm 20 %LEL is above the second alarm 15 %LEL; GB/T 50493-2019 5.5.3 has the first level "
        "below the second"]


def test_all_violations_are_reported_together() -> None:
    problems = check_gas_limits("combustible", 30.0, 60.0, "%LEL", 120.0)
    assert len(problems) == 3
    assert problems[0].startswith("alarm delay 120 s")


def test_non_numbers_are_refused() -> None:
    assert check_gas_limits("combustible", math.nan, 40.0, "%LEL", 0.0) == ["first alarm nan is not a finite number"]
    assert check_gas_limits("oxygen", 19.5, math.inf, "%VOL", 0.0) == ["high alarm inf is not a finite number"]
    assert check_gas_limits("combustible", 20.0, 40.0, "%LEL", math.nan) == ["alarm delay nan is not a finite number"]
