#!/usr/bin/env bash
# Install edge-agent as a systemd service: a virtual environment in /opt/edge-agent, a system user and the
# group of the field engineers who may use the CLI, the unit file, and /etc/edge-agent/agent.yaml (the example,
# when none exists yet). Run as root, either from an offline bundle (scripts/bundle.sh: the wheels beside this
# script, no network needed) or from a checkout (the dependencies come from the package index):
#
#   sudo ./install.sh                 install or upgrade (configuration and store are kept)
#   sudo ./install.sh --uninstall     remove the service and the program; keep configuration and store
#   sudo ./install.sh --uninstall --purge    remove those too
#
# EDGE_AGENT_PREFIX, EDGE_AGENT_CONF_DIR, EDGE_AGENT_STATE_DIR, EDGE_AGENT_UNIT_DIR, EDGE_AGENT_BIN_DIR,
# EDGE_AGENT_COMPLETION_DIR and EDGE_AGENT_CACHE_DIR move the places it writes (default /opt/edge-agent,
# /etc/edge-agent, /var/lib/edge-agent, /etc/systemd/system, /usr/local/bin for the `edge-agent` command,
# /etc/bash_completion.d, /var/cache/edge-agent, which an uninstall empties).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX=${EDGE_AGENT_PREFIX:-/opt/edge-agent}
CONF_DIR=${EDGE_AGENT_CONF_DIR:-/etc/edge-agent}
STATE_DIR=${EDGE_AGENT_STATE_DIR:-/var/lib/edge-agent}
CACHE_DIR=${EDGE_AGENT_CACHE_DIR:-/var/cache/edge-agent}  # the unit's CacheDirectory: the kept parse of agent.yaml
UNIT_DIR=${EDGE_AGENT_UNIT_DIR:-/etc/systemd/system}
say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

uninstall=0 purge=0
for arg in "$@"; do
    case "$arg" in
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $arg (see --help)" ;;
    esac
done
[[ $purge -eq 1 && $uninstall -eq 0 ]] && die "--purge goes with --uninstall"
[[ $EUID -eq 0 ]] || die "run as root (sudo $0)"
systemd_up() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

if [[ $uninstall -eq 1 ]]; then
    if systemd_up; then
        systemctl disable --now edge-agent 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/edge-agent.service"
    systemd_up && systemctl daemon-reload
    rm -rf "$PREFIX"
    rm -f "${EDGE_AGENT_COMPLETION_DIR:-/etc/bash_completion.d}/edge-agent"
    [[ -L "${EDGE_AGENT_BIN_DIR:-/usr/local/bin}/edge-agent" ]] && rm -f "${EDGE_AGENT_BIN_DIR:-/usr/local/bin}/edge-agent"
    rm -rf "$CACHE_DIR"  # a copy of what agent.yaml held, passwords too; the next start would parse it again anyway
    if [[ $purge -eq 1 ]]; then
        rm -rf "$CONF_DIR" "$STATE_DIR"
        say "removed the service, the program, the configuration and the store"
    else
        say "removed the service and the program; kept $CONF_DIR and $STATE_DIR (--purge removes them)"
    fi
    exit 0
fi

command -v python3 >/dev/null || die "python3 (>= 3.11) is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 is $(python3 -V 2>&1); 3.11 or newer is required"
python3 -c 'import venv, ensurepip' 2>/dev/null || die "python3's venv module is missing (Debian/Ubuntu: the python3-venv package)"

if [[ -d "$HERE/wheels" ]]; then  # an offline bundle: everything is beside this script
    source=(--no-index --find-links "$HERE/wheels" edge-agent)
    files="$HERE"
elif [[ -f "$HERE/../pyproject.toml" ]]; then  # a checkout: systemd/install.sh
    source=("$HERE/..")
    files="$HERE/.."
    [[ -f "$files/systemd/edge-agent.service" ]] && unit="$files/systemd/edge-agent.service"
else
    die "no wheels/ beside this script and not in a checkout: use the bundle from scripts/bundle.sh"
fi
unit=${unit:-$files/edge-agent.service}
example=$files/example.yaml
[[ -f $example ]] || example=$files/config/example.yaml

