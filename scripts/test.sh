#!/usr/bin/env bash
# Command 2 of the README (and CI): set up, lint, type-check and run every test against a real mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test

if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "test: installing mosquitto (the tests run a real broker)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "test: mosquitto is missing; install it (sudo apt-get install mosquitto) and run again" >&2
        exit 1
    fi
fi
export PATH="$PATH:/usr/sbin"
# systemd-analyze rates the unit's sandbox (tests/test_systemd_unit.py, skipped without it); it needs no running systemd
if ! command -v systemd-analyze >/dev/null; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "test: installing systemd-analyze (the unit's sandbox is checked)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } \
            || echo "test: could not install systemd; the unit's check will be skipped" >&2
    else
        echo "test: systemd-analyze is missing (sudo apt-get install systemd); the unit's check will be skipped" >&2
    fi
fi

echo "== ruff"
.venv/bin/ruff check agent devtools tests
echo "== mypy --strict agent devtools"
.venv/bin/mypy --strict agent
.venv/bin/mypy --strict devtools/simulators devtools/bench
echo "== pytest"
# the slow tests mostly wait (outages, restarts), so several run side by side even on two cores
.venv/bin/python -m pytest -q -n 4 "$@"
