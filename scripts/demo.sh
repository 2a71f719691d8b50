#!/usr/bin/env bash
# README command one: install clipsearch into .venv, then index the bundled sample images with the bundled model,
# search them by text and by image, and evaluate recall on the held-out split.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh" serve,ocr   # serve: the web extra the demo suggests; ocr: index --ocr
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
