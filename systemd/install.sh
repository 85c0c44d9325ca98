#!/usr/bin/env bash
# Install edge-agent as a systemd service: a virtual environment in /opt/edge-agent, a system user,
# the unit file, and /etc/edge-agent/agent.yaml (the example, when none exists yet). Run as root
# from a checkout of this repository: sudo systemd/install.sh
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/edge-agent
CONF_DIR=/etc/edge-agent

if [[ $EUID -ne 0 ]]; then
    echo "install.sh: run as root (sudo $0)" >&2
    exit 1
fi
command -v python3 >/dev/null || { echo "install.sh: python3 (>= 3.11) is required" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: python3 is $(python3 -V 2>&1); 3.11 or newer is required" >&2; exit 1; }

id edge-agent >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent
mkdir -p "$PREFIX" "$CONF_DIR" /var/lib/edge-agent
chown edge-agent:edge-agent /var/lib/edge-agent
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet "$SRC"
cp "$SRC/README.md" "$PREFIX/README.md"
if [[ ! -e "$CONF_DIR/agent.yaml" ]]; then
    install -m 0640 -g edge-agent "$SRC/config/example.yaml" "$CONF_DIR/agent.yaml"
    echo "install.sh: wrote $CONF_DIR/agent.yaml from the example: edit it for this site"
fi
"$PREFIX/venv/bin/edge-agent" config check "$CONF_DIR/agent.yaml" || echo "install.sh: fix $CONF_DIR/agent.yaml before starting"
install -m 0644 "$SRC/systemd/edge-agent.service" /etc/systemd/system/edge-agent.service
systemctl daemon-reload
echo "install.sh: done. Start with: systemctl enable --now edge-agent; logs: journalctl -u edge-agent -f"
