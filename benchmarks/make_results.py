#!/usr/bin/env python
"""Regenerate docs/results.md (and the PNGs it embeds) from the JSON files a run of benchmarks/run_all.sh leaves.

    python benchmarks/make_results.py R -o docs/results.md      # R = the runs folder given to run_all.sh
    python benchmarks/make_results.py R -o /tmp/preview.md      # images go next to it, into /tmp/img/

Every number on the page is read from a file in R (or benchmarks/results/ for the emulator calibration) and
printed next to the command that wrote that file (the commands are those of run_all.sh: see ``commands``;
tests/test_results_page.py checks that run_all.sh runs each of them). A missing or unreadable file gives
"not run: <command>" where its numbers would be; nothing is invented. Targets from the issues are printed next
to the measured values with met / NOT met computed from the numbers.

Layout of R (what run_all.sh writes)::

    tests.txt  smoke/ smoke.time  failures.txt  depth_table.json
    minilm/search/<candidate>/cgf_fhe.json            single-seed teacher recipe candidates
    minilm/teacher/seed<S>/cgf_fhe.json               the chosen recipe, seeds 42 7 123
    minilm/{cgf-kd,poly6-newton,poly6-frozen,poly2-newton}/seed<S>/cgf_fhe.json
    narrow/student2-h64/[seed<S>/]cgf_fhe.json
    minilm/{poly6,poly6-clr,poly2}.{onnx,parity.json,check.json}  narrow/student2-h64.{parity,check}.json
    minilm/report-{poly6,poly2}-L{9,14}/report.json
    minilm/emulate-{poly6,poly6-clr,poly2}/simulation.json  narrow/{emulate,tenseal}/simulation.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

from cgf_fhe.fmt import fmt_best_point, fmt_seconds

HERE = Path(__file__).resolve().parent
SEEDS = (42, 7, 123)

# targets from the issues
TEACHER_MIN_ACC = 0.84       # #2: exact MiniLM teacher, 3-seed mean dev accuracy
CGF_KD_MAX_DROP_PP = 1.5     # #2: CGF + KD within 1.5 pp of the teacher (paired mean)
POLY_MAX_DROP_PP = 1.0       # #3: polynomial student within 1 pp of the teacher (paired mean)
EMULATE_MAX_RATIO = 3.0      # #6: emulated wall time <= 3x the plain backend
TENSEAL_MIN_AGREEMENT = 0.995  # #6: TenSEAL vs emulate prediction agreement
CALIB_MAX_RATIO = 2.0        # #6: emulator error std within 2x of TenSEAL's, per primitive
SMOKE_MAX_SECONDS = 600      # #7: smoke pipeline under 10 minutes

# teacher recipe candidates: (folder name under R/minilm/search, flags)
SEARCH = (
    ("ref-e3", "--preset reference --epochs 3"),
    ("lr1e-4-unfrz-wu", "--lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5"),
    ("swap-lr1e-4-unfrz-wu-e3", "--lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --swap-pairs --epochs 3"),
    ("lr2e-4-llrd0.8-unfrz-wu-e6",
     "--lr 2e-4 --layer-lr-decay 0.8 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 6"),
    ("lr5e-5-unfrz-wu-e10", "--lr 5e-5 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 10"),
    ("lr1e-4-unfrz-wu-k4", "--lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 --evals-per-epoch 4"),
    ("lr1e-4-unfrz-wu-reinit1", "--lr 1e-4 --unfreeze-embeddings --warmup-ratio 0.1 --epochs 5 --reinit-layers 1"),
    # probes: flags starting with "python " are the whole command (a benchmark script, not a recipe flag)
    ("meanpool-lr1e-4-unfrz-wu", "python benchmarks/pooling_probe.py --seed 42 --resume"),
)
FRESH_SEEDS = (1, 2, 3)  # seeds of the confirmation run and its teachers, never used to choose a configuration
FRESH_TEACHER = "minilm/teacher-fresh"
# students: (key, folder under R, label, distill flags, seeds flag, paired target in pp (None: a control, no
# target), polynomial?)
STUDENTS = (
    ("cgf-kd", "minilm/cgf-kd", "CGF + KD (exact GELU/LayerNorm/tanh), 6 layers", "", "--seeds 42 7 123",
     CGF_KD_MAX_DROP_PP, False),
    ("poly6-newton", "minilm/poly6-newton", "polynomial, 6 layers, Newton LayerNorm",
     "--poly all --ln newton --epochs 2", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-cover", "minilm/poly6-newton-cover",
     "polynomial, 6 layers, Newton LayerNorm, intervals widened by `cgf-fhe cover` after training",
     "cover", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover", "minilm/poly6-newton-ecover",
     "polynomial, 6 layers, Newton LayerNorm, intervals widened at the end of every epoch (`--epoch-cover`)",
     "--poly all --ln newton --epochs 2 --epoch-cover", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-e4", "minilm/poly6-newton-ecover-e4",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, dev evaluated 4 times per epoch (`--evals-per-epoch 4`)",
     "--poly all --ln newton --epochs 2 --epoch-cover --evals-per-epoch 4", "--seeds 42 7 123", POLY_MAX_DROP_PP,
     True),
    ("poly6-newton-ecover-swap", "minilm/poly6-newton-ecover-swap",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, KD on both sentence orders (`--swap-pairs`, 1 epoch of "
     "the doubled set = the steps of 2 epochs, dev at its half and end)",
     "--poly all --ln newton --epochs 1 --swap-pairs --epoch-cover --evals-per-epoch 2", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-lr3e5", "minilm/poly6-newton-ecover-lr3e5",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, lower learning rate annealed over 1 epoch (`--lr 3e-5 "
     "--epochs 1`), dev 4 times",
     "--poly all --ln newton --epochs 1 --lr 3e-5 --epoch-cover --evals-per-epoch 4", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-from-cgf", "minilm/poly6-newton-from-cgf",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, dev 4 times, two stages: calibrated on and trained from "
     "the finished `cgf-kd` student of the same seed (`--student-init`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --student-init $R/minilm/cgf-kd",
     "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-lr1e4", "minilm/poly6-newton-ecover-lr1e4",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, higher learning rate annealed over 1 epoch (`--lr 1e-4 "
     "--epochs 1`), dev 4 times",
     "--poly all --ln newton --epochs 1 --lr 1e-4 --epoch-cover --evals-per-epoch 4", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-attn", "minilm/poly6-newton-ecover-attn",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, plus the attention-map loss "
     "(`--attn-weight 1`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --attn-weight 1", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-heads", "minilm/poly6-newton-ecover-heads",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, one CGF coefficient per layer and "
     "head (`--coeff-per-head`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-ce1", "minilm/poly6-newton-ecover-ce1",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, plus CE on the labels "
     "(`--ce-weight 1`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --ce-weight 1", "--seeds 42 7 123",
     POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-sblend", "minilm/poly6-newton-ecover-sblend",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, attention annealed from exact "
     "softmax to CGF over the first 0.4 epoch (`--softmax-blend-epochs 0.4`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --softmax-blend-epochs 0.4",
     "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-heads-clr", "minilm/poly6-newton-ecover-heads-clr",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, one CGF coefficient per layer and "
     "head, calibrated then trained (`--coeff-per-head --coeff-lr 0.01`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01",
     "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-from-cgf-clr", "minilm/poly6-newton-from-cgf-clr",
     "polynomial, 6 layers, Newton LayerNorm, epoch cover, 1 epoch, dev 4 times, two stages: calibrated on and "
     "trained from the `cgf-kd-e1-heads-clr` student of the same seed, its coefficients trained on (`--student-init "
     "--coeff-lr 0.01`)",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-lr 0.01 --student-init "
     "$R/minilm/cgf-kd-e1-heads-clr", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-newton-ecover-heads-clr-fresh", "minilm/poly6-newton-ecover-heads-clr-fresh",
     "confirmation on fresh seeds: the flags of `poly6-newton-ecover-heads-clr`, chosen before these runs, with "
     f"fresh teachers (`{FRESH_TEACHER}`, seeds {' '.join(map(str, FRESH_SEEDS))}) that no earlier choice has seen",
     "--poly all --ln newton --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01",
     "--seeds " + " ".join(map(str, FRESH_SEEDS)), POLY_MAX_DROP_PP, True),
    ("kd-exact-control", "minilm/kd-exact-control",
     "control: exact softmax (not CGF, not polynomial), the same KD, 1 epoch, dev 4 times: what KD and checkpoint "
     "selection cost apart from CGF", "--student-softmax exact --epochs 1 --evals-per-epoch 4", "--seeds 42 7 123",
     None, False),
    ("cgf-kd-e1", "minilm/cgf-kd-e1",
     "CGF (exact GELU/LayerNorm/tanh), the same KD as the control, 1 epoch, dev 4 times: what CGF costs before any "
     "polynomial", "--epochs 1 --evals-per-epoch 4", "--seeds 42 7 123", None, False),
    ("cgf-kd-e1-heads-clr", "minilm/cgf-kd-e1-heads-clr",
     "CGF as `cgf-kd-e1`, with one coefficient per layer and head, calibrated then trained (`--coeff-per-head "
     "--coeff-lr 0.01`)", "--epochs 1 --evals-per-epoch 4 --coeff-per-head --coeff-lr 0.01", "--seeds 42 7 123",
     None, False),
    ("poly6-frozen", "minilm/poly6-frozen", "polynomial, 6 layers, frozen LayerNorm",
     "--poly all --ln frozen --epochs 3 --epoch-cover", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-frozen-ecover-heads-clr", "minilm/poly6-frozen-ecover-heads-clr",
     "polynomial, 6 layers, frozen LayerNorm (annealed from exact over the first half epoch), otherwise as "
     "`poly6-newton-ecover-heads-clr`",
     "--poly all --ln frozen --blend-epochs 0.5 --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head "
     "--coeff-lr 0.01", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly6-frozenattn-ecover-heads-clr", "minilm/poly6-frozenattn-ecover-heads-clr",
     "polynomial, 6 layers, frozen LayerNorm after attention and Newton after the FFN (`--ln frozen-attn`, frozen "
     "from the start), otherwise as `poly6-newton-ecover-heads-clr`",
     "--poly all --ln frozen-attn --blend-epochs 0 --epochs 1 --epoch-cover --evals-per-epoch 4 --coeff-per-head "
     "--coeff-lr 0.01", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("poly2-newton", "minilm/poly2-newton", "polynomial, 2 layers, Newton LayerNorm",
     "--poly all --ln newton --student-layers 2 --epochs 3", "--seeds 42 7 123", POLY_MAX_DROP_PP, True),
    ("narrow-cgf", "narrow/cgf2-h64", "CGF (not polynomial), 2 layers, hidden 64 (narrow), 32 tokens: stage 1",
     "--student-layers 2 --student-hidden 64 --max-length 32 --lr 1e-3 --epochs 6", "--seed 42",
     CGF_KD_MAX_DROP_PP, False),
    ("narrow", "narrow/student2-h64", "polynomial, 2 layers, hidden 64 (narrow), Newton LayerNorm, 32 tokens: "
     "stage 2", "--poly all --ln newton --student-init $R/narrow/cgf2-h64 --max-length 32 --epochs 3", "--seed 42",
     POLY_MAX_DROP_PP, True),
)
PAIRED_WITH = {  # student -> earlier students trained from the same teachers on the same seeds, compared seed by seed
    "poly6-newton-ecover": ("poly6-newton", "poly6-newton-cover"),
    "poly6-newton-ecover-e4": ("poly6-newton-ecover",),
    "poly6-newton-ecover-swap": ("poly6-newton-ecover", "poly6-newton-ecover-e4"),
    "poly6-newton-ecover-lr3e5": ("poly6-newton-ecover-e4",),
    "poly6-newton-from-cgf": ("cgf-kd", "poly6-newton-ecover-e4"),
    "poly6-newton-ecover-lr1e4": ("poly6-newton-ecover-e4",),
    "poly6-newton-ecover-attn": ("poly6-newton-ecover-e4",),
    "poly6-newton-ecover-heads": ("poly6-newton-ecover-e4",),
    "poly6-newton-ecover-ce1": ("poly6-newton-ecover-e4",),
    "poly6-newton-ecover-sblend": ("poly6-newton-ecover-e4",),
    "poly6-newton-ecover-heads-clr": ("poly6-newton-ecover-heads", "poly6-newton-ecover-e4", "cgf-kd-e1-heads-clr"),
    "poly6-newton-from-cgf-clr": ("cgf-kd-e1-heads-clr", "poly6-newton-ecover-heads-clr", "poly6-newton-from-cgf"),
    "poly6-frozen-ecover-heads-clr": ("poly6-newton-ecover-heads-clr", "poly6-frozen"),
    "poly6-frozenattn-ecover-heads-clr": ("poly6-newton-ecover-heads-clr", "poly6-frozen-ecover-heads-clr"),
    "cgf-kd-e1": ("kd-exact-control",),
    "cgf-kd-e1-heads-clr": ("cgf-kd-e1", "kd-exact-control"),
}
# confirmation runs: student -> (the student whose flags it repeats, teacher folder). Its seeds and teachers were
# not used to choose anything; its paired differences are also pooled with the original's.
CONFIRMS = {"poly6-newton-ecover-heads-clr-fresh": ("poly6-newton-ecover-heads-clr", FRESH_TEACHER)}
# student -> the seeds its seeds flag names
SEEDS_OF = {key: tuple(int(x) for x in seeds_flag.split()[1:]) for key, _, _, _, seeds_flag, _, _ in STUDENTS}
ONNX = (  # (key, onnx path under R, source checkpoint under R, extra export flags)
    ("poly6", "minilm/poly6.onnx", "minilm/poly6-newton-ecover/seed42", ""),
    ("poly6-clr", "minilm/poly6-clr.onnx", "minilm/poly6-newton-ecover-heads-clr/seed123", ""),
    ("poly2", "minilm/poly2.onnx", "minilm/poly2-newton/seed42", ""),
    ("narrow", "narrow/student2-h64.onnx", "narrow/student2-h64", " --max-length 32"),
)
LEVELS = (9, 14)
REPORTED = ("poly6", "poly2")  # depth reports at LEVELS
EMULATED = ("poly6", "poly6-clr", "poly2")  # emulated CKKS on the full dev set
NARROW_SIM = "--limit 408 --max-length 8 --poly-modulus 8192"
CALIBRATION = (  # (file name in benchmarks/results, emulator_calibration.py flags)
    ("emulator_calibration_n8192.json", "--poly-modulus 8192 --coeff-bits 60,40,40,60 --scale-bits 40"),
    ("emulator_calibration_n16384.json",
     "--poly-modulus 16384 --coeff-bits 60,40,40,40,40,40,40,40,60 --scale-bits 40"),
    ("emulator_calibration_n16384_s50.json",
     "--poly-modulus 16384 --coeff-bits 60,50,50,50,50,50,50,60 --scale-bits 50"),
)
PACKAGES = ("cgf-fhe", "torch", "transformers", "datasets", "onnx", "onnxruntime", "onnxscript", "tenseal", "numpy",
            "matplotlib")


def commands(R: str) -> dict[str, str]:
    """Every command of run_all.sh whose output the page reads, keyed by what it produces (``R`` = runs folder)."""
    teacher = f"--teacher {R}/minilm/teacher --coeff 0.5 --beta 10"
    c = {
        "tests": "python -m pytest -q tests",
        "smoke": f"cgf-fhe pipeline --preset smoke -o {R}/smoke",
        "main": f"cgf-fhe pipeline --preset mrpc-minilm -o {R}/mrpc-minilm",
        "teacher": f"cgf-fhe finetune --model minilm --preset minilm --seeds 42 7 123 --no-progress --resume "
                   f"-o {R}/minilm/teacher",
        "teacher-fresh": f"cgf-fhe finetune --model minilm --preset minilm --seeds "
                         f"{' '.join(map(str, FRESH_SEEDS))} --no-progress --resume -o {R}/{FRESH_TEACHER}",
        "depth_table": f"python benchmarks/depth_table.py --json {R}/depth_table.json",
        "poly_grad_memory": f"python benchmarks/poly_grad_memory.py {R}/minilm/poly6-newton/seed42 --steps 4 "
                            "--json benchmarks/results/poly_grad_memory.json",
        "frozen_probe": f"python benchmarks/frozen_ln_probe.py {R}/minilm/cgf-kd/seed42 -o {R}/minilm/frozen-ln-probe.json",
    }
    for name, flags in SEARCH:
        if flags.startswith("python "):
            c[f"search/{name}"] = f"{flags} -o {R}/minilm/search/{name}"
            continue
        c[f"search/{name}"] = (f"cgf-fhe finetune --model minilm --softmax exact {flags} --seed 42 --no-progress "
                               f"--resume -o {R}/minilm/search/{name}")
    for key, folder, _, flags, seeds, _, _ in STUDENTS:
        if flags == "cover":  # post-processing of the student folder without the suffix
            c[key] = f"cgf-fhe cover {R}/{folder.removesuffix('-cover')} -o {R}/{folder} --no-progress --resume"
            continue
        flags = flags.replace("$R", R)
        tf = f"--teacher {R}/{CONFIRMS[key][1]} --coeff 0.5 --beta 10" if key in CONFIRMS else teacher
        c[key] = (f"cgf-fhe distill --model minilm {tf}{' ' + flags if flags else ''} {seeds} --no-progress "
                  f"--resume -o {R}/{folder}")
    for key, path, ckpt, extra in ONNX:
        c[f"export/{key}"] = f"cgf-fhe export {R}/{ckpt} -o {R}/{path} --verify 408{extra}"
        c[f"check/{key}"] = f"cgf-fhe check {R}/{path} --format json > {R}/{path[:-5]}.check.json"
    for m in REPORTED:
        for L in LEVELS:
            c[f"report/{m}/{L}"] = (f"cgf-fhe report {R}/minilm/{m}.onnx --levels {L} --seq-len 128 "
                                    f"-o {R}/minilm/report-{m}-L{L}")
    for m in EMULATED:
        c[f"emulate/{m}"] = (f"cgf-fhe simulate {R}/minilm/{m}.onnx --backend emulate --emulate-refresh client "
                             f"--no-progress -o {R}/minilm/emulate-{m}")
    c["narrow/emulate"] = (f"cgf-fhe simulate {R}/narrow/student2-h64.onnx --backend emulate --emulate-refresh client "
                           f"{NARROW_SIM} --no-progress -o {R}/narrow/emulate")
    c["narrow/report"] = (f"cgf-fhe report {R}/narrow/student2-h64.onnx --levels 2 --seq-len 8 "
                          f"-o {R}/narrow/report-L2-len8")
    c["narrow/tenseal"] = (f"cgf-fhe simulate {R}/narrow/student2-h64.onnx --backend tenseal {NARROW_SIM} "
                           f"--no-progress -o {R}/narrow/tenseal")
    for fname, flags in CALIBRATION:
        c[f"calibration/{fname}"] = (f"python benchmarks/emulator_calibration.py {flags} "
                                     f"-o benchmarks/results/{fname}")
    return c


# ------------------------------------------------------------------------------------------------ reading helpers

def _seed_order(by_seed: dict[int, dict]) -> dict[int, dict]:
    """The same dict, seeds in SEEDS order first, then any others ascending."""
    return dict(sorted(by_seed.items(), key=lambda kv: (SEEDS.index(kv[0]) if kv[0] in SEEDS else 99, kv[0])))


class Runs:
    """Reads the files of a runs folder; remembers which were read (for the header) and which were unreadable."""

    def __init__(self, root: Path, shown: str):
        self.root = root
        self.shown = shown.rstrip("/") or "."
        self.read: list[Path] = []
        self.problems: list[str] = []

    def rel(self, p: Path) -> str:
        try:
            return f"{self.shown}/{p.relative_to(self.root).as_posix()}"
        except ValueError:
            try:
                return p.resolve().relative_to(HERE.parent).as_posix()
            except ValueError:
                return str(p)

    def json(self, p: Path | str):
        """The parsed file, or None when it is missing or unreadable (then recorded in ``problems``)."""
        p = self.root / p if not isinstance(p, Path) else p
        if not p.is_file():
            return None
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            self.problems.append(f"`{self.rel(p)}` is unreadable ({type(exc).__name__}: {exc}); treated as not run")
            return None
        if not isinstance(obj, dict):
            self.problems.append(f"`{self.rel(p)}` holds no JSON object; treated as not run")
            return None
        self.read.append(p)
        return obj

    def text(self, p: str) -> str | None:
        f = self.root / p
        if not f.is_file():
            return None
        try:
            t = f.read_text(errors="replace")
        except OSError:
            return None
        self.read.append(f)
        return t

    def seed_runs(self, folder: str) -> dict[int, dict]:
        """{seed: cgf_fhe.json settings} of the finished checkpoints in ``folder`` (itself or its seed<S>/)."""
        base = self.root / folder
        files = ([base / "cgf_fhe.json"] if (base / "cgf_fhe.json").is_file() else []) + \
            sorted(base.glob("seed*/cgf_fhe.json"))
        out = {}
        for f in files:
            s = self.json(f)
            if s is None:
                continue
            if s.get("status") != "done" or not isinstance(s.get("dev"), dict):
                self.problems.append(f"`{self.rel(f)}`: run not finished (status {s.get('status')!r}); ignored")
                continue
            seed = s.get("seed")
            if seed is None:
                m = re.fullmatch(r"seed(\d+)", f.parent.name)
                seed = int(m.group(1)) if m else -1
            s = dict(s)
            s["_path"] = self.rel(f)
            out[int(seed)] = s
        return _seed_order(out)

    def diverged_runs(self, folder: str) -> dict[int, dict]:
        """{seed: train_state/diverged.json} of the seeds in ``folder`` whose training stopped at a non-finite
        loss (and that have no finished checkpoint since)."""
        out = {}
        for f in sorted((self.root / folder).glob("seed*/train_state/diverged.json")):
            m = re.fullmatch(r"seed(\d+)", f.parent.parent.name)
            rec = self.json(f)
            if m and rec is not None and not (f.parent.parent / "cgf_fhe.json").is_file():
                out[int(m.group(1))] = rec
        return _seed_order(out)


# ------------------------------------------------------------------------------------------------ formatting

def mean_std(xs) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def pm(xs, digits: int = 4, scale: float = 1.0, sign: bool = False, unit: str = "") -> str:
    """``mean ± sample std`` of xs (std needs >= 2 values)."""
    m, s = mean_std(xs)
    if m is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    out = f.format(scale * m)
    if s is None:
        return out + unit + " (n = 1, no std)"
    return out + f" ± {scale * s:.{digits}f}" + unit


def num(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.{digits}f}"


def sci(v) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def secs(v) -> str:
    return fmt_seconds(v, day_unit="days", minutes_from=120)


def status(ok: bool | None, why: str = "") -> str:
    if ok is None:
        return why or "not evaluable"
    return "met" if ok else "**NOT met**"


def table(cols, rows) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def code(cmd: str) -> list[str]:
    """A command as an indented code block (wrapped at flag boundaries)."""
    words, lines, cur = cmd.split(" "), [], ""
    for w in words:
        if cur and len(cur) + len(w) > 104 and w.startswith("-"):
            lines.append(cur + " \\")
            cur = "    " + w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return ["    " + x for x in lines]


def not_run(cmd: str) -> str:
    return f"not run: `{cmd}`"


def seeds_note(runs: dict, expected=SEEDS) -> str:
    have = list(runs)
    missing = [s for s in expected if s not in runs]
    s = ", ".join(map(str, have)) if have else "none"
    return s + (f" (missing {', '.join(map(str, missing))})" if missing else "")


# ------------------------------------------------------------------------------------------------ recipe text

REF_RECIPE = {"lr": 5e-5, "epochs": 5, "batch_size": 16, "freeze_embeddings": True, "warmup_ratio": 0.0,
              "weight_decay": 0.01, "max_length": 128, "swap_pairs": False, "kd_alpha": 1.0, "kd_beta": 10.0,
              "kd_temperature": 1.0, "kd_ce_weight": 0.0}
try:  # the reference recipe as the code defines it (falls back to the values above)
    from cgf_fhe.training.recipes import REFERENCE as _REF

    REF_RECIPE.update({k: getattr(_REF, k) for k in REF_RECIPE if hasattr(_REF, k)})
except Exception:  # noqa: BLE001 -- the page must render without the package
    pass


def lr_text(v) -> str:
    if not isinstance(v, (int, float)):
        return "n/a"
    return f"{v:.0e}".replace("e-0", "e-") if 0 < v < 1e-2 and float(f"{v:.0e}") == v else f"{v:g}"


def preset_mismatch(s: dict, preset: str) -> list[str]:
    """Fine-tune recipe fields where the recorded run differs from ``--preset <preset>`` in this code version."""
    try:
        from cgf_fhe.training.recipes import get_recipe

        want = get_recipe(preset).finetune_fields()
    except Exception:  # noqa: BLE001
        return []
    have = s.get("recipe") or {}
    return [f"{k} {have.get(k)!r} (preset: {v!r})" for k, v in want.items() if k in have and have[k] != v]


def recipe_text(s: dict, kd: bool = False) -> str:
    """The recorded recipe: lr and epochs always, other fields where they differ from the reference recipe."""
    r = s.get("recipe") or {}
    data = s.get("data") or {}
    parts = [f"lr {lr_text(r.get('lr'))}",
             f"{r.get('epochs', 'n/a')} epochs"]
    if r.get("freeze_embeddings") is False:
        parts.append("unfrozen embeddings")
    if r.get("warmup_ratio"):
        parts.append(f"warmup {r['warmup_ratio']:g}")
    if r.get("swap_pairs"):
        parts.append("swapped pairs")
    if r.get("layer_lr_decay", 1.0) != 1.0:
        parts.append(f"layer-wise lr decay {r['layer_lr_decay']:g}")
    if r.get("evals_per_epoch", 1) != 1:
        parts.append(f"{r['evals_per_epoch']} dev evaluations per epoch")
    if r.get("reinit_layers"):
        parts.append(f"pooler + top {r['reinit_layers']} layer(s) re-initialised")
    if s.get("probe"):
        parts.append(s["probe"])
    for k, label in (("batch_size", "batch"), ("weight_decay", "weight decay")):
        if k in r and r[k] != REF_RECIPE[k]:
            parts.append(f"{label} {r[k]:g}")
    ml = data.get("max_length") or r.get("max_length")
    if ml is not None and ml != REF_RECIPE["max_length"]:
        parts.append(f"max length {ml}")
    if data.get("max_train_samples"):
        parts.append(f"{data['max_train_samples']} train examples")
    if kd:
        k = s.get("kd") or {}
        parts.append((f"c {s.get('coeff', 'n/a')}" if s.get("softmax", "cgf") == "cgf" else f"{s['softmax']} softmax")
                     + f", KD beta {k.get('beta', r.get('kd_beta', 'n/a'))}")
        if k.get("ce_weight"):
            parts.append(f"CE weight {k['ce_weight']:g}")
    return ", ".join(parts)


def epoch_accs(s: dict) -> list[float]:
    return [h.get("dev", {}).get("accuracy") for h in s.get("history") or []]


def eval_points(s: dict) -> list[tuple[float, float | None]]:
    """(epochs trained, dev accuracy) of every evaluation point: mid-epoch points (``--evals-per-epoch``) and ends."""
    out = []
    for h in s.get("history") or []:
        for m in h.get("mid_evals") or []:
            out.append((float(m.get("at")), (m.get("dev") or {}).get("accuracy")))
        out.append((float(h.get("epoch")), (h.get("dev") or {}).get("accuracy")))
    return out


def points_note(s: dict, ref_acc: float | None = None) -> str | None:
    """For a run with mid-epoch evaluation points: every point's dev accuracy, where the best was, and what
    selecting among epoch ends only would have given (the selection's own share of the result)."""
    pts = eval_points(s)
    if len(pts) <= len(s.get("history") or []):
        return None
    ends = [a for at, a in pts if float(at).is_integer() and a is not None]
    end_best = max(ends) if ends else None
    return ("dev accuracy at every evaluation point (epochs trained: accuracy) "
            + ", ".join(f"{at:g}: {num(a)}" for at, a in pts)
            + f"; best at {fmt_best_point(s)}; selecting among epoch ends only would give {num(end_best)}"
            + (f" ({100 * (end_best - ref_acc):+.2f} pp)" if ref_acc is not None and end_best is not None else ""))


def slow_epochs(s: dict, factor: float = 2.0) -> list[tuple[int, float, float]]:
    """Epochs whose training took > factor x the median epoch of the run: (epoch, seconds, median)."""
    ts = [h.get("train_seconds") for h in s.get("history") or []]
    if len(ts) < 3 or any(t is None for t in ts):
        return []
    med = statistics.median(ts)
    return [(i + 1, t, med) for i, t in enumerate(ts) if t > factor * med]


def teacher_ref(student: dict, teachers: dict, seed: int) -> tuple[dict | None, str]:
    """The teacher's dev metrics paired with a student seed: what distill measured on the same dev inputs
    ("teacher_dev"), else the teacher checkpoint of that seed."""
    if isinstance(student.get("teacher_dev"), dict):
        return student["teacher_dev"], "teacher_dev"
    t = teachers.get(seed)
    return (t["dev"], "teacher checkpoint") if t else (None, "")


# ------------------------------------------------------------------------------------------------ the page

class Page:
    def __init__(self, runs: Runs, out: Path, img_dir: Path, calib_dir: Path):
        self.r = runs
        self.R = runs.shown
        self.cmd = commands(self.R)
        self.out = out
        self.img_dir = img_dir
        self.calib_dir = calib_dir
        self.lines: list[str] = []
        self.targets: list[list[str]] = []
        self.images: list[Path] = []

    # -- output helpers
    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def img(self, name: str) -> Path:
        self.img_dir.mkdir(parents=True, exist_ok=True)
        p = self.img_dir / name
        self.images.append(p)
        return p

    def link(self, p: Path) -> str:
        return Path(os.path.relpath(p, self.out.parent)).as_posix()

    def target(self, what: str, goal: str, measured: str, ok: bool | None, source: str, why: str = "") -> str:
        st = status(ok, why)
        self.targets.append([what, goal, measured, st, source])
        return st

    # -- sections
    def build(self) -> str:
        body_start = len(self.lines)
        self.tests_and_smoke()
        self.training()
        self.fresh_teacher()
        self.students()
        self.export_and_reports()
        self.simulation()
        body = self.lines[body_start:]
        self.lines = self.lines[:body_start]
        self.header()
        self.lines += body
        return "\n".join(self.lines).rstrip() + "\n"

    def header(self) -> None:
        now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        vers = []
        for p in PACKAGES:
            try:
                vers.append(f"{p} {metadata.version(p)}")
            except metadata.PackageNotFoundError:
                vers.append(f"{p} (not installed)")
        mem = None
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        except (ValueError, OSError, AttributeError):
            pass
        times = sorted(p.stat().st_mtime for p in set(self.r.read) if p.exists())
        span = (f"{dt.datetime.fromtimestamp(times[0]).strftime('%Y-%m-%d %H:%M')} to "
                f"{dt.datetime.fromtimestamp(times[-1]).strftime('%Y-%m-%d %H:%M')}") if times else "none found"
        self.add(
            "# Measured results", "",
            f"Generated {now} by `python benchmarks/make_results.py {self.R} -o {self.out}` from the JSON files "
            f"in `{self.R}/` (written by `bash benchmarks/run_all.sh {self.R}`; {len(set(self.r.read))} files read, "
            f"modified {span}). Do not edit by hand: rerun the script. Every figure is printed next to the command "
            "that wrote the file it comes from; where a file is missing the page says `not run: <command>`. "
            "Standard deviations are sample standard deviations over seeds (ddof = 1); paired differences are "
            "student - teacher per seed, then mean ± std over the seeds both have.", "",
            f"Machine (at generation time): {platform.platform()}, {platform.machine()}, {os.cpu_count()} logical "
            f"CPUs" + (f", {mem:.0f} GiB RAM" if mem else "") + f", Python {platform.python_version()}. "
            f"Packages: {', '.join(vers)}.", "",
            "`run_all.sh` sets `OMP_NUM_THREADS=1`: on a shared 2-core machine one torch thread per process was "
            "several times faster than two when other processes were busy. Timings depend on what else ran.", "")
        fails = self.r.text("failures.txt")
        if fails and fails.strip():
            self.add("Commands that failed in the last `run_all.sh` (from `failures.txt`):", "")
            self.add(*[f"- `{x}`" for x in fails.strip().splitlines()], "")
        if self.r.problems:
            self.add("Files skipped:", "", *[f"- {p}" for p in self.r.problems], "")
        self.add("## Targets from the issues", "")
        self.add(*table(["target", "goal", "measured", "status", "source"], self.targets), "")

    # ---------------------------------------------------------------------------------------------- tests, smoke
    def tests_and_smoke(self) -> None:
        self.add("## Test suite, smoke pipeline and main job", "")
        rows = []
        t = self.r.text("tests.txt")
        if t is None:
            rows.append(["test suite", f"`{self.cmd['tests']}`", not_run(self.cmd["tests"])])
        else:
            res = [ln.strip() for ln in t.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
            wall = re.findall(r"wall seconds: ([\d.]+)", t)
            rows.append(["test suite", f"`{self.cmd['tests']}`",
                         (res[-1].strip("= ") if res else "no pytest summary line in tests.txt")
                         + (f"; {secs(float(wall[-1]))} wall" if wall else "; wall time not recorded")])
        summ = self.r.json("smoke/summary.json")
        tm = self.r.text("smoke.time")
        wall = re.findall(r"wall seconds: ([\d.]+)", tm or "") or re.findall(r"^\s*([\d.]+)\s*$", tm or "", re.M)
        if summ is None:
            rows.append(["smoke pipeline (tiny, end to end)", f"`{self.cmd['smoke']}`", not_run(self.cmd["smoke"])])
        else:
            stage_s = sum(v for v in (summ.get("seconds") or {}).values() if isinstance(v, (int, float)))
            if wall:
                w = float(wall[-1])
                st = self.target("smoke pipeline wall time (#7)", f"< {SMOKE_MAX_SECONDS // 60} min", secs(w),
                                 w < SMOKE_MAX_SECONDS, f"`{self.R}/smoke.time`")
                res = f"{secs(w)} wall (target < {SMOKE_MAX_SECONDS // 60} min: {st})"
            else:
                res = (f"wall time not recorded (`{self.R}/smoke.time` missing or empty); the stages that ran "
                       f"in the last invocation took {secs(stage_s)} in total")
            rows.append(["smoke pipeline (tiny, end to end)", f"`{self.cmd['smoke']}`", res])
        self.add(*table(["what", "command", "result"], rows), "")
        if summ is not None:
            self.add(f"Smoke run (`{self.R}/smoke/summary.json`; tiny random-init BERT, the `smoke` preset of "
                     "`cgf_fhe/pipeline.py`):", "")
            self.pipeline_summary(summ, "smoke")
            self.smoke_notes(summ)
        self.main_job()

    def pipeline_summary(self, summ: dict, run: str) -> None:
        """Table (teacher, student, ONNX plain, emulated/TenSEAL CKKS) and facts of a pipeline's summary.json."""
        te, stu = summ.get("teacher") or {}, summ.get("student") or {}
        em, tn = summ.get("emulate") or {}, summ.get("tenseal") or {}
        sec = summ.get("seconds") or {}
        cv = summ.get("cover") or {}
        cv_dev = cv.get("dev") or {}

        def ckks(s):
            p = s.get("params") or {}
            if not p:
                return ""
            return f" (N={p.get('poly_modulus')}, {p.get('level_budget')} levels, {s.get('refreshes')} refreshes)"

        rows = [["teacher (exact softmax), plaintext", num(te.get("accuracy")), num(te.get("f1")), num(te.get("n")),
                 secs(sec.get("teacher"))],
                ["student (CGF, polynomial), plaintext", num(stu.get("accuracy")), num(stu.get("f1")),
                 num(stu.get("n")), secs(sec.get("student"))],
                *([["student after `cover` (exported form), plaintext", num(cv_dev.get("accuracy")),
                     num(cv_dev.get("f1")), num(cv_dev.get("n")), secs(sec.get("cover"))]] if cv else []),
                ["student, ONNX plain backend", num(em.get("plain_accuracy")), num(em.get("plain_f1")),
                 num(em.get("n_examples")), "-"],
                ["student, emulated CKKS" + ckks(em), num(em.get("accuracy")), num(em.get("f1")),
                 num(em.get("n_examples")), secs(em.get("seconds"))]]
        if tn:
            rows.append(["student, TenSEAL CKKS" + ckks(tn), num(tn.get("accuracy")), num(tn.get("f1")),
                         num(tn.get("n_examples")), secs(tn.get("seconds"))])
        self.add(*table(["stage", "accuracy", "F1", "examples", "time"], rows), "")
        facts = []
        if em:
            facts.append(f"emulated vs plain: agreement {num(100 * em['agreement'], 2)}%, max logit error "
                         f"{sci(em.get('max_logit_error'))}" if em.get("agreement") is not None else "")
        par = self.r.json(f"{run}/student.parity.json")
        if par:
            facts.append(f"export parity (onnxruntime vs torch, {par.get('n_examples')} examples): max |logit diff| "
                         f"{sci(par.get('max_abs_logit_diff'))}, agreement {num(100 * par.get('agreement', 0), 1)}%")
        if cv:
            facts.append(f"cover: {len(cv.get('changed') or [])} intervals widened"
                         + (f" ({', '.join(cv['changed'])})" if cv.get("changed") else "")
                         + f"; depth {cv.get('depth_before')} -> {cv.get('depth_after')}")
        reps = summ.get("reports") or {}
        if reps:
            depth = {r.get("total_depth") for r in reps.values()}
            facts.append("depth " + "/".join(map(str, sorted(d for d in depth if d is not None))) + "; " + ", ".join(
                f"at L = {L}: {r.get('bootstraps_total')} refreshes" for L, r in sorted(reps.items(),
                                                                                     key=lambda kv: int(kv[0]))))
        timings = [f"{k} {secs(v)}" for k, v in sec.items() if isinstance(v, (int, float))]
        if timings:
            facts.append("stage times (last invocation): " + ", ".join(timings))
        self.add(*[f"- {f}" for f in facts if f], "")

    def smoke_notes(self, summ: dict) -> None:
        em, stu = summ.get("emulate") or {}, summ.get("student") or {}
        labels = em.get("labels")
        if labels and stu.get("accuracy") is not None:
            share = sum(1 for x in labels if x == 1) / len(labels)
            if abs(stu["accuracy"] - max(share, 1 - share)) < 1e-9:
                self.add(f"The tiny model predicts only the majority class ({num(max(share, 1 - share))} = share of "
                         f"that class among the {len(labels)} dev examples): the smoke run checks the plumbing, "
                         "not accuracy.", "")
            else:
                self.add("The smoke run checks the plumbing (tiny random-init model), not accuracy.", "")
        else:
            self.add("The smoke run checks the plumbing (tiny random-init model, a few hundred examples), not "
                     "accuracy: its dev accuracy is close to the share of the majority class.", "")
        self.add("The preset widens the calibrated intervals (student `margin` in `smoke/config.yaml`) and keeps the "
                 "student's learning rate at the default: with narrower intervals and a larger learning rate, dev "
                 "inputs left the intervals, the polynomials blew up there and the CKKS backends decrypted garbage.",
                 "")

    def main_job(self) -> None:
        """The README's main job (`pipeline --preset mrpc-minilm`) run end to end as one command."""
        cmd = self.cmd["main"]
        self.add("### Main job: `pipeline --preset mrpc-minilm`", "", *code(cmd), "")
        summ = self.r.json("mrpc-minilm/summary.json")
        if summ is None:
            self.add(not_run(cmd), "")
            return
        tm = self.r.text("mrpc-minilm.time") or ""
        wall = re.findall(r"wall seconds: ([\d.]+)", tm)
        if not wall:  # GNU time -v: "Elapsed (wall clock) time (h:mm:ss or m:ss): 2:05:13"
            for t in re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", tm):
                parts = [float(x) for x in t.split(":")]
                wall.append(str(sum(v * 60 ** i for i, v in enumerate(reversed(parts)))))
        self.add("MiniLM teacher on full MRPC, 6-layer polynomial CGF student, export, check, reports, emulated CKKS on "
                 f"the dev set (`{self.R}/mrpc-minilm/summary.json`"
                 + ((f"; {secs(float(wall[0]))} wall for the whole command" if len(wall) == 1 else
                     f"; {len(wall)} invocations (resumed), wall " + " + ".join(secs(float(w)) for w in wall))
                    if wall else "; wall time not recorded")
                 + "):", "")
        self.pipeline_summary(summ, "mrpc-minilm")
        done = all(summ.get(k) for k in ("teacher", "student", "emulate"))
        self.target("README main job (`pipeline --preset mrpc-minilm`) end to end (#7)", "completes",
                    (f"completed, {secs(sum(float(w) for w in wall))} wall" if wall else "completed") if done
                    else "incomplete",
                    done, f"`{self.R}/mrpc-minilm/summary.json`")
        from cgf_fhe.pipeline import PRESETS

        want = {k: v for k, v in PRESETS["mrpc-minilm"]["student"].items() if k in ("epoch_cover",) and v}
        got = ((self.r.json("mrpc-minilm/student/cgf_fhe.json") or {}).get("poly_training") or {})
        stale = sorted(k for k, v in want.items() if got.get(k) != v)
        if stale:
            self.add("This run predates part of the current preset: its student was trained without "
                     + ", ".join(f"`--{k.replace('_', '-')}`" for k in stale)
                     + " (rerunning the command retrains the student with it).", "")
        note = self.r.text("mrpc-minilm/NOTES.md")
        if note:
            self.add("Notes on this run (`" + f"{self.R}/mrpc-minilm/NOTES.md" + "`):", "", note.strip(), "")

    # ---------------------------------------------------------------------------------------------- 1. training
    def training(self) -> None:
        self.add("## 1. Training: MiniLM teacher on MRPC", "",
                 "### Recipe search (seed 42, one run per candidate, full MRPC: 3,668 train / 408 dev)", "")
        rows = []
        for name, _ in SEARCH:
            c = self.cmd[f"search/{name}"]
            runs = self.r.seed_runs(f"minilm/search/{name}")
            if not runs:
                rows.append([f"`{name}`", not_run(c), "", "", "", "", ""])
                continue
            s = next(iter(runs.values()))
            rows.append([f"`{name}`", recipe_text(s), " / ".join(num(a) for a in epoch_accs(s)),
                         num(s["dev"].get("accuracy")), num(s["dev"].get("f1")), fmt_best_point(s),
                         secs(s.get("seconds_per_epoch"))])
        self.add(*table(["candidate", "recorded recipe", "dev accuracy per epoch", "best accuracy", "F1",
                         "best epoch", "time per epoch"], rows), "")
        self.add("Commands (`cgf_fhe.json` in each folder):", "")
        for name, _ in SEARCH:
            self.add(*code(self.cmd[f"search/{name}"]))
        self.add("")
        for name, _ in SEARCH:
            for s in self.r.seed_runs(f"minilm/search/{name}").values():
                note = points_note(s)
                if note:
                    self.add(f"- `{name}`: {note}")
        self.add(*self._slow_notes({n: self.r.seed_runs(f"minilm/search/{n}") for n, _ in SEARCH}))

        self.add("### Teacher seed set", "", *code(self.cmd["teacher"]), "")
        runs = self.r.seed_runs("minilm/teacher")
        self.teachers = runs
        if not runs:
            self.add(not_run(self.cmd["teacher"]), "")
            self.target("MiniLM teacher, 3-seed mean dev accuracy (#2)", f">= {TEACHER_MIN_ACC}", "not run", None,
                        f"`{self.R}/minilm/teacher/seed*/cgf_fhe.json`", "not run")
            return
        accs = self.teacher_table(runs, "minilm/teacher", SEEDS)
        m, _ = mean_std(accs)
        full = all(sd in runs for sd in SEEDS)
        measured = pm(accs) + (f", {len(runs)} seeds" if len(runs) > 1 else "")
        st = self.target("MiniLM teacher, 3-seed mean dev accuracy (#2)", f">= {TEACHER_MIN_ACC}",
                         measured, (m >= TEACHER_MIN_ACC) if full else None,
                         f"`{self.R}/minilm/teacher/seed*/cgf_fhe.json`",
                         f"not evaluable: {len(runs)} of 3 seeds")
        self.add(f"Target (issue #2): 3-seed mean dev accuracy >= {TEACHER_MIN_ACC}: {st} ({num(m)}).", "")
        self.add(*self._slow_notes({f"teacher seed {sd}": {sd: s} for sd, s in runs.items()}))

    def fresh_teacher(self) -> None:
        self.add("### Fresh teacher seeds (for the confirmation run in section 2)", "",
                 "The same recipe on seeds " + " ".join(map(str, FRESH_SEEDS)) + ", trained after every student "
                 f"configuration had been chosen on seeds {' '.join(map(str, SEEDS))}.", "", *code(self.cmd["teacher-fresh"]), "")
        fresh = self.r.seed_runs(FRESH_TEACHER)
        self.fresh_teachers = fresh
        if fresh:
            self.teacher_table(fresh, FRESH_TEACHER, FRESH_SEEDS)
        else:
            self.add(not_run(self.cmd["teacher-fresh"]), "")

    def teacher_table(self, runs: dict, folder: str, expected) -> list:
        """The per-seed table, seeds and recipe notes of a teacher seed set; returns its dev accuracies."""
        rows = [[str(sd), num(s["dev"].get("accuracy")), num(s["dev"].get("f1")), fmt_best_point(s),
                 " / ".join(num(a) for a in epoch_accs(s)), secs(s.get("seconds_per_epoch"))]
                for sd, s in runs.items()]
        accs = [s["dev"].get("accuracy") for s in runs.values()]
        f1s = [s["dev"].get("f1") for s in runs.values()]
        spe = [s.get("seconds_per_epoch") for s in runs.values()]
        rows.append([f"**mean ± std ({len(runs)} seeds)**", f"**{pm(accs)}**", f"**{pm(f1s)}**", "", "",
                     pm(spe, 0, unit=" s")])
        self.add(*table(["seed", "best dev accuracy", "F1", "best epoch", "dev accuracy per epoch",
                         "time per epoch"], rows), "")
        recipes = {recipe_text(s) for s in runs.values()}
        self.add(f"Seeds: {seeds_note(runs, expected)}. Recorded recipe: {'; '.join(sorted(recipes))} "
                 f"(from `{self.R}/{folder}/seed*/cgf_fhe.json`"
                 + (", NOT the same for every seed" if len(recipes) > 1 else "") + ").", "")
        diff = sorted({x for s in runs.values() for x in preset_mismatch(s, "minilm")})
        if diff:
            self.add("Note: these runs' recorded recipe differs from what `--preset minilm` gives in the current "
                     f"code ({'; '.join(diff)}): they were trained with explicit flags or an earlier preset, so "
                     "rerunning the command above would train a different recipe.", "")
        return accs

    def _slow_notes(self, groups: dict) -> list[str]:
        out = []
        for name, runs in groups.items():
            for s in runs.values():
                for ep, t, med in slow_epochs(s):
                    out.append(f"- `{name}`: epoch {ep} took {secs(t)} to train, {t / med:.1f}x the run's median "
                               f"epoch ({secs(med)}): CPU contention or more threads; its time per epoch is inflated.")
        return out + [""] if out else []

    # ---------------------------------------------------------------------------------------------- 2. students
    def students(self) -> None:
        self.add("## 2. Students distilled from the teacher", "",
                 "Each student is distilled from the teacher checkpoint of the same seed (CGF softmax c = 0.5, KD: "
                 "logit KL + beta x hidden-state MSE). The paired reference is the teacher's dev score as `distill` "
                 "measured it on the same dev inputs (`teacher_dev` in the student's `cgf_fhe.json`; for the 32-token "
                 "narrow student that is the teacher on 32-token inputs).", "")
        summary_rows = []
        self.poly_points = []
        self.paired: dict[str, dict[int, float]] = {}  # student -> {seed: paired accuracy difference}
        for key, folder, label, flags, seeds_flag, target_pp, poly in STUDENTS:
            cmd = self.cmd[key]
            target_txt = f"{target_pp:g} pp" if target_pp is not None else "-"  # None: a control
            expected = SEEDS_OF[key]
            teachers = self.fresh_teachers if key in CONFIRMS else self.teachers
            runs = self.r.seed_runs(folder)
            self.add(f"### `{key}`: {label}", "", *code(cmd), "")
            if key == "poly6-frozen":
                self.frozen_probe()
            what = (f"{label}: paired accuracy difference to the teacher ("
                    + ("#2" if key == "cgf-kd" else "#3") + ")")
            src = f"`{self.R}/{folder}/" + ("seed*/" if "--seeds" in seeds_flag else "") + "cgf_fhe.json`"
            dv = self.r.diverged_runs(folder)
            if dv:
                self.diverged_table(dv)
            if not runs and dv:
                why = (f"**NOT met**: training diverged (non-finite loss) on seed(s) {', '.join(map(str, dv))}"
                       + (f"; seeds {', '.join(str(x) for x in expected if x not in dv)} not run"
                          if any(x not in dv for x in expected) else ""))
                summary_rows.append([f"`{key}`", "0", "n/a", "n/a", "n/a", "n/a", target_txt, why])
                if target_pp is not None:
                    self.target(what, f">= -{target_pp:g} pp", "diverged", None,
                                f"`{self.R}/{folder}/seed*/train_state/diverged.json`", why)
                continue
            if not runs:
                self.add(not_run(cmd), "")
                summary_rows.append([f"`{key}`", "0", "n/a", "n/a", "n/a", "n/a", target_txt, "not run"])
                if target_pp is not None:
                    self.target(what, f">= -{target_pp:g} pp", "not run", None, src, "not run")
                continue
            rows, fdiffs = [], []
            self.paired[key] = {}
            for sd, s in runs.items():
                ref, _ = teacher_ref(s, teachers, sd)
                a, f = s["dev"].get("accuracy"), s["dev"].get("f1")
                d = (a - ref["accuracy"]) if ref and a is not None and ref.get("accuracy") is not None else None
                fd = (f - ref["f1"]) if ref and f is not None and ref.get("f1") is not None else None
                if d is not None:
                    self.paired[key][sd] = d
                if fd is not None:
                    fdiffs.append(fd)
                depth = ((s.get("fhe") or {}).get("depth") or {})
                ir = s.get("interval_report") or {}
                nonfin = (s.get("dev_final") or s["dev"]).get("n_nonfinite")
                rows.append([str(sd), num(a), num(f), num(ref.get("accuracy")) if ref else "n/a",
                             f"{100 * d:+.2f}" if d is not None else "n/a", fmt_best_point(s),
                             " / ".join(num(x) for x in epoch_accs(s)), secs(s.get("seconds_per_epoch")),
                             str(depth.get("total", "n/a")) if poly else "n/a",
                             (sci(ir.get("frac_out")) if ir else "n/a") if poly else "-",
                             f"{nonfin}/{(s.get('dev_final') or s['dev']).get('n')}" if nonfin is not None else "n/a"])
                if poly and depth.get("total") is not None and a is not None:
                    self.poly_points.append((key, sd, depth["total"], a))
            diffs = list(self.paired[key].values())
            accs = [s["dev"].get("accuracy") for s in runs.values()]
            f1s = [s["dev"].get("f1") for s in runs.values()]
            rows.append([f"**mean ± std ({len(runs)})**", f"**{pm(accs)}**", pm(f1s), "",
                         f"**{pm(diffs, 2, 100, True)}**", "", "", pm([s.get('seconds_per_epoch')
                                                                       for s in runs.values()], 0, unit=" s"),
                         "", "", ""])
            self.add(*table(["seed", "dev accuracy", "F1", "teacher accuracy (same inputs)", "difference (pp)",
                             "best epoch", "dev accuracy per epoch", "time per epoch", "total depth",
                             "out-of-interval inputs (dev)", "non-finite dev logits"], rows), "")
            s0 = next(iter(runs.values()))
            extra = [f"seeds {seeds_note(runs, expected)}", f"recorded recipe: {recipe_text(s0, kd=True)}"]
            if s0.get("layer_map") is not None:
                extra.append(f"teacher layers kept: {s0['layer_map']}")
            if s0.get("projection"):
                pr = s0["projection"]
                sc = pr.get("student_config") or {}
                extra.append(f"narrow: hidden {sc.get('hidden_size')}, {sc.get('num_attention_heads')} heads, "
                             f"intermediate {sc.get('intermediate_size')}"
                             + (f"; the projection keeps {100 * pr['explained_second_moment']:.1f}% of the teacher's "
                                "hidden-state second moment" if pr.get("explained_second_moment") else ""))
            for sd, s in runs.items():
                cv = s.get("cover")
                if cv:
                    b, a = cv.get("dev_before") or {}, s.get("dev") or {}
                    extra.append(f"seed {sd}, cover: dev accuracy {num(b.get('accuracy'))} ({b.get('n_nonfinite')} "
                                 f"non-finite logits) -> {num(a.get('accuracy'))} ({a.get('n_nonfinite')}); "
                                 f"{len(cv.get('changed') or {})} ops refitted"
                                 + (f" ({', '.join(sorted(cv['changed']))})" if cv.get("changed") else "")
                                 + f"; depth {cv.get('depth_before')} -> {cv.get('depth_after')}")
            for sd, s in runs.items():
                ec = (s.get("fhe") or {}).get("epoch_cover")
                if ec:
                    tf = [(h.get("dev_training_form") or {}).get("accuracy") for h in s.get("history") or []]
                    extra.append(f"seed {sd}, epoch cover: intervals widened per epoch "
                                 + " / ".join(str(len(e.get("widened") or [])) for e in ec)
                                 + "; training-form (guard on) dev accuracy per epoch "
                                 + " / ".join(num(x) for x in tf))
            for sd, s in runs.items():
                ref, _ = teacher_ref(s, teachers, sd)
                note = points_note(s, (ref or {}).get("accuracy"))
                if note:
                    extra.append(f"seed {sd}, {note}")
            for sd, s in runs.items():
                losses = [h.get("train_loss") for h in s.get("history") or []]
                if any(x is not None and x > 1e3 for x in losses):
                    extra.append(f"seed {sd}: training diverged, train loss per epoch "
                                 + " / ".join(f"{x:.3g}" for x in losses if x is not None)
                                 + "; blend per epoch " + " / ".join(f"{h.get('blend', 1.0):.3g}"
                                                                     for h in s.get("history") or []))
            folders = {k: f for k, f, *_ in STUDENTS}
            for other in PAIRED_WITH.get(key, ()):
                o_runs = self.r.seed_runs(folders[other])
                both = [sd for sd in runs if sd in o_runs]
                if both:
                    ds = [runs[sd]["dev"]["accuracy"] - o_runs[sd]["dev"]["accuracy"] for sd in both]
                    extra.append(f"paired with `{other}` (same teachers and seeds {', '.join(map(str, both))}): "
                                 + ", ".join(f"seed {sd} {100 * d:+.2f} pp" for sd, d in zip(both, ds))
                                 + f"; mean {pm(ds, 2, 100, True, ' pp')}")
            fo = s0.get("fhe_options") or {}
            if fo:
                extra.append(f"polynomials: exp degree {fo.get('exp_degree')}, GELU {fo.get('gelu_degree')}, tanh "
                             f"{fo.get('tanh_degree')}, LayerNorm {fo.get('ln')}"
                             + (f" (1/sqrt degree {fo.get('invsqrt_degree')})" if fo.get("ln") == "newton" else "")
                             + f", interval margin {fo.get('margin')}")
                dpl = ((s0.get("fhe") or {}).get("depth") or {}).get("per_layer")
                if dpl:
                    extra.append(f"depth per layer (seed {next(iter(runs))}): {dpl}")
            self.add(*[f"- {x}" for x in extra], "")
            bad = [(sd, (s.get("dev_final") or s["dev"]).get("n_nonfinite")) for sd, s in runs.items()
                   if (s.get("dev_final") or s["dev"]).get("n_nonfinite")]
            if bad:
                self.add("Non-finite logits in the exported form (guard off): "
                         + ", ".join(f"seed {sd}: {n} dev examples" for sd, n in bad)
                         + ". Inputs leave the polynomial intervals there; these seeds' accuracies count those "
                           "examples as wrong.", "")
            m, _ = mean_std(diffs)
            full = all(sd in runs for sd in expected)
            measured = pm(diffs, 2, 100, True, " pp") + (f", {len(diffs)} seeds" if len(diffs) > 1 else "")
            if target_pp is None:
                st = "control (no target)"
            elif key.startswith("narrow"):  # a vehicle for real TenSEAL runs: one seed, 32 tokens, not an issue target
                st = ("informative only (one seed, 32 tokens, teacher scored at 32 tokens; not an issue target): "
                      + ("within" if m is not None and 100 * m >= -target_pp else "not within") + f" {target_pp:g} pp")
            else:
                diverged = list(_seed_order({**dv, **{sd: s for sd, s in runs.items() if any(
                    (h.get("train_loss") or 0) > 1e3 for h in s.get("history") or [])}}))
                missing = [str(sd) for sd in expected if sd not in runs and sd not in dv]
                why = (f"not evaluable: {len(runs)} of {len(expected)} seeds" if not full else "no pairs")
                if diverged and not full:  # a partial seed set whose runs diverged: say so, not just "partial"
                    why = (f"**NOT met** on the seeds run: training diverged (seed {', '.join(map(str, diverged))})"
                           + (f"; seeds {', '.join(missing)} not run" if missing else ""))
                st = self.target(what, f">= -{target_pp:g} pp", measured,
                                 (100 * m >= -target_pp) if (m is not None and full) else None, src, why)
            self.add(f"Paired difference to the teacher (accuracy): {pm(diffs, 2, 100, True, ' pp')}; F1: "
                     f"{pm(fdiffs, 2, 100, True, ' pp')}. "
                     + (f"Target: within {target_pp:g} pp of the teacher: {st}." if target_pp is not None else
                        f"{st[0].upper()}{st[1:]}."), "")
            if key in CONFIRMS:
                self.pooled(key, what, src, target_pp)
            summary_rows.append([f"`{key}`", str(len(runs)), pm(accs), pm(f1s), pm(diffs, 2, 100, True),
                                 "/".join(sorted({str(((s.get('fhe') or {}).get('depth') or {}).get('total', 'n/a'))
                                                  for s in runs.values()})) if poly else "n/a",
                                 target_txt, st])
        self.add("### Summary", "")
        self.add(*table(["student", "seeds", "dev accuracy", "F1", "paired difference (pp)", "total depth",
                         "target", "status"], summary_rows), "")
        self.plot_accuracy_depth()
        self.plot_paired()
        self.depth_table()
        self.poly_grad_memory()

    def pooled_diffs(self, key: str) -> dict[tuple[str, int], float]:
        """{(seed set, seed): paired difference} of a confirmation run and the run whose flags it repeats."""
        return {**{("orig", s): d for s, d in self.paired.get(CONFIRMS[key][0], {}).items()},
                **{("fresh", s): d for s, d in self.paired[key].items()}}

    def pooled(self, key: str, what: str, src: str, target_pp: float) -> None:
        """A confirmation run's paired differences pooled with those of the run whose flags it repeats."""
        orig = CONFIRMS[key][0]
        both = self.pooled_diffs(key)
        ds = [100 * d for d in both.values()]
        m, sd = mean_std(ds)
        if m is None:
            return
        n = len(ds)
        seeds = " ".join(str(s) for _, s in both)
        within = sum(d >= -target_pp for d in ds)
        ci = ""
        if n > 1:
            se = sd / n ** 0.5
            try:  # scipy is not a dependency of cgf-fhe; without it the page gives the standard error only
                from scipy import stats
                h = stats.t.ppf(0.975, n - 1) * se
                ci = f", 95% t-interval of the mean [{m - h:+.2f}, {m + h:+.2f}] pp"
            except ImportError:
                pass
            ci = f"; standard error {se:.2f} pp" + ci
        measured = f"{m:+.2f} ± {sd:.2f} pp, {n} seeds ({seeds})" if n > 1 else f"{m:+.2f} pp, 1 seed"
        full = all(s in self.paired.get(k, {}) for k in (key, orig) for s in SEEDS_OF[k])
        st = self.target(f"{what}, pooled with `{orig}`", f">= -{target_pp:g} pp", measured,
                         (m >= -target_pp) if full else None, f"{src} and `{orig}`'s",
                         f"not evaluable: {n} of {len(SEEDS_OF[key]) + len(SEEDS_OF[orig])} seeds")
        self.add(f"Pooled with `{orig}` (the same flags on seeds {' '.join(map(str, SEEDS_OF[orig]))}, where they "
                 "were chosen): paired "
                 f"difference {measured}{ci}; {within} of {n} seeds within {target_pp:g} pp. "
                 f"Target on the pooled mean: {st}.", "")

    def diverged_table(self, dv: dict) -> None:
        """Seeds whose training stopped at a non-finite loss: where, the blend, the loss parts, the last
        evaluation point reached."""
        def nf(v):  # JSON holds non-finite floats as text ("nan", "inf"); the page writes NaN / Inf
            if isinstance(v, (int, float)):
                return f"{v:.3g}"
            return {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}.get(str(v), str(v))

        rows = []
        for sd, r in dv.items():
            pts = [p for h in r.get("history") or [] for p in (h.get("mid_evals") or [])
                   + ([h] if "dev" in h else [])]
            last = pts[-1] if pts else None
            rows.append([str(sd), str(r.get("step")), f"{r.get('at'):g}" if r.get("at") is not None else "n/a",
                         f"{r['blend']:.3g}" if r.get("blend") is not None else "-", nf(r.get("loss")),
                         ", ".join(f"{k} {nf(v)}" for k, v in (r.get("parts") or {}).items()),
                         f"{num(last['dev'].get('accuracy'))} at epoch {last.get('at', last.get('epoch'))}"
                         if last else "none"])
        self.add("Training stopped at a non-finite loss (`train_state/diverged.json`):", "",
                 *table(["seed", "step", "epoch", "frozen-LN blend", "loss", "loss parts at that step",
                         "last dev point before"], rows), "")

    def poly_grad_memory(self) -> None:
        """Training cost of a polynomial student: autograd through the schedules vs the derivative backward."""
        c = self.cmd["poly_grad_memory"]
        self.add("### Training memory and time: derivative backward of the polynomials", "",
                 "Training evaluates each polynomial in its encrypted schedule. Recording every intermediate product "
                 "for autograd (a degree-63 GELU saves 40 tensors of its input's size; the exp, LayerNorm and tanh schedules add more) dominated memory and time; the backward pass now uses "
                 "the derivative series instead (`cgf_fhe.poly._PolyGrad`), with the forward values unchanged.", "",
                 *code(c), "")
        d = self.r.json(self.calib_dir / "poly_grad_memory.json")
        if d is None:
            self.add(not_run(c), "")
            return
        rows = [[f"autograd through the schedule" if m == "schedule" else "derivative series (default)",
                 f"{d[m]['peak_rss_mb']:.0f} MB", f"{d[m]['growth_mb']:.0f} MB", f"{d[m]['seconds_per_step']:.2f} s"]
                for m in ("schedule", "derivative") if m in d]
        self.add(*table(["backward", "peak RSS", "growth over the loaded model", "time per step"], rows), "")
        r = d.get("ratio") or {}
        self.add(f"Ratios measured in one run: peak RSS x{r.get('peak_rss', float('nan')):.2f}, time per step "
                 f"x{r.get('seconds_per_step', float('nan')):.2f}; the two gradients differ by "
                 f"{sci(d.get('max_rel_grad_diff'))} (relative norm over all parameters, first batch). Batch "
                 f"{d['derivative'].get('batch_size')}, {d['derivative'].get('steps')} steps per mode (first not timed).",
                 "")

    def frozen_probe(self) -> None:
        """Why frozen LayerNorm fails on MiniLM: variance by position and a no-retraining swap."""
        cmd = self.cmd["frozen_probe"]
        self.add("Where the LayerNorm variance outliers sit, and what swapping every LayerNorm of the CGF + KD "
                 "student (seed 42) for frozen statistics does without retraining:", "", *code(cmd), "")
        d = self.r.json("minilm/frozen-ln-probe.json")

        def g3(v):
            return f"{v:.3g}" if isinstance(v, (int, float)) else "n/a"

        if d is None:
            self.add(not_run(cmd), "")
            return
        rows = [[f"`{k}`", g3(v.get("geo_var_cls")), g3(v.get("spread_cls")), g3(v.get("geo_var_rest")),
                 g3(v.get("spread_rest"))] for k, v in (d.get("layernorms") or {}).items()]
        self.add(*table(["LayerNorm", "[CLS] geo-mean variance", "[CLS] max/min", "other tokens geo-mean variance",
                         "other tokens max/min"], rows), "")
        var = d.get("variants") or {}

        def top(k):
            his = [r[1] for r in (var.get(k) or {}).get("exp_range_per_layer") or [] if r and r[1] is not None]
            return g3(max(his)) if his else "n/a"

        labels = {"exact_ln": "exact LayerNorm (the checkpoint)", "frozen": "frozen, one constant per LayerNorm",
                  "frozen_cls": "frozen, own constant for position 0 ([CLS])",
                  "frozen_attn": "frozen after attention only (`--ln frozen-attn`), exact after the FFN",
                  "frozen_ffn": "frozen after the FFN only, exact after attention"}
        vrows = []
        for k, v in var.items():
            blown = sum(1 for r in v.get("exp_range_per_layer") or [] if not r or r[1] is None)
            vrows.append([labels.get(k, k), num(v.get("accuracy")), f"{v.get('n_nonfinite')}/{v.get('n')}", top(k),
                          str(blown)])
        self.add(*table(["LayerNorm", "dev accuracy", "non-finite logits", "max CGF exp input",
                         "layers with non-finite exp inputs"], vrows), "")
        st = list((d.get("layernorms") or {}).values())
        ratio = max((v["geo_var_cls"] / v["geo_var_rest"] for v in st
                     if v.get("geo_var_cls") and v.get("geo_var_rest")), default=None)
        spread = max((max(v.get("spread_cls") or 0, v.get("spread_rest") or 0) for v in st), default=None)
        self.add(f"The [CLS] row's typical variance is up to {g3(ratio)}x that of the other tokens, and within "
                 f"a group a LayerNorm's variance spans up to {g3(spread)}x: no per-layer constant (nor one per "
                 "position class) normalises these tokens. Without the per-token normalisation the attention "
                 f"scores grow and CGF's `exp(s - mean - c var)` receives arguments up to {top('frozen')} (exact "
                 f"LayerNorm: {top('exact_ln')}), and the network overflows. A frozen-LayerNorm MiniLM student would "
                 "need training that removes these outliers first. Distillation that anneals exact -> frozen "
                 "LayerNorm (the run below) does not remove them: see its training loss.", "")
        if "frozen_attn" in var and "frozen_ffn" in var:
            self.add(f"The damage comes from the LayerNorms after the FFN: frozen there alone, the exp inputs reach "
                     f"{top('frozen_ffn')}; frozen after attention alone, they stay at {top('frozen_attn')} and dev "
                     f"accuracy is {num(var['frozen_attn'].get('accuracy'))} before any training (exact "
                     f"{num(var['exact_ln'].get('accuracy'))}). `--ln frozen-attn` freezes exactly those and keeps "
                     "Newton after the FFN.", "")

    def plot_accuracy_depth(self) -> None:
        if not self.poly_points:
            self.add("No accuracy-vs-depth plot: no polynomial student has finished.", "")
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        keys = list(dict.fromkeys(k for k, *_ in self.poly_points))
        for i, k in enumerate(keys):
            pts = [(x, y) for kk, _, x, y in self.poly_points if kk == k]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, _ = mean_std(xs)
            my, sy = mean_std(ys)
            col = f"C{i}"
            ax.scatter(xs, ys, color=col, alpha=0.35, s=18)
            ax.errorbar([mx], [my], yerr=[sy] if sy is not None else None, fmt="o", color=col, capsize=4,
                        label=f"{k} (n={len(pts)})")
        tm, _ = mean_std([s["dev"].get("accuracy") for s in self.teachers.values()])
        if tm is not None:
            ax.axhline(tm, color="gray", ls="--", lw=1, label=f"teacher mean (exact, not FHE) {tm:.4f}")
            ax.axhline(tm - POLY_MAX_DROP_PP / 100, color="gray", ls=":", lw=1, label=f"teacher - {POLY_MAX_DROP_PP:g} pp")
        ax.set_xlabel("total multiplicative depth (stated, cgf_fhe.json fhe.depth.total)")
        ax.set_ylabel("dev accuracy (mean ± std over seeds)")
        ax.set_title("polynomial students: accuracy vs depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        self.figure(fig, "accuracy_vs_depth.png", "accuracy vs depth",
                    "Accuracy vs total depth of the polynomial students (faint points: single seeds; the teacher "
                    "and the CGF+KD student are not FHE-evaluable and have no depth):")

    def figure(self, fig, name: str, alt: str, caption: str) -> None:
        """Save ``fig`` as img/``name`` and add ``caption`` and the image link to the page."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        p = self.img(name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        self.add(caption, "", f"![{alt}]({self.link(p)})", "")

    def plot_paired(self) -> None:
        """Per-seed paired differences of every student with a #3 target, against the 1 pp band: how far the seed
        spread reaches past the margin, which a mean alone hides."""
        targets = {k for k, _, _, _, _, pp, poly in STUDENTS if poly and pp is not None and not k.startswith("narrow")}
        rows = [(k, d) for k, d in self.paired.items() if k in targets and d]
        rows += [(f"{CONFIRMS[k][0]}: both seed sets pooled", self.pooled_diffs(k))
                 for k, d in self.paired.items() if k in CONFIRMS and d]
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.4))
        for i, (k, d) in enumerate(rows):
            xs = [100 * v for v in d.values()]
            ax.scatter(xs, [i] * len(xs), color="C0", alpha=0.5, s=16)
            m, _ = mean_std(xs)
            ax.scatter([m], [i], color="C3" if m < -POLY_MAX_DROP_PP else "C2", marker="D", s=30, zorder=3)
        ax.axvline(0, color="gray", lw=1)
        ax.axvline(-POLY_MAX_DROP_PP, color="C3", ls=":", lw=1)
        ax.set_yticks(range(len(rows)), [k for k, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("dev accuracy, student - teacher (pp)")
        ax.set_title(f"paired differences (dots: seeds, diamonds: means, dotted: -{POLY_MAX_DROP_PP:g} pp)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        self.figure(fig, "paired_differences.png", "paired differences",
                    "Paired differences to the teacher of every polynomial student with a #3 target, seed by seed "
                    "(a mean inside the band can hide seeds outside it):")

    def depth_table(self) -> None:
        self.add("### Depth per encoder layer for each approximation choice", "", *code(self.cmd["depth_table"]), "")
        t = self.r.json("depth_table.json")
        if t is None:
            self.add(not_run(self.cmd["depth_table"]), "")
            return
        self.add("Stated depths; `tests/test_surgery.py` and `tests/test_export.py` check that each stated depth "
                 "equals the depth `fhe_ops.analyze` finds in the exported ONNX graph.", "",
                 f"Formula: {t.get('formula', 'n/a')}", "")
        from cgf_fhe.surgery import ln_cells

        rows = []
        for r in t.get("rows") or []:
            ln, lnd = ln_cells(r)
            rows.append([ln, f"{r.get('exp_form')} ({r.get('exp_degree')}, {r.get('exp_squarings')})",
                         r.get("exp_depth"), r.get("gelu_degree"), r.get("gelu_depth"), lnd, r.get("layer_depth")])
        self.add(*table(["LayerNorm", "exp form (degree, squarings)", "exp depth", "GELU degree", "GELU depth",
                         "LN depth (each; attn + ffn if they differ)", "depth per layer"], rows), "")

    # ---------------------------------------------------------------------------------------------- 3-4. export, report
    def export_and_reports(self) -> None:
        from cgf_fhe.export.plots import plot_levels, plot_stage_ops

        self.add("## 3-4. Export, check, depth report", "")
        for key, path, _, _ in ONNX:
            stem = path[:-5]
            ce, cc = self.cmd[f"export/{key}"], self.cmd[f"check/{key}"]
            self.add(f"### `{path}`", "", *code(ce), *code(cc), "")
            par, chk = self.r.json(f"{stem}.parity.json"), self.r.json(f"{stem}.check.json")
            items = []
            if chk is None:
                items.append(not_run(cc))
            else:
                ops = ", ".join(f"{k} x{v}" for k, v in sorted((chk.get("encrypted_op_types") or {}).items()))
                viol = chk.get("violations") or []
                items.append(f"graph: {num(chk.get('nodes'))} nodes, {num(chk.get('encrypted_nodes'))} on ciphertexts "
                             f"({ops}); depth {chk.get('depth')}; `check`: "
                             + ("OK, every operation on an encrypted value is polynomial" if chk.get("ok")
                                else f"**{len(viol)} violation(s)**"))
            if par is None:
                items.append(not_run(ce))
            else:
                items.append(f"parity (onnxruntime vs torch, {par.get('n_examples')} dev examples, max length "
                             f"{par.get('max_length')}): max |logit diff| {sci(par.get('max_abs_logit_diff'))}, mean "
                             f"{sci(par.get('mean_abs_logit_diff'))}, agreement {num(100 * par.get('agreement', 0), 2)}% "
                             f"(accuracy torch {num(par.get('torch_accuracy'))}, onnx {num(par.get('onnx_accuracy'))});"
                             f" {secs(par.get('seconds'))}")
            self.add(*[f"- {x}" for x in items], "")

        for m in REPORTED:
            reps = {L: self.r.json(f"minilm/report-{m}-L{L}/report.json") for L in LEVELS}
            self.add(f"### Depth report: `{m}` (slot packing, 128 tokens)", "")
            for L in LEVELS:
                self.add(*code(self.cmd[f"report/{m}/{L}"]))
            self.add("")
            have = {L: r for L, r in reps.items() if r is not None}
            for L in LEVELS:
                if L not in have:
                    self.add(not_run(self.cmd[f"report/{m}/{L}"]), "")
            if not have:
                continue

            def groups(r, field):
                vals = [str(x[field]) for x in r.get("layers") or []]
                vals += [str(g[field]) for g in r.get("head") or [] if g.get("encrypted_nodes")]
                names = [f"layer {x['index']}" for x in r.get("layers") or []]
                names += [g["name"] for g in r.get("head") or [] if g.get("encrypted_nodes")]
                return ", ".join(vals), ", ".join(names)

            cols = [""] + [f"L = {L}" for L in have]
            first = next(iter(have.values()))
            gnames = groups(first, "depth")[1]
            rows = [
                ["total depth (smallest L with no bootstrap)"] + [str(r.get("total_depth")) for r in have.values()],
                [f"levels per group ({gnames})"] + [groups(r, "depth")[0] for r in have.values()],
                [f"bootstraps per group ({gnames})"] + [groups(r, "bootstraps")[0] for r in have.values()],
                ["bootstraps total (lower bound ceil(depth/L) - 1)"]
                + [f"{r.get('bootstraps_total')} ({r.get('bootstraps_lower_bound')})" for r in have.values()],
                ["CKKS ring (128-bit)"] + [f"N = {r['ckks']['poly_modulus']}, {len(r['ckks']['coeff_bits'])} primes"
                                           + ("" if r["ckks"].get("secure_128") else " (NOT 128-bit secure)")
                                           for r in have.values()],
                ["estimated latency per pass"] + [f"{secs(r.get('latency_seconds'))} ({num(r.get('examples_per_pass'))} "
                                                  "examples in the slots)" for r in have.values()],
                ["estimated latency per example (amortised)"] + [secs(r.get("latency_per_example_seconds"))
                                                                 for r in have.values()],
                ["ct x ct / ct x pt mults, rotations (all layers)"]
                + [f"{num((r.get('totals') or {}).get('ct_ct_mults'))} / {num((r.get('totals') or {}).get('ct_pt_mults'))}"
                   f", {num((r.get('totals') or {}).get('rotations'))}" for r in have.values()],
            ]
            self.add(*table(cols, rows), "")
            crit = Counter()
            for c in first.get("critical_path") or []:
                crit[c.get("stage")] += c.get("levels") or 0
            if crit:
                self.add("Levels on the critical path by stage (all layers): "
                         + ", ".join(f"{k} {v}" for k, v in crit.most_common()) + ".", "")
            self.add("The latency figures extrapolate single-core TenSEAL op costs (the report's cost table, scaled by "
                     "ring size x limbs) and do not depend on the level: read them as orders of magnitude.", "")
            for L, r in have.items():
                p = self.img(f"minilm_{m}_levels_L{L}.png")
                plot_levels(r, p)
                self.add(f"![levels per layer, {m}, L={L}]({self.link(p)})")
            p = self.img(f"minilm_{m}_ops_per_stage.png")
            plot_stage_ops(first, p)
            self.add(f"![op counts per stage, {m}]({self.link(p)})", "")

    # ---------------------------------------------------------------------------------------------- 5. simulation
    def simulation(self) -> None:
        self.add("## 5. CKKS simulation", "")
        self.calibration()
        self.emulated()
        self.tenseal_vs_emulate()

    def calibration(self) -> None:
        self.add("### Emulator vs TenSEAL, per primitive", "")
        found = []
        for fname, _ in CALIBRATION:
            c = self.cmd[f"calibration/{fname}"]
            self.add(*code(c))
            d = self.r.json(self.calib_dir / fname)
            found.append((fname, c, d))
        self.add("")
        for fname, c, d in found:
            if d is None:
                self.add(not_run(c), "")
        have = [(f, d) for f, _, d in found if d is not None]
        if not have:
            self.target("emulator error std vs TenSEAL, per primitive (#6)", f"within {CALIB_MAX_RATIO:g}x",
                        "not run", None, "`benchmarks/results/emulator_calibration_*.json`", "not run")
            return

        def head(d):
            p = d.get("params") or {}
            bits = p.get("coeff_bits") or []
            return f"N={p.get('poly_modulus')} {bits}, 2^{p.get('scale_bits')}"

        prims = list(dict.fromkeys(r["primitive"] for _, d in have for r in d.get("rows") or []))
        rows = []
        for pr in prims:
            row = [pr]
            for _, d in have:
                r = next((x for x in d.get("rows") or [] if x["primitive"] == pr), None)
                row.append("n/a" if r is None else
                           f"{sci(r.get('tenseal_std'))} / {num(r.get('ratio'), 3)} / {num(r.get('noise_ratio'), 3)} / "
                           + (f"{r['tenseal_ms_per_op']:.1f}" if r.get("tenseal_ms_per_op") is not None else "n/a"))
            rows.append(row)
        self.add(*table(["primitive"] + [f"{head(d)}: TenSEAL err std / emulator ratio / noise ratio / ms per op"
                                         for _, d in have], rows), "")
        ratios = [x for _, d in have for r in d.get("rows") or [] for x in (r.get("ratio"), r.get("noise_ratio"))
                  if isinstance(x, (int, float)) and not math.isnan(x)]
        ok = all(1 / CALIB_MAX_RATIO <= x <= CALIB_MAX_RATIO for x in ratios) if ratios else None
        rng = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "n/a"
        st = self.target("emulator error std vs TenSEAL, per primitive (#6)", f"ratio within {CALIB_MAX_RATIO:g}x",
                         f"ratios {rng} ({len(have)} parameter sets)", ok,
                         "`benchmarks/results/emulator_calibration_*.json`")
        self.add(f"Every ratio (total error and noise part) lies in {rng} (target: within {CALIB_MAX_RATIO:g}x: {st}). "
                 "error = decrypted - exact, including TenSEAL's deterministic rescale bias (with auto-rescale the "
                 "scale stays pinned at 2^scale_bits while the true scale is scale^2/q_i), which the emulator "
                 "reproduces; noise = decrypted - noise-free emulation. The full tables are in "
                 "`benchmarks/results/*.md`.", "")

    def emulated(self) -> None:
        from cgf_fhe.simulate.report import plot_layers

        for m in EMULATED:
            c = self.cmd[f"emulate/{m}"]
            self.add(f"### Emulated CKKS on the MRPC dev set: `{m}`", "", *code(c), "")
            s = self.r.json(f"minilm/emulate-{m}/simulation.json")
            if s is None:
                self.add(not_run(c), "")
                self.target(f"emulated wall time vs plain, `{m}` (#6)", f"<= {EMULATE_MAX_RATIO:g}x", "not run",
                            None, f"`{self.R}/minilm/emulate-{m}/simulation.json`", "not run")
                continue
            p = s.get("params") or {}
            n = s.get("n_examples") or 0
            agree = s.get("agreement")
            ratio = s.get("ratio_to_plain")
            st = self.target(f"emulated wall time vs plain, `{m}` (#6)", f"<= {EMULATE_MAX_RATIO:g}x",
                             f"{num(ratio, 2)}x", (ratio <= EMULATE_MAX_RATIO) if ratio is not None else None,
                             f"`{self.R}/minilm/emulate-{m}/simulation.json`")
            diag = s.get("diagnostics") or {}
            rows = [
                ["CKKS", f"N = {p.get('poly_modulus')}, chain {p.get('coeff_bits')} ({p.get('level_budget')} levels), "
                         f"scale 2^{p.get('scale_bits')}, {p.get('security')}"],
                ["examples (batches, padded lengths)", f"{n} ({s.get('batches')} batches, {s.get('seq_lens')})"],
                ["accuracy / F1 (emulated CKKS)", f"{num(s.get('accuracy'))} / {num(s.get('f1'))}"],
                ["accuracy (plain backend, same run)", num(s.get("plain_accuracy"))],
                ["agreement with plain", f"{num(100 * agree, 2)}% ({round(agree * n)}/{n})" if agree is not None
                 else "n/a"],
                ["max / mean logit error", f"{sci(s.get('max_logit_error'))} / {sci(s.get('mean_logit_error'))}"],
                [f"{s.get('refresh_label', 'refresh')}es per inference (all batches)",
                 f"{s.get('refreshes')} ({s.get('refresh_operations')} over {s.get('batches')} batches)"],
                ["wall time (total; emulated part; plain part)",
                 f"{secs(s.get('seconds'))}; {secs(s.get('backend_seconds'))}; {secs(s.get('plain_seconds'))}"],
                ["emulated / plain time", f"{num(ratio, 2)}x (target <= {EMULATE_MAX_RATIO:g}x: {st})"],
                ["emulated time per example", secs(s.get("seconds_per_example"))],
                ["level mismatches (plan vs emulator)", str(s.get("n_level_mismatches"))],
                ["values past the modulus (overflows)", str(diag.get("overflows", "n/a"))],
            ]
            self.add(*table(["metric", "value"], rows), "")
            cfg = s.get("config") or {}
            if diag.get("overflows"):
                self.add(f"Read with care: {diag['overflows']} values exceeded what their ciphertext level holds "
                         f"(smallest headroom {num(diag.get('min_headroom_bits'), 1)} bits) and, with "
                         f"`--on-overflow {cfg.get('on_overflow', 'garbage')}`, decrypt to garbage there (polynomials "
                         "evaluated outside their intervals; see the error per layer). The agreement above shows "
                         "whether that garbage reached the logits; with the default `--on-overflow raise` the run "
                         "stops at the first such value.", "")
            per = s.get("error_per_layer") or []
            if per:
                self.add("Error of the hidden state after each layer vs plain (valid tokens): "
                         + "; ".join(f"{d['layer']}: max {sci(d.get('max_abs_error'))}, mean "
                                     f"{sci(d.get('mean_abs_error'))}" for d in per) + ".", "")
            img = self.img(f"minilm_{m}_emulate_error_per_layer.png")
            plot_layers(s, img)
            self.add(f"![error per layer, {m}]({self.link(img)})", "")

    def tenseal_vs_emulate(self) -> None:
        ce, ct = self.cmd["narrow/emulate"], self.cmd["narrow/tenseal"]
        self.add("### Real TenSEAL vs the emulator: narrow student (`narrow/student2-h64.onnx`)", "",
                 *code(ct), *code(ce), "")
        e, t = self.r.json("narrow/emulate/simulation.json"), self.r.json("narrow/tenseal/simulation.json")
        src = f"`{self.R}/narrow/{{tenseal,emulate}}/simulation.json`"
        for s, c in ((t, ct), (e, ce)):
            if s is None:
                self.add(not_run(c), "")
        rows = []
        for name, s in (("tenseal (real CKKS)", t), ("emulate", e)):
            if s is None:
                continue
            p = s.get("params") or {}
            rows.append([name, num(s.get("n_examples")), num(s.get("accuracy")),
                         f"{num(100 * s['agreement'], 2)}%" if s.get("agreement") is not None else "n/a",
                         sci(s.get("max_logit_error")), f"{s.get('refreshes')} ({s.get('refresh_label', 'refresh')})",
                         f"N = {p.get('poly_modulus')}, chain {p.get('coeff_bits')}, 2^{p.get('scale_bits')}",
                         secs(s.get("seconds_per_example")), secs(s.get("seconds"))])
        if rows:
            self.add(*table(["backend", "examples", "accuracy", "agreement with plain", "max logit error",
                             "refreshes per pass", "CKKS", "time per example", "wall time"], rows), "")
        rep = self.r.json("narrow/report-L2-len8/report.json")
        if t is not None and rep is not None and rep.get("latency_seconds") and t.get("backend_seconds"):
            est, got = float(rep["latency_seconds"]), float(t["backend_seconds"])
            self.add(f"The depth report's latency model on the same graph, level budget and length "
                     f"(`{self.cmd['narrow/report']}`) predicted {secs(est)} for this pass; TenSEAL took {secs(got)} "
                     f"(estimate / measured = {est / got:.2f}), with {rep.get('bootstraps_total')} refresh points "
                     f"planned against {t.get('refreshes')} performed.", "")
        elif t is not None:
            self.add(not_run(self.cmd["narrow/report"]), "")
        what = "TenSEAL vs emulate prediction agreement (#6)"
        goal = f">= {100 * TENSEAL_MIN_AGREEMENT:g}%"
        if e is None or t is None:
            self.target(what, goal, "not run", None, src, "not run")
            return
        pe, pt = e.get("predictions"), t.get("predictions")
        if not isinstance(pe, list) or not isinstance(pt, list):
            self.add("No per-example predictions in " + ("both files" if not pe and not pt else
                                                          "the emulate file" if not pe else "the tenseal file")
                     + " (written by an older `cgf-fhe simulate`): agreement not computable.", "")
            self.target(what, goal, "n/a", None, src, "not computable (no predictions)")
            return
        k = min(len(pe), len(pt))
        why = []
        le, lt = e.get("labels"), t.get("labels")
        if isinstance(le, list) and isinstance(lt, list) and le[:k] != lt[:k]:
            why.append("their labels differ (not the same examples)")
        if e.get("max_length") != t.get("max_length"):
            why.append(f"max length {e.get('max_length')} vs {t.get('max_length')}")
        if why or k == 0:
            msg = "; ".join(why) or "no common examples"
            self.add(f"TenSEAL and emulate runs are not comparable: {msg}.", "")
            self.target(what, goal, "n/a", None, src, f"not comparable: {msg}")
            return
        same = sum(1 for a, b in zip(pe[:k], pt[:k]) if a == b)
        frac = same / k
        st = self.target(what, goal, f"{100 * frac:.2f}% ({same}/{k})", frac >= TENSEAL_MIN_AGREEMENT, src)
        self.add(f"TenSEAL vs emulate prediction agreement over the {k} examples both ran: **{100 * frac:.2f}% "
                 f"({same}/{k})** (target {goal}: {st}).", "")
        trained = None
        ck = self.r.json("narrow/student2-h64/cgf_fhe.json")
        if isinstance(ck, dict):
            trained = (ck.get("data") or {}).get("max_length")
        if trained and t.get("max_length") and int(t["max_length"]) < int(trained):
            self.add(f"The examples are truncated to {t['max_length']} tokens (the student was trained at {trained}), "
                     "which is why the plaintext accuracy drops: the run measures encrypted-vs-plaintext agreement "
                     "on identical inputs, not the student's accuracy. Memory, not time, sets the length: the "
                     "ciphertexts alive at once grow with the sequence length (one per element), and `simulate "
                     "--backend tenseal` refuses a run whose estimated peak exceeds the available memory.", "")
        mem = t.get("memory")
        if isinstance(mem, dict) and mem.get("estimated_peak_bytes"):
            self.add(f"Memory estimate of the run: {mem['peak_ciphertexts']:,} ciphertexts alive at the peak (node "
                     f"`{mem.get('peak_node')}`), about {mem['estimated_peak_bytes'] / 2**30:.1f} GiB.", "")
        if k < math.ceil(1 / (1 - TENSEAL_MIN_AGREEMENT)):
            self.add(f"With {k} examples one disagreement already falls below {100 * TENSEAL_MIN_AGREEMENT:g}%: the run "
                     "is too small to show the target, only to refute it.", "")


# ------------------------------------------------------------------------------------------------ CLI

def build(runs_dir: str | Path, output: str | Path, img_dir: str | Path | None = None,
          calib_dir: str | Path | None = None) -> str:
    """Write the page to ``output`` (and its PNGs to ``img_dir``, default ``<output dir>/img``); returns the text."""
    root = Path(runs_dir)
    out = Path(output)
    page = Page(Runs(root, str(runs_dir)), out, Path(img_dir) if img_dir else out.parent / "img",
                Path(calib_dir) if calib_dir else HERE / "results")
    text = page.build()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="runs folder written by benchmarks/run_all.sh")
    ap.add_argument("-o", "--output", default="docs/results.md")
    ap.add_argument("--img-dir", help="where the PNGs go (default: img/ next to the output)")
    ap.add_argument("--calibration-dir", help="emulator_calibration_*.json folder (default: benchmarks/results)")
    a = ap.parse_args(argv)
    if not Path(a.runs).is_dir():
        print(f"make_results: runs folder {a.runs} does not exist", file=sys.stderr)
        return 2
    build(a.runs, a.output, a.img_dir, a.calibration_dir)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
