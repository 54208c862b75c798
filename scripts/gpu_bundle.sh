#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check/run.py needs, for an NVIDIA machine with no
# network: run this once where PyPI is reachable, then carry build/gpu-check to the GPU
# machine (beside this checkout) and run `python3 scripts/gpu_check/run.py` there.
#
# What it fetches: gpusm's run-time dependencies from pyproject.toml, less those that only
# the CLI, the HTTP API and the Docker runtime import (the check uses neither), for
# CPython 3.11-3.13 on manylinux x86_64 (binary wheels only). gpusm itself is not bundled:
# the check runs the checkout's own source, so a bundle made last week still checks
# today's code. Fails if the bundle reaches 64 MiB (what a device run can carry).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${GPU_BUNDLE_DIR:-build/gpu-check}
PYTHONS=${GPU_BUNDLE_PYTHONS:-"3.11 3.12 3.13"}
LIMIT_MIB=64
# Imported only by gpusm.cli, gpusm.api and gpusm.runtimes.docker.
EXCLUDE="docker typer rich fastapi uvicorn prometheus-client"

PY=${PYTHON:-python3}
REQS=$("$PY" - "$EXCLUDE" <<'EOF'
import re, sys, tomllib
excluded = set(sys.argv[1].split())
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
    if name not in excluded:
        print(dep)
EOF
)

rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels"
printf '%s\n' "$REQS" >"$DEST/requirements.txt"
for version in $PYTHONS; do
    echo "== wheels for CPython $version" >&2
    "$PY" -m pip download --quiet --disable-pip-version-check \
        --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 \
        --dest "$DEST/wheels" -r "$DEST/requirements.txt"
done
printf '%s\n' "$PYTHONS" >"$DEST/pythons.txt"

total=0
while read -r size name; do
    printf '%8.2f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "$name"
    total=$((total + size))
done < <(find "$DEST/wheels" -name '*.whl' -printf '%s %f\n' | sort -k2)
printf '%8.2f MiB  total (%s)\n' "$(echo "$total / 1048576" | bc -l)" "$DEST"
if ((total >= LIMIT_MIB * 1048576)); then
    echo "error: the bundle is over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
