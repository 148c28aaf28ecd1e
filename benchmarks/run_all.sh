#!/usr/bin/env bash
# Every command behind docs/results.md, in order, each writing its JSON into the runs folder R; then
# benchmarks/record_run.py turns each run into a committed record and make_results.py builds the pages from them.
#
#   CGF_FHE_DATA_DIR=../shared/data/mrpc bash benchmarks/run_all.sh [R]      # default R = runs
#
# Real runs: many hours on a 2-core CPU (MiniLM: ~4.5 min per epoch and process with one thread). Training
# commands use --resume: rerunning the script continues interrupted runs and skips finished ones.
# A failing command does not stop the script: it is logged to R/failures.txt, whatever depends on it is missing,
# and the page says "not run: <command>" there. Threads: on a shared 2-core machine one torch thread per process
# is several times faster than two.
set -uo pipefail
cd "$(dirname "$0")/.."
R="${1:-runs}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$R/minilm/search" "$R/narrow"
: > "$R/failures.txt"

fail() { echo "exit $1: ${*:2}" >> "$R/failures.txt"; echo "FAILED (exit $1): ${*:2}" >&2; }
run() { echo "+ $*" >&2; "$@" || fail $? "$@"; }
run_to() { local out="$1"; shift; echo "+ $* > $out" >&2; "$@" > "$out" || fail $? "$@"; }

# 1. test suite (output tail + wall time in R/tests.txt)
echo "+ python -m pytest -q tests" >&2
/usr/bin/time -f "wall seconds: %e" python -m pytest -q tests > "$R/tests.log" 2>&1 || fail $? python -m pytest -q tests
tail -n 5 "$R/tests.log" > "$R/tests.txt"

# 2. smoke pipeline (tiny model, end to end; TenSEAL spot check off, see README)
run /usr/bin/time -f "wall seconds: %e" -o "$R/smoke.time" cgf-fhe pipeline --preset smoke -o "$R/smoke"
# README's main job as one command (about 2 h here; its stages repeat the seed-42 runs below)
run /usr/bin/time -f "wall seconds: %e" -o "$R/mrpc-minilm.time" cgf-fhe pipeline --preset mrpc-minilm -o "$R/mrpc-minilm"

# 3. MiniLM teacher: recipe search (seed 42, one folder per candidate), then the chosen recipe on 3 seeds
run cgf-fhe finetune --model minilm --softmax exact --preset reference --epochs 3 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/ref-e3"
run cgf-fhe finetune --model minilm --softmax exact --lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/lr1e-4-unfrz-wu"
run cgf-fhe finetune --model minilm --softmax exact --lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --swap-pairs --epochs 3 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/swap-lr1e-4-unfrz-wu-e3"
run cgf-fhe finetune --model minilm --softmax exact --lr 2e-4 --layer-lr-decay 0.8 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 6 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/lr2e-4-llrd0.8-unfrz-wu-e6"
run cgf-fhe finetune --model minilm --softmax exact --lr 5e-5 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 10 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/lr5e-5-unfrz-wu-e10"
run cgf-fhe finetune --model minilm --softmax exact --lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 --evals-per-epoch 4 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/lr1e-4-unfrz-wu-k4"
run cgf-fhe finetune --model minilm --softmax exact --lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 --reinit-layers 1 \
    --seed 42 --no-progress --resume -o "$R/minilm/search/lr1e-4-unfrz-wu-reinit1"
run python benchmarks/pooling_probe.py --seed 42 --resume -o "$R/minilm/search/meanpool-lr1e-4-unfrz-wu"
run cgf-fhe finetune --model minilm --preset minilm --seeds 42 7 123 --no-progress --resume -o "$R/minilm/teacher"
# the same teachers with the best epoch chosen on 10% of train held out from training (dev not used for selection)
run cgf-fhe finetune --model minilm --preset minilm --select-holdout 0.1 --seeds 42 7 --no-progress --resume \
    -o "$R/minilm/teacher-holdout10"

# 4. students distilled from that teacher, same seeds: CGF + KD (exact non-linearities), polynomial students
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 \
    --seeds 42 7 123 --no-progress --resume -o "$R/minilm/cgf-kd"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 2 \
    --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton"
