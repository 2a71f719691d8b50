#!/usr/bin/env bash
# Create .venv (if needed) and install clipsearch into it with the given extras, e.g. `scripts/setup_env.sh dev`.
# Sourced or run by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
pip=("$root/.venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned: these builds lie on this machine's disk; a bare `torch` could pull a different build.
"${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1"
if [ -n "$extras" ]; then
    "${pip[@]}" install -e "$root[$extras]"
else
    "${pip[@]}" install -e "$root"
fi
# The project's own modules compiled now: an editable install leaves that to the first run, and where
# PYTHONDONTWRITEBYTECODE is set (as on this machine) every command would compile them again: a 2-photo new index
# took 0.780 s (1.334 s CPU) from a fresh clone, 0.726 s (1.254 s CPU) compiled (scripts/bench_start.py, 8 runs a side).
"$root/.venv/bin/python" -m compileall -q -j 0 "$root/retrieval" "$root/indexer" "$root/clipsearch" >/dev/null
