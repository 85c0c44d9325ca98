#!/usr/bin/env bash
# Build the offline installation bundle: one archive with the agent's wheel, every wheel it needs for the target
# Python and architecture, the install script, the unit and the example configuration. On a plant PC with no
# network: tar xf edge-agent-*.tar.gz && cd edge-agent-* && sudo ./install.sh
#
#   scripts/bundle.sh                      # this machine's Python and architecture
#   scripts/bundle.sh --python 3.11 --arch aarch64 --arch x86_64
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
arches=()
out=dist
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python_version="$2"; shift 2 ;;
        --arch) arches+=("$2"); shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#arches[@]} -eq 0 ]] && arches=("$(uname -m)")
command -v python3 >/dev/null || { echo "bundle.sh: python3 is required" >&2; exit 1; }

version=$(python3 -c 'import re,sys; print(re.search(r"^version = \"([^\"]+)\"", open("pyproject.toml").read(), re.M)[1])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip wheel
# a clean build: setuptools never clears build/, and a stale one once shipped a deleted module
rm -rf build
"$work/venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/agent" .
rm -rf build
agent_wheel=$(ls "$work"/agent/edge_agent-*.whl)
pyver=${python_version/./}
mkdir -p "$out"
for arch in "${arches[@]}"; do
    name="edge-agent-$version-py$pyver-$arch"
    dir="$work/$name"
    mkdir -p "$dir/wheels"
    cp "$agent_wheel" "$dir/wheels/"
    # every dependency as a binary wheel for the target: manylinux for glibc systems, any pure-Python wheel
    "$work/venv/bin/pip" download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version "$python_version" --implementation cp --abi "cp$pyver" \
        --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
        --platform "linux_$arch" --dest "$dir/wheels" "$agent_wheel" || {
        echo "bundle.sh: some dependency has no wheel for Python $python_version on $arch; see the message above" >&2
        exit 1; }
    cp systemd/install.sh systemd/edge-agent.service config/example.yaml README.md "$dir/"
    chmod 0755 "$dir/install.sh"
    tar -C "$work" -czf "$out/$name.tar.gz" "$name"
    echo "bundle.sh: $out/$name.tar.gz ($(ls "$dir/wheels" | wc -l) wheels)"
done
