#!/usr/bin/env bash
# The main job, self-contained: set up (scripts/setup.sh), then the MiniLM pipeline on MRPC into
# runs/mrpc-minilm (resumable: rerunning skips what is done). MRPC comes from $CGF_FHE_DATA_DIR if set, else
# the copy beside the checkout (../shared/data/mrpc), else the datasets hub. Extra arguments go to
# `cgf-fhe pipeline` (e.g. `--preset smoke --output runs/smoke` for the few-minute end-to-end run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python}"
if [ -z "${CGF_FHE_DATA_DIR:-}" ] && [ -f ../shared/data/mrpc/validation.tsv ]; then
    CGF_FHE_DATA_DIR="$(cd ../shared/data/mrpc && pwd)"
    export CGF_FHE_DATA_DIR
fi
echo "run_main: MRPC from ${CGF_FHE_DATA_DIR:-the datasets hub (glue/mrpc)}" >&2
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m cgf_fhe pipeline --preset mrpc-minilm --output runs/mrpc-minilm "$@"