run cgf-fhe cover "$R/minilm/poly6-newton" -o "$R/minilm/poly6-newton-cover" --no-progress --resume
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 2 \
    --epoch-cover --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 2 \
    --epoch-cover --evals-per-epoch 4 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-e4"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --swap-pairs --epoch-cover --evals-per-epoch 2 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-swap"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --lr 3e-5 --epoch-cover --evals-per-epoch 4 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-lr3e5"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --lr 1e-4 --epoch-cover --evals-per-epoch 4 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-lr1e4"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --attn-weight 1 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-attn"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --coeff-per-head --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-heads"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --ce-weight 1 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-newton-ecover-ce1"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --softmax-blend-epochs 0.4 --seeds 42 7 123 --no-progress --resume \
    -o "$R/minilm/poly6-newton-ecover-sblend"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01 --seeds 42 7 123 --no-progress --resume \
    -o "$R/minilm/poly6-newton-ecover-heads-clr"
# confirmation of those flags on fresh seeds, chosen before these ran: fresh teachers (same recipe), then the student
run cgf-fhe finetune --model minilm --preset minilm --seeds 1 2 3 --no-progress --resume -o "$R/minilm/teacher-fresh"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher-fresh" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01 --seeds 1 2 3 --no-progress --resume \
    -o "$R/minilm/poly6-newton-ecover-heads-clr-fresh"
# control: an exact-softmax student with the same KD (what KD and selection cost apart from CGF)
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --student-softmax exact --epochs 1 \
    --evals-per-epoch 4 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/kd-exact-control"
# the same KD with CGF (not polynomial): what CGF costs before any polynomial
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --epochs 1 --evals-per-epoch 4 \
    --seeds 42 7 123 --no-progress --resume -o "$R/minilm/cgf-kd-e1"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --epochs 1 --evals-per-epoch 4 \
    --coeff-per-head --coeff-lr 0.01 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/cgf-kd-e1-heads-clr"
# two stages: each seed's polynomial student calibrated on, and trained from, that seed's finished CGF + KD student
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --student-init "$R/minilm/cgf-kd" --seeds 42 7 123 --no-progress --resume \
    -o "$R/minilm/poly6-newton-from-cgf"
# two stages: the polynomial stage from each seed's cgf-kd-e1-heads-clr student, its coefficients trained on
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --epochs 1 \
    --epoch-cover --evals-per-epoch 4 --coeff-lr 0.01 --student-init "$R/minilm/cgf-kd-e1-heads-clr" --seeds 42 7 123 \
    --no-progress --resume -o "$R/minilm/poly6-newton-from-cgf-clr"
run python benchmarks/frozen_ln_probe.py "$R/minilm/cgf-kd/seed42" -o "$R/minilm/frozen-ln-probe.json"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln frozen \
    --epochs 3 --epoch-cover --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly6-frozen"
# frozen LayerNorm with the flags of poly6-newton-ecover-heads-clr, annealed exact -> frozen over the first half epoch
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln frozen --blend-epochs 0.5 \
    --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01 --seeds 42 7 123 --no-progress --resume \
    -o "$R/minilm/poly6-frozen-ecover-heads-clr"
# frozen LayerNorm after attention only, Newton after the FFN (the probe above: the FFN-output ones cannot be frozen)
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln frozen-attn --blend-epochs 0 \
    --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01 --seeds 42 7 123 --no-progress --resume \
    -o "$R/minilm/poly6-frozenattn-ecover-heads-clr"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton --student-layers 2 \
    --epochs 3 --seeds 42 7 123 --no-progress --resume -o "$R/minilm/poly2-newton"
# narrow 2-layer hidden-64 student for real TenSEAL runs, in two stages: CGF (not polynomial) first, then the
# polynomial student initialised from it (calibrating a random-init encoder gives intervals a trained one leaves)
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --student-layers 2 \
    --student-hidden 64 --max-length 32 --lr 1e-3 --epochs 6 --seed 42 --no-progress --resume -o "$R/narrow/cgf2-h64"
run cgf-fhe distill --model minilm --teacher "$R/minilm/teacher" --coeff 0.5 --beta 10 --poly all --ln newton \
    --student-init "$R/narrow/cgf2-h64" --max-length 32 --epochs 3 --seed 42 --no-progress --resume -o "$R/narrow/student2-h64"