getent group edge-agent-cli >/dev/null || groupadd --system edge-agent-cli
id edge-agent >/dev/null 2>&1 || useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin edge-agent
getent group dialout >/dev/null && usermod -a -G dialout edge-agent
usermod -a -G edge-agent-cli edge-agent  # the daemon hands its control socket to that group

# a new virtual environment beside the old one, switched in (the link venv) only once it works: an upgrade
# never leaves the plant without a working agent (a venv cannot be moved: its scripts name its own path)
mkdir -p "$PREFIX"
fresh="$PREFIX/venv-$(date +%Y%m%d%H%M%S)"
rm -rf "$fresh"
python3 -m venv "$fresh"
"$fresh/bin/pip" install --quiet --disable-pip-version-check "${source[@]}" \
    || { rm -rf "$fresh"; die "installing the agent failed (see above); the installed version, if any, is unchanged"; }
"$fresh/bin/edge-agent" --version >/dev/null || { rm -rf "$fresh"; die "the new installation does not run; unchanged"; }
[[ -d "$PREFIX/venv" && ! -L "$PREFIX/venv" ]] && rm -rf "$PREFIX/venv"  # an install of before the link
ln -sfn "$(basename "$fresh")" "$PREFIX/venv.link" && mv -T "$PREFIX/venv.link" "$PREFIX/venv"
for old in "$PREFIX"/venv-*; do
    [[ "$old" == "$fresh" ]] || rm -rf "$old"
done
cp "$files/README.md" "$PREFIX/README.md"

install -d -m 0750 -o root -g edge-agent "$CONF_DIR"
install -d -m 0750 -o edge-agent -g edge-agent "$STATE_DIR"
# the agent's signing key, made once and kept over upgrades (the platform registers its public key)
if [[ ! -e "$STATE_DIR/agent-key.pem" ]]; then
    "$PREFIX/venv/bin/edge-agent" keys init --dir "$STATE_DIR" || die "creating the agent's signing key failed (see above)"
    chown edge-agent:edge-agent "$STATE_DIR/agent-key.pem"
fi
# secrets for the unit's LoadCredential=, readable by root alone (an empty one keeps the unit startable)
install -d -m 0700 -o root -g root "$CONF_DIR/credentials"
[[ -e "$CONF_DIR/credentials/mqtt-password" ]] || install -m 0600 -o root -g root /dev/null "$CONF_DIR/credentials/mqtt-password"
if [[ ! -e "$CONF_DIR/agent.yaml" ]]; then
    install -m 0640 -o root -g edge-agent "$example" "$CONF_DIR/agent.yaml"
    say "wrote $CONF_DIR/agent.yaml from the example: edit it for this site"
else
    say "kept $CONF_DIR/agent.yaml and the store in $STATE_DIR"
fi
"$PREFIX/venv/bin/edge-agent" config check "$CONF_DIR/agent.yaml" || say "fix $CONF_DIR/agent.yaml before starting"
mkdir -p "$UNIT_DIR"
install -m 0644 "$unit" "$UNIT_DIR/edge-agent.service"
ln -sfn "$PREFIX/venv/bin/edge-agent" "${EDGE_AGENT_BIN_DIR:-/usr/local/bin}/edge-agent" 2>/dev/null || true
completion=${EDGE_AGENT_COMPLETION_DIR:-/etc/bash_completion.d}
if [[ -d "$completion" ]]; then  # tab completion of commands and options (click's)
    _EDGE_AGENT_COMPLETE=bash_source "$PREFIX/venv/bin/edge-agent" > "$completion/edge-agent" || true
fi
if systemd_up; then
    systemctl daemon-reload
    systemctl is-active --quiet edge-agent && systemctl restart edge-agent && say "restarted the running agent"
    say "done. Start with: systemctl enable --now edge-agent; logs: journalctl -u edge-agent -f"
else
    say "done; systemd is not running here: enable the unit where it runs (systemctl enable --now edge-agent)"
fi
say "field engineers: add them to group edge-agent-cli to use edge-agent status/alarms (usermod -a -G edge-agent-cli NAME)"
