#!/usr/bin/env bash
# The test suite, self-contained: set up (scripts/setup.sh), then pytest offline on the MRPC copy beside the
# checkout (../shared/data/mrpc) unless $CGF_FHE_DATA_DIR says otherwise. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python}"
export CGF_FHE_DATA_DIR="${CGF_FHE_DATA_DIR:-$(cd .. && pwd)/shared/data/mrpc}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest -q tests "$@"
