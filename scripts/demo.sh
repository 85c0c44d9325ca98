#!/usr/bin/env bash
# Command 1 of the README: set up and run the demo (simulated plant, broker, agent, platform). Arguments go to
# `edge-agent demo`, e.g. scripts/demo.sh --duration 60
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edge-agent demo "$@"