# 5. export + FHE check + parity on the dev set; depth reports at L = 9 and 14
run cgf-fhe export "$R/minilm/poly6-newton-ecover/seed42" -o "$R/minilm/poly6.onnx" --verify 408
run_to "$R/minilm/poly6.check.json" cgf-fhe check "$R/minilm/poly6.onnx" --format json
# a polynomial student with trained per-head coefficients (one seed: 123)
run cgf-fhe export "$R/minilm/poly6-newton-ecover-heads-clr/seed123" -o "$R/minilm/poly6-clr.onnx" --verify 408
run_to "$R/minilm/poly6-clr.check.json" cgf-fhe check "$R/minilm/poly6-clr.onnx" --format json
run cgf-fhe export "$R/minilm/poly2-newton/seed42" -o "$R/minilm/poly2.onnx" --verify 408
run_to "$R/minilm/poly2.check.json" cgf-fhe check "$R/minilm/poly2.onnx" --format json
run cgf-fhe export "$R/narrow/student2-h64" -o "$R/narrow/student2-h64.onnx" --verify 408 --max-length 32
run_to "$R/narrow/student2-h64.check.json" cgf-fhe check "$R/narrow/student2-h64.onnx" --format json
run cgf-fhe report "$R/minilm/poly6.onnx" --levels 9 --seq-len 128 -o "$R/minilm/report-poly6-L9"
run cgf-fhe report "$R/minilm/poly6.onnx" --levels 14 --seq-len 128 -o "$R/minilm/report-poly6-L14"
run cgf-fhe report "$R/minilm/poly2.onnx" --levels 9 --seq-len 128 -o "$R/minilm/report-poly2-L9"
run cgf-fhe report "$R/minilm/poly2.onnx" --levels 14 --seq-len 128 -o "$R/minilm/report-poly2-L14"

# 6. CKKS simulation: emulated on the full dev set; narrow student under TenSEAL and the emulator on the same
#    examples (all 408 share one pass in the slots; the cost is per ciphertext, not per example)
run cgf-fhe simulate "$R/minilm/poly6.onnx" --backend emulate --emulate-refresh client \
    --no-progress -o "$R/minilm/emulate-poly6"
run cgf-fhe simulate "$R/minilm/poly6-clr.onnx" --backend emulate --emulate-refresh client \
    --no-progress -o "$R/minilm/emulate-poly6-clr"
run cgf-fhe simulate "$R/minilm/poly2.onnx" --backend emulate --emulate-refresh client \
    --no-progress -o "$R/minilm/emulate-poly2"
run cgf-fhe simulate "$R/narrow/student2-h64.onnx" --backend emulate --emulate-refresh client \
    --limit 408 --max-length 8 --poly-modulus 8192 --no-progress -o "$R/narrow/emulate"
run cgf-fhe report "$R/narrow/student2-h64.onnx" --levels 2 --seq-len 8 -o "$R/narrow/report-L2-len8"
run cgf-fhe simulate "$R/narrow/student2-h64.onnx" --backend tenseal \
    --limit 408 --max-length 8 --poly-modulus 8192 --no-progress -o "$R/narrow/tenseal"

# 7. emulator vs TenSEAL per primitive (three parameter sets); depth per layer for each approximation choice
run python benchmarks/emulator_calibration.py --poly-modulus 8192 --coeff-bits 60,40,40,60 --scale-bits 40 \
    -o benchmarks/results/emulator_calibration_n8192.json
run python benchmarks/emulator_calibration.py --poly-modulus 16384 --coeff-bits 60,40,40,40,40,40,40,40,60 --scale-bits 40 \
    -o benchmarks/results/emulator_calibration_n16384.json
run python benchmarks/emulator_calibration.py --poly-modulus 16384 --coeff-bits 60,50,50,50,50,50,50,60 --scale-bits 50 \
    -o benchmarks/results/emulator_calibration_n16384_s50.json
run python benchmarks/depth_table.py --json "$R/depth_table.json"
run python benchmarks/poly_grad_memory.py "$R/minilm/poly6-newton/seed42" --steps 4 --json benchmarks/results/poly_grad_memory.json

# 8. the page
# the pages are built from committed records, not from $R: add a record per run with benchmarks/record_run.py
# and an entry in records/pages.json (records/README.md), then run python benchmarks/make_results.py
