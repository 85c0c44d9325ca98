#!/usr/bin/env bash
# Create (or update) the virtual environment in .venv with the agent, its tooling (simulators, demo, bench: the
# devtools distribution, never part of the runtime wheel) and, with --test, the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "setup: python3 (>= 3.11) is required" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: python3 is $(python3 -V 2>&1); 3.11 or newer is required" >&2; exit 1; }
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || { echo "setup: 'python3 -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
fi
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}" -e ./devtools
