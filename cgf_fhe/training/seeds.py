"""Seed sets and teachers: CE fine-tuning of one seed or a seed set, the exact teachers distillation trains
once and reuses, and the CGF coefficient sweep (folder layout: :mod:`cgf_fhe.layout`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from .. import __version__, layout
from ..models import is_checkpoint, read_settings, resolve_model, save_checkpoint
from . import engine
from .engine import CEStep, clear_state
from .evaluate import summarize_seeds, format_summary, mean_std
from .recipes import Recipe
from .common import (RunOptions, STATE_SUBDIR, TrainingError, _as_recipe, _backbone_of, _barrier, _done, _finish,
                     _is_main, _log, _run_key, _seed_checkpoint, _seed_dirs, _select_settings, _skip_finished,
                     _write_json, collator, load_data)


def finetune(model: str = "tiny", out_dir: str | os.PathLike = "out/finetune", softmax: str = "exact",
             coeff: float | None = None, seed: int = 42, recipe: Recipe | str | None = None,
             opts: RunOptions | None = None) -> dict:
    """CE fine-tune one seed of ``model`` (backbone name or checkpoint) into the checkpoint ``out_dir``.

    Returns the checkpoint settings (``settings["dev"]`` = best dev metrics)."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    if softmax == "cgf" and coeff is None:
        coeff = 0.5
    settings = {
        "kind": "finetune", "softmax": softmax, "coeff": float(coeff) if softmax == "cgf" else None,
        "recipe": recipe.to_dict(), "seed": int(seed), "init": str(model), "teacher": None, "layer_map": None,
        "data": opts.data_settings(recipe), "cgf_fhe_version": __version__,
    }
    if opts.resume and (s := _skip_finished(out, settings, "finetune")):
        return s
    net, tok, src_settings = resolve_model(model, softmax, coeff, seed)
    if recipe.reinit_layers:
        from ..models import reinit_top_layers

        try:
            settings["reinitialized"] = reinit_top_layers(net, recipe.reinit_layers, seed)
        except ValueError as exc:
            raise TrainingError(f"--reinit-layers: {exc}") from exc
    train, dev, select = load_data(tok, opts, recipe, with_select=True)
    state_dir = out / STATE_SUBDIR
    if not opts.resume:
        clear_state(state_dir)
    tag = f"finetune {softmax}" + (f" c={coeff:g}" if softmax == "cgf" else "") + f" seed {seed}"
    res = engine.fit(net, CEStep(), train, dev, collator(tok), recipe, seed=seed, state_dir=state_dir,
              resume=opts.resume, device=opts.device, mixed_precision=opts.mixed_precision,
              progress=opts.progress, stop_after=opts.stop_after, desc=tag, run_info=_run_key(settings),
              select_dataset=select)
    settings.update({
        "status": "done" if res.completed else "partial", "dev": res.best_metrics, "best_epoch": res.best_epoch,
        "best_at": res.best_at, "history": res.history, "seconds_per_epoch": res.seconds_per_epoch,
        **_select_settings(res, select),
        "backbone": _backbone_of(net) or str(model),
    })
    if src_settings.get("fhe"):
        settings["fhe"] = src_settings["fhe"]
    if not res.completed:
        _log(f"[{tag}] stopped after epoch {len(res.history)}/{recipe.epochs}; continue with --resume")
        return settings
    if _is_main(opts):
        save_checkpoint(net, tok, out, settings)
        _finish(out, state_dir, opts)
    _barrier(opts)
    return settings


def _read_reference(reference: str | os.PathLike | None, seeds: Sequence[int]) -> dict | None:
    """{seed: dev metrics} from a multi-seed run folder (reference/seed<S>/) or a single checkpoint."""
    if reference is None:
        return None
    ref = Path(reference)
    if is_checkpoint(ref):
        m = read_settings(ref)["dev"]
        return {s: m for s in seeds}
    out = {}
    for s in seeds:
        d = layout.seed_dir(ref, s)
        if not is_checkpoint(d):
            raise TrainingError(f"reference run {ref} has no checkpoint for seed {s} ({d})")
        out[s] = read_settings(d)["dev"]
    return out


