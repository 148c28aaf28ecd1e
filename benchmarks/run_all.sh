#!/usr/bin/env bash
# Every command whose output is quoted in docs/results.md, in order. Real runs: hours on a 2-core CPU.
# Usage: CGF_FHE_DATA_DIR=../shared/data/mrpc bash benchmarks/run_all.sh [RUNS_DIR]
# Threads: on a shared 2-core machine, one torch thread per process is several times faster than two.
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-runs}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$R"

# 1. test suite wall time
/usr/bin/time -f "tests: %e s" python -m pytest -q tests

# 2. smoke pipeline (tiny model, end to end; TenSEAL spot check off, see README)
/usr/bin/time -f "smoke pipeline: %e s" cgf-fhe pipeline --preset smoke -o "$R/smoke"

# 3. MiniLM teacher (candidate minilm recipe: lr 1e-4, unfrozen embeddings, 10% warmup, 5 epochs), seed 42
cgf-fhe finetune --model minilm --softmax exact --lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 \
    --seed 42 --no-progress --resume -o "$R/minilm/teacher-s42"

# 4. 2-layer fully polynomial CGF student (Newton LayerNorm), KD from that teacher
cgf-fhe distill --model minilm --teacher "$R/minilm/teacher-s42" --coeff 0.5 --beta 10 --poly all --ln newton \
    --student-layers 2 --epochs 3 --seed 42 --no-progress --resume -o "$R/minilm/student2-newton-s42"

# 5. export + check + parity on the full dev set, depth reports at L = 9 and 14, emulated CKKS on the dev set
S="$R/minilm/student2-newton-s42"
cgf-fhe export "$S" -o "$R/minilm/student2.onnx" --verify 408
cgf-fhe check "$R/minilm/student2.onnx"
cgf-fhe report "$R/minilm/student2.onnx" --levels 9 --seq-len 128 -o "$R/minilm/report-L9"
cgf-fhe report "$R/minilm/student2.onnx" --levels 14 --seq-len 128 -o "$R/minilm/report-L14"
cgf-fhe simulate "$R/minilm/student2.onnx" --backend emulate --emulate-refresh client --on-overflow garbage -o "$R/minilm/emulate"

# 6. emulator vs TenSEAL per primitive; op costs; depth table
python benchmarks/emulator_calibration.py --poly-modulus 8192 --coeff-bits 60,40,40,60 --scale-bits 40 \
    -o benchmarks/results/emulator_calibration_n8192.json
python benchmarks/emulator_calibration.py --poly-modulus 16384 --coeff-bits 60,40,40,40,40,40,40,40,60 --scale-bits 40 \
    -o benchmarks/results/emulator_calibration_n16384.json
python benchmarks/emulator_calibration.py --poly-modulus 16384 --coeff-bits 60,50,50,50,50,50,50,60 --scale-bits 50 \
    -o benchmarks/results/emulator_calibration_n16384_s50.json
cgf-fhe calibrate-costs --poly-modulus 8192 -o "$R/costs-8192.json"
python benchmarks/depth_table.py
