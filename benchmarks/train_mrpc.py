#!/usr/bin/env python
"""The real training run: exact teacher and CGF+KD student on full MRPC, a seed set, paired comparison.

    python benchmarks/train_mrpc.py                       # minilm, seeds 42 7 123, c=0.5, beta=10
    python benchmarks/train_mrpc.py --max-train-samples 64 --max-eval-samples 32 --epochs 1 --model tiny \\
        -o out/train_mrpc_smoke                            # seconds-long check that the script works

Per seed S it trains the exact teacher into OUT/teacher/seed<S> (reused if already there) and distills the
CGF student from it into OUT/seed<S> (same as ``cgf-fhe distill --seeds ...``). Interrupted runs continue
where they stopped (resume is on by default; ``--no-resume`` starts over). Prints dev accuracy and F1 as
mean +- std (sample std over seeds), the paired difference student - teacher, seconds per epoch, and
writes everything to OUT/results.json (or --json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_PP = 1.5  # CGF+KD within 1.5 accuracy points of the teacher (paired mean)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--preset", default="minilm", help="recipe preset (reference | minilm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 123])
    p.add_argument("--coeff", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("-o", "--output", default="out/train_mrpc")
    p.add_argument("--json", help="results file (default OUT/results.json)")
    p.add_argument("--data-dir")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import datasets
    import torch

    from cgf_fhe.training import api
    from cgf_fhe.training.evaluate import format_summary
    from cgf_fhe.training.recipes import get_recipe

    datasets.disable_progress_bars()
    recipe = get_recipe(args.preset, epochs=args.epochs, lr=args.lr, max_length=args.max_length, kd_beta=args.beta)
    opts = api.RunOptions(data_dir=args.data_dir, max_length=args.max_length,
                          max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                          device=args.device, resume=not args.no_resume, progress=not args.no_progress)
    if not recipe.tuned:
        print(f"note: preset {recipe.name!r} is a placeholder ({recipe.note})", flush=True)
    print(f"recipe: {json.dumps(recipe.to_dict(), sort_keys=True)}", flush=True)
    t0 = time.perf_counter()
    summary = api.distill(args.model, args.output, coeff=args.coeff, seeds=args.seeds, recipe=recipe, opts=opts)
    wall = time.perf_counter() - t0
    if summary.get("status") == "partial":
        print("stopped before the end; rerun the same command to continue", file=sys.stderr)
        return 1

    st, te = summary["student"], summary["teacher"]
    sec = summary["seconds_per_epoch"]
    diff_pp = 100 * st["accuracy"]["paired_diff"]["mean"]
    n_dev = api.read_settings(summary["runs"][str(summary["seeds"][0])])["dev"]["n"]
    lines = [
        f"MRPC dev ({n_dev} examples), model {args.model}, preset {recipe.name}, CGF c={args.coeff:g}, "
        f"KD beta={recipe.kd_beta:g}, seeds {' '.join(map(str, summary['seeds']))}",
        format_summary(te, "teacher"),
        format_summary(st, "CGF+KD"),
        f"paired difference CGF+KD - teacher: accuracy {diff_pp:+.2f} +- {100 * st['accuracy']['paired_diff']['std']:.2f} pp, "
        f"f1 {100 * st['f1']['paired_diff']['mean']:+.2f} +- {100 * st['f1']['paired_diff']['std']:.2f} pp",
        f"seconds per epoch: teacher {sec['teacher']['mean']:.1f} +- {sec['teacher']['std']:.1f}, "
        f"student {sec['student']['mean']:.1f} +- {sec['student']['std']:.1f}  (wall {wall:.0f} s this invocation)",
        f"target (paired accuracy difference >= -{TARGET_PP} pp): {'met' if diff_pp >= -TARGET_PP else 'NOT met'}",
    ]
    print("\n".join(lines))
    out = {
        "summary": summary, "printed": lines, "target_pp": TARGET_PP, "target_met": diff_pp >= -TARGET_PP,
        "wall_seconds": wall, "argv": sys.argv if argv is None else ["train_mrpc.py", *argv],
        "env": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "platform": platform.platform()},
    }
    path = Path(args.json) if args.json else Path(args.output) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