def finetune_seeds(model: str, out_dir, seeds: Sequence[int], softmax: str = "exact", coeff: float | None = None,
                   recipe: Recipe | str | None = None, opts: RunOptions | None = None,
                   reference: str | os.PathLike | None = None) -> dict:
    """Fine-tune each seed into ``out_dir/seed<S>`` and write ``out_dir/summary.json``."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    runs = {}
    for s, d in _seed_dirs(out, seeds, seeds[0]):
        st = finetune(model, d, softmax, coeff, s, recipe, opts)
        if st.get("status") != "done":
            return {"status": "partial"}
        runs[s] = st
    ref = _read_reference(reference, list(runs))
    summary = {
        "kind": "finetune", "softmax": softmax, "coeff": coeff, "model": str(model), "recipe": recipe.to_dict(),
        "seeds": list(runs), **summarize_seeds({s: r["dev"] for s, r in runs.items()}, ref),
        "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in runs.values()]),
        "reference_run": str(reference) if reference else None,
        "runs": {str(s): str(_seed_dirs(out, [s], s)[0][1]) for s in runs},
    }
    if _is_main(opts):
        _write_json(out / layout.SUMMARY_FILE, summary)
    _log(format_summary(summary, softmax))
    return summary


def _teacher_dir(teacher, out: Path, seed: int, multi: bool) -> tuple[Path, bool]:
    """(teacher checkpoint dir for this seed, given_by_user)."""
    if teacher is not None:
        return _seed_checkpoint(Path(teacher), seed, "--teacher"), True
    return layout.teacher_dir(out, seed, multi), False


def _ensure_teacher(model: str, tdir: Path, seed: int, recipe: Recipe, opts: RunOptions) -> dict:
    """Train the exact teacher into ``tdir`` once; reuse it when it is finished and compatible."""
    s = _done(tdir)
    if s is not None:
        data_keys = ("max_length", "max_train_samples")  # what changes the trained weights
        cached_recipe = Recipe.from_dict(s.get("recipe") or {}).finetune_fields()
        want = {"backbone": str(model), "seed": int(seed), **{f"recipe.{k}": v for k, v in recipe.finetune_fields().items()},
                **{f"data.{k}": opts.data_settings(recipe)[k] for k in data_keys}}
        have = {"backbone": s.get("init"), "seed": s.get("seed"), **{f"recipe.{k}": v for k, v in cached_recipe.items()},
                **{f"data.{k}": (s.get("data") or {}).get(k) for k in data_keys}}
        diff = [f"{k}: cached {have[k]!r} vs requested {want[k]!r}" for k in want if want[k] != have[k]]
        if diff:
            raise TrainingError(f"cached teacher {tdir} was trained with different settings ({'; '.join(diff)}); "
                                "pass --teacher, use another -o, or delete that folder")
        _log(f"[distill] using cached teacher {tdir} (dev accuracy {s['dev']['accuracy']:.4f})")
        return s
    _log(f"[distill] training the exact teacher (seed {seed}) into {tdir}")
    return finetune(model, tdir, "exact", None, seed, recipe, opts)


def sweep(model: str = "tiny", coeffs: Iterable[float] = (0.5, 0.65, 0.8), out_dir="out/sweep",
          seeds: Sequence[int] = (42,), recipe: Recipe | str | None = None, opts: RunOptions | None = None,
          with_exact: bool = False) -> dict:
    """CE-only CGF fine-tunes per coefficient (and optionally an exact reference on the same seeds)."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    seeds = [int(s) for s in seeds]
    reference = None
    rows = []
    if with_exact:
        ex = finetune_seeds(model, out / "exact", seeds, "exact", None, recipe, opts)
        if ex.get("status") == "partial":
            return ex
        reference = out / "exact"
        rows.append({"softmax": "exact", "coeff": None, "accuracy": ex["accuracy"], "f1": ex["f1"]})
    for c in coeffs:
        summ = finetune_seeds(model, out / f"c{c:g}", seeds, "cgf", float(c), recipe, opts, reference)
        if summ.get("status") == "partial":
            return summ
        rows.append({"softmax": "cgf", "coeff": float(c), "accuracy": summ["accuracy"], "f1": summ["f1"]})
    result = {"kind": "sweep", "model": str(model), "seeds": seeds, "recipe": recipe.to_dict(), "rows": rows}
    if _is_main(opts):
        _write_json(out / layout.SWEEP_FILE, result)
    _log(format_sweep(result))
    return result


def format_sweep(result: dict) -> str:
    head = f"{'softmax':<8} {'coeff':>6}  {'accuracy':>18}  {'f1':>18}  {'paired diff acc':>18}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        a, f = r["accuracy"], r["f1"]
        d = a.get("paired_diff")
        diff = f"{d['mean']:+.4f} +- {d['std']:.4f}" if d else ""
        c = f"{r['coeff']:g}" if r["coeff"] is not None else "-"
        lines.append(f"{r['softmax']:<8} {c:>6}  {a['mean']:.4f} +- {a['std']:.4f}  {f['mean']:.4f} +- {f['std']:.4f}"
                     f"  {diff:>18}")
    return "\n".join(lines)
