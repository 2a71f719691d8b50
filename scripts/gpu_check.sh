#!/usr/bin/env bash
# The device check (docs/gpu.md): on a machine with a GPU, and nothing but Python 3.12, torch, torchvision, numpy,
# pillow, typer and tqdm, with no internet and no pip registry. Within about 8 minutes:
#   1. installs the other dependencies from the wheels in .whl/ (filled beforehand with `pip download`, docs/gpu.md)
#   2. runs `pytest -m gpu`
#   3. runs the bench: one JSON line per figure (scripts/bench_index.py --figures)
#   4. runs the whole test suite with the time that is left
# Without CUDA it runs the same steps on the CPU (fewer images), so it can be tried anywhere.
#
#   scripts/gpu_check.sh [--no-suite]        # logs and figures.jsonl go to $OUT (or /tmp/gpu-check)
#
# Environment: PYTHON (default python3), WHEELS (default .whl), BUDGET_S (default 480), SMALL_IMAGES and
# PHOTO_IMAGES (default 4096 and 256 on CUDA, 32 and 4 on the CPU), SUITE_ARGS (extra pytest arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
budget=${BUDGET_S:-480}
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
out=${OUT:-/tmp/gpu-check}
suite=1
[ "${1:-}" = "--no-suite" ] && suite=0
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
say() { echo "gpu_check [$((SECONDS - started)) s]: $*"; }

# 1. dependencies: what the machine lacks comes from the wheel folder, nothing from a network
if ! "$py" -c "import open_clip, sqlalchemy, faiss, fastapi, multipart, uvicorn" 2>/dev/null; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        say "missing dependencies and no wheels in $wheels/: see docs/gpu.md for the pip download command"
        exit 2
    fi
    site=/tmp/clipsearch-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl || { say "installing the wheels failed"; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls "$wheels"/*.whl | wc -l) wheels into $site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'EOF'
import platform, torch, open_clip, faiss, sqlalchemy
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"gpu_check: python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
      f"faiss {faiss.__version__}, sqlalchemy {sqlalchemy.__version__}; GPU: {gpu}")
EOF
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=cuda small=${SMALL_IMAGES:-4096} photos=${PHOTO_IMAGES:-256}
else
    device=cpu small=${SMALL_IMAGES:-32} photos=${PHOTO_IMAGES:-4}
    say "no CUDA here: every step runs on the CPU"
fi
status=0

# 2. the GPU tests (skipped without CUDA)
say "pytest -m gpu"
timeout 120 "$py" -m pytest -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest-gpu.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; say "pytest -m gpu FAILED"; }

# 3. the bench: one JSON line per figure
say "bench on $device: $small 500x375 JPEGs, $photos 12-MP photos (generated on the fly)"
XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/gpu-check-cache} timeout 330 "$py" scripts/bench_index.py --figures \
    --device "$device" --small-images "$small" --photo-images "$photos" 2>"$out/bench.err" | tee "$out/figures.jsonl"
code=${PIPESTATUS[0]}
[ "$code" -eq 124 ] && say "the bench ran out of time (a busy machine? fewer images: SMALL_IMAGES, PHOTO_IMAGES)"
[ "$code" -eq 0 ] || { status=1; say "bench FAILED (exit $code):"; tail -20 "$out/bench.err"; }

# 4. the whole suite, with the time that is left (in parallel where pytest-xdist is installed)
if [ "$suite" = 1 ]; then
    left=$((budget - (SECONDS - started) - 10))
    parallel=()
    "$py" -c "import xdist" 2>/dev/null && parallel=(-n "${SUITE_WORKERS:-6}")
    say "whole suite, ${parallel[*]:-serial}, ${left} s left"
    # shellcheck disable=SC2086
    timeout "$left" "$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" ${SUITE_ARGS:-} 2>&1 \
        | tee "$out/pytest-all.log" | tail -25
    code=${PIPESTATUS[0]}
    [ "$code" -eq 124 ] && say "the suite ran out of time (log: $out/pytest-all.log)"
    [ "$code" -eq 0 ] || { status=1; say "whole suite FAILED (exit $code)"; }
fi
say "done, exit $status; figures in $out/figures.jsonl"
exit $status
