#!/usr/bin/env bash
# The test suite under the oldest torch TransferSeg supports (TORCH_MINIMUM in
# TransferSeg/TransferSegModuleLib/dependencies.py), in a venv of its own: .venv is not touched.
# By hand, not by CI: it downloads about 5 GB and the suite takes about 20 minutes on 2 cores.
#
#   bench/old_torch.sh [VENV] [-- PYTEST ARGUMENTS]
#
# VENV defaults to ~/.cache/transferseg/torch-floor-venv; it is made if missing and reused after.
# Environment: PYTHON (python3.11), TORCH (the floor's last release), TORCHVISION (its match),
# NUMPY ("numpy<2": torch 2.2 is built against NumPy 1.x), TORCH_INDEX_URL (another wheel index for
# torch and torchvision, e.g. PyTorch's CPU-only one, a smaller download than PyPI's CUDA build).
# PYTEST ARGUMENTS go to pytest, e.g. `-- -x` or `-- Testing/test_convert.py`; without a path it runs
# Testing/, less the Slicer tests (they need Slicer's Python, as the one deselected below does), the
# real-volume ones (large downloads) and the browser one (Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.2.2}
TORCHVISION=${TORCHVISION:-0.17.2}
NUMPY=${NUMPY:-numpy<2}
PYTHON=${PYTHON:-python3.11}
VENV=${HOME}/.cache/transferseg/torch-floor-venv
if [[ $# -gt 0 && $1 != "--" ]]; then VENV=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
PY=$VENV/bin/python

if [[ ! -x $PY ]]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
fi
pins=$VENV/pins.txt
printf 'torch==%s\ntorchvision==%s\n%s\n' "$TORCH" "$TORCHVISION" "$NUMPY" > "$pins"
"$PY" -m pip install --quiet -c "$pins" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch torchvision
# the library's own dependencies (pyproject.toml, less torch and torchvision) and what the tests import
mapfile -t requirements < <("$PY" -c '
import re, tomllib
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.split(r"[<>=!~ ;\[]", requirement)[0].lower() not in ("torch", "torchvision"):
        print(requirement)')
"$PY" -m pip install --quiet -c "$pins" "${requirements[@]}" pytest pytest-timeout monai psutil nibabel
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -c 'import numpy, torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "numpy", numpy.__version__)'

export MPLBACKEND=Agg
exec "$PY" -m pytest -q -p no:cacheprovider -k "not slicer" \
  --ignore-glob='Testing/test_slicer_*.py' --ignore=Testing/test_real_ct.py --ignore=Testing/test_real_volumes.py \
  --ignore=Testing/test_report_browser.py \
  --deselect Testing/test_hostile_outputs.py::test_no_case_name_forges_a_progress_line \
  "$@"
